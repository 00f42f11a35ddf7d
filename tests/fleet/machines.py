"""Booted Debian 12 containers for the fleet test: debootstrap once, systemd-nspawn per host.

Facts this rests on (measured on the CI machine class): there is no Docker engine and PID 1 is not
systemd, but ``systemd-nspawn --register=no --keep-unit -b`` boots a full systemd from a
debootstrap tree; without those two flags nspawn fails with "Failed to open system bus". nspawn
shares the host network, so each container's sshd, broker, HTTP and Samba listen on their own
loopback ports. Every step has a timeout; ``Machine.stop`` always ends the container (SIGTERM is a
clean poweroff, then SIGKILL of its init, which ends its whole PID namespace).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
MIRROR = os.environ.get("SOHOA_FLEET_MIRROR", "http://deb.debian.org/debian")
# What Ansible needs to reach a bare box: an init, sshd and a Python; sudo for become_user.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "openssh-server", "sudo")
HOST_TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container",
              "smbclient": "smbclient", "ssh": "openssh-client", "nsenter": "util-linux"}


class FleetError(RuntimeError):
    """A step of the container harness failed (with its output)."""


def run(argv: list[str], *, timeout: float, check: bool = True, input_text: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input_text,
                              env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FleetError(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from exc
    if check and done.returncode != 0:
        raise FleetError(f"exit {done.returncode}: {' '.join(argv)}\n"
                         f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def why_not_here() -> str | None:
    """A reason this machine cannot boot containers, or None."""
    if os.geteuid() != 0:
        return "the fleet test needs root (debootstrap, systemd-nspawn)"
    if not Path("/proc/self/ns/pid").exists():
        return "no PID namespaces on this kernel"
    missing = [package for tool, package in HOST_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        return f"missing host tools (apt-get install {' '.join(sorted(set(missing)))})"
    return None


def build_base(cache: Path) -> Path:
    """debootstrap minbase + BASE_PACKAGES into ``cache/base`` once; later calls reuse it."""
    base = cache / "base"
    done = cache / "base.complete"
    if done.exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(base),
         MIRROR], timeout=900)
    done.touch()
    return base


@dataclass
class Machine:
    """One booted container: a copy of the base tree, its own hostname and sshd port."""

    name: str
    root: Path
    ssh_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    _log_file: object = field(default=None, repr=False)

    def prepare(self, base: Path, public_key: str) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        run(["cp", "-a", str(base), str(self.root)], timeout=300)
        (self.root / "etc/hostname").write_text(self.name + "\n")
        (self.root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {self.name}\n")
        (self.root / "etc/machine-id").write_text("")
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(public_key)
        (ssh_dir / "authorized_keys").chmod(0o600)
        (self.root / "etc/ssh/sshd_config.d/sohoa-ci.conf").write_text(
            f"Port {self.ssh_port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nUseDNS no\n")

    def boot(self, *, timeout: float = 90) -> None:
        self._log_file = self.log.open("ab")
        self.process = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "--boot", "--console=passive",
             f"--machine={self.name}", f"--directory={self.root}"],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FleetError(f"{self.name}: systemd-nspawn exited {self.process.returncode}: "
                                 f"{self.log.read_text(errors='replace')[-2000:]}")
            if self.init_pid() is not None:
                state = self.sh("systemctl is-system-running", check=False, timeout=20).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.5)
        raise FleetError(f"{self.name}: not running after {timeout:.0f} s")

    def init_pid(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            pids = children.read_text().split()
            return int(pids[0]) if pids else None
        return None

    def sh(self, command: str, *, timeout: float = 60, check: bool = True,
           input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside the container (its namespaces, its root)."""
        pid = self.init_pid()
        if pid is None:
            raise FleetError(f"{self.name} is not running")
        return run(["nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "--",
                    "/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG=C.UTF-8", "SYSTEMD_PAGER=", "/bin/sh", "-c", command],
                   timeout=timeout, check=check, input_text=input_text)

    def stop(self, *, timeout: float = 30) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            init = self.init_pid()
            process.send_signal(signal.SIGTERM)   # nspawn asks the container's systemd to power off
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                if init is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(init, signal.SIGKILL)   # ends every process in its PID namespace
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        self.process = None
        if self._log_file is not None:
            self._log_file.close()   # type: ignore[attr-defined]
            self._log_file = None
