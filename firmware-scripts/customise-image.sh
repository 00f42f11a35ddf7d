#!/usr/bin/env bash
# Prepare a Debian 12 or Raspberry Pi OS (bookworm) image offline, before Ansible reaches the box:
# hostname, an admin user with an SSH key (Ansible's way in), password logins off, SSH on, and the
# first-boot unit (expand the filesystem, clock, report in for enrollment).
#   usage: customise-image.sh (--image FILE.img | --root DIR) --hostname NAME --admin USER
#                             --ssh-key FILE.pub [--report-url URL] [--ntp "SERVER ..."]
# Runs as root on any architecture: nothing inside the image is executed (useradd --root only
# edits its files), so an arm64 Raspberry Pi image can be prepared on an x86 laptop.
set -o errexit -o nounset -o pipefail

usage() {
  echo "usage: $0 (--image FILE.img | --root DIR) --hostname NAME --admin USER --ssh-key FILE.pub [--report-url URL] [--ntp \"SERVERS\"]" >&2
  exit 64
}

here="$(cd "$(dirname "$0")" && pwd)"
image="" root="" hostname="" admin="" ssh_key="" report_url="" ntp="0.vn.pool.ntp.org 1.asia.pool.ntp.org"
while [ "$#" -gt 0 ]; do
  [ "$#" -ge 2 ] || usage
  case "$1" in
    --image) image="$2" ;;
    --root) root="$2" ;;
    --hostname) hostname="$2" ;;
    --admin) admin="$2" ;;
    --ssh-key) ssh_key="$2" ;;
    --report-url) report_url="$2" ;;
    --ntp) ntp="$2" ;;
    *) usage ;;
  esac
  shift 2
done
if [ -z "${image}${root}" ] || [ -z "${hostname}" ] || [ -z "${admin}" ] || [ -z "${ssh_key}" ]; then
  usage
fi
[[ "${hostname}" =~ ^[a-z0-9][a-z0-9-]{0,62}$ ]] || { echo "hostname must be a-z, 0-9, '-': ${hostname}" >&2; exit 65; }
[[ "${admin}" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || { echo "bad admin user name: ${admin}" >&2; exit 65; }
[ -r "${ssh_key}" ] || { echo "cannot read ${ssh_key}" >&2; exit 66; }
[ "$(id -u)" -eq 0 ] || { echo "run as root (loop devices, file ownership)" >&2; exit 77; }

loop="" mnt=""
cleanup() {
  if [ -n "${mnt}" ]; then
    umount "${mnt}/boot/firmware" 2>/dev/null || true
    umount "${mnt}" 2>/dev/null || true
    rmdir "${mnt}" 2>/dev/null || true
  fi
  if [ -n "${loop}" ]; then
    losetup --detach "${loop}" || true
  fi
}
trap cleanup EXIT

if [ -n "${image}" ]; then
  loop="$(losetup --find --show --partscan "${image}")"
  mnt="$(mktemp -d)"
  # The root filesystem is the largest ext4 partition; Raspberry Pi OS has a FAT boot one before it.
  rootpart="$(lsblk --list --noheadings --bytes --output NAME,FSTYPE,SIZE "${loop}" \
    | awk '$2 == "ext4" {print $3, $1}' | sort -n | tail -n 1 | awk '{print $2}')"
  [ -n "${rootpart}" ] || { echo "no ext4 root partition in ${image}" >&2; exit 65; }
  mount "/dev/${rootpart}" "${mnt}"
  bootpart="$(lsblk --list --noheadings --output NAME,FSTYPE "${loop}" | awk '$2 == "vfat" {print $1; exit}')"
  if [ -n "${bootpart}" ] && [ -d "${mnt}/boot/firmware" ]; then
    mount "/dev/${bootpart}" "${mnt}/boot/firmware"
  fi
  root="${mnt}"
fi
[ -f "${root}/etc/os-release" ] || { echo "${root} does not look like a root filesystem" >&2; exit 65; }

echo "${hostname}" > "${root}/etc/hostname"
cat > "${root}/etc/hosts" <<HOSTS
127.0.0.1 localhost
127.0.1.1 ${hostname}
::1 localhost ip6-localhost ip6-loopback
HOSTS

if ! grep -q "^${admin}:" "${root}/etc/passwd"; then
  useradd --root "${root}" --create-home --shell /bin/bash --groups sudo "${admin}"
fi
# Key only: lock the password so nobody logs in with a default one.
usermod --root "${root}" --lock "${admin}"
uid="$(awk -F: -v u="${admin}" '$1 == u {print $3}' "${root}/etc/passwd")"
gid="$(awk -F: -v u="${admin}" '$1 == u {print $4}' "${root}/etc/passwd")"
home="${root}/home/${admin}"
install -d -m 0700 -o "${uid}" -g "${gid}" "${home}/.ssh"
install -m 0600 -o "${uid}" -g "${gid}" "${ssh_key}" "${home}/.ssh/authorized_keys"
install -d -m 0750 "${root}/etc/sudoers.d"
printf '%s ALL=(ALL) NOPASSWD:ALL\n' "${admin}" > "${root}/etc/sudoers.d/90-sohoa-admin"
chmod 0440 "${root}/etc/sudoers.d/90-sohoa-admin"

install -d -m 0755 "${root}/etc/ssh/sshd_config.d"
cat > "${root}/etc/ssh/sshd_config.d/50-sohoa.conf" <<'SSHD'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
SSHD
# Raspberry Pi OS turns SSH on when the boot partition holds a file named "ssh".
if [ -d "${root}/boot/firmware" ]; then
  touch "${root}/boot/firmware/ssh"
fi
install -d -m 0755 "${root}/etc/systemd/system/multi-user.target.wants"
if [ -f "${root}/lib/systemd/system/ssh.service" ]; then
  ln -sf /lib/systemd/system/ssh.service "${root}/etc/systemd/system/multi-user.target.wants/ssh.service"
fi

install -d -m 0755 "${root}/usr/local/lib/sohoa" "${root}/etc/sohoa"
install -m 0755 "${here}/first-boot.sh" "${root}/usr/local/lib/sohoa/first-boot"
install -m 0755 "${here}/health-check.sh" "${root}/usr/local/lib/sohoa/health-check"
install -m 0644 "${here}/sohoa-first-boot.service" "${root}/etc/systemd/system/sohoa-first-boot.service"
ln -sf /etc/systemd/system/sohoa-first-boot.service \
  "${root}/etc/systemd/system/multi-user.target.wants/sohoa-first-boot.service"
cat > "${root}/etc/sohoa/first-boot.env" <<ENV
SOHOA_REPORT_URL=${report_url}
SOHOA_NTP_SERVERS="${ntp}"
ENV
chmod 0644 "${root}/etc/sohoa/first-boot.env"
# Every copy of the image must get its own machine id and SSH host keys on first boot.
: > "${root}/etc/machine-id"
rm -f "${root}"/etc/ssh/ssh_host_*_key "${root}"/etc/ssh/ssh_host_*_key.pub
echo "customised ${image:-${root}}: hostname ${hostname}, admin ${admin}, first boot reports to ${report_url:-nobody}"
