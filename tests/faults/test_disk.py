"""The tmpfs helper gives a real ENOSPC and the space comes back after free()."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from tests.faults.disk import fill, free, free_bytes, tmpfs

pytestmark = pytest.mark.timeout(30)


def test_fill_then_write_fails_with_enospc_and_free_gives_space_back() -> None:
    with tmpfs(4) as root:
        assert free_bytes(root) > 3 * 1024 * 1024
        assert os.stat(root).st_mode & 0o777 == 0o700
        filler = fill(root, leave_bytes=64 * 1024)
        assert free_bytes(root) <= 64 * 1024

        small = root / "Công văn số 5 – Tuyên Quang.txt"
        small.write_bytes(b"x" * 16 * 1024)  # what was left over is still usable
        with pytest.raises(OSError) as raised:
            (root / "big.bin").write_bytes(os.urandom(1024 * 1024))
        assert raised.value.errno == errno.ENOSPC

        free(filler)
        assert not filler.exists()
        (root / "big.bin").write_bytes(os.urandom(1024 * 1024))
    assert not root.exists()  # unmounted and removed


def test_sqlite_reports_disk_full() -> None:
    with tmpfs(2) as root:
        connection = sqlite3.connect(root / "outbox.db")
        connection.execute("CREATE TABLE t (b BLOB)")
        connection.commit()
        fill(root, leave_bytes=0)
        with pytest.raises(sqlite3.OperationalError, match="full"):
            connection.execute("INSERT INTO t VALUES (?)", (os.urandom(256 * 1024),))
            connection.commit()
        connection.close()
        free(root)  # a directory: every filler in it goes
        assert free_bytes(root) > 1024 * 1024


def test_fill_refuses_a_real_disk(tmp_path: Path) -> None:
    if free_bytes(tmp_path) <= 1 << 30:
        pytest.skip("this disk is small enough that the guard does not apply")
    with pytest.raises(ValueError, match="refusing"):
        fill(tmp_path)


def test_free_refuses_files_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "original.pdf"
    precious.write_bytes(b"%PDF")
    with pytest.raises(ValueError, match="not a filler"):
        free(precious)
    assert precious.exists()
