"""Running Mosquitto on this machine: find the binary, pick a free loopback port, wait for it.

Shared by the demo and the test suite, so both start the broker the same way.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerStartError(RuntimeError):
    """Mosquitto is missing, exited, or never listened."""


def mosquitto_binary() -> str:
    """The mosquitto executable (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    for candidate in MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise BrokerStartError("mosquitto not found: `make demo` / `make test` install it, "
                           "or apt-get install mosquitto")


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never one this process was already given.

    The kernel may hand the same ephemeral port to two binds in a row once the first socket is
    closed, so ``init(broker=free_port(), devices=free_port())`` could get one port twice.
    """
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError("no unused loopback port left")


def listener_ports(config: Path) -> list[int]:
    """The ports of every ``listener PORT [ADDRESS]`` line of a mosquitto.conf, in order."""
    ports = []
    for line in config.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "listener" and words[1].isascii() and words[1].isdigit():
            ports.append(int(words[1]))
    return ports


def wait_for_ports(config: Path, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once every listener of ``config`` accepts connections on 127.0.0.1."""
    for port in listener_ports(config):
        wait_for_port(port, timeout=timeout, proc=proc)


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once something listens on 127.0.0.1:``port``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerStartError(f"mosquitto exited with {proc.returncode}; see its log")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise BrokerStartError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")
