"""Start a real Mosquitto for tests: free loopback port, config on disk, stopped on exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sohoa.localbroker import free_port, listener_ports, mosquitto_binary, wait_for_port, wait_for_ports

__all__ = ["Broker", "anonymous_config", "free_port", "mosquitto_binary", "running_broker", "wait_for_port"]


@dataclass
class Broker:
    """A running Mosquitto; ``restart()`` and ``kill()`` serve the fault tests.

    ``port`` is the listener central (or a test's own client) uses; a generated central config has
    a second listener for devices, ``device_port`` (the same port for single-listener test configs).
    """

    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def device_port(self) -> int:
        others = [p for p in listener_ports(self.config) if p != self.port]
        return others[0] if others else self.port

    def start(self) -> None:
        logf = self.log.open("ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)],
                                     stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        wait_for_port(self.port, proc=self.proc)
        wait_for_ports(self.config, proc=self.proc)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def restart(self) -> None:
        self.stop()
        self.start()


def anonymous_config(directory: Path, port: int) -> Path:
    """A minimal MQTT v5-capable broker for tests that are not about auth."""
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_packet_size 1100000\n"
    )
    return conf


@contextlib.contextmanager
def running_broker(config: Path, port: int, log: Path) -> Iterator[Broker]:
    broker = Broker(config=config, port=port, log=log)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        if os.environ.get("SOHOA_SHOW_BROKER_LOG"):
            print(log.read_text(errors="replace"))
