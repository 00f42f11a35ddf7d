"""`sohoa edge run` / `central run` as systemd sees them: sd_notify over a real datagram socket,
the watchdog, SIGHUP reload without a restart, SIGTERM drain; and the CLI conventions
(--version, -v after the subcommand, --log-format, one exit-code table)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sohoa import cli, daemon
from tests.support.deployment import Deployment

ROOT = Path(__file__).resolve().parents[2]


class NotifySocket:
    """What systemd's notify socket receives (an abstract-namespace datagram socket)."""

    def __init__(self) -> None:
        self.name = f"@sohoa-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.seen: list[str] = []

    def wait_for(self, state: str, within: float) -> list[str]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                self.seen.extend(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                continue
            if state in self.seen:
                return self.seen
        raise AssertionError(f"{state} not received in {within} s; got {self.seen}")


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.sock.close()


def test_notify_speaks_the_socket_protocol(notify_socket: NotifySocket,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.name)
    assert daemon.notify("READY=1", "STATUS=up")
    assert notify_socket.wait_for("STATUS=up", 2) == ["READY=1", "STATUS=up"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not daemon.notify("READY=1")


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert daemon.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")   # meant for another process
    assert daemon.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    monkeypatch.delenv("WATCHDOG_PID")
    assert daemon.watchdog_interval() is None


def test_log_formats(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    assert daemon.configure_logging(logging.INFO, "json", stream=stream) == "json"
    logging.getLogger("sohoa.edge").warning("đã nhận %d trang", 3)
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "warning" and entry["msg"] == "đã nhận 3 trang" and entry["ts"]
    stream = io.StringIO()
    daemon.configure_logging(logging.INFO, "journal", stream=stream)
    logging.getLogger("sohoa.edge").error("boom")
    # journald adds the time itself and reads the priority from the prefix: no timestamp here.
    assert stream.getvalue() == "<3>sohoa.edge: boom\n"
    # auto: text with a timestamp unless stderr is the journal stream systemd connected.
    assert daemon.configure_logging(logging.INFO, "auto", stream=io.StringIO()) == "text"
    daemon.configure_logging(logging.WARNING, "text")


def test_version_verbose_after_subcommand_and_exit_codes(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("sohoa ")
    args = cli.build_parser().parse_args(["edge", "status", "--home", "h", "-v", "--log-format", "json"])
    assert args.verbose and args.log_format == "json"
    args = cli.build_parser().parse_args(["-v", "edge", "status", "--home", "h"])
    assert args.verbose and args.log_format == "auto"   # not reset by the subcommand's defaults
    with pytest.raises(SystemExit) as exited:
        cli.main(["edge", "no-such-command"])
    assert exited.value.code == cli.EX_USAGE
    # Missing or broken configuration is EX_CONFIG (78) on both sides; a missing home EX_NOINPUT.
    assert cli.main(["edge", "status", "--home", str(tmp_path / "nothing")]) == cli.EX_CONFIG
    assert cli.main(["central", "verify", "--home", str(tmp_path / "nothing")]) == cli.EX_NOINPUT
    assert cli.main(["edge", "run", "--home", str(tmp_path / "nothing")]) == cli.EX_CONFIG
    bad = tmp_path / "bad.bundle"
    bad.write_text("format = 'nope'\n")
    assert cli.main(["edge", "init", "--home", str(tmp_path / "e"), "--bundle", str(bad),
                     "--watch", str(tmp_path / "w")]) == cli.EX_CONFIG


def _sohoa(*argv: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sohoa.cli", *argv], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_edge_run_notifies_reloads_on_sighup_and_drains_on_sigterm(
        deployment: Deployment, notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": "400000", "OMP_THREAD_LIMIT": "1"}
    proc = _sohoa("edge", "run", "--home", str(deployment.edge_home), "--log-format", "json", env=env)
    try:
        notify_socket.wait_for("READY=1", 30)
        notify_socket.wait_for("WATCHDOG=1", 5)
        config = deployment.edge_home / "edge.toml"
        config.write_text(config.read_text() + "\n[uplink]\nrate_kbit = 256.0\n\n[log]\nlevel = \"debug\"\n")
        notify_socket.seen.clear()
        proc.send_signal(signal.SIGHUP)
        states = notify_socket.wait_for("READY=1", 10)
        assert states[0] == "RELOADING=1" and any(s.startswith("MONOTONIC_USEC=") for s in states)
        # A bad file is refused and the service keeps running with what it had.
        config.write_text(config.read_text() + "\n[uplink2]\nx = 1\n")
        notify_socket.seen.clear()
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("READY=1", 10)
        time.sleep(0.5)
        assert proc.poll() is None, "SIGHUP must never stop the service"
        notify_socket.seen.clear()
        proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1", 10)
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    messages = [entry["msg"] for entry in lines]
    assert any("uplink.rate_kbit=256" in m and m.startswith("reloaded") for m in messages), messages
    assert any(m.startswith("reload refused") and "uplink2" in m for m in messages), messages
    assert any(entry["level"] == "debug" for entry in lines), "log level reloaded to debug"
    assert "Traceback" not in output


def test_central_run_notifies_and_stops(deployment: Deployment, notify_socket: NotifySocket) -> None:
    proc = _sohoa("central", "run", "--home", str(deployment.central_home), "-v",
                  env={"NOTIFY_SOCKET": notify_socket.name})
    try:
        notify_socket.wait_for("READY=1", 30)
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING=1", 10)
        proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1", 10)
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert "reloaded: log level info" in output and "Traceback" not in output
