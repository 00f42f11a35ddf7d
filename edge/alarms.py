"""Alarms and the last error: what the box tells its operator (status file, MQTT status, CLI).

Every stage reports here instead of keeping its own flags; ``changed`` wakes the status writer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3

log = logging.getLogger("sohoa.edge")

OUTBOX_FULL = "outbox full: new scans wait in the watch folder"
DISK_FULL = "disk full: no space left in the edge home; scans wait and are retried, nothing is quarantined"
IDENTITY_CLASH = ("another box is using this box's identity (a cloned memory card?): central refused "
                  "its documents; re-enroll one of the boxes, then run `sohoa edge retry --all`")


class Alarms:
    def __init__(self) -> None:
        self.active: set[str] = set()
        self.last_error: str | None = None
        self.changed = asyncio.Event()

    def raise_(self, text: str) -> None:
        if text not in self.active:
            log.warning("alarm: %s", text)
            self.active.add(text)
            self.changed.set()

    def clear(self, text: str) -> None:
        if text in self.active:
            log.info("alarm cleared: %s", text)
            self.active.discard(text)
            self.changed.set()

    def clear_prefix(self, prefix: str) -> None:
        for text in [a for a in self.active if a.startswith(prefix)]:
            self.clear(text)

    def error(self, text: str) -> None:
        self.last_error = text
        self.changed.set()

    def disk_full(self, exc: BaseException) -> None:
        self.error(f"{DISK_FULL} ({exc})")
        self.raise_(DISK_FULL)


_SQLITE_FULL = 13


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from the kernel or SQLITE_FULL from the outbox: wait for space, do not give up."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(exc)
    return False
