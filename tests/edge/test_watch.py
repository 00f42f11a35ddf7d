"""Intake on a real directory: watchdog events, startup scan, periodic rescan and the settle rule."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import watchdog.observers.inotify as watchdog_inotify
from watchdog.events import FileCreatedEvent, FileSystemEvent, generate_sub_created_events

from edge.errors import EdgeError
from edge.settle import FileEvent, Quiet
from edge.watch import Intake, _translate

pytestmark = pytest.mark.timeout(60)

QUIET = 0.6


def fast(watch_dir: Path, *, use_events: bool = True) -> Intake:
    return Intake(watch_dir, quiet_seconds=QUIET, check_interval=0.05, rescan_seconds=3600.0,
                  use_events=use_events)


async def take(stream: AsyncIterator[Path], until: Path, *, timeout: float = 15) -> list[Path]:
    """Everything the intake yields up to and including ``until``."""
    seen: list[Path] = []
    async with asyncio.timeout(timeout):
        async for path in stream:
            seen.append(path)
            if path == until:
                return seen
    raise AssertionError("stream ended")


def write(path: Path, data: bytes = b"%PDF-1.4 scan") -> Path:
    path.write_bytes(data)
    return path


async def test_startup_scan_finds_existing_files_and_subfolders(tmp_path: Path) -> None:
    top = write(tmp_path / "Quyết định số 12 – UBND.pdf")
    (tmp_path / "2024" / "tháng 3").mkdir(parents=True)
    deep = write(tmp_path / "2024" / "tháng 3" / "Công văn số 5 – Tuyên Quang.png")
    async with fast(tmp_path, use_events=False) as intake:
        stream = intake.stable()
        seen = await take(stream, deep)
        if top not in seen:
            seen += await take(stream, top)
        await stream.aclose()  # type: ignore[attr-defined]
    assert set(seen) == {top, deep}


async def test_slow_writer_in_place_is_yielded_only_after_it_finished(tmp_path: Path) -> None:
    target = tmp_path / "Biên bản họp thôn.tif"
    finished_at: list[float] = []  # time of the last write

    async def slow_scanner() -> None:
        with target.open("wb") as handle:
            for _ in range(8):  # 8 x 0.25 s: longer than the quiet period in total
                handle.write(b"x" * 4096)
                handle.flush()
                finished_at[:] = [time.monotonic()]
                await asyncio.sleep(0.25)

    async with fast(tmp_path) as intake:
        writer = asyncio.create_task(slow_scanner())
        stream = intake.stable()
        seen = await take(stream, target)
        yielded_at = time.monotonic()
        await stream.aclose()  # type: ignore[attr-defined]
        await writer
    assert seen == [target]
    assert finished_at and yielded_at >= finished_at[0] + QUIET * 0.9
    assert target.stat().st_size == 8 * 4096


async def test_temp_name_then_rename(tmp_path: Path) -> None:
    final = tmp_path / "Công văn số 5 – Tuyên Quang.pdf"
    async with fast(tmp_path) as intake:
        stream = intake.stable()
        for temp_name in (".Công văn.pdf.part", "scan0001.tmp", "~$scan.pdf"):
            temp = write(tmp_path / temp_name, b"%PDF-1.4 " + b"x" * 10000)
        temp.rename(final)
        seen = await take(stream, final)
        await stream.aclose()  # type: ignore[attr-defined]
    assert seen == [final]


async def test_ignored_names_are_never_yielded_symlinks_and_fifos_are_handed_over_to_refuse(
        tmp_path: Path) -> None:
    real = write(tmp_path.parent / f"{tmp_path.name}-outside.pdf")
    (tmp_path / "link.pdf").symlink_to(real)
    (tmp_path / "linked-dir").symlink_to(tmp_path.parent)
    os.mkfifo(tmp_path / "pipe.pdf")
    (tmp_path / ".recycle").mkdir()
    write(tmp_path / ".recycle" / "deleted.pdf")
    for name in (".hidden.pdf", "Thumbs.db", "desktop.ini", "scan.crdownload"):
        write(tmp_path / name)
    async with fast(tmp_path) as intake:
        stream = intake.stable()
        sentinel = write(tmp_path / "Tờ trình – sentinel.jpg")  # created last, via an event
        seen = await take(stream, sentinel)
        await stream.aclose()  # type: ignore[attr-defined]
    # Symlinks (to a file or a folder) and FIFOs come out so the service can quarantine them with
    # a reason; nothing inside the linked folder or under ignored names does.
    assert set(seen) == {tmp_path / "link.pdf", tmp_path / "linked-dir", tmp_path / "pipe.pdf", sentinel}


async def test_lost_events_are_caught_by_the_periodic_rescan(tmp_path: Path) -> None:
    # use_events=False stands for every way events get lost (overflow, SMB/NFS, service down).
    async with Intake(tmp_path, use_events=False, quiet_seconds=0.3, check_interval=0.05,
                      rescan_seconds=0.5) as intake:
        stream = intake.stable()
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.2)  # let the startup scan see an empty folder
        late = write(tmp_path / "Quyết định số 13.pdf")
        assert await asyncio.wait_for(first, 10) == late
        await stream.aclose()  # type: ignore[attr-defined]


async def test_a_file_left_in_place_is_yielded_again_at_a_later_rescan(tmp_path: Path) -> None:
    doc = write(tmp_path / "Giấy xác nhận cư trú.png")
    async with Intake(tmp_path, quiet_seconds=0.2, check_interval=0.05, rescan_seconds=0.5) as intake:
        stream = intake.stable()
        async with asyncio.timeout(10):
            assert await anext(stream) == doc
            assert await anext(stream) == doc
        await stream.aclose()  # type: ignore[attr-defined]


async def test_rescan_now_finds_a_file_without_events(tmp_path: Path) -> None:
    async with Intake(tmp_path, use_events=False, quiet_seconds=0.2, check_interval=0.05,
                      rescan_seconds=3600) as intake:
        stream = intake.stable()
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)
        doc = write(tmp_path / "Báo cáo.pdf")
        intake.rescan_now()
        assert await asyncio.wait_for(first, 10) == doc
        await stream.aclose()  # type: ignore[attr-defined]


async def test_missing_watch_dir_is_an_edge_error(tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="does not exist"):
        async with Intake(tmp_path / "nope"):
            pass


async def test_a_folder_moved_in_whole_is_taken_however_late_its_listing_events_arrive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clerk drops a day's folder into the share while the box is busy. watchdog reports the
    folder, then lists what is inside it as "created" events from its own thread; on a loaded box
    that listing can reach the intake *after* the intake already scanned the folder. Those
    listings say nothing about a writer: the scans must still be taken after the closed-file
    quiet period, not wait the 10 minutes a scanner holding its file open gets."""
    share, staging = tmp_path / "share", tmp_path / "usb"
    share.mkdir()
    staging.mkdir()
    names = ["Quyết định số 12.pdf", "Công văn số 5.png", "Tờ trình.jpg"]
    for name in names:
        write(staging / name)

    def late_listing(path: bytes | str) -> Iterator[FileSystemEvent]:
        # The emitter thread starved by OCR workers: its listing comes after the intake scanned
        # the folder (within a check interval), but well inside the quiet period.
        time.sleep(0.5)
        yield from generate_sub_created_events(path)

    monkeypatch.setattr(watchdog_inotify, "generate_sub_created_events", late_listing)
    day = share / "2026-11-30"
    # The quiet period a writer holding its file open gets (600 s in the field) stays far away.
    async with Intake(share, quiet=Quiet(closed=2.0, unknown_mtime_age=2.0, open=300.0),
                      check_interval=0.05, rescan_seconds=3600.0) as intake:
        stream = intake.stable()
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)   # the startup scan saw an empty share
        staging.rename(day)
        seen = set()
        async with asyncio.timeout(10):
            seen.add(await first)
            while len(seen) < len(names):
                seen.add(await anext(stream))
        await stream.aclose()  # type: ignore[attr-defined]
    assert seen == {day / name for name in names}


def test_watchdogs_listing_of_a_moved_in_folder_is_a_move_not_a_writer() -> None:
    listed = FileCreatedEvent("/share/2026-11-30/Quyết định số 12.pdf", is_synthetic=True)
    created = FileCreatedEvent("/share/Quyết định số 12.pdf")
    assert _translate(listed) == [(Path(listed.src_path), FileEvent.MOVED_IN, False)]
    assert _translate(created) == [(Path(created.src_path), None, False)]   # exists; writer unknown


async def test_scans_written_into_a_new_dated_folder_before_it_was_watched_are_not_held_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scanner makes today's folder and writes the first scans into it at once. On a busy box
    they are written and closed before watchdog watches the new folder, so their close is never
    seen; watchdog then reports them as "created". A create only says the file exists: the scans
    must be taken after the closed-file quiet period, not wait the 10 minutes of a writer that
    holds its file open (no close will ever come)."""
    group = watchdog_inotify.InotifyWatchGroup
    add_watches, simulate = group._add_all_callbacks, group._recursive_simulate

    def late_watch(self: object, path: bytes) -> None:
        time.sleep(0.3)   # the scans land before the new folder is watched
        add_watches(self, path)

    def late_listing(self: object, path: bytes) -> list[object]:
        time.sleep(0.5)   # and the listing of what is already there comes after the intake's scan
        return simulate(self, path)

    monkeypatch.setattr(group, "_add_all_callbacks", late_watch)
    monkeypatch.setattr(group, "_recursive_simulate", late_listing)
    day = tmp_path / "2026-11-30"
    names = ["scan0001.pdf", "scan0002.pdf"]
    async with Intake(tmp_path, quiet=Quiet(closed=2.0, unknown_mtime_age=2.0, open=300.0),
                      check_interval=0.05, rescan_seconds=3600.0) as intake:
        stream = intake.stable()
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)   # the startup scan saw an empty share
        day.mkdir()
        for name in names:
            write(day / name)
        seen = set()
        async with asyncio.timeout(10):
            seen.add(await first)
            while len(seen) < len(names):
                seen.add(await anext(stream))
        await stream.aclose()  # type: ignore[attr-defined]
    assert seen == {day / name for name in names}


def _nested(top: Path, depth: int) -> Path:
    """``top/a/a/…/a`` ``depth`` levels deep, made relative to a descriptor (each call stays short)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fd)
            inner = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    return top.joinpath(*["a"] * depth)


def _remove_nested(top: Path) -> None:
    """Undo :func:`_nested` a level at a time (shutil.rmtree, and pytest's clean-up of old
    temporary folders, recurse and would fail on it)."""
    while (level := top / "a").is_dir():
        for entry in level.iterdir():
            if entry.name != "a":
                entry.unlink()
        if (level / "a").is_dir():
            (level / "a").rename(top / "next")
            level.rmdir()
            (top / "next").rename(level)
        else:
            level.rmdir()


async def test_a_very_deep_folder_does_not_stop_the_intake(tmp_path: Path) -> None:
    """A sync tool that copied a folder into itself leaves a tree a thousand levels deep. The scan
    at the top must still be taken, and the one at the bottom too; one odd folder must never stop
    the intake (the service would stop with it, and stop again at every restart)."""
    top = write(tmp_path / "Quyết định số 12.pdf")
    bottom = write(_nested(tmp_path, 1100) / "Công văn số 5.pdf")
    try:
        async with fast(tmp_path) as intake:
            stream = intake.stable()
            seen = set()
            async with asyncio.timeout(30):
                while len(seen) < 2:
                    seen.add(await anext(stream))
            await stream.aclose()  # type: ignore[attr-defined]
    finally:
        _remove_nested(tmp_path)
    assert seen == {top, bottom}
