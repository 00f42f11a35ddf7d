"""The pure settle rule, driven with a fake clock and fabricated stat results."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edge.settle import Settler, is_ignored

P = Path("/scans/Công văn số 5 – Tuyên Quang.pdf")


def st(size: int, mtime: float, mode: int = stat.S_IFREG | 0o644) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, 0, 0, size, 0, int(mtime), 0),
                          {"st_mtime_ns": int(mtime * 1e9)})


def test_settles_after_quiet_period_with_two_equal_checks() -> None:
    s = Settler(5)
    s.observe(P, st(100, 0), now=10)
    assert s.due(10) == []
    s.observe(P, st(100, 0), now=14.9)
    assert s.due(14.9) == []
    s.observe(P, st(100, 0), now=15)
    assert s.due(15) == [P]
    assert s.pending() == 0
    assert s.due(20) == []  # returned once, then forgotten


def test_one_observation_is_never_enough_however_long_we_wait() -> None:
    s = Settler(5)
    s.observe(P, st(100, 0), now=0)
    assert s.due(1000) == []


def test_growing_file_restarts_the_quiet_period() -> None:
    s = Settler(5)
    for t in range(10):  # a slow scanner appending every second
        s.observe(P, st(100 * (t + 1), t), now=t)
        assert s.due(t) == []
    s.observe(P, st(1000, 9), now=12)
    assert s.due(12) == []
    s.observe(P, st(1000, 9), now=14)
    assert s.due(14) == [P]


def test_rewrite_in_place_same_size_new_mtime_restarts() -> None:
    s = Settler(2)
    s.observe(P, st(100, 0), now=0)
    s.observe(P, st(100, 1.5), now=1.5)
    s.observe(P, st(100, 1.5), now=3)
    assert s.due(3) == []
    s.observe(P, st(100, 1.5), now=3.5)
    assert s.due(3.5) == [P]


def test_recent_mtime_keeps_waiting_when_wall_clock_is_known() -> None:
    s = Settler(5)
    # Coarse mtime: unchanged across 5 s of checks, but the wall clock says it was written 1 s ago.
    s.observe(P, st(100, 1000), now=0, wall_now=996)
    s.observe(P, st(100, 1000), now=5, wall_now=1001)
    assert s.due(5) == []
    s.observe(P, st(100, 1000), now=9, wall_now=1005)
    assert s.due(9) == [P]


def test_future_mtime_from_a_skewed_client_does_not_block_forever() -> None:
    s = Settler(5)
    s.observe(P, st(100, 99999), now=0, wall_now=1000)
    s.observe(P, st(100, 99999), now=5, wall_now=1005)
    assert s.due(5) == [P]


def test_vanished_files_are_forgotten_and_non_regular_ones_are_due_at_once_for_refusal() -> None:
    s = Settler(1)
    s.observe(P, st(100, 0), now=0)
    s.observe(P, None, now=1)
    assert s.pending() == 0
    fifo, link, folder = Path("/s/pipe.pdf"), Path("/s/link.pdf"), Path("/s/sub")
    s.observe(fifo, st(0, 0, stat.S_IFIFO | 0o644), now=2)
    s.observe(link, st(0, 0, stat.S_IFLNK | 0o777), now=3)
    s.observe(folder, st(0, 0, stat.S_IFDIR | 0o755), now=3)
    # No quiet period: they will never become scans, so the caller refuses them now, once.
    assert s.due(3) == [fifo, link]
    assert s.due(10) == [] and s.pending() == 0


def test_forget_and_order() -> None:
    s = Settler(0)
    a, b = Path("/s/a.pdf"), Path("/s/b.pdf")
    for t in (0, 1):
        s.observe(a, st(1, 0), now=t)
        s.observe(b, st(1, 0), now=t)
    s.forget(b)
    assert s.due(1) == [a]


def test_clock_going_backwards_is_not_taken_as_quiet() -> None:
    s = Settler(5)
    s.observe(P, st(1, 0), now=100)
    s.observe(P, st(1, 0), now=50)
    assert s.due(50) == []


@pytest.mark.parametrize("name", [
    ".hidden.pdf", ".~lock.doc#", "~$temp.docx", "scan.tmp", "scan.PART", "scan.pdf.part",
    "scan.crdownload", "Thumbs.db", "desktop.ini", "backup~", "",
])
def test_ignored_names(name: str) -> None:
    assert is_ignored(name)


@pytest.mark.parametrize("name", [
    "Quyết định số 12 – UBND.pdf", "Công văn số 5 – Tuyên Quang.png", "scan 001.tif", "a.jpg",
])
def test_document_names_are_not_ignored(name: str) -> None:
    assert not is_ignored(name)


# -- writer state (rule 2): a scanner that pauses with the file open is not finished ---------------

from edge.settle import FileEvent, Quiet, Writer  # noqa: E402

QUIET = Quiet(closed=5, unknown_mtime_age=60, open=600)


def _steady(s: Settler, start: float, end: float, *, size: int = 100, mtime: float = 0.0,
            wall0: float | None = None) -> list[Path]:
    """Observe an unchanging file once a second from ``start`` to ``end`` until it is due."""
    t = start
    while t <= end:
        s.observe(P, st(size, mtime), now=t, wall_now=None if wall0 is None else wall0 + t)
        if due := s.due(t):
            return due
        t += 1
    return []


def test_a_file_held_open_waits_through_a_long_pause_until_it_is_closed() -> None:
    s = Settler(QUIET)
    s.event(P, FileEvent.WRITTEN)                       # page 1 written, descriptor kept open
    assert s.writer(P) is Writer.OPEN
    assert _steady(s, 0, 120) == []                     # two minutes turning pages: not finished
    s.event(P, FileEvent.CLOSED)
    assert s.writer(P) is Writer.CLOSED
    assert _steady(s, 121, 125) == []                   # the quiet counts from the close …
    assert _steady(s, 126, 130) == [P]                  # … closed, then 5 s quiet: finished


def test_a_writer_that_never_closes_is_taken_after_the_open_quiet_period() -> None:
    s = Settler(QUIET)
    s.event(P, FileEvent.WRITTEN)
    assert _steady(s, 0, 598) == []
    assert _steady(s, 599, 601) == [P]


def test_a_rename_into_place_counts_as_closed() -> None:
    s = Settler(QUIET)
    s.event(P, FileEvent.MOVED_IN)
    assert _steady(s, 0, 5) == [P]


def test_unknown_writer_needs_an_old_mtime_and_a_rescan_keeps_the_state() -> None:
    s = Settler(QUIET)
    # No event ever (a network mount): quiet is not enough while the mtime is young.
    assert _steady(s, 0, 30, mtime=1000.0, wall0=1000.0) == []
    assert _steady(s, 31, 61, mtime=1000.0, wall0=1000.0) == [P]   # mtime now 60 s old
    s.event(P, FileEvent.WRITTEN)
    s.event(P, FileEvent.CLOSED)
    _steady(s, 100, 110)                               # due and forgotten …
    assert s.writer(P) is Writer.CLOSED                # … but what the events said is kept


def test_gone_forgets_the_writer_state() -> None:
    s = Settler(QUIET)
    s.event(P, FileEvent.WRITTEN)
    s.event(P, FileEvent.GONE)
    assert s.writer(P) is Writer.UNKNOWN
