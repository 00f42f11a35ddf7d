"""The segment journal's files: each worker owns exactly its own, whatever the other names are."""

from __future__ import annotations

from pathlib import Path

import pytest

from central.fsutil import LockHeld, exclusive_lock
from central.ingest.staging import SegmentJournal


def test_a_worker_collects_only_its_own_journal_files_not_those_of_a_longer_name(tmp_path: Path) -> None:
    plain = SegmentJournal(tmp_path, "sohoa-central")
    second = SegmentJournal(tmp_path, "sohoa-central-2")
    theirs, _ = second.append(b"segment of a live worker")
    second.sync()
    ours, _ = plain.append(b"ours")
    plain.sync()
    assert plain.own_files() == [ours] and second.own_files() == [theirs]
    # Nothing points into either: the plain worker drops its own file and leaves the other's alone.
    assert plain.collect(lambda _name: False) == [ours]
    assert (tmp_path / theirs).exists()


def test_a_lock_is_refused_while_held_and_free_once_released(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "sohoa-central.lock"
    with exclusive_lock(lock):
        with pytest.raises(LockHeld) as held, exclusive_lock(lock):
            pass
        assert held.value.holder.isdigit()
    with exclusive_lock(lock):   # released when the first holder let go
        pass
