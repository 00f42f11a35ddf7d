#!/usr/bin/env bash
# Is this sohoa box healthy? Used by monitoring (exit status) and by upgrade.yml's health gate.
#   usage: health-check.sh edge|central [--home DIR] [--venv DIR] [--expect-version V]
#                          [--max-status-age S] [--drain-window S] [--url HEALTHZ_URL]
# edge:    the unit is active, runs the expected version, its status file is fresh (the service
#          writes it at least once a minute), no alarm is raised, and the outbox drains (empty,
#          or a receipt arrived within --drain-window seconds).
# central: the unit is active, runs the expected version, /healthz says ok with MQTT connected.
# Exit 0 healthy; 1 unhealthy, one line per problem on stderr; 64 usage (sysexits, like sohoa).
set -o errexit -o nounset -o pipefail

usage() { echo "usage: $0 edge|central [--home DIR] [--venv DIR] [--expect-version V] [--max-status-age S] [--drain-window S] [--url URL]" >&2; exit 64; }

role="${1:-}"
[ "${role}" = edge ] || [ "${role}" = central ] || usage
shift
home="/var/lib/sohoa-${role}"
venv=/opt/sohoa/venv
expect_version=""
max_status_age=150
drain_window=900
url="http://127.0.0.1:8080/healthz"
while [ "$#" -gt 0 ]; do
  [ "$#" -ge 2 ] || usage
  case "$1" in
    --home) home="$2" ;;
    --venv) venv="$2" ;;
    --expect-version) expect_version="$2" ;;
    --max-status-age) max_status_age="$2" ;;
    --drain-window) drain_window="$2" ;;
    --url) url="$2" ;;
    *) usage ;;
  esac
  shift 2
done

problems=()
unit="sohoa-${role}.service"
state="$(systemctl is-active "${unit}" 2>/dev/null || true)"
[ "${state}" = active ] || problems+=("${unit} is ${state:-unknown}")

version="$("${venv}/bin/sohoa" --version 2>/dev/null | awk '{print $2}' || true)"
if [ -n "${expect_version}" ] && [ "${version}" != "${expect_version}" ]; then
  problems+=("installed version is ${version:-none}, expected ${expect_version}")
fi

if [ "${role}" = edge ]; then
  status_file="${home}/status.json"
  if [ ! -f "${status_file}" ]; then
    problems+=("${status_file} does not exist (the service never got going)")
  else
    age=$(( $(date +%s) - $(stat -c %Y "${status_file}") ))
    [ "${age}" -le "${max_status_age}" ] || problems+=("status file is ${age} s old (service stuck?)")
  fi
  owner="$(stat -c %U "${home}")"
  # As the service's own user: a root reader could leave root-owned SQLite side files behind.
  if report="$(runuser -u "${owner}" -- "${venv}/bin/sohoa" edge status --home "${home}" --json 2>&1)"; then
    verdict="$(printf '%s' "${report}" | "${venv}/bin/python" -c '
import datetime as dt, json, sys
window = float(sys.argv[1])
r = json.load(sys.stdin)
for alarm in r["alarms"]:
    print("alarm: " + alarm)
last, queued = r["last_receipt_at"], r["queued_docs"]
if queued:
    age = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(last)).total_seconds() if last else None
    if age is None or age > window:
        print(f"outbox not draining: {queued} document(s) queued, last receipt {last}")
' "${drain_window}")"
    while IFS= read -r line; do
      [ -z "${line}" ] || problems+=("${line}")
    done <<< "${verdict}"
  else
    problems+=("sohoa edge status failed: ${report##*$'\n'}")
  fi
else
  if ! body="$("${venv}/bin/python" -c '
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
    print(response.read().decode())
' "${url}" 2>&1)"; then
    problems+=("${url} did not answer 200: ${body##*$'\n'}")
  elif [[ "${body}" != *'"mqtt_connected": true'* ]]; then
    problems+=("central is not connected to the broker: ${body}")
  fi
fi

if [ "${#problems[@]}" -gt 0 ]; then
  for problem in "${problems[@]}"; do
    echo "$(hostname): ${problem}" >&2
  done
  exit 1
fi
echo "$(hostname): ${role} healthy (sohoa ${version})"
