#!/usr/bin/env bash
# First boot of a commune box (sohoa-first-boot.service, once): make SSH host keys, grow the root
# filesystem to the card, use network time, and report in so an admin can enroll the box with
# `ansible-playbook enroll.yml --limit HOST`. Safe to re-run; each step checks before it acts.
#   environment (from /etc/sohoa/first-boot.env): SOHOA_REPORT_URL, SOHOA_NTP_SERVERS
set -o errexit -o nounset -o pipefail

report_url="${SOHOA_REPORT_URL:-}"
ntp_servers="${SOHOA_NTP_SERVERS:-}"
done_marker=/var/lib/sohoa/first-boot.done
log() { echo "first-boot: $*"; }

# 1. SSH host keys: the image was shipped without any, so every box has its own.
if ! ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1; then
  ssh-keygen -A
  log "generated SSH host keys"
fi

# 2. Grow the root partition and filesystem to the whole card (growpart from cloud-guest-utils).
root_dev="$(findmnt --noheadings --output SOURCE /)"
if [ -b "${root_dev}" ] && command -v growpart >/dev/null 2>&1; then
  disk="/dev/$(lsblk --noheadings --output PKNAME "${root_dev}" | head -n 1)"
  part="$(cat "/sys/class/block/$(basename "${root_dev}")/partition")"
  if growpart "${disk}" "${part}"; then
    resize2fs "${root_dev}"
    log "grew ${root_dev} to the end of ${disk}"
  else
    log "${root_dev} already fills ${disk}"
  fi
else
  log "not growing the root filesystem (no block device or no growpart)"
fi

# 3. Clock: a box without a battery-backed clock boots in the past; receipts and alarms need time.
if [ -n "${ntp_servers}" ]; then
  install -d -m 0755 /etc/systemd/timesyncd.conf.d
  printf '[Time]\nNTP=%s\n' "${ntp_servers}" > /etc/systemd/timesyncd.conf.d/sohoa.conf
fi
if command -v timedatectl >/dev/null 2>&1; then
  timedatectl set-ntp true || log "cannot enable NTP (no systemd-timesyncd?)"
fi

# 4. Report in: hostname, machine id, addresses and the SSH host key fingerprint, so the admin
#    can check the key before the first Ansible run. A few quick tries (this runs before sshd
#    starts): failing to report is not fatal, the admin can still find the box by its hostname.
if [ -n "${report_url}" ]; then
  fingerprint="$(ssh-keygen -l -f /etc/ssh/ssh_host_ed25519_key.pub | awk '{print $2}')"
  addresses="$(hostname -I 2>/dev/null || true)"
  payload="$(python3 -c 'import json, sys; print(json.dumps(dict(zip(["hostname", "machine_id", "addresses", "ssh_ed25519"], sys.argv[1:]))))' \
    "$(hostname)" "$(cat /etc/machine-id)" "${addresses}" "${fingerprint}")"
  for attempt in 1 2 3; do
    if python3 - "${report_url}" "${payload}" <<'PY'
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        sys.exit(0 if response.status < 300 else 1)
except OSError as exc:
    print(f"first-boot: cannot report to {sys.argv[1]}: {exc}")
    sys.exit(1)
PY
    then
      log "reported in to ${report_url}"
      break
    fi
    log "report attempt ${attempt} failed; retrying"
    sleep $(( attempt * 5 ))
  done
fi

install -d -m 0755 "$(dirname "${done_marker}")"
date --iso-8601=seconds > "${done_marker}"
log "done"
