"""Take stage: a settled file in the scan folder becomes a durable outbox row, then custody holds it.

For each path the intake hands over:
  1. a row already waiting for this very path (its move was interrupted) → custody finishes it;
  2. probe (type by content, full decode, caps) and check the file *ends* as its format must;
     structurally incomplete, or still empty (a placeholder) → leave it: a scanner may still be
     writing; refuse it only once it stayed so and unchanged for ``incomplete_grace_seconds``;
     refused (not a scan, damaged, encrypted, too large, a symlink…) → a ``failed`` row with its
     reason code, and custody moves it to the clerk's refused folder;
  3. no room under the outbox cap → the scan waits, untouched, where the clerk put it (alarm);
  4. otherwise: hash, a durable row (``stable``, place ``watch``), then custody moves it out.
A re-drop of bytes central once receipted is simply taken again: the box never trusts its memory
of a past receipt for a new drop (central may have been restored from a backup); central stores the
content once and records the arrival.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from edge.alarms import OUTBOX_FULL, Alarms
from edge.complete import check_complete
from edge.config import EdgeConfig
from edge.custody import Custody
from edge.errors import BadInputError, IncompleteFileError
from edge.fsutil import sha256_file
from edge.media import probe
from edge.outbox import Outbox
from edge.reasons import classify
from protocol.names import display_name

log = logging.getLogger("sohoa.edge.take")


class Taker:
    def __init__(self, outbox: Outbox, custody: Custody, config: EdgeConfig, alarms: Alarms, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._outbox = outbox
        self._custody = custody
        self._config = config
        self._alarms = alarms
        self._clock = clock
        # Scans left in the watch folder for lack of outbox room: path → (size, mtime_ns) then.
        self._waiting: dict[Path, tuple[int, int]] = {}
        # Structurally incomplete files: path → ((size, mtime_ns), first seen so).
        self._incomplete: dict[Path, tuple[tuple[int, int], float]] = {}
        self.taken = 0
        self.refused = 0
        self.original_bytes = 0

    async def take(self, path: Path) -> None:
        """Take one settled path (FileNotFoundError: it went away meanwhile, nothing to do)."""
        cfg = self._config
        pending = await self._outbox.pending_at(str(path))
        if pending is not None:
            await self._custody.hold(pending)
            return
        info = path.lstat()
        shape = (info.st_size, info.st_mtime_ns)
        if self._waiting.get(path) == shape and not await self._outbox.room_for(info.st_size * 2):
            # Refused for room at an earlier rescan and unchanged since: while the box is offline
            # for hours, do not decode and hash every waiting scan again at every rescan.
            return
        name = display_name(path.name)
        relative = str(path.relative_to(cfg.watch_dir)) if path.is_relative_to(cfg.watch_dir) else path.name
        if info.st_size == 0 and not self._still_incomplete(path, shape, IncompleteFileError(
                "the file is still empty")):
            # A placeholder: scanners and copy tools create the file, close it, and write the
            # pages later. It is refused as empty only after the incomplete-file grace period.
            return
        try:
            # Completeness first (the file's tail): a file still being written must wait, not be
            # refused as truncated. Then probe decodes every frame, off the event loop.
            await asyncio.to_thread(check_complete, path)
            media = await asyncio.to_thread(probe, path, max_bytes=cfg.intake.max_file_bytes)
        except IncompleteFileError as exc:
            if not self._still_incomplete(path, shape, exc):
                return
            await self._refuse(path, name, relative, f"{exc.reason}, unchanged for "
                               f"{cfg.intake.incomplete_grace_seconds:.0f} s", "incomplete")
            return
        except BadInputError as exc:
            await self._refuse(path, name, relative, exc.reason, exc.code or classify(exc.reason))
            return
        self._incomplete.pop(path, None)
        if not await self._outbox.room_for(media.size * 2):
            # Never drop, never evict: the scan waits, untouched, where the clerk put it.
            self._waiting[path] = shape
            self._alarms.raise_(OUTBOX_FULL)
            return
        self._waiting.pop(path, None)
        self._alarms.clear(OUTBOX_FULL)
        sha = await asyncio.to_thread(sha256_file, path)
        after = path.lstat()
        if (after.st_size, after.st_mtime_ns) != shape:
            return   # written to while we read it: the intake offers it again once it settles
        # The row first (durably), then the move: a crash in between leaves a row whose file is
        # still in the watch folder, which custody moves; never a moved file without a row.
        doc = await self._outbox.add(
            name=name, rel_path=relative, src_path=str(path), size=media.size, sha256=sha,
            media_type=media.media_type, pages=media.pages, priority=cfg.intake.priority_of(relative),
            captured_at=info.st_mtime)
        self.taken += 1
        self.original_bytes += media.size
        await self._custody.hold(doc)

    def _still_incomplete(self, path: Path, shape: tuple[int, int], exc: IncompleteFileError) -> bool:
        """True once ``path`` has been incomplete and unchanged for the grace period."""
        seen = self._incomplete.get(path)
        now = self._clock()
        if seen is None or seen[0] != shape:
            self._incomplete[path] = (shape, now)
            log.info("%s is not finished yet (%s); waiting for the writer", display_name(path.name),
                     exc.reason)
            return False
        return now - seen[1] >= self._config.intake.incomplete_grace_seconds

    async def _refuse(self, path: Path, name: str, relative: str, reason: str, code: str) -> None:
        self._incomplete.pop(path, None)
        self._waiting.pop(path, None)
        if not os.path.lexists(path):
            return
        await self._outbox.add_refused(name=name, rel_path=relative, src_path=str(path), reason=reason,
                                       reason_code=code)
        self.refused += 1
        self._alarms.error(f"{name}: {reason}")
        self._custody.wake()

    def forget(self, path: Path) -> None:
        self._waiting.pop(path, None)
        self._incomplete.pop(path, None)
