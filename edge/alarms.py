"""Alarms and the last error: what the box tells its operator (status file, MQTT status, CLI).

Every stage reports here instead of keeping its own flags; ``changed`` wakes the status writer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import time

log = logging.getLogger("sohoa.edge")

OUTBOX_FULL = "outbox full: new scans wait in the watch folder"
DISK_FULL = "disk full: no space left in the edge home; scans wait and are retried, nothing is quarantined"
IDENTITY_CLASH = ("another box is using this box's identity (a cloned memory card?): central refused "
                  "its documents; re-enroll one of the boxes, then run `sohoa edge retry --all`")

ACCESS_REFUSED = ("central's broker refuses this box's account (revoked, or a wrong password): its "
                  "scans stay on the box, nothing is lost; tell the administrator (once the box is "
                  "enrolled again: `sohoa edge init --force --abandon-queue`, then `sohoa edge retry --all`)")

QUOTA_DEFERRED = ("central is pacing this box (its quota of new documents): scans wait on the box and "
                  "go out by themselves when central allows; nothing is lost or failed, nothing to do")

# A last error is news, not a state: it is reported for a day, or until someone acknowledges it
# (`sohoa edge ack`); alarms (conditions still true) stay until their condition clears.
ERROR_SHOWN_FOR_S = 24 * 3600


class Alarms:
    def __init__(self) -> None:
        self.active: set[str] = set()
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.changed = asyncio.Event()

    def current_error(self, now: float | None = None) -> str | None:
        """The last error if it is recent and nobody acknowledged it."""
        if self.last_error is None or self.last_error_at is None:
            return self.last_error
        if (now or time.time()) - self.last_error_at > ERROR_SHOWN_FOR_S:
            return None
        return self.last_error

    def acknowledge(self, at: float) -> None:
        """Someone read the errors up to ``at`` (the mtime of HOME/errors-acknowledged)."""
        if self.last_error is not None and self.last_error_at is not None and self.last_error_at <= at:
            log.info("last error acknowledged: %s", self.last_error)
            self.last_error = None
            self.last_error_at = None
            self.changed.set()

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
        self.last_error_at = time.time()
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
