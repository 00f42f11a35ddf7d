"""The durability barrier the writer passes before every commit.

An ack and a receipt promise durable bytes: the segment journal before the segment rows commit, the
stored objects (and their directory entries) before the arrival is catalogued. Two ways to keep
that promise:

  - ``fsync``: each object file and directory is fsynced as it is stored (2 files, 2–5 directories
    per document), and the journal once per group.
  - ``syncfs`` (Linux): objects are stored without any fsync; before the writer commits a group
    that records one, one ``syncfs(2)`` per filesystem flushes them all — journal, object files,
    directories. Measured here: one syncfs after 50 stored files took 18–36 ms where 50 fsyncs took
    150–210 ms. It flushes everything dirty on that filesystem, so central's home should have its
    own (as an archive's storage would anyway); on a filesystem shared with heavy writers, choose
    ``fsync``.

The flag is raised by an assembler before it posts its record, and cleared by the writer before it
starts a barrier, so every record commits after a barrier that began after its objects were stored.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path

from central.ingest.staging import SegmentJournal

MODES = ("syncfs", "fsync")


def _libc_syncfs() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    function = getattr(ctypes.CDLL(name, use_errno=True), "syncfs", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


class Durability:
    def __init__(self, mode: str, journal: SegmentJournal, directories: list[Path]) -> None:
        if mode not in MODES:
            raise ValueError(f"durability mode {mode!r} is not one of {MODES}")
        self._syncfs = _libc_syncfs() if mode == "syncfs" else None
        self.mode = "syncfs" if self._syncfs is not None else "fsync"
        self._journal = journal
        # One descriptor per distinct filesystem among the directories (syncfs covers a whole one).
        self._fds: dict[int, int] = {}
        if self._syncfs is not None:
            for directory in directories:
                device = directory.stat().st_dev
                if device not in self._fds:
                    self._fds[device] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self._lock = threading.Lock()
        self._pending = False
        self.barriers = 0   # syncfs calls (the benchmark counts them per document)

    @property
    def sync_objects(self) -> bool:
        """Whether the assembler must fsync each object itself."""
        return self._syncfs is None

    def stored(self) -> None:
        """An assembler stored objects without fsync; the next commit must pass a barrier first."""
        with self._lock:
            self._pending = True

    def before_commit(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, False
        if pending and self._syncfs is not None:
            for fd in self._fds.values():
                if self._syncfs(fd) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"syncfs failed: {os.strerror(errno)}")
                self.barriers += 1
            self._journal.mark_synced()   # the barrier covered the journal too
            return
        self._journal.sync()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
