"""Staging: the segment journal, where received ciphertext waits until its transfer is assembled.

Rules:
  - Every accepted segment of a group commit is appended to this worker's current journal file
    (``staging/journal-<worker>-<n>.log``); the file is fsynced once, then the catalog commits the
    segment rows that point into it (file, position), and only then is anything acked. One fsync
    per group, however many transfers it touched (per-transfer ``.part`` files cost one each).
  - A journal file is never appended to after a restart: a new life starts a new file, so bytes
    written but never committed are simply never pointed at.
  - A journal file is deleted once no segment row points into it (stored, rejected and aborted
    transfers delete their rows) and it is not the file being written; the current one is dropped
    too when nothing points into it, so an idle central keeps no journal at all.
  - Segments staged before the journal (catalog v2) are read from ``staging/<tid>.part`` at their
    offset, so an upgrade in the middle of a transfer loses nothing.

Readers (the assemblers) only ever read segments whose rows are committed, so they never race the
writer; several workers on one filesystem each write their own journal files and read everyone's.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from central.catalog import StoredSegment
from central.fsutil import fsync_dir
from central.paths import worker_slug

ROTATE_BYTES = 64 * 1024 * 1024
_JOURNAL = re.compile(r"journal-[A-Za-z0-9_.-]+-[0-9a-f]{8}-\d{8}\.log")


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite made no progress at offset {offset}")
        view, offset = view[written:], offset + written


class JournalLostError(OSError):
    """Bytes a committed segment row points at are not there: its journal file is missing or shorter
    than the row says (a central restored from a backup that did not carry ``staging/``). Unlike a
    disk error, trying again cannot help: the transfer's held bytes must be received again."""


class SegmentJournal:
    """This worker's append-only journal files under ``directory`` (written by the writer thread)."""

    def __init__(self, directory: Path, worker: str, *, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.directory = directory
        self.worker = worker_slug(worker)
        # Exactly this worker's files: "journal-sohoa-central-" must not take in those of
        # "sohoa-central-2", which would delete a live worker's journal under it.
        self._own = re.compile(re.escape(f"journal-{self.worker}-") + r"[0-9a-f]{8}-\d{8}\.log")
        self._life = secrets.token_hex(4)   # never append to a file of an earlier life
        self.rotate_bytes = rotate_bytes
        self._number = 0
        self._fd: int | None = None
        self._name: str | None = None
        self._size = 0
        self._dirty = False
        self.syncs = 0   # fsyncs issued (the benchmark counts them per document)

    @property
    def current(self) -> str | None:
        return self._name

    def append(self, data: bytes) -> tuple[str, int]:
        """Write ``data`` at the end of the current file; return (file name, position). Not durable
        until ``sync``."""
        if self._fd is None or self._size >= self.rotate_bytes:
            self._open_next()
        assert self._fd is not None and self._name is not None
        position = self._size
        _pwrite_all(self._fd, data, position)
        self._size += len(data)
        self._dirty = True
        return self._name, position

    def sync(self) -> None:
        """Make everything appended so far durable (called once per group commit, before COMMIT)."""
        if self._fd is not None and self._dirty:
            os.fdatasync(self._fd)
            self.syncs += 1
            self._dirty = False

    def mark_synced(self) -> None:
        """A filesystem-wide barrier (syncfs) made everything appended so far durable."""
        self._dirty = False

    def _open_next(self) -> None:
        self._close_current()
        self._number += 1
        name = f"journal-{self.worker}-{self._life}-{self._number:08d}.log"
        self._fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._name = name
        self._size = 0
        # The new name must survive a crash before any row can point at it.
        fsync_dir(self.directory)
        self.syncs += 1

    def _close_current(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._name = None

    def collect(self, in_use: Callable[[str], bool]) -> list[str]:
        """Delete this worker's journal files no committed segment points into; return their names.

        Files of earlier lives count as this worker's (same worker name: one process at a time holds
        it, ``central.worker``). The current file is closed and deleted too when nothing points into
        it.
        """
        removed: list[str] = []
        for name in self.own_files():
            if in_use(name):
                continue
            if name == self._name:
                if self._dirty:
                    continue   # appended but not yet synced and committed: rows may follow
                self._close_current()
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
            removed.append(name)
        return removed

    def own_files(self) -> list[str]:
        """This worker's journal files (of every life), oldest first."""
        return [path.name for path in sorted(self.directory.glob(f"journal-{self.worker}-*.log"))
                if self._own.fullmatch(path.name)]

    def close(self) -> None:
        self._close_current()


class SegmentReader:
    """Reads a transfer's committed segments in offset order (any worker's journal, or legacy .part)."""

    def __init__(self, staging: Path) -> None:
        self._staging = staging

    def chunks(self, tid: str, segments: Iterable[StoredSegment]) -> Iterator[tuple[StoredSegment, bytes]]:
        """Each segment with its bytes; a missing or short file is a ``JournalLostError``, any other
        failure to read an OSError (our trouble, tried again)."""
        handles: dict[str, IO[bytes]] = {}
        try:
            for seg in segments:
                name = seg.log if seg.log is not None else f"{tid}.part"
                if not (_JOURNAL.fullmatch(name) or name == f"{tid}.part"):
                    raise OSError(f"segment of {tid} points at an unexpected file {name[:80]!r}")
                handle = handles.get(name)
                if handle is None:
                    try:
                        handle = handles[name] = (self._staging / name).open("rb")
                    except FileNotFoundError as exc:
                        raise JournalLostError(f"journal {name} of {tid} is missing") from exc
                position = seg.pos if seg.log is not None else seg.offset
                assert position is not None
                data = os.pread(handle.fileno(), seg.length, position)
                if len(data) != seg.length:
                    raise JournalLostError(f"journal {name} ends before segment {tid}@{seg.offset}")
                yield seg, data
        finally:
            for handle in handles.values():
                handle.close()

    def copy_to(self, tid: str, segments: Iterable[StoredSegment], out: Path) -> None:
        """Write the held segments at their offsets into ``out`` (fsynced, 0600): the ``.part``
        file a quarantine keeps for whoever investigates."""
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for seg, data in self.chunks(tid, segments):
                _pwrite_all(fd, data, seg.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
