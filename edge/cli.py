"""``sohoa edge …``: init from an enrollment bundle, run the service, show status."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import tomli_w

from edge import config as edge_config
from edge.config import CONFIG_NAME, KEY_PATH, Bundle, ConfigError
from edge.fsutil import atomic_write_bytes
from protocol.messages import Status, decode


def register(subparsers: Any) -> None:
    edge = subparsers.add_parser("edge", help="the commune edge box",
                                 description="Run and inspect an edge box.")
    sub = edge.add_subparsers(dest="edge_command", required=True)

    init = sub.add_parser("init", help="configure this box from an enrollment bundle",
                          description="Create HOME/edge.toml and the device signing key from the secret "
                                      "bundle written by `sohoa central enroll`.")
    init.add_argument("--home", type=Path, required=True, help="the edge's state directory")
    init.add_argument("--bundle", type=Path, required=True, help="bundle file from `sohoa central enroll`")
    init.add_argument("--watch", type=Path, required=True, help="folder the scanner writes into")
    init.add_argument("--force", action="store_true", help="overwrite an existing configuration")
    init.set_defaults(func=_init)

    run = sub.add_parser("run", help="run the edge service until SIGTERM",
                         description="Watch, OCR, package and sync until stopped.")
    run.add_argument("--home", type=Path, required=True)
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="counts per state, bytes queued, last receipt, failures",
                            description="Read the outbox (safe while the service runs).")
    status.add_argument("--home", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)

    retry = sub.add_parser(
        "retry", help="take refused scans back in (from the refused folder in the scan share)",
        description="Move refused scans from the refused folder (default _Lỗi in the scan folder) back "
                    "into the scan folder, where the box takes them again as new scans. Use after "
                    "fixing the cause (re-scanning, re-enrolling a cloned box…).")
    retry.add_argument("--home", type=Path, required=True)
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("names", nargs="*", default=[], metavar="NAME",
                       help="file name(s) as shown in the refused folder")
    which.add_argument("--all", action="store_true", help="every refused scan")
    retry.set_defaults(func=_retry)


def init(home: Path, bundle_path: Path, watch: Path, *, force: bool = False) -> Path:
    """Write ``edge.toml`` (0600) and ``keys/device.key`` (0600) from the bundle."""
    bundle = Bundle.load(bundle_path)
    config_path = home / CONFIG_NAME
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path} exists: pass --force to overwrite")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(0o700)
    (home / KEY_PATH).parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write_bytes(home / KEY_PATH, bundle.signing_key.encode() + b"\n", mode=0o600)
    broker: dict[str, Any] = {"url": bundle.broker.url, "username": bundle.broker.username,
                              "password": bundle.broker.password}
    if bundle.ca_cert:
        # The broker's CA travels in the bundle; the box pins it for mqtts://.
        ca_path = home / "keys" / "ca.pem"
        atomic_write_bytes(ca_path, bundle.ca_cert.encode(), mode=0o600)
        broker["ca_file"] = str(ca_path.resolve())
    elif bundle.broker.ca_file:
        broker["ca_file"] = bundle.broker.ca_file
    document = {
        "device_id": bundle.device_id,
        "watch_dir": str(watch.resolve()),
        "broker": broker,
        "central": {"encryption_public_key": bundle.central.encryption_public_key,
                    "receipt_public_key": bundle.central.receipt_public_key},
    }
    atomic_write_bytes(config_path, tomli_w.dumps(document).encode(), mode=0o600)
    watch.mkdir(parents=True, exist_ok=True)
    edge_config.load(home)  # validate what we wrote, with the same rules as `run`
    return config_path


def _init(args: argparse.Namespace) -> int:
    path = init(args.home, args.bundle, args.watch, force=args.force)
    print(f"wrote {path}; start with: sohoa edge run --home {args.home}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from edge.service import run
    return run(args.home)


async def status_report(home: Path) -> dict[str, Any]:
    from edge.outbox import Outbox
    from edge.quarantine import list_failed

    cfg = edge_config.load(home)
    outbox = await Outbox.open(cfg.outbox_path, cap_bytes=cfg.outbox.cap_bytes)
    try:
        stats = await outbox.stats()
    finally:
        await outbox.close()
    failed = list_failed(cfg.refused_dir)
    alarms: list[str] = []
    last_error = None
    service_updated = None
    if cfg.status_path.exists():
        # Written by the running service; it holds what only the service knows (alarms, errors).
        status = decode(f"sohoa/v1/up/{cfg.device_id}/status", cfg.status_path.read_bytes())
        if isinstance(status, Status):
            alarms, last_error, service_updated = list(status.alarms), status.last_error, status.updated_at
    return {
        "device_id": cfg.device_id,
        "counts": dict(stats.counts),
        "queued_docs": stats.queued_docs,
        "queued_bytes": stats.queued_bytes,
        "cap_bytes": cfg.outbox.cap_bytes,
        "oldest_age_s": round(stats.oldest_age_s, 1),
        "last_receipt_at": _iso(stats.last_receipt_at),
        "failed": [{"name": f.name, "reason": f.reason, "detail": f.detail, "code": f.code,
                    "since": str(f.since)} for f in failed],
        "refused_dir": str(cfg.refused_dir),
        "alarms": alarms,
        "last_error": last_error,
        "service_updated_at": service_updated,
    }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def _status(args: argparse.Namespace) -> int:
    report = asyncio.run(status_report(args.home))
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(f"device {report['device_id']}")
    for state, count in sorted(report["counts"].items()):
        print(f"  {state:<10} {count}")
    mib = 1024 * 1024
    print(f"queued: {report['queued_docs']} document(s), {report['queued_bytes'] / mib:.1f} MiB "
          f"of {report['cap_bytes'] / mib:.0f} MiB, oldest waiting {report['oldest_age_s']:.0f} s")
    print(f"last receipt: {report['last_receipt_at'] or 'never'}")
    if report["last_error"]:
        print(f"last error: {report['last_error']}")
    for alarm in report["alarms"]:
        print(f"ALARM: {alarm}")
    if report["failed"]:
        print(f"refused ({len(report['failed'])}), in the {report['refused_dir']} folder of the scan share:")
        for item in report["failed"]:
            print(f"  {item['name']}: {item['reason']}")
    return 0


def retry(home: Path, names: list[str], *, every: bool = False) -> list[Path]:
    """Move refused scans back into the scan folder; return their new paths."""
    from edge.quarantine import list_failed, restore

    cfg = edge_config.load(home)
    wanted = [item.name for item in list_failed(cfg.refused_dir)] if every else names
    return [restore(cfg.refused_dir, name, cfg.watch_dir) for name in wanted]


def _retry(args: argparse.Namespace) -> int:
    try:
        moved = retry(args.home, args.names, every=args.all)
    except FileNotFoundError as exc:
        print(f"sohoa: {exc}")
        return 1
    for path in moved:
        print(f"back in the scan folder: {path.name}")
    if not moved:
        print("nothing to retry: the refused folder is empty")
    return 0
