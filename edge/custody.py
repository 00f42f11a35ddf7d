"""Custody: the one place that moves, deletes and quarantines originals, from durable outbox state.

The custody rule (DESIGN §9): the box deletes bytes only when a signed receipt covers exactly those
bytes — the sha256 of what is on disk at the moment of deletion — for this drop.

Level-triggered (STYLE §17): the intake, the processor and the uplink only record facts in the
outbox (taken, packaged, delivered with the receipted sha256, failed with a reason). The
:class:`Custody` reconciler reads every row whose files disagree with its state and acts:

    place watch, not failed   → hold: move the scan from the scan folder to processed/<tid>.<ext>
    delivered, held           → after ``release_after`` seconds, re-hash the held file:
                                  same bytes as receipted → delete it (or keep: keep_originals)
                                  other bytes (a scanner still wrote into it) → return it to the
                                  scan folder, where it is taken again as a new version
    failed, watch or held     → quarantine into the clerk's refused folder, with a reason note
    delivered/failed + envelope → delete the envelope
    quarantined, file gone    → retried (the clerk or `sohoa edge retry` took it back)

Every move records its target first (``Outbox.intend``), so a power cut mid-move leaves the file
at one end or the other and the next pass finishes it. Start-up recovery is this same reconciler
run once; there is no second copy of these rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from edge.alarms import DISK_FULL, Alarms, is_disk_full
from edge.fsutil import fsync_dir, move_durably
from edge.job import Layout
from edge.outbox import Doc, DocState, Outbox, OutboxError, Place
from edge.quarantine import LEGACY_SUFFIX, free_name, note_path, place, write_note

log = logging.getLogger("sohoa.edge.custody")

RECHECK_SECONDS = 30.0
_BLOCK = 1 << 20


class Custody:
    """Acts on files from outbox facts; ``run()`` until cancelled, ``wake()`` after a new fact."""

    def __init__(self, outbox: Outbox, layout: Layout, alarms: Alarms, *, keep_originals: bool = False,
                 release_after: float = 60.0, clock: Callable[[], float] = time.time,
                 on_held: Callable[[str], None] | None = None) -> None:
        self._outbox = outbox
        self._layout = layout
        self._alarms = alarms
        self._keep = keep_originals
        self._release_after = release_after
        self._clock = clock
        self._on_held = on_held
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            next_due = await self.reconcile()
            timeout = RECHECK_SECONDS if next_due is None else min(
                RECHECK_SECONDS, max(0.0, next_due - self._clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def reconcile(self) -> float | None:
        """One pass over every row custody must act on; when the next delayed release falls due."""
        async with self._lock:
            next_due: float | None = None
            after = 0
            while rows := await self._outbox.custody_pending(after_seq=after):
                for doc in rows:
                    due = await self._guarded(doc)
                    if due is not None:
                        next_due = due if next_due is None else min(next_due, due)
                after = rows[-1].seq
            await self._notice_retried()
            return next_due

    async def hold(self, doc: Doc) -> Doc:
        """Move a just-taken scan out of the scan folder (the intake calls this right after the
        durable row; a failure here is finished by the next pass)."""
        async with self._lock:
            return await self._hold(doc)

    # -- one row --------------------------------------------------------------------------------
    async def _guarded(self, doc: Doc) -> float | None:
        try:
            return await self._act(doc)
        except OutboxError as exc:
            log.debug("custody: %s changed under us: %s", doc.tid, exc)   # the next pass re-reads it
        except (OSError, sqlite3.Error) as exc:
            if is_disk_full(exc):
                self._alarms.disk_full(exc)
            elif isinstance(exc, OSError):
                self._alarms.error(f"{doc.name}: cannot move or release the file: {exc.strerror or exc}")
                log.warning("custody: %s (%s): %s", doc.name, doc.tid, exc)
            else:
                raise
        return None

    async def _act(self, doc: Doc) -> float | None:
        if doc.pending_path is not None:
            was = doc.place
            doc = await self._finish_move(doc)
            if was is Place.WATCH and doc.place is Place.HELD and doc.state is DocState.STABLE and (
                    self._on_held is not None):
                self._on_held(doc.tid)
        if doc.place is Place.WATCH:
            if doc.state is DocState.FAILED:
                await self._quarantine(doc)
            else:
                await self._hold(doc)
            return None
        if doc.state is DocState.DELIVERED and doc.place is Place.HELD:
            due = (doc.delivered_at or 0.0) + self._release_after
            now = self._clock()
            if due > now + self._release_after:
                # Received in the future: the clock was stepped back since (a box whose RTC was
                # years ahead, then NTP). The wait restarts now rather than lasting years.
                doc = await self._outbox.restart_release_wait(doc.tid, now)
                due = now + self._release_after
            if now < due:
                return due
            await self._release(doc)
        elif doc.state is DocState.FAILED and doc.place is Place.HELD:
            await self._quarantine(doc)
        if doc.envelope_path and doc.state in (DocState.DELIVERED, DocState.FAILED):
            Path(doc.envelope_path).unlink(missing_ok=True)
            self._layout.job(doc.tid, doc.media_type).package.unlink(missing_ok=True)
            await self._outbox.clear_envelope(doc.tid)
        self._alarms.clear(DISK_FULL)
        return None

    async def _hold(self, doc: Doc) -> Doc:
        fresh = await self._outbox.get(doc.tid)
        if fresh is None or fresh.place is not Place.WATCH:
            return fresh or doc
        doc = fresh
        held = self._layout.job(doc.tid, doc.media_type).held
        source = Path(doc.src_path)
        if os.path.lexists(source):
            moved = await self._move(doc, source, held, Place.HELD)
            with contextlib.suppress(OSError):
                held.chmod(0o600)   # a plaintext archive record (best effort: the owner may be Samba's user)
        elif os.path.lexists(held):
            moved = await self._outbox.moved(doc.tid, Place.HELD, str(held))
        else:
            await self._outbox.moved(doc.tid, Place.MISSING)
            await self._outbox.mark_failed(doc.tid, "the scan vanished from the scan folder before the "
                                                    "box could take it (deleted or moved away?)", "vanished")
            return doc
        if moved is not None and self._on_held is not None:
            self._on_held(doc.tid)
        log.info("took %s as %s (%d page(s))", doc.name, doc.tid, doc.pages)
        return moved or doc

    async def _release(self, doc: Doc) -> None:
        held = Path(doc.src_path)
        expected = doc.receipt_sha256 or doc.sha256
        verdict = await asyncio.to_thread(verify_for_release, held, expected, delete=not self._keep)
        if verdict == "released":
            await self._outbox.moved(doc.tid, Place.GONE)
            log.info("released %s (%s): central holds exactly these bytes", doc.name, doc.tid)
        elif verdict == "kept":
            await self._outbox.moved(doc.tid, Place.KEPT)
        elif verdict == "missing":
            await self._outbox.moved(doc.tid, Place.MISSING)
        else:
            target = self._return_target(doc)
            await self._move(doc, held, target, Place.RETURNED)
            with contextlib.suppress(OSError):
                target.chmod(0o644)
            log.warning("%s changed after it was taken (was the scanner still writing?): central has "
                        "the version it receipted; the new content is back in the scan folder as %s "
                        "and will be sent as a new version", doc.name, target.name)

    async def _quarantine(self, doc: Doc) -> None:
        source = Path(doc.src_path)
        if not os.path.lexists(source):
            await self._outbox.moved(doc.tid, Place.MISSING)
            return
        refused = self._layout.refused
        refused.mkdir(parents=True, exist_ok=True)
        target = free_name(refused, doc.name)
        await self._outbox.intend(doc.tid, str(target))
        await asyncio.to_thread(place, source, target, code=doc.reason_code, detail=doc.reason or "",
                                tid=doc.tid, name=doc.name)
        await self._outbox.moved(doc.tid, Place.QUARANTINED, str(target))
        log.warning("refused %s: %s (now in %s)", doc.name, doc.reason, refused.name)

    async def _move(self, doc: Doc, source: Path, target: Path, where: Place) -> Doc | None:
        await self._outbox.intend(doc.tid, str(target))
        await asyncio.to_thread(move_durably, source, target)
        return await self._outbox.moved(doc.tid, where, str(target))

    async def _finish_move(self, doc: Doc) -> Doc:
        """A move was interrupted (power cut): find the file at one end or the other."""
        assert doc.pending_path is not None
        source, target = Path(doc.src_path), Path(doc.pending_path)
        if os.path.lexists(source):
            fresh = await self._outbox.moved(doc.tid, doc.place)   # not moved yet: start again
        elif os.path.lexists(target):
            where = self._place_of(target)
            if where is Place.QUARANTINED and not note_path(target).exists():
                await asyncio.to_thread(write_note, target, code=doc.reason_code, detail=doc.reason or "",
                                        tid=doc.tid, name=doc.name)
            fresh = await self._outbox.moved(doc.tid, where, str(target))
        else:
            fresh = await self._outbox.moved(doc.tid, Place.MISSING)
        return fresh or doc

    def _place_of(self, path: Path) -> Place:
        if path.is_relative_to(self._layout.processed):
            return Place.HELD
        if path.is_relative_to(self._layout.refused):
            return Place.QUARANTINED
        return Place.RETURNED

    def _return_target(self, doc: Doc) -> Path:
        """Where the clerk put it (same subfolder if it still exists), under a free name."""
        relative = Path(doc.rel_path)
        folder = self._layout.watch / relative.parent
        if relative.is_absolute() or ".." in relative.parts or not folder.is_dir():
            folder = self._layout.watch
        return free_name(folder, relative.name or doc.name)

    async def _notice_retried(self) -> None:
        """A refused scan taken out of the refused folder (retry) no longer waits for a human."""
        for doc in await self._outbox.quarantined():
            if not os.path.lexists(doc.src_path):
                await self._outbox.moved(doc.tid, Place.RETRIED)

    # -- once, at start-up ----------------------------------------------------------------------
    def sweep_leftovers(self, legacy_failed: Path | None = None) -> None:
        """Temp files a kill -9 left before their rename hold nothing that is not elsewhere; scans
        refused by an older version (HOME/failed) go to the clerk's refused folder."""
        for leftover in self._layout.work.iterdir():
            if not leftover.is_dir():
                leftover.unlink(missing_ok=True)
        for leftover in self._layout.envelopes.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        if legacy_failed is None or not legacy_failed.is_dir():
            return
        refused = self._layout.refused
        for item in sorted(legacy_failed.iterdir()):
            if item.name.endswith(LEGACY_SUFFIX) or not os.path.lexists(item):
                continue
            refused.mkdir(parents=True, exist_ok=True)
            target = free_name(refused, item.name)
            move_durably(item, target)
            legacy_note = legacy_failed / (item.name + LEGACY_SUFFIX)
            if legacy_note.exists():
                move_durably(legacy_note, target.with_name(target.name + LEGACY_SUFFIX))
        with contextlib.suppress(OSError):
            legacy_failed.rmdir()


def verify_for_release(held: Path, expected_sha256: str, *, delete: bool) -> str:
    """Re-hash the held original and delete it only if it is exactly what central receipted.

    'released' (deleted), 'kept' (matches, delete=False), 'changed' (other bytes, or written to
    while we read), 'missing'. The file is read through one descriptor whose identity, size and
    times are compared before and after, and checked again at the path right before the unlink, so
    a writer that appends in between is caught rather than cut off.
    """
    try:
        fd = os.open(held, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "changed"
        raise
    try:
        before = os.fstat(fd)
        digest = hashlib.sha256()
        while block := os.read(fd, _BLOCK):
            digest.update(block)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if _identity(before) != _identity(after) or digest.hexdigest() != expected_sha256:
        return "changed"
    if not delete:
        return "kept"
    try:
        now = held.lstat()
    except FileNotFoundError:
        return "missing"
    if _identity(now) != _identity(before):
        return "changed"
    held.unlink()
    fsync_dir(held.parent)
    return "released"


def _identity(info: os.stat_result) -> tuple[int, int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
