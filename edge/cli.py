"""``sohoa edge …``: init from an enrollment bundle, run the service, show status."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import tomli_w

from edge import config as edge_config
from edge.clerk import (
    ACK_NAME,
    RECENT,
    SERVICE_LOCK,
    VIEW_NAME,
    age,
    alarm_text,
    lang_from_env,
    refused_json,
    scan_of,
    size,
    t,
    view_is_fresh,
    vn_time,
)
from edge.config import CONFIG_NAME, KEY_PATH, Bundle, ConfigError
from edge.fsutil import atomic_write_bytes, disk_free, lock_is_held
from protocol.errors import ProtocolError
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
    init.add_argument("--abandon-queue", action="store_true",
                      help="with --force: hand the old identity's unsent scans back to the "
                           "refused folder (send them with `edge retry --all`) and move the rest "
                           "of its queue aside (HOME/abandoned-TIME/) instead of refusing; "
                           "nothing is deleted")
    init.add_argument("--status-group", metavar="GROUP",
                      help="let this group read the box's status (sohoa edge status without root): the home "
                           "becomes 2710 with this group, the status files 0640; keys, outbox stay private")
    init.set_defaults(func=_init)

    run = sub.add_parser("run", help="run the edge service until SIGTERM",
                         description="Watch, OCR, package and sync until stopped.")
    run.add_argument("--home", type=Path, required=True)
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="link, queue, refused and recent scans (Vietnamese, no root)",
                            description="Vietnamese unless LANG/LC_ALL say English; Vietnam time. Reads the "
                                        "status files the running service writes (readable by the home's "
                                        "group), so it needs no root; a status older than a minute is shown "
                                        "as 'service not running'.")
    status.add_argument("--home", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)

    ack = sub.add_parser("ack", help="acknowledge the box's last error (it stops being reported)",
                         description="Mark the errors so far as read: the running service stops "
                                     "reporting its last error (to the status page, `edge status` and "
                                     "central). Alarms whose cause persists stay. Errors clear by "
                                     "themselves after a day.")
    ack.add_argument("--home", type=Path, required=True)
    ack.set_defaults(func=_ack)

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


def unsent(outbox_path: Path) -> int:
    """Documents in the outbox that central has not receipted (taken, packaged or being sent)."""
    import sqlite3

    if not outbox_path.exists():
        return 0
    conn = sqlite3.connect(f"file:{outbox_path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT count(*) FROM docs"
                           " WHERE state IN ('stable', 'packaged', 'sending')").fetchone()
    except sqlite3.Error:
        return 0   # no docs table: nothing was ever queued
    finally:
        conn.close()
    return int(row[0])


def _set_aside_queue(home: Path, *, abandon: bool) -> None:
    """Before re-initialising a box: refuse to strand unsent documents, or move them aside intact.

    Unsent envelopes are signed with the old identity's key; under a new bundle central would refuse
    them, and a new outbox would never look at them again.
    """
    outbox = home / "outbox.db"
    waiting = unsent(outbox)
    if not waiting:
        return
    if not abandon:
        raise ConfigError(f"{home} holds {waiting} document(s) not yet receipted by central; re-initialising "
                          "would strand them. Let them drain first (sohoa edge status), or pass "
                          "--abandon-queue to move the old queue aside (nothing is deleted)")
    _hand_back_unsent(home, outbox)
    aside = home / f"abandoned-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}"
    aside.mkdir(mode=0o700)
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm", "envelopes", "processed", "work",
                 "status.json", VIEW_NAME):
        if (home / name).exists():
            (home / name).rename(aside / name)


def _hand_back_unsent(home: Path, outbox: Path) -> None:
    """The originals the old identity never got receipted go back to the clerk (the refused folder,
    with a note), so `sohoa edge retry --all` sends them under the new identity; in the abandoned
    folder they would sit under tid names, sent by nobody. Re-runnable after a crash: a row whose
    held file is gone was handed back already. Scans still in the scan folder are simply taken
    again by the new identity."""
    import sqlite3

    from edge.quarantine import free_name, place

    try:
        refused = edge_config.load(home).refused_dir
    except ConfigError:
        return   # the old config is unreadable: nothing tells where the clerk looks; all goes aside
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT tid, name, src_path FROM docs WHERE place = 'held'"
                            " AND state IN ('stable', 'packaged', 'sending') ORDER BY seq").fetchall()
    finally:
        conn.close()
    for tid, name, src_path in rows:
        held = Path(src_path)
        if not os.path.lexists(held):
            continue
        refused.mkdir(parents=True, exist_ok=True)
        target = free_name(refused, name)
        place(held, target, code="re_enrolled", tid=tid, name=name,
              detail="the box was enrolled again before central receipted this document")


def init(home: Path, bundle_path: Path, watch: Path, *, force: bool = False, abandon_queue: bool = False,
         status_group: str | None = None) -> Path:
    """Write ``edge.toml`` (0600) and ``keys/device.key`` (0600) from the bundle.

    With ``status_group`` the home is 2710 and owned by that group: members may open the status
    files by name (``status.json``, ``status-view.json``, 0640; setgid so new ones keep the group)
    but not list the home, and everything else in it stays 0600/0700.
    """
    bundle = Bundle.load(bundle_path)
    config_path = home / CONFIG_NAME
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path} exists: pass --force to overwrite")
    if config_path.exists():
        if lock_is_held(home / SERVICE_LOCK):
            raise ConfigError(f"`sohoa edge run` is serving {home}: stop it first (systemctl stop "
                              "sohoa-edge); re-initialising would move its running queue away")
        _set_aside_queue(home, abandon=abandon_queue)
    gid = None
    if status_group is not None:
        import grp

        try:
            gid = grp.getgrnam(status_group).gr_gid
        except KeyError:
            raise ConfigError(f"--status-group {status_group!r}: no such group (create it first, "
                              "e.g. groupadd --system sohoa-status)") from None
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if gid is not None:
        os.chown(home, -1, gid)
        home.chmod(0o2710)
    else:
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
    path = init(args.home, args.bundle, args.watch, force=args.force, abandon_queue=args.abandon_queue,
                status_group=args.status_group)
    print(f"wrote {path}; start with: sohoa edge run --home {args.home}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from edge.service import run
    return run(args.home)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_status(path: Path) -> Status | None:
    """The service's last status file, whoever's it is (a box re-initialised for another device
    still has the old one: it is shown as stale, never a traceback)."""
    data = _read_json(path)
    device = data.get("device") if data else None
    if not isinstance(device, str):
        return None
    try:
        status = decode(f"sohoa/v1/up/{device}/status", path.read_bytes())
    except (ProtocolError, OSError, ValueError):
        return None
    return status if isinstance(status, Status) else None


_Counts = tuple[dict[str, int], int, int, float, float | None, list[dict[str, Any]]]


async def _from_outbox(cfg: edge_config.EdgeConfig) -> _Counts:
    from edge.outbox import Outbox

    outbox = await Outbox.open(cfg.outbox_path, cap_bytes=cfg.outbox.cap_bytes)
    try:
        stats = await outbox.stats()
        recent = [scan_of(doc).to_json() for doc in await outbox.recent(RECENT)]
    finally:
        await outbox.close()
    return (dict(stats.counts), stats.queued_docs, stats.queued_bytes, stats.oldest_age_s,
            stats.last_receipt_at, recent)


async def status_report(home: Path) -> dict[str, Any]:
    """What `sohoa edge status` shows, from the files the running service writes (0640, readable by
    the home's group) — the private outbox is read only by its owner, when the service is not running.
    """
    from edge.quarantine import list_failed

    now = time.time()
    view = _read_json(home / VIEW_NAME)
    status = _read_status(home / "status.json")
    try:
        cfg: edge_config.EdgeConfig | None = edge_config.load(home)
    except (ConfigError, PermissionError):
        if view is None and status is None:
            raise   # not a box's home, or nothing in it this user may read: say so (EX_CONFIG/EX_NOPERM)
        cfg = None   # a member of the status group: edge.toml is the service's secret
    if cfg is not None and view is not None and view.get("device") != cfg.device_id:
        view = None   # written under another identity (edge init --force with another bundle)
    if cfg is not None and status is not None and status.device != cfg.device_id:
        status = None
    # The service's lock says whether it runs; its files alone can mislead: on a full disk they stop
    # being rewritten, and a root `edge status` that took a running service for stopped would open
    # its outbox itself. The files decide only where the lock cannot be read (an older service).
    held = lock_is_held(home / SERVICE_LOCK)
    running = held if held is not None else view_is_fresh(view, now=now)
    device = cfg.device_id if cfg else (view or {}).get("device") or (status.device if status else "?")
    if running or cfg is None or not os.access(cfg.outbox_path, os.R_OK | os.W_OK):
        v = view or {}
        counts = dict(v.get("counts", {}))
        queued_docs, queued_bytes = int(v.get("queued_docs", 0)), int(v.get("queued_bytes", 0))
        oldest, last_receipt, recent = float(v.get("oldest_age_s", 0.0)), v.get("last_receipt_at"), \
            list(v.get("recent", []))
    else:
        counts, queued_docs, queued_bytes, oldest, last_receipt, recent = await _from_outbox(cfg)
    if cfg is not None:
        refused = [refused_json(item) for item in list_failed(cfg.refused_dir)]
        refused_dir, refused_folder = str(cfg.refused_dir), cfg.intake.refused_folder
    else:
        refused = list((view or {}).get("refused", []))
        refused_dir = refused_folder = str((view or {}).get("refused_folder", "_Lỗi"))
    return {
        "device_id": device,
        "service_running": running,
        "service_updated_at": status.updated_at if status else None,
        "view_written_at": _iso((view or {}).get("written_at")),
        "online": bool(running and view and view.get("online")),
        "link_error": (view or {}).get("link_error") if running else None,
        "disk_free_bytes": free if (free := _disk_free_now(home)) is not None else (view or {}).get(
            "disk_free_bytes", status.disk_free_bytes if status else None),
        "version": (view or {}).get("version") or (status.version if status else None),
        "counts": counts,
        "queued_docs": queued_docs,
        "queued_bytes": queued_bytes,
        "cap_bytes": cfg.outbox.cap_bytes if cfg else (view or {}).get("cap_bytes"),
        "oldest_age_s": round(oldest, 1),
        "last_receipt_at": _iso(last_receipt),
        # The refused scans the clerk can act on are the files in the refused folder; the count is
        # this list's length, never a separate number that could disagree with it.
        "failed": [{"name": f["name"], "reason": f["what_vi"], "reason_en": f["what_en"],
                    "todo": f["todo_vi"], "todo_en": f["todo_en"], "code": f["code"],
                    "detail": f["detail"],
                    "since": _iso(f["since"])}
                   for f in refused],
        "refused_dir": refused_dir,
        "refused_folder": refused_folder,
        "alarms": list(status.alarms) if status else list((view or {}).get("alarms", [])),
        "last_error": status.last_error if status else (view or {}).get("last_error"),
        "recent": recent,
    }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


_STATE_ORDER = ("stable", "packaged", "sending", "delivered")


def render_status(report: dict[str, Any], lang: str) -> str:
    """The report for a person: Vietnamese unless ``lang`` is 'en', Vietnam time, the pipeline's order."""
    def tr(key: str, **params: Any) -> str:
        return t(lang, key, **params)

    version = f" (sohoa {report['version']})" if report["version"] else ""
    lines = [f"{tr('device')}: {report['device_id']}{version}"]
    if report["service_running"]:
        lines.append(f"{tr('status_service')}: {tr('service_running')}")
    elif report["view_written_at"] or report["service_updated_at"]:
        last = report["view_written_at"] or report["service_updated_at"]
        lines.append(f"{tr('status_service')}: {tr('service_stopped', time=vn_time(last))}")
    else:
        lines.append(f"{tr('status_service')}: {tr('service_never')}")
    link = tr("online") if report["online"] else tr("offline")
    if report["link_error"]:
        link += " — " + tr("link_error", error=report["link_error"])
    lines.append(f"{tr('link')}: {link}")
    lines.append(f"{tr('disk_free')}: {size(report['disk_free_bytes'], lang)}")
    last_send = report["last_receipt_at"]
    if last_send:
        seconds = max(0.0, time.time() - dt.datetime.fromisoformat(last_send).timestamp())
        lines.append(f"{tr('last_send')}: {vn_time(last_send)} ({age(seconds, lang)})")
    else:
        lines.append(f"{tr('last_send')}: {tr('never')}")
    waiting = tr("waiting_value", docs=report["queued_docs"], bytes=size(report["queued_bytes"], lang))
    if report["cap_bytes"]:
        waiting += " — " + tr("queue_cap", used=size(report["queued_bytes"], lang),
                              cap=size(report["cap_bytes"], lang))
    if report["queued_docs"]:
        waiting += f"; {tr('oldest').lower()}: {age(report['oldest_age_s'], lang)}"
    lines.append(f"{tr('waiting')}: {waiting}")
    counts = report["counts"]
    shown = [f"{tr('state_' + state)} {counts.get(state, 0)}" for state in _STATE_ORDER]
    shown.append(f"{tr('state_failed')} {len(report['failed'])}")
    lines.append(f"{tr('counts')}: " + " · ".join(shown))
    for alarm in report["alarms"]:
        lines.append(f"{tr('alarms').upper()}: {alarm_text(lang, alarm)}")
    if report["last_error"]:
        lines.append(f"{tr('last_error')}: {report['last_error']}")
    failed = report["failed"]
    lines.append(f"{tr('refused_count', folder=report['refused_folder'])}: {len(failed)}")
    for item in failed:
        reason = item["reason"] if lang == "vi" else item["reason_en"]
        todo = item["todo"] if lang == "vi" else item["todo_en"]
        lines.append(f"  {item['name']} ({vn_time(item['since'])}): {reason}")
        lines.append(f"    {tr('todo')}: {todo}")
    if failed:
        lines.append(f"  {tr('retry')}")
    if report["recent"]:
        lines.append(f"{tr('recent')}:")
        for scan in report["recent"][:20]:
            lines.append(f"  {vn_time(scan['at'])}  {scan['name']} — {tr('stage_' + scan['stage'])}")
    return "\n".join(lines)


def _disk_free_now(home: Path) -> int | None:
    """Measured now, not the figure the service last wrote (which a full disk keeps from changing)."""
    try:
        return disk_free(home)
    except OSError:
        return None


def _status(args: argparse.Namespace) -> int:
    report = asyncio.run(status_report(args.home))
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(render_status(report, lang_from_env()))
    return 0


def _ack(args: argparse.Namespace) -> int:
    marker = args.home / ACK_NAME
    marker.touch(mode=0o600)
    os.utime(marker)
    print(t(lang_from_env(), "acknowledged"))
    return 0


def retry(home: Path, names: list[str], *, every: bool = False) -> list[Path]:
    """Move refused scans back into the scan folder; return their new paths."""
    from edge.quarantine import list_failed, restore

    cfg = edge_config.load(home)
    wanted = [item.name for item in list_failed(cfg.refused_dir)] if every else names
    return [restore(cfg.refused_dir, name, cfg.watch_dir) for name in wanted]


def _retry(args: argparse.Namespace) -> int:
    from edge.quarantine import RefusedScanMissing

    lang = lang_from_env()   # the clerk runs this: every refusal note tells them to
    try:
        moved = retry(args.home, args.names, every=args.all)
    except RefusedScanMissing as exc:
        print(f"sohoa: {t(lang, 'retry_missing', name=exc.name, folder=exc.folder)}")
        return 1
    for path in moved:
        print(t(lang, "retry_back", name=path.name))
    if not moved:
        print(t(lang, "retry_none"))
    return 0
