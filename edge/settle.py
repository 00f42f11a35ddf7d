"""The pure "is this scan finished?" rule: no I/O here, the caller injects stat results, events and clocks.

Rules:

1. Regular files are candidates. Anything else that is not a directory (a symlink, FIFO, socket or
   device) will never become a scan: it is due at once, so the caller refuses it *with a reason*
   (quarantine) instead of leaving a mystery in the scan folder.
2. File events tell whether a writer still holds the file:
   - *open*: written since the last close (inotify modify) — a scanner writing
     page by page keeps its descriptor open between pages, for as long as the clerk turns pages;
   - *closed*: the last word was close-after-write, or a rename into place (local writers and
     Samba produce both);
   - *unknown*: no event other than its creation was ever seen for it (a network mount, a lost event
     queue, a file that was there before the service started, or written into a new folder before
     the folder was watched).
3. A path is settled when its (size, mtime) stayed the same over at least two observations whose
   span is at least the quiet period of its writer state: ``quiet_seconds`` when closed,
   ``open_quiet_seconds`` when open (a writer that never closes: a lost event, or a scanner that
   died; if it writes again later the box sends the new content as a new version, nothing is lost),
   and ``quiet_seconds`` plus an mtime at least ``unknown_quiet_seconds`` old when unknown.
4. If the caller also passes the wall-clock time, an mtime younger than ``quiet_seconds`` keeps
   the file waiting (coarse SMB/FAT mtimes can hide a write between two checks). An mtime in the
   future (a client that sets its own skewed clock) is ignored so the file cannot wait forever.
5. A settled path is returned by :meth:`Settler.due` once and then forgotten; observing it again
   starts a new quiet period (that is how a periodic rescan re-offers a file left in place). Its
   writer state is kept: a rescan does not make a closed file unknown. Every event restarts the
   quiet period (the quiet is counted from the close, not from the last write).

Whether the file is also *complete* (a PDF trailer, a PNG IEND…) is checked by the caller when the
path is due (``edge.complete``): that needs the file's bytes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import Enum
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


class Writer(Enum):
    """What file events say about the file's writer (rule 2)."""

    UNKNOWN = "unknown"
    OPEN = "open"
    CLOSED = "closed"


class FileEvent(Enum):
    WRITTEN = "written"      # data written
    CLOSED = "closed"        # closed after writing
    MOVED_IN = "moved_in"    # renamed or moved into place: complete by convention
    GONE = "gone"            # deleted or moved away


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


@dataclass(frozen=True, slots=True)
class Quiet:
    """The quiet periods of rule 3."""

    closed: float = 5.0
    unknown_mtime_age: float = 60.0
    open: float = 600.0

    def __post_init__(self) -> None:
        if min(self.closed, self.unknown_mtime_age, self.open) < 0:
            raise ValueError("quiet periods must be >= 0")


class Settler:
    """Tracks candidate paths until they have been quiet long enough for their writer state."""

    def __init__(self, quiet: Quiet | float) -> None:
        self.quiet = quiet if isinstance(quiet, Quiet) else Quiet(closed=quiet, unknown_mtime_age=0.0,
                                                                  open=quiet)
        self._tracks: dict[Path, _Track] = {}
        self._writers: dict[Path, Writer] = {}
        self._refuse: dict[Path, None] = {}   # non-regular entries, due at once (ordered)

    @property
    def quiet_seconds(self) -> float:
        return self.quiet.closed

    def event(self, path: Path, event: FileEvent) -> None:
        """Record a file event for ``path`` (rule 2); an event is activity: the quiet period restarts."""
        self._tracks.pop(path, None)
        if event is FileEvent.GONE:
            self._writers.pop(path, None)
            return
        self._writers[path] = Writer.OPEN if event is FileEvent.WRITTEN else Writer.CLOSED

    def writer(self, path: Path) -> Writer:
        return self._writers.get(path, Writer.UNKNOWN)

    def observe(self, path: Path, stat_result: os.stat_result | None, now: float, *,
                wall_now: float | None = None) -> None:
        """Record one ``lstat`` of ``path`` (``None`` = it vanished) taken at ``now``."""
        if stat_result is None or stat.S_ISDIR(stat_result.st_mode):
            self._tracks.pop(path, None)
            self._refuse.pop(path, None)
            self._writers.pop(path, None)
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
        ready = [path for path, track in self._tracks.items() if self._settled(path, track, now)]
        for path in ready:
            del self._tracks[path]
        refused = list(self._refuse)
        self._refuse.clear()
        return refused + ready

    def forget(self, path: Path) -> None:
        self._tracks.pop(path, None)
        self._refuse.pop(path, None)
        self._writers.pop(path, None)

    def pending(self) -> int:
        return len(self._tracks) + len(self._refuse)

    def tracked(self) -> list[Path]:
        """Paths still waiting (the caller re-stats these at every check)."""
        return list(self._tracks)

    def _settled(self, path: Path, track: _Track, now: float) -> bool:
        if track.checks < 2 or now < track.last.seen_at:
            return False
        writer = self._writers.get(path, Writer.UNKNOWN)
        span = track.last.seen_at - track.first.seen_at
        needed = self.quiet.open if writer is Writer.OPEN else self.quiet.closed
        if span < needed:
            return False
        if track.last.wall_at is not None:
            age = track.last.wall_at - track.last.mtime_ns / 1e9
            if 0 <= age < self.quiet.closed:
                return False
            if writer is Writer.UNKNOWN and 0 <= age < self.quiet.unknown_mtime_age:
                return False
        return True
