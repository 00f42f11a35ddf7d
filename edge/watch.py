"""Intake: turn a scan folder into a stream of finished files.

Watchdog events only *hint* that a path changed (they are lost on overflow, on SMB/NFS mounts and
while the service is down), so a startup scan and a periodic rescan are the ground truth for which
files exist. The events also say whether a writer still holds a file (written / closed / moved in),
which is what lets a scanner pause between pages without losing the rest of the document. The
watchdog thread never touches shared state: it hands (path, event) to the event loop with
``call_soon_threadsafe``. Whether a file is finished is decided by :mod:`edge.settle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from edge.errors import EdgeError
from edge.settle import FileEvent, Quiet, Settler, is_ignored

try:   # Linux: full move events, so a file moved in from elsewhere is a move, not a "create"
    from watchdog.observers.inotify import InotifyObserver
except ImportError:  # pragma: no cover - other platforms poll or use their own backend
    InotifyObserver = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

# What each event says about a file's writer. Opening or reading a file (which we do ourselves)
# and attribute changes (touch, chmod) say nothing and are not listened to. A create says only
# that the file exists: watchdog also reports as created the files it finds in a new folder once
# it watches it, and on a busy box a scanner has often written and closed them by then (no close
# event will ever come). A writer that really holds the file shows itself by writing to it.
_FILE_EVENTS: tuple[tuple[type[FileSystemEvent], FileEvent | None], ...] = (
    (FileCreatedEvent, None), (FileModifiedEvent, FileEvent.WRITTEN),
    (FileClosedEvent, FileEvent.CLOSED), (FileDeletedEvent, FileEvent.GONE))
Touch = Callable[[Path, "FileEvent | None", bool], None]


class _Handler(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, touch: Touch) -> None:
        self._loop = loop
        self._touch = touch

    def on_any_event(self, event: FileSystemEvent) -> None:
        for path, kind, is_dir in _translate(event):
            with contextlib.suppress(RuntimeError):  # the loop is closing; the next scan catches up
                self._loop.call_soon_threadsafe(self._touch, path, kind, is_dir)


def _translate(event: FileSystemEvent) -> list[tuple[Path, FileEvent | None, bool]]:
    """(path, what it says about the writer, is a directory) for one watchdog event."""
    if isinstance(event, DirCreatedEvent | DirMovedEvent):
        raw = event.dest_path if isinstance(event, DirMovedEvent) else event.src_path
        return [(Path(os.fsdecode(raw)), None, True)] if raw else []
    if isinstance(event, FileMovedEvent):
        moves: list[tuple[Path, FileEvent | None, bool]] = []
        if event.src_path:
            moves.append((Path(os.fsdecode(event.src_path)), FileEvent.GONE, False))
        if event.dest_path:
            moves.append((Path(os.fsdecode(event.dest_path)), FileEvent.MOVED_IN, False))
        return moves
    if isinstance(event, FileCreatedEvent) and event.is_synthetic:
        # Not a writer creating the file: watchdog listing a folder that was moved in whole, from
        # its own thread. On a busy box that listing can arrive after the intake already scanned
        # the folder; read as "created" it would mark every scan in it as held open (the 10-minute
        # quiet) and a day's folder dropped at once would sit there. Moved in: complete.
        return [(Path(os.fsdecode(event.src_path)), FileEvent.MOVED_IN, False)]
    for cls, kind in _FILE_EVENTS:
        if isinstance(event, cls):
            return [(Path(os.fsdecode(event.src_path)), kind, False)]
    return []


class Intake:
    """Async context manager yielding settled scan files from ``watch_dir`` (recursively)."""

    def __init__(self, watch_dir: Path, *, quiet_seconds: float = 5.0, rescan_seconds: float = 30.0,
                 check_interval: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, use_events: bool = True,
                 quiet: Quiet | None = None, ignore_dirs: tuple[str, ...] = ()) -> None:
        self.watch_dir = watch_dir
        self.rescan_seconds = rescan_seconds
        self.check_interval = check_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._use_events = use_events
        self._ignore_dirs = frozenset(ignore_dirs)
        self._settler = Settler(quiet or Quiet(closed=quiet_seconds, unknown_mtime_age=quiet_seconds,
                                               open=max(quiet_seconds, 600.0)))
        self._dirty: set[Path] = set()
        self._dirty_dirs: set[Path] = set()
        self._next_rescan = float("-inf")
        self._wake = asyncio.Event()
        self._observer: BaseObserver | None = None
        self._watched: tuple[int, int] | None = None    # (st_dev, st_ino) the observer watches

    @property
    def pending(self) -> int:
        """Files seen but not settled yet (for status reports)."""
        return self._settler.pending()

    async def __aenter__(self) -> Intake:
        if not self.watch_dir.is_dir():
            raise EdgeError(f"watch folder {self.watch_dir} does not exist or is not a folder",
                            hint="create it or fix 'watch_dir' in edge.toml")
        if self._use_events:
            self._start_observer()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 10)

    def _start_observer(self) -> None:
        self._watched = _identity(self.watch_dir)
        observer = InotifyObserver(generate_full_events=True) if InotifyObserver is not None else Observer()
        observer.schedule(_Handler(asyncio.get_running_loop(), self._touch), str(self.watch_dir),
                          recursive=True)
        try:
            observer.start()
        except (OSError, RecursionError) as exc:
            # inotify watch limit reached, an exotic mount, or a tree deeper than watchdog's
            # recursive walk can go: polling by rescan still works, the box must still start.
            log.warning("file events unavailable for %s (%s); relying on rescans every %.0f s",
                        self.watch_dir, exc, self.rescan_seconds)
            return
        self._observer = observer

    async def _rearm(self) -> None:
        """Watch the scan folder again if it was removed and made again, or remounted: inotify's
        watch dies with the old folder, and without events every scan would be judged by its
        mtime's age alone (a scanner pausing with its file open would look finished)."""
        if not self._use_events:
            return
        identity = await asyncio.to_thread(_identity, self.watch_dir)
        observer = self._observer
        alive = observer is not None and all(emitter.is_alive() for emitter in observer.emitters)
        if identity is None or (identity == self._watched and (alive or observer is None)):
            return   # away (nothing to watch yet), or unchanged (or events never worked here)
        log.warning("the scan folder %s was removed, remade or remounted; watching it again",
                    self.watch_dir)
        self._observer = None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 10)
        self._start_observer()

    def _touch(self, path: Path, event: FileEvent | None, is_directory: bool) -> None:
        if is_directory:
            self._dirty_dirs.add(path)  # a folder moved in brings files that raise no events
        else:
            if event is not None:
                self._settler.event(path, event)
            if event is not FileEvent.GONE:
                self._dirty.add(path)
        self._wake.set()

    def writer_state(self, path: Path) -> str:
        return self._settler.writer(path).value

    def rescan_now(self) -> None:
        self._next_rescan = float("-inf")
        self._wake.set()

    async def stable(self) -> AsyncIterator[Path]:
        """Yield settled files forever; re-yields a file still present at a later rescan."""
        while True:
            now = self._clock()
            if now >= self._next_rescan:
                self._next_rescan = now + self.rescan_seconds
                await self._rearm()
                self._dirty.update(await asyncio.to_thread(self._scan, self.watch_dir))
            if self._dirty_dirs:
                dirs, self._dirty_dirs = self._dirty_dirs, set()
                for directory in dirs:
                    if self._inside(directory):
                        found = await asyncio.to_thread(self._scan, directory)
                        for path in found:   # moved in whole: complete, like a renamed file
                            self._settler.event(path, FileEvent.MOVED_IN)
                        self._dirty.update(found)
            candidates = {p for p in self._dirty if self._inside(p)} | set(self._settler.tracked())
            self._dirty.clear()
            stats = await asyncio.to_thread(_lstat_all, candidates)
            now, wall = self._clock(), self._wall_clock()
            for path, info in stats.items():
                self._settler.observe(path, info, now, wall_now=wall)
            for path in self._settler.due(now):
                # Right before handing it out: still there? (A symlink or FIFO is handed out too:
                # the caller refuses it with a reason; probe() never follows or opens it blindly.)
                info = _lstat(path)
                if info is not None and not stat.S_ISDIR(info.st_mode):
                    yield path
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races
            # with the event being set, and shutdown would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.check_interval):
                    await self._wake.wait()

    def _inside(self, path: Path) -> bool:
        try:
            relative = path.relative_to(self.watch_dir)
        except ValueError:
            return False
        return bool(relative.parts) and not any(
            is_ignored(part) or part in self._ignore_dirs for part in relative.parts)

    def _scan(self, top: Path) -> set[Path]:
        return set(_walk(top, self._ignore_dirs)) if top.is_dir() and not top.is_symlink() else set()


def _walk(top: Path, ignore_dirs: frozenset[str] = frozenset()) -> Iterator[Path]:
    # A stack, not recursion: a tree deeper than Python's recursion limit (a sync tool that
    # copied a folder into itself) would otherwise raise out of the scan and stop the service.
    folders = [top]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("cannot list %s: %s", folder, exc)
            continue
        for entry in entries:
            if is_ignored(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in ignore_dirs:
                        folders.append(Path(entry.path))
                else:  # regular files, and symlinks/FIFOs/sockets to be refused with a reason
                    yield Path(entry.path)
            except OSError:
                continue


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        info = folder.stat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except OSError:
        return None


def _lstat_all(paths: set[Path]) -> dict[Path, os.stat_result | None]:
    return {path: _lstat(path) for path in sorted(paths)}
