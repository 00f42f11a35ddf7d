"""The pure "is this scan finished?" rule: no I/O here, the caller injects stat results and clocks.

Rules:

1. Regular files are candidates. Anything else that is not a directory (a symlink, FIFO, socket or
   device) will never become a scan: it is due at once, so the caller refuses it *with a reason*
   (quarantine) instead of leaving a mystery in the scan folder.
2. A path is settled when its (size, mtime) stayed the same over at least two observations whose
   span is at least ``quiet_seconds`` — scanners that write slowly in place keep changing one of
   them, scanners that write a temp name and rename show up complete under the final name.
3. If the caller also passes the wall-clock time, an mtime younger than ``quiet_seconds`` keeps
   the file waiting (coarse SMB/FAT mtimes can hide a write between two checks). An mtime in the
   future (a client that sets its own skewed clock) is ignored so the file cannot wait forever.
4. A settled path is returned by :meth:`Settler.due` once and then forgotten; observing it again
   starts a new quiet period (that is how a periodic rescan re-offers a file left in place).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r", "$recycle.bin",
                            "system volume information", "lost+found"})
_IGNORED_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", "~",
                     ".lock", ".filepart")


def is_ignored(name: str) -> bool:
    """True for names that are never documents: hidden, temporary, partial or OS bookkeeping."""
    lowered = name.casefold()
    return (not name or name.startswith((".", "~$")) or lowered in _IGNORED_NAMES
            or lowered.endswith(_IGNORED_SUFFIXES))


@dataclass(frozen=True, slots=True)
class Observation:
    size: int
    mtime_ns: int
    seen_at: float
    wall_at: float | None = None


@dataclass(slots=True)
class _Track:
    first: Observation
    last: Observation
    checks: int


class Settler:
    """Tracks candidate paths until they have been quiet long enough."""

    def __init__(self, quiet_seconds: float) -> None:
        if quiet_seconds < 0:
            raise ValueError("quiet_seconds must be >= 0")
        self.quiet_seconds = quiet_seconds
        self._tracks: dict[Path, _Track] = {}
        self._refuse: dict[Path, None] = {}   # non-regular entries, due at once (ordered)

    def observe(self, path: Path, stat_result: os.stat_result | None, now: float, *,
                wall_now: float | None = None) -> None:
        """Record one ``lstat`` of ``path`` (``None`` = it vanished) taken at ``now``."""
        if stat_result is None or stat.S_ISDIR(stat_result.st_mode):
            self._tracks.pop(path, None)
            self._refuse.pop(path, None)
            return
        if not stat.S_ISREG(stat_result.st_mode):
            self._tracks.pop(path, None)
            self._refuse[path] = None
            return
        seen = Observation(stat_result.st_size, stat_result.st_mtime_ns, now, wall_now)
        track = self._tracks.get(path)
        if track is None or (track.last.size, track.last.mtime_ns) != (seen.size, seen.mtime_ns):
            self._tracks[path] = _Track(first=seen, last=seen, checks=1)
        elif now >= track.last.seen_at:
            track.last = seen
            track.checks += 1

    def due(self, now: float) -> list[Path]:
        """Paths settled as of ``now``, in the order they were first seen; each returned once."""
        ready = [path for path, track in self._tracks.items() if self._settled(track, now)]
        for path in ready:
            del self._tracks[path]
        refused = list(self._refuse)
        self._refuse.clear()
        return refused + ready

    def forget(self, path: Path) -> None:
        self._tracks.pop(path, None)
        self._refuse.pop(path, None)

    def pending(self) -> int:
        return len(self._tracks) + len(self._refuse)

    def tracked(self) -> list[Path]:
        """Paths still waiting (the caller re-stats these at every check)."""
        return list(self._tracks)

    def _settled(self, track: _Track, now: float) -> bool:
        if track.checks < 2 or now < track.last.seen_at:
            return False
        if track.last.seen_at - track.first.seen_at < self.quiet_seconds:
            return False
        if track.last.wall_at is not None:
            age = track.last.wall_at - track.last.mtime_ns / 1e9
            if 0 <= age < self.quiet_seconds:
                return False
        return True
