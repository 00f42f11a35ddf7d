"""The CLI surface: `central init/enroll/run` with --help, exit codes, and a clean SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from central import catalog
from central.admin import broker_config
from central.cli import register
from central.config import load_config
from tests.central.conftest import read_bundle
from tests.support.broker import free_port, running_broker, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """\
import argparse, sys
from central.admin import broker_config
from central import catalog
from central.cli import register
from central.config import load_config
p = argparse.ArgumentParser(prog="sohoa")
register(p.add_subparsers(required=True))
a = p.parse_args()
sys.exit(a.func(a))
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sohoa")
    register(parser.add_subparsers(required=True))
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv", [("central",), ("central", "init"), ("central", "enroll"),
                                  ("central", "run"), ("central", "verify"),
                                  ("central", "revoke")])
def test_every_level_has_help(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(*argv, "--help")
    assert exited.value.code == 0 and "usage:" in capsys.readouterr().out


def test_init_enroll_and_errors_as_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    args = parse("central", "init", "--home", str(home), "--broker", f"mqtt://127.0.0.1:{free_port()}",
                 "--http", "127.0.0.1:0")
    assert args.func(args) == 0
    again = parse("central", "init", "--home", str(home))
    assert again.func(again) == 66 and "already exists" in capsys.readouterr().err
    bundle = tmp_path / "xa.bundle"
    enroll = parse("central", "enroll", "xa-tan-trao", "--home", str(home), "--out", str(bundle))
    assert enroll.func(enroll) == 0 and bundle.stat().st_mode & 0o777 == 0o600
    assert enroll.func(enroll) == 65 and "already enrolled" in capsys.readouterr().err
    reserved = parse("central", "enroll", "central", "--home", str(home), "--out", str(tmp_path / "c"))
    assert reserved.func(reserved) == 65
    bad = parse("central", "enroll", "Xã Tân Trào", "--home", str(home), "--out", str(tmp_path / "c"))
    assert bad.func(bad) == 65
    config = home / "central.toml"
    config.write_text("brokr = 1\n" + config.read_text())
    typo = parse("central", "enroll", "xa-khac", "--home", str(home), "--out", str(tmp_path / "d"))
    assert typo.func(typo) == 78
    assert "unknown key brokr = 1" in capsys.readouterr().err


def test_run_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "home"
    broker_port, http_port = free_port(), free_port()
    parse_args = parse("central", "init", "--home", str(home), "--broker", f"mqtt://127.0.0.1:{broker_port}",
                       "--http", f"127.0.0.1:{http_port}", "--device-broker", f"mqtt://127.0.0.1:{free_port()}")
    assert parse_args.func(parse_args) == 0
    with running_broker(home / "mosquitto.conf", broker_port, tmp_path / "broker.log"):
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, "central", "run", "--home", str(home)],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_for_port(http_port, timeout=20)
            deadline = time.monotonic() + 20
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as r:
                    if b'"mqtt_connected": true' in r.read() or time.monotonic() > deadline:
                        break
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=20)[0].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, output
        assert "Traceback" not in output, output


def _cli(*argv: str) -> int:
    args = parse(*argv)
    return int(args.func(args))


def test_bulk_enrollment_from_a_csv_is_all_or_none_and_fast(tmp_path: Path) -> None:
    """Issue 11: `central enroll --from devices.csv` for Ansible, at in-process speed (≤ 50 ms/device)."""
    home = tmp_path / "home"
    assert _cli("central", "init", "--home", str(home), "--broker", f"mqtt://127.0.0.1:{free_port()}",
                "--http", "127.0.0.1:0") == 0

    devices = tmp_path / "devices.csv"
    ids = [f"xa-{n:04d}" for n in range(200)]
    devices.write_text("device_id,commune\n" + "".join(f"{d},Xã số {n}\n" for n, d in enumerate(ids)),
                       encoding="utf-8")
    out = tmp_path / "bundles"
    started = time.perf_counter()
    assert _cli("central", "enroll", "--from", str(devices), "--out-dir", str(out), "--home", str(home)) == 0
    per_device = (time.perf_counter() - started) / len(ids)
    print(f"\nbulk enrolment: {per_device * 1000:.1f} ms per device ({len(ids)} devices)")
    assert per_device < 0.05
    paths = load_config(home).paths
    assert set(broker_config.read_users(paths)) == set(ids)
    bundle = read_bundle(out / "xa-0007.toml")
    assert bundle.device_id == "xa-0007" and (out / "xa-0007.toml").stat().st_mode & 0o777 == 0o600
    conn = catalog.connect(paths.catalog, readonly=True)
    assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == len(ids)
    # One bad row (listed twice, enrolled already, or reserved) and nothing of the file is enrolled.
    again = tmp_path / "again.csv"
    again.write_text("xa-new-1\nxa-new-2\nxa-0007\n", encoding="utf-8")
    assert _cli("central", "enroll", "--from", str(again), "--out-dir", str(out), "--home", str(home)) == 65
    assert conn.execute("SELECT count(*) FROM devices WHERE id LIKE 'xa-new-%'").fetchone()[0] == 0
    assert "xa-new-1" not in broker_config.read_users(paths)
    reserved = tmp_path / "reserved.csv"
    reserved.write_text("device_id\nsohoa-central-w1\n", encoding="utf-8")
    assert _cli("central", "enroll", "--from", str(reserved), "--out-dir", str(out),
                "--home", str(home)) == 65


def test_a_replacement_names_a_revoked_device_once(tmp_path: Path) -> None:
    """`enroll NEW --replaces OLD` (or a replaces column): OLD must exist, be revoked (its identity
    never sends again) and not be replaced already; a refused row enrolls nothing."""
    home = tmp_path / "home"
    assert _cli("central", "init", "--home", str(home), "--broker", f"mqtt://127.0.0.1:{free_port()}",
                "--http", "127.0.0.1:0") == 0

    def enroll(device: str, *extra: str) -> int:
        return _cli("central", "enroll", device, "--home", str(home),
                    "--out", str(tmp_path / f"{device}.toml"), *extra)

    assert enroll("xa-cu") == 0
    assert enroll("xa-moi", "--replaces", "xa-cu") == 65            # still active: revoke it first
    assert enroll("xa-moi", "--replaces", "xa-khong-co") == 65      # no such device
    assert _cli("central", "revoke", "xa-cu", "--home", str(home)) == 0
    assert enroll("xa-moi", "--replaces", "xa-cu") == 0
    assert enroll("xa-moi-2", "--replaces", "xa-cu") == 65          # already replaced by xa-moi
    assert _cli("central", "device", "remove", "xa-cu", "--home", str(home)) != 0   # xa-moi names it
    table = tmp_path / "devices.csv"
    table.write_text("device_id,replaces\nxa-moi-3,\nxa-moi-4,xa-cu\n", encoding="utf-8")
    assert _cli("central", "enroll", "--from", str(table), "--out-dir", str(tmp_path / "b"),
                "--home", str(home)) == 65
    conn = catalog.connect(load_config(home).paths.catalog, readonly=True)
    rows = dict(conn.execute("SELECT id, replaces FROM devices").fetchall())
    assert rows == {"xa-cu": None, "xa-moi": "xa-cu"}
    assert "xa-moi-3" not in broker_config.read_users(load_config(home).paths)
    table.write_text("device_id,replaces,commune\nxa-moi-3,,Xã Kim Bình\nxa-moi-4,,Xã Trung Yên\n",
                     encoding="utf-8")
    assert _cli("central", "enroll", "--from", str(table), "--out-dir", str(tmp_path / "b"),
                "--home", str(home)) == 0
    assert conn.execute("SELECT count(*) FROM devices WHERE replaces IS NULL").fetchone()[0] == 3
