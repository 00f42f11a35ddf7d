#!/usr/bin/env bash
# Install the Debian packages sohoa needs on this machine (edge box, central server or a developer
# machine). Idempotent: packages already present are not reinstalled and apt-get update runs only
# when something is missing.
#   usage: install-packages.sh [edge|central|dev|fleet-ci]
# fleet-ci: what the fleet test needs on the CI machine to boot Debian containers and reach them.
set -o errexit -o nounset -o pipefail

role="${1:-dev}"
common=(python3 python3-venv python3-dev ca-certificates sqlite3)
# libjxl-tools: JPEG originals travel as lossless JPEG XL (edge.transcode), central restores them.
edge=(tesseract-ocr tesseract-ocr-vie libjxl-tools)
central=(mosquitto mosquitto-clients openssl libjxl-tools)
# fonts-liberation2: Times-compatible serif for the OCR quality test set (Decree 30 prescribes Times);
# hunspell-vi: the syllable list bench/ocr_quality.py checks diacritic errors against; qpdf and
# poppler-utils (pdfsig, pdftotext): independent checks of the archival PDF/A and its signature;
# chromium: the browser tests (Playwright drives Debian's build, never a downloaded one);
# prometheus: promtool, which checks and unit-tests monitoring/sohoa-alerts.yml;
# postgresql: the PostgreSQL catalog's contract suite and the three-worker kill test start their own cluster.
dev=(fonts-dejavu-core fonts-liberation2 hunspell-vi poppler-utils qpdf shellcheck chromium prometheus
     postgresql)
fleet_ci=(debootstrap systemd-container smbclient openssh-client)

case "${role}" in
  edge) wanted=("${common[@]}" "${edge[@]}") ;;
  central) wanted=("${common[@]}" "${central[@]}") ;;
  dev) wanted=("${common[@]}" "${edge[@]}" "${central[@]}" "${dev[@]}") ;;
  fleet-ci) wanted=("${fleet_ci[@]}") ;;
  *) echo "usage: $0 [edge|central|dev|fleet-ci]" >&2; exit 64 ;;
esac

missing=()
for pkg in "${wanted[@]}"; do
  if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("${pkg}")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
  else
    echo "missing packages: ${missing[*]} (run as root or install them)" >&2
    exit 1
  fi
else
  sudo_cmd=()
fi

echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -q
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
