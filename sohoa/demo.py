"""``sohoa demo``: the whole path on one machine — Mosquitto, central, one edge, sample pages.

Everything is real (broker, tesseract ``vie``, encryption, receipts); only the distance is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from central import worker as central_worker
from central.admin import commands as central_commands
from edge import cli as edge_cli
from edge import config as edge_config
from edge.service import EdgeService
from protocol.names import nfc
from sohoa.localbroker import free_port, mosquitto_binary, wait_for_ports

DEVICE_ID = "xa-tan-trao"


def _scans(scans: Path | None, pages: int, into: Path) -> list[Path]:
    if scans is not None:
        files = sorted(p for p in scans.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise SystemExit(f"no files in {scans}")
        return files
    from edge.samples import generate_samples
    return [sample.path for sample in generate_samples(into, pages=pages)]


def _drop_like_a_scanner(files: list[Path], watch: Path) -> None:
    """Write each file under a temporary name, then rename: what most network scanners do."""
    for source in files:
        target = watch / nfc(source.name)
        temp = watch / f".{target.name}.part"
        shutil.copyfile(source, temp)
        temp.rename(target)


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done}/{total}"


async def _run(home: Path, files: list[Path], *, http_port: int, exit_when_synced: bool,
               as_json: bool, give_up_after: float, login: tuple[str, str]) -> dict[str, Any]:
    """The services' phase: SIGTERM and Ctrl-C cancel it, which stops central and the edge in order
    (the edge shuts its OCR workers down) instead of interrupting whatever code was running."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await _services(home, files, http_port=http_port, exit_when_synced=exit_when_synced,
                               as_json=as_json, give_up_after=give_up_after, login=login)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _services(home: Path, files: list[Path], *, http_port: int, exit_when_synced: bool,
                    as_json: bool, give_up_after: float, login: tuple[str, str]) -> dict[str, Any]:
    central_home, edge_home = home / "central", home / "edge"
    ready = asyncio.Event()
    central_task = asyncio.create_task(central_worker.serve(central_home, ready=ready), name="central")
    await asyncio.wait_for(ready.wait(), 30)
    cfg = edge_config.load(edge_home)
    # A demo should not make people wait for a slow scanner: settle after one quiet second.
    cfg = dataclasses.replace(cfg, intake=dataclasses.replace(cfg.intake, quiet_seconds=1.0,
                                                              check_interval=0.25),
                              # The clerk's page, on loopback: the demo is not an office box.
                              status_page=dataclasses.replace(cfg.status_page, listen="127.0.0.1:0"))
    service = EdgeService(cfg)
    edge_task = asyncio.create_task(service.run(), name="edge")
    try:
        await asyncio.wait_for(service.ready.wait(), 30)
        started = time.monotonic()
        _drop_like_a_scanner(files, cfg.watch_dir)
        total = len(files)
        done = failed = 0
        interactive = sys.stdout.isatty() and not as_json
        while time.monotonic() - started < give_up_after:
            for task in (edge_task, central_task):
                if task.done():   # a dead service would otherwise leave the bar waiting forever
                    raise SystemExit(f"sohoa demo: {task.get_name()} stopped: {task.exception()!r}")
            stats = await service.outbox.stats()
            done = stats.counts.get("delivered", 0)
            failed = stats.counts.get("failed", 0)
            if not as_json:
                line = f"{_bar(done, total)} receipted, {failed} failed"
                print(("\r" + line) if interactive else line, end="" if interactive else "\n", flush=True)
            if done + failed >= total:
                break
            await asyncio.sleep(0.5 if interactive else 2.0)
        seconds = time.monotonic() - started
        if interactive:
            print()
        summary = {
            "documents": total,
            "receipted": done,
            "failed": failed,
            "pages": service.counters.pages,
            "bytes_original": service.counters.original_bytes,
            "bytes_compressed_encrypted": service.counters.ciphertext_bytes,
            "bytes_on_wire": service.uplink.bytes_on_wire,
            "ocr_seconds": round(service.counters.ocr_seconds, 2),
            "seconds": round(seconds, 2),
            "dashboard": f"http://127.0.0.1:{http_port}/",
            "dashboard_user": login[0],
            "dashboard_password_file": login[1],
            "api_token_file": str(central_home / "api-token"),
            "home": str(home),
        }
        keep_serving = not exit_when_synced and done + failed >= total
        if not as_json:
            _print_summary(summary, keep_serving=keep_serving)
        if keep_serving:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
    finally:
        # Also when cancelled (SIGTERM, Ctrl-C): wait for both to finish their own cleanup.
        for task in (edge_task, central_task):
            task.cancel()
        for task in (edge_task, central_task):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return summary


def _print_summary(summary: dict[str, Any], *, keep_serving: bool) -> None:
    mib = 1024 * 1024
    print(f"documents: {summary['receipted']}/{summary['documents']} receipted, "
          f"{summary['failed']} failed; pages: {summary['pages']}")
    print(f"bytes: original {summary['bytes_original'] / mib:.2f} MiB, compressed+encrypted "
          f"{summary['bytes_compressed_encrypted'] / mib:.2f} MiB, on the wire "
          f"{summary['bytes_on_wire'] / mib:.2f} MiB")
    print(f"time: {summary['seconds']} s (OCR {summary['ocr_seconds']} s of engine time)")
    login = f"sign in as {summary['dashboard_user']}, password in {summary['dashboard_password_file']}"
    if keep_serving:
        print(f"dashboard: {summary['dashboard']} ({login}); Ctrl-C to stop")
    else:
        # A temporary home (and the password file in it) is removed on exit: point at it only as kept.
        print(f"dashboard: stopped with the demo; `sohoa demo` without --exit-when-synced keeps it up "
              f"(sign in as {summary['dashboard_user']}; with --home DIR the password stays in "
              f"DIR/{Path(summary['dashboard_password_file']).name})")


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(*, scans: Path | None, pages: int, home: Path | None, exit_when_synced: bool, as_json: bool,
         timeout: float) -> int:
    """Run the demo; SIGTERM and Ctrl-C stop it cleanly: the services are cancelled (the OCR workers
    shut down with the edge), the broker stopped, and a temporary home with its keys removed."""
    previous = signal.signal(signal.SIGTERM, _interrupted)
    temporary = home is None
    home = home or Path(tempfile.mkdtemp(prefix="sohoa-demo-"))
    try:
        return _main(scans=scans, pages=pages, home=home, exit_when_synced=exit_when_synced, as_json=as_json,
                     timeout=timeout)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if temporary:
            # Keys, the device bundle's secret and the dashboard password lived here: not left in /tmp.
            shutil.rmtree(home, ignore_errors=True)


def _main(*, scans: Path | None, pages: int, home: Path, exit_when_synced: bool, as_json: bool,
          timeout: float) -> int:
    home.mkdir(parents=True, exist_ok=True)
    broker_port, device_port, http_port = free_port(), free_port(), free_port()
    central_home = home / "central"
    # Two listeners, as in production: central's own, and the devices' (plain on loopback).
    central_commands.init(central_home, broker_url=f"mqtt://127.0.0.1:{broker_port}",
                          http=f"127.0.0.1:{http_port}", device_url=f"mqtt://127.0.0.1:{device_port}")
    log_path = home / "mosquitto.out"
    with log_path.open("ab") as log:
        broker = subprocess.Popen([mosquitto_binary(), "-c", str(central_home / "mosquitto.conf")],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_ports(central_home / "mosquitto.conf", proc=broker)
        operator_password = secrets.token_urlsafe(12)
        central_commands.user_add(central_home, "demo", "admin", operator_password)
        # The password goes to a 0600 file, not to the terminal or a log.
        password_file = home / "dashboard-password"
        password_file.unlink(missing_ok=True)
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(operator_password + "\n")
        bundle = home / "bundle.toml"
        central_commands.enroll(central_home, DEVICE_ID, bundle)
        edge_cli.init(home / "edge", bundle, home / "scans")
        bundle.unlink()  # the bundle holds the device's secret key: it has served its purpose
        files = _scans(scans, pages, home / "samples")
        if not as_json:
            print(f"sohoa demo in {home}: broker :{broker_port} (central) :{device_port} (devices), "
                  f"central http :{http_port}, "
                  f"{len(files)} document(s)")
        summary = asyncio.run(_run(home, files, http_port=http_port, exit_when_synced=exit_when_synced,
                                   as_json=as_json, give_up_after=timeout,
                                   login=("demo", str(password_file))))
    finally:
        with contextlib.suppress(ProcessLookupError):
            broker.terminate()
        try:
            broker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
    if as_json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
    # Success means every document receipted; a quarantined sample is a failure worth an exit code.
    return 0 if summary["receipted"] == summary["documents"] else 1
