"""The exactly-once checker classifies lost, duplicated and unexpected documents, and SQLite checks."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from tests.faults.jepsen import (
    CatalogEntry,
    Outcome,
    assert_databases_intact,
    assert_exactly_once,
    classify,
    integrity_check,
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


A, B, C, D = (sha(x) for x in ("a", "b", "c", "d"))
DROPPED = {
    "Công văn số 5 – Tuyên Quang.pdf": A,
    "Quyết định 12 – Hà Giang.pdf": B,
    "Tờ trình 3.pdf": C,
}


def test_all_delivered_once_is_valid() -> None:
    catalog = [(A, "xa-1", "t1", False), (B, "xa-1", "t2", False), (C, "xa-1", "t3", False)]
    report = assert_exactly_once(DROPPED, catalog)
    assert report.summary.ok == 3
    assert {v.outcome for v in report.verdicts} == {Outcome.OK}


def test_lost_duplicated_and_unexpected_are_reported() -> None:
    catalog = [
        CatalogEntry(A, "xa-1", "t1", False),
        CatalogEntry(A, "xa-1", "t4", False),  # stored twice as two documents: duplicated
        CatalogEntry(C, "xa-1", "t3", False),
        CatalogEntry(D, "xa-1", "t9", False),  # nobody dropped this
    ]
    report = classify(DROPPED, catalog)
    outcomes = {v.name: v.outcome for v in report.verdicts}
    assert outcomes == {
        "Công văn số 5 – Tuyên Quang.pdf": Outcome.DUPLICATED,
        "Quyết định 12 – Hà Giang.pdf": Outcome.LOST,
        "Tờ trình 3.pdf": Outcome.OK,
    }
    assert [e.sha256 for e in report.unexpected] == [D]
    s = report.summary
    assert (s.dropped, s.ok, s.lost, s.duplicated, s.unexpected, s.valid) == (3, 1, 1, 1, 1, False)
    assert report.with_outcome(Outcome.DUPLICATED)[0].tids == ("t1", "t4")
    with pytest.raises(AssertionError, match=r"Quyết định 12 – Hà Giang\.pdf"):
        assert_exactly_once(DROPPED, catalog)


def test_flagged_duplicates_are_idempotence_not_extra_copies() -> None:
    catalog = [(A, "xa-1", "t1", False), (A, "xa-1", "t1-resend", True), (B, "xa-1", "t2", False),
               (C, "xa-1", "t3", False)]
    report = assert_exactly_once(DROPPED, catalog)
    verdict = next(v for v in report.verdicts if v.sha256 == A)
    assert (verdict.outcome, verdict.copies, verdict.tids) == (Outcome.OK, 1, ("t1", "t1-resend"))


def test_only_a_flagged_duplicate_is_still_lost() -> None:
    report = classify({"x.pdf": A}, [(A, "xa-1", "t1", True)])
    assert report.verdicts[0].outcome is Outcome.LOST


def test_same_content_under_two_names_may_be_stored_once_or_twice() -> None:
    dropped = {"scan-1.pdf": A, "scan-1 (copy).pdf": A}
    assert classify(dropped, [(A, "d", "t1", False)]).summary.valid
    assert classify(dropped, [(A, "d", "t1", False), (A, "d", "t2", False)]).summary.valid
    three = classify(dropped, [(A, "d", f"t{i}", False) for i in range(3)])
    assert three.summary.duplicated == 2


def test_device_filter_ignores_other_edges() -> None:
    catalog = [(A, "xa-1", "t1", False), (B, "xa-2", "t1", False)]
    report = classify({"a.pdf": A}, catalog, device="xa-1")
    assert report.summary.valid
    assert not classify({"a.pdf": A}, catalog).summary.valid  # B is unexpected without the filter


def test_catalog_entry_rejects_bad_hash() -> None:
    with pytest.raises(ValueError, match="sha256"):
        CatalogEntry("ABC", "xa-1", "t1", False)


def make_db(path: Path, rows: int = 2000) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE doc (id INTEGER PRIMARY KEY, name TEXT, body BLOB)")
    connection.execute("CREATE INDEX doc_name ON doc(name)")
    connection.executemany("INSERT INTO doc (name, body) VALUES (?, ?)",
                           [(f"Công văn {i}", bytes(200)) for i in range(rows)])
    connection.commit()
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def test_integrity_check_ok_and_corrupt(tmp_path: Path) -> None:
    home = tmp_path / "hộp biên" / "state"  # a non-ASCII path with a space survives the URI
    home.mkdir(parents=True)
    good = home / "outbox.db"
    make_db(good)
    assert integrity_check(good) == "ok"
    assert assert_databases_intact(tmp_path) == [good]

    bad = home / "catalog.sqlite"
    make_db(bad)
    data = bytearray(bad.read_bytes())
    page = 4096
    data[5 * page : 5 * page + 512] = b"\xff" * 512  # trash the header of a b-tree page
    bad.write_bytes(bytes(data))
    assert integrity_check(bad) != "ok"
    with pytest.raises(AssertionError, match=r"catalog\.sqlite"):
        assert_databases_intact(tmp_path)


def test_integrity_check_on_garbage_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    assert "DatabaseError" in integrity_check(junk)
