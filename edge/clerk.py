"""What the clerk reads, in one place: the string tables, Vietnam time, sizes, and the status view.

The view (``HOME/status-view.json``) is written by the running service every few seconds, 0640,
so `sohoa edge status` and anyone in the box's status group can read it without root and without
touching the private outbox. A view older than ``STALE_AFTER_S`` means the service is not running.
Strings come from ``edge/i18n/<lang>.json`` (Vietnamese unless ``LANG``/``?lang=`` says English).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from edge.alarms import ACCESS_REFUSED, DISK_FULL, IDENTITY_CLASH, OUTBOX_FULL, QUOTA_DEFERRED
from edge.outbox import Doc, DocState, OutboxStats, Place
from edge.quarantine import FailedItem
from edge.reasons import explain

VIEW_NAME = "status-view.json"
# Held by the running service (``edge.fsutil.hold_lock``): whether it runs, whatever its files say.
SERVICE_LOCK = "service.lock"
ACK_NAME = "errors-acknowledged"   # its mtime: errors up to then were read (`sohoa edge ack`)
VIEW_MODE = 0o640          # the group the installer gives the home may read it; others may not
CHECK_EVERY_S = 2.0        # the view is recomputed this often, and written when it changed
WRITE_EVERY_S = 10.0       # ... or at least this often (the heartbeat)
STALE_AFTER_S = 60.0       # six missed writes: the service is not running
RECENT = 50
# Vietnam has kept UTC+7 without daylight saving since 1975.
VIETNAM = dt.timezone(dt.timedelta(hours=7), "ICT")
LANGS = ("vi", "en")


@cache
def strings(lang: str) -> dict[str, str]:
    name = lang if lang in LANGS else "vi"
    data = resources.files("edge").joinpath("i18n", f"{name}.json").read_text(encoding="utf-8")
    table: dict[str, str] = json.loads(data)
    return table


def lang_from_env(environ: dict[str, str] | None = None) -> str:
    """English when the locale asks for it (LC_ALL, LC_MESSAGES, LANG start with 'en'), else Vietnamese."""
    env = os.environ if environ is None else environ
    for key in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(key)
        if value:
            return "en" if value.lower().startswith("en") else "vi"
    return "vi"


def t(lang: str, key: str, **params: Any) -> str:
    text = strings(lang).get(key, key)
    for name, value in params.items():
        text = text.replace("{" + name + "}", str(value))
    return text


# Alarms are English sentences in status.json, logs and MQTT (what an admin greps); the clerk reads
# the ones that concern the office in their language.
_ALARM_KEYS = {QUOTA_DEFERRED: "alarm_quota_deferred", OUTBOX_FULL: "alarm_outbox_full",
               DISK_FULL: "alarm_disk_full", IDENTITY_CLASH: "alarm_identity_clash",
               ACCESS_REFUSED: "alarm_access_refused"}
# Alarms that carry a figure or an OS error: matched by how they start (edge.service words them).
_ALARM_PREFIXES = (("oldest document waiting", "alarm_oldest_waiting"),
                   ("cannot take scans", "alarm_cannot_take"))


def alarm_text(lang: str, alarm: str) -> str:
    key = _ALARM_KEYS.get(alarm) or next(
        (k for prefix, k in _ALARM_PREFIXES if alarm.startswith(prefix)), None)
    return t(lang, key) if key is not None else alarm


def vn_time(at: float | str | None) -> str | None:
    """``dd/mm/yyyy HH:MM`` in Vietnam time, from a Unix time or an ISO 8601 string."""
    if at is None or at == "":
        return None
    moment = (dt.datetime.fromtimestamp(at, dt.UTC) if isinstance(at, int | float)
              else dt.datetime.fromisoformat(str(at).replace("Z", "+00:00")))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(VIETNAM).strftime("%d/%m/%Y %H:%M")


def age(seconds: float, lang: str) -> str:
    units = (("ngày", "day(s)", 86400), ("giờ", "h", 3600), ("phút", "min", 60))
    for vi, en, size in units:
        if seconds >= size * (1 if size == 60 else 1.5):
            value = seconds / size
            shown = f"{value:.0f}" if size == 60 or value >= 10 else f"{value:.1f}".replace(
                ".", "," if lang == "vi" else ".")
            return f"{shown} {vi if lang == 'vi' else en}"
    return f"{seconds:.0f} {'giây' if lang == 'vi' else 's'}"


def size(nbytes: int | None, lang: str) -> str:
    if nbytes is None:
        return "—"
    value, unit = float(nbytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    shown = f"{value:.0f}" if unit == "B" else f"{value:.1f}"
    return f"{shown.replace('.', ',') if lang == 'vi' else shown} {unit}"


STAGES = {DocState.STABLE: "received", DocState.PACKAGED: "ocr", DocState.SENDING: "sending",
          DocState.DELIVERED: "archived", DocState.FAILED: "refused"}


@dataclass(frozen=True, slots=True)
class Scan:
    """One recent scan as the clerk sees it."""

    name: str
    stage: str                 # received | ocr | sending | archived | refused
    at: float                  # when it last moved
    taken_at: float
    reason_code: str | None
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage, "at": self.at, "taken_at": self.taken_at,
                "reason_code": self.reason_code, "detail": self.detail}


def scan_of(doc: Doc) -> Scan:
    return Scan(name=doc.name, stage=STAGES[doc.state], at=doc.updated_at, taken_at=doc.created_at,
                reason_code=doc.reason_code if doc.state is DocState.FAILED else None,
                detail=doc.reason if doc.state is DocState.FAILED else None)


def refused_json(item: FailedItem) -> dict[str, Any]:
    why = explain(item.code)
    return {"name": item.name, "code": item.code, "since": item.since.timestamp(),
            "what_vi": why.what_vi, "todo_vi": why.todo_vi, "what_en": why.what_en, "todo_en": why.todo_en,
            "detail": item.detail}


def build_view(*, device: str, stats: OutboxStats, recent: list[Doc], refused: list[FailedItem],
               refused_folder: str, online: bool, link_error: str | None, connected_since: float | None,
               disk_free: int | None, alarms: list[str], last_error: str | None, cap_bytes: int,
               version: str, now: float) -> dict[str, Any]:
    """The clerk's view of the box; counts come from the same data as the lists they sit above."""
    scans = [scan_of(doc).to_json() for doc in recent if doc.place is not Place.RETRIED or
             doc.state is not DocState.FAILED]
    return {
        "format": "sohoa-edge-view/1", "device": device, "written_at": now, "version": version,
        "online": online, "link_error": None if online else link_error, "connected_since": connected_since,
        "disk_free_bytes": disk_free, "alarms": alarms, "last_error": last_error,
        "counts": dict(stats.counts), "queued_docs": stats.queued_docs, "queued_bytes": stats.queued_bytes,
        "cap_bytes": cap_bytes, "oldest_age_s": round(stats.oldest_age_s, 1),
        "last_receipt_at": stats.last_receipt_at,
        "refused_folder": refused_folder,
        # The list the clerk can act on is what is in the refused folder; the count is its length.
        "refused": [refused_json(item) for item in refused],
        "recent": scans,
    }


def view_is_fresh(view: dict[str, Any] | None, *, now: float) -> bool:
    """Written by a running service: recently, and not its farewell (``stopped_at``)."""
    if not view or view.get("stopped_at"):
        return False
    return now - float(view.get("written_at", 0)) <= STALE_AFTER_S
