"""Who is online, said out loud: INFO log lines when a box comes online or goes quiet, and the
hourly backlog samples behind the device page's chart.

Online is decided at query time (``catalog.STALE_AFTER_S``: a box that stops talking is offline
even if its last will never came), so transitions are found the same way: by comparing what the
catalog says now with what it said one round ago. One task per central process, reading through
the app's reader connection and writing samples through the app's second writer (sessions/audit);
the ingest's writer is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from aiohttp import web

from central import catalog
from central.http.state import AUTH_DB, READER

log = logging.getLogger("sohoa.central.presence")

CHECK_EVERY_S = 15.0
SAMPLE_EVERY_S = 60.0


class Presence:
    def __init__(self) -> None:
        self.known: dict[str, tuple[bool, str | None]] | None = None

    def compare(self, now: dict[str, tuple[bool, str | None]]) -> list[str]:
        """The log lines for what changed since the last round (none on the first round)."""
        before, self.known = self.known, now
        if before is None:
            online = sum(1 for up, _ in now.values() if up)
            return [f"{online} of {len(now)} device(s) that ever reported are online"]
        lines = []
        for device, (up, last_seen) in sorted(now.items()):
            was_up = before.get(device, (False, None))[0]
            if up and not was_up:
                lines.append(f"device {device} online")
            elif was_up and not up:
                lines.append(f"device {device} offline (last heard {last_seen})")
        for device in sorted(set(before) - set(now)):
            if before[device][0]:
                lines.append(f"device {device} offline (revoked or removed)")
        return lines


def _sample(conn: sqlite3.Connection) -> int:
    sampled = catalog.record_history(conn, interval_s=SAMPLE_EVERY_S)
    conn.commit()
    return sampled


async def run(app: web.Application, *, check_every_s: float = CHECK_EVERY_S,
              sample_every_s: float = SAMPLE_EVERY_S) -> None:
    presence = Presence()
    loop = asyncio.get_running_loop()
    next_sample = loop.time()
    while True:
        try:
            now = await app[READER].call(lambda conn: catalog.presence(conn, now=datetime.now(UTC)))
            for line in presence.compare(now):
                log.info("%s", line)
            if loop.time() >= next_sample:
                next_sample = loop.time() + sample_every_s
                await app[AUTH_DB].call(_sample)
        except sqlite3.Error as exc:   # a busy or full catalog: say so, try again next round
            log.warning("presence check failed: %s", exc)
        await asyncio.sleep(check_every_s)


async def presence_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(run(app), name="central-presence")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
