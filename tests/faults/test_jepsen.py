"""The exactly-once checker classifies lost, duplicated and unexpected documents, and SQLite checks."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from tests.faults.jepsen import (
    Arrival,
    Outcome,
    assert_databases_intact,
    assert_exactly_once,
    classify,
    integrity_check,
    resent_arrivals,
    view,
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


A, B, C, D = (sha(x) for x in ("a", "b", "c", "d"))
DROPPED = {
    "Công văn số 5 – Tuyên Quang.pdf": A,
    "Quyết định 12 – Hà Giang.pdf": B,
    "Tờ trình 3.pdf": C,
}


N1, N2, N3 = DROPPED


def arrival(doc_id: int, name: str, sha256: str, *tids: str, device: str = "xa-1") -> Arrival:
    return Arrival(doc_id, device, name, sha256, tids or (f"t{doc_id}",))


def test_all_delivered_once_is_valid() -> None:
    catalog = view([arrival(1, N1, A), arrival(2, N2, B), arrival(3, N3, C)], [A, B, C])
    report = assert_exactly_once(DROPPED, catalog)
    assert report.summary.ok == 3
    assert {v.outcome for v in report.verdicts} == {Outcome.OK}


def test_lost_duplicated_and_unexpected_are_reported() -> None:
    catalog = view([
        arrival(1, N1, A),
        arrival(4, N1, A, "t4"),            # the same drop catalogued as a second arrival: duplicated
        arrival(3, N3, C),
        arrival(9, "Lạ.pdf", D),            # nobody dropped this
    ], [A, C, D])
    report = classify(DROPPED, catalog)
    outcomes = {v.name: v.outcome for v in report.verdicts}
    assert outcomes == {N1: Outcome.DUPLICATED, N2: Outcome.LOST, N3: Outcome.OK}
    assert [a.sha256 for a in report.unexpected] == [D]
    s = report.summary
    assert (s.dropped, s.ok, s.lost, s.duplicated, s.unexpected, s.valid) == (3, 1, 1, 1, 1, False)
    assert report.with_outcome(Outcome.DUPLICATED)[0].tids == ("t1", "t4")
    assert report.with_outcome(Outcome.DUPLICATED)[0].arrivals == (1, 4)
    with pytest.raises(AssertionError, match=r"Quyết định 12 – Hà Giang\.pdf"):
        assert_exactly_once(DROPPED, catalog)


def test_a_resent_transfer_of_the_same_arrival_is_idempotence_not_a_copy() -> None:
    catalog = view([arrival(1, N1, A, "t1", "t1-resend"), arrival(2, N2, B), arrival(3, N3, C)], [A, B, C])
    report = assert_exactly_once(DROPPED, catalog)
    verdict = next(v for v in report.verdicts if v.sha256 == A)
    assert (verdict.outcome, verdict.arrivals, verdict.tids) == (Outcome.OK, (1,), ("t1", "t1-resend"))
    assert [a.document_id for a in resent_arrivals(catalog)] == [1]


def test_an_arrival_under_another_name_does_not_cover_a_drop() -> None:
    # Content once, provenance per arrival: the bytes being stored is not enough, the drop's own
    # arrival (its name) must be catalogued.
    report = classify({"x.pdf": A}, view([arrival(1, "y.pdf", A)], [A]))
    assert report.verdicts[0].outcome is Outcome.LOST
    assert [a.filename for a in report.unexpected] == ["y.pdf"]


def test_same_content_under_two_names_is_two_arrivals_and_one_object() -> None:
    dropped = {"scan-1.pdf": A, "scan-1 (copy).pdf": A}
    assert classify(dropped, view([arrival(1, "scan-1.pdf", A), arrival(2, "scan-1 (copy).pdf", A)],
                                  [A])).summary.valid
    one = classify(dropped, view([arrival(1, "scan-1.pdf", A)], [A]))
    assert one.summary.lost == 1 and not one.summary.valid


def test_one_circular_in_two_communes_is_judged_per_device() -> None:
    catalog = view([arrival(1, N1, A, device="xa-1"), arrival(2, N1, A, device="xa-2")], [A])
    assert assert_exactly_once({N1: A}, catalog, device="xa-1").summary.ok == 1
    assert assert_exactly_once({N1: A}, catalog, device="xa-2").summary.ok == 1
    assert classify({N1: A}, catalog).summary.duplicated == 1   # without the filter: two arrivals


def test_objects_must_be_stored_exactly_once() -> None:
    arrivals = [arrival(1, N1, A), arrival(2, N2, B), arrival(3, N3, C)]
    twice = classify(DROPPED, view(arrivals, [A, B, C, A]))
    missing = classify(DROPPED, view(arrivals, [A, B]))
    orphan = classify(DROPPED, view(arrivals, [A, B, C, D]))
    assert [r.summary.object_problems for r in (twice, missing, orphan)] == [1, 1, 1]
    assert "stored 2 times" in twice.object_problems[0]
    assert "no stored object" in missing.object_problems[0]
    assert "no arrival points at it" in orphan.object_problems[0]
    assert not any(r.summary.valid for r in (twice, missing, orphan))
    with pytest.raises(AssertionError, match="objects:"):
        assert_exactly_once(DROPPED, view(arrivals, [A, B]))


def test_device_filter_ignores_other_edges() -> None:
    catalog = view([arrival(1, "a.pdf", A, device="xa-1"), arrival(2, "b.pdf", B, device="xa-2")], [A, B])
    report = classify({"a.pdf": A}, catalog, device="xa-1")
    assert report.summary.valid
    assert not classify({"a.pdf": A}, catalog).summary.valid  # B is unexpected without the filter


def test_bad_hashes_are_refused() -> None:
    with pytest.raises(ValueError, match="sha256"):
        Arrival(1, "xa-1", "a.pdf", "ABC")
    with pytest.raises(ValueError, match="sha256"):
        view([], ["ABC"])


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
