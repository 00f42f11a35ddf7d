"""The outbox: state machine, per-device sequence, byte cap, crash safety and lazy paging."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.outbox import (
    NOTICE_MOVES,
    SCHEMA_VERSION,
    TRANSITIONS,
    DocState,
    NoticeState,
    Outbox,
    OutboxError,
    Place,
)

ROOT = Path(__file__).resolve().parents[2]
NAME = "Công văn số 5 – Tuyên Quang.pdf"


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


async def add(outbox: Outbox, n: int, *, size: int = 1000, priority: int = 0) -> str:
    doc = await outbox.add(name=NAME, src_path=f"/scans/{n}.pdf", size=size, sha256=sha(n),
                           media_type="application/pdf", pages=1, priority=priority)
    return doc.tid


async def package(outbox: Outbox, tid: str, ciphertext_size: int = 500) -> None:
    await outbox.mark_packaged(tid, envelope_path=f"/outbox/{tid}.env", signed_header=b"\x00hdr",
                               ciphertext_size=ciphertext_size, segment_size=32768, pages=3)


async def test_lifecycle_and_fields(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "outbox.db", clock=lambda: 1_700_000_000.0)
    try:
        doc = await outbox.add(name=NAME, src_path="/scans/a.pdf", size=1234, sha256=sha(1),
                               media_type="application/pdf", pages=0, captured_at=1234.5)
        # A new outbox counts from the clock in ms: a re-imaged box never reuses an old seq.
        assert doc.state is DocState.STABLE and doc.place is Place.WATCH and doc.seq == 1_700_000_000_001
        assert doc.name == NAME and doc.rel_path == NAME and doc.captured_at == 1234.5
        assert len(doc.tid) == 32 and doc.attempts == 0 and doc.envelope_path is None
        assert [d.tid for d in await outbox.custody_pending()] == [doc.tid]   # its move is pending
        assert (await outbox.pending_at("/scans/a.pdf")) == doc
        await outbox.intend(doc.tid, "/processed/a.pdf")
        got = await outbox.get(doc.tid)
        assert got is not None and got.pending_path == "/processed/a.pdf"
        await outbox.moved(doc.tid, Place.HELD, "/processed/a.pdf")
        assert await outbox.custody_pending() == [] and await outbox.pending_at("/scans/a.pdf") is None
        assert [d.tid for d in await outbox.unfinished()] == [doc.tid]
        await outbox.content_changed(doc.tid, sha256=sha(2), size=2000, captured_at=1300.0)
        await package(outbox, doc.tid)
        assert await outbox.unfinished() == []
        got = await outbox.get(doc.tid)
        assert got is not None and got.state is DocState.PACKAGED and got.pages == 3
        assert got.src_path == "/processed/a.pdf" and got.signed_header == b"\x00hdr"
        assert got.pending_path is None and got.sha256 == sha(2) and got.size == 2000
        assert [d.tid for d in await outbox.sendable()] == [doc.tid]
        await outbox.mark_sending(doc.tid)
        await outbox.mark_sending(doc.tid)    # a resumed transfer
        await outbox.mark_delivered(doc.tid, central_document_id=42, duplicate=False, receipt_sha256=sha(2))
        await outbox.mark_delivered(doc.tid, central_document_id=42, duplicate=False)  # idempotent
        got = await outbox.get(doc.tid)
        assert got is not None and got.state is DocState.DELIVERED and got.central_document_id == 42
        assert got.receipt_sha256 == sha(2)
        assert await outbox.sendable() == []
        assert [d.tid for d in await outbox.custody_pending()] == [doc.tid]   # files to release
        await outbox.clear_envelope(doc.tid)
        await outbox.moved(doc.tid, Place.GONE)
        assert await outbox.custody_pending() == []
        with pytest.raises(OutboxError):
            await outbox.mark_failed(doc.tid, "too late")      # delivered is final
        with pytest.raises(OutboxError):
            await outbox.moved(doc.tid, Place.HELD)            # gone is final
        with pytest.raises(OutboxError):
            await outbox.mark_sending("0" * 32)
    finally:
        await outbox.close()


@pytest.mark.parametrize("state", list(DocState))
def test_every_state_has_a_row_in_the_transition_table(state: DocState) -> None:
    assert state in TRANSITIONS and TRANSITIONS[state] <= set(DocState)
    assert (TRANSITIONS[state] == frozenset()) == (state in (DocState.DELIVERED, DocState.FAILED))


async def test_illegal_moves_are_refused_by_the_table(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "outbox.db")
    try:
        tid = await add(outbox, 1)
        with pytest.raises(OutboxError, match="cannot become sending"):
            await outbox.mark_sending(tid)                   # stable → sending skips packaging
        with pytest.raises(OutboxError, match="cannot become delivered"):
            await outbox.mark_delivered(tid, central_document_id=1, duplicate=False)
        with pytest.raises(OutboxError, match="cannot move to gone"):
            await outbox.moved(tid, Place.GONE)              # never delete what was not held
        await outbox.moved(tid, Place.HELD, "/p/1.pdf")
        await package(outbox, tid)
        with pytest.raises(OutboxError):
            await package(outbox, tid)                       # packaged twice
        await outbox.mark_failed(tid, "central refused it", "central_refused")
        await outbox.mark_failed(tid, "again", "central_refused")   # a repeat is a no-op
        doc = await outbox.get(tid)
        assert doc is not None and doc.reason == "central refused it"
        assert doc.reason_code == "central_refused"
        assert [d.tid for d in await outbox.custody_pending()] == [tid]   # to quarantine
    finally:
        await outbox.close()


async def test_failed_attempts_and_stats(tmp_path: Path) -> None:
    now = [1000.0]
    outbox = await Outbox.open(tmp_path / "outbox.db", cap_bytes=10_000, clock=lambda: now[0])
    try:
        a = await add(outbox, 1, size=3000)
        now[0] += 10
        b = await add(outbox, 2, size=2000)
        await outbox.moved(b, Place.HELD, "/p/b.pdf")
        await package(outbox, b, ciphertext_size=1500)
        assert await outbox.bump_attempts(a, "tesseract crashed") == 1
        assert await outbox.bump_attempts(a, "tesseract crashed again") == 2
        now[0] += 5
        stats = await outbox.stats()
        assert stats.queued_docs == 2 and stats.queued_bytes == 3000 + 2000 + 1500
        assert stats.oldest_age_s == pytest.approx(15.0)
        assert stats.counts["stable"] == 1 and stats.counts["packaged"] == 1 and stats.failed == 0
        assert await outbox.room_for(10_000 - 6500)
        assert not await outbox.room_for(10_000 - 6500 + 1)
        await outbox.mark_failed(a, "không đọc được tệp", "damaged")
        got = await outbox.get(a)
        assert got is not None and got.state is DocState.FAILED and got.attempts == 2
        assert got.reason == "không đọc được tệp"
        stats = await outbox.stats()
        # "failed" counts refused scans waiting in the refused folder: this one is not there yet.
        assert stats.failed == 0 and stats.counts["failed"] == 1 and stats.queued_bytes == 3500
        await outbox.moved(a, Place.QUARANTINED, "/scans/_Lỗi/a.pdf")
        assert (await outbox.stats()).failed == 1
        await outbox.moved(a, Place.RETRIED)
        assert (await outbox.stats()).failed == 0
        await outbox.mark_delivered(b, central_document_id=7, duplicate=True)
        stats = await outbox.stats()
        assert stats.queued_docs == 0 and stats.queued_bytes == 0 and stats.last_receipt_at == now[0]
        refused = await outbox.add_refused(name="ghi chú.txt", src_path="/scans/ghi chú.txt",
                                           reason="the file is not a PNG, JPEG, TIFF or PDF",
                                           reason_code="not_a_scan")
        assert refused.state is DocState.FAILED and refused.place is Place.WATCH
        assert refused.tid in {d.tid for d in await outbox.custody_pending()}
    finally:
        await outbox.close()


async def test_seq_survives_restart_and_is_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = await Outbox.open(path)
    seqs = [(await outbox.get(await add(outbox, n))).seq for n in range(3)]  # type: ignore[union-attr]
    await outbox.close()
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    # Deleting the newest row must not let its seq come back.
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM docs WHERE seq = ?", (seqs[-1],))
    outbox = await Outbox.open(path)
    try:
        doc = await outbox.add(name=NAME, src_path="/x", size=1, sha256=sha(9), media_type="image/png",
                               pages=1)
        assert doc.seq == seqs[-1] + 1
    finally:
        await outbox.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


_V1_SCHEMA = """
CREATE TABLE docs (
    tid TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, state TEXT NOT NULL, name TEXT NOT NULL,
    src_path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, media_type TEXT NOT NULL,
    pages INTEGER NOT NULL, priority INTEGER NOT NULL DEFAULT 0, envelope_path TEXT, signed_header BLOB,
    ciphertext_size INTEGER, segment_size INTEGER, attempts INTEGER NOT NULL DEFAULT 0, reason TEXT,
    duplicate_of TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL, delivered_at REAL,
    central_document_id INTEGER) STRICT;
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
INSERT INTO counters (name, value) VALUES ('seq', 6);
CREATE INDEX docs_sendable ON docs (priority DESC, seq) WHERE state IN ('packaged', 'sending');
CREATE INDEX docs_sha256 ON docs (sha256);
PRAGMA user_version = 1;
"""


async def test_a_version_1_outbox_is_migrated_in_place(tmp_path: Path) -> None:
    """Boxes in the field keep their queue across the upgrade: every row keeps its seq and gets a place."""
    path = tmp_path / "outbox.db"
    processed = tmp_path / "processed"
    processed.mkdir()
    (processed / "b.pdf").write_bytes(b"b")
    (processed / "c.pdf").write_bytes(b"c")
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.pdf").write_bytes(b"a")
    rows = [  # tid, seq, state, src_path, envelope_path
        ("a" * 32, 1, "stable", str(tmp_path / "scans" / "a.pdf"), None),
        ("b" * 32, 2, "ocr_done", str(processed / "b.pdf"), None),
        ("c" * 32, 3, "sending", str(processed / "c.pdf"), "/e/c.env"),
        ("d" * 32, 4, "delivered", str(processed / "gone.pdf"), None),
        ("e" * 32, 5, "duplicate", "", None),
        ("f" * 32, 6, "failed", str(processed / "gone-too.pdf"), None),
    ]
    with sqlite3.connect(path) as db:
        db.executescript(_V1_SCHEMA)
        db.executemany(
            "INSERT INTO docs (tid, seq, state, name, src_path, size, sha256, media_type, pages, "
            "envelope_path, signed_header, ciphertext_size, segment_size, created_at, updated_at) VALUES "
            "(?, ?, ?, ?, ?, 1, ?, 'application/pdf', 1, ?, x'00', 10, 32768, 5, 5)",
            [(tid, seq, state, NAME, src, sha(seq), env) for tid, seq, state, src, env in rows])
    outbox = await Outbox.open(path)
    try:
        got = {d.tid[0]: d for d in [await outbox.get(r[0]) for r in rows] if d is not None}
        assert [(k, got[k].state.value, got[k].place.value) for k in "abcdef"] == [
            ("a", "stable", "watch"), ("b", "stable", "held"), ("c", "sending", "held"),
            ("d", "delivered", "gone"), ("e", "delivered", "gone"), ("f", "failed", "quarantined")]
        assert [got[k].seq for k in "abcdef"] == [1, 2, 3, 4, 5, 6]
        assert (await add_doc_seq(outbox)) == 7          # the counter carries on
        assert [d.tid for d in await outbox.sendable()] == ["c" * 32]
    finally:
        await outbox.close()


async def add_doc_seq(outbox: Outbox) -> int:
    return (await outbox.add(name=NAME, src_path="/n", size=1, sha256=sha(99), media_type="image/png",
                             pages=1)).seq


async def test_sendable_orders_by_priority_then_seq_and_pages(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "outbox.db")
    try:
        tids = {}
        for n, prio in enumerate([0, 0, 5, 0, 5, 1]):
            tids[n] = await add(outbox, n, priority=prio)
            await package(outbox, tids[n])
        order = [tids[2], tids[4], tids[5], tids[0], tids[1], tids[3]]
        seen: list[str] = []
        after: int | None = None
        while page := await outbox.sendable(limit=2, after_seq=after):
            seen += [d.tid for d in page]
            after = page[-1].seq
        assert seen == order
    finally:
        await outbox.close()


async def test_lazy_sendable_with_5000_rows_is_fast(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = await Outbox.open(path)
    await outbox.close()
    # Fill directly: the subject is reading a big backlog, not 5,000 awaits of add().
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO docs (tid, seq, state, place, name, rel_path, src_path, size, sha256, media_type, "
            "pages, captured_at, created_at, updated_at, envelope_path, signed_header, ciphertext_size, "
            "segment_size) VALUES (?, ?, 'packaged', 'held', ?, ?, '/x', 100000, ?, 'application/pdf', 2, "
            "0, 0, 0, '/e', x'00', 90000, 32768)",
            [(f"{n:032x}", n, NAME, NAME, sha(n)) for n in range(1, 5001)])
        db.execute("UPDATE counters SET value = 5000")
    started = time.perf_counter()
    outbox = await Outbox.open(path)
    try:
        first = await outbox.sendable(limit=16)
        elapsed = time.perf_counter() - started
        assert [d.seq for d in first] == list(range(1, 17))
        started = time.perf_counter()
        page = await outbox.sendable(limit=16, after_seq=4990)
        paged = time.perf_counter() - started
        assert [d.seq for d in page] == list(range(4991, 5001))
        print(f"\n5000 rows: open + first page {elapsed * 1000:.1f} ms, later page {paged * 1000:.1f} ms")
        assert elapsed < 0.5 and paged < 0.1
    finally:
        await outbox.close()


_WRITER = """
import asyncio, sys
from pathlib import Path
from edge.outbox import Outbox, Place

async def main():
    outbox = await Outbox.open(Path(sys.argv[1]))
    n = 0
    while True:
        n += 1
        doc = await outbox.add(name="Tờ trình %d.pdf" % n, src_path="/s/%d" % n, size=n,
                               sha256="%064x" % n, media_type="application/pdf", pages=1)
        if n % 3 == 0:
            await outbox.moved(doc.tid, Place.HELD, "/p/%d" % n)
            await outbox.mark_packaged(doc.tid, envelope_path="/e", signed_header=b"h",
                                       ciphertext_size=n, segment_size=1024)
            # FULL sync: this one is on disk before we say so
        print(doc.tid, doc.seq, flush=True)

asyncio.run(main())
"""


async def test_kill_9_mid_writes_loses_no_committed_row(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    committed: list[tuple[str, int]] = []
    try:
        deadline = time.monotonic() + 30
        while len(committed) < 300 and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                break
            tid_text, seq_text = line.decode().split()
            committed.append((tid_text, int(seq_text)))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert len(committed) >= 300, proc.stderr.read().decode() if proc.stderr else ""
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    outbox = await Outbox.open(path)
    try:
        for tid, seq in committed:
            doc = await outbox.get(tid)
            assert doc is not None and doc.seq == seq
        stats = await outbox.stats()
        assert stats.queued_docs >= len(committed)
        new = await outbox.add(name=NAME, src_path="/n", size=1, sha256=sha(-1), media_type="x", pages=1)
        assert new.seq > max(seq for _, seq in committed)
    finally:
        await outbox.close()


# -- notices (rule 7) ------------------------------------------------------------------------------

@pytest.mark.parametrize("state", list(NoticeState))
def test_every_notice_state_has_a_row_in_its_table(state: NoticeState) -> None:
    assert state in NOTICE_MOVES


async def test_notice_lifecycle_is_durable_and_never_delivers(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = await Outbox.open(path)
    try:
        with_notice, without = await add(outbox, 1), await add(outbox, 2)
        await outbox.mark_packaged(with_notice, envelope_path="/o/1.env", signed_header=b"h",
                                   ciphertext_size=10, segment_size=32768, notice=b"sealed notice")
        await package(outbox, without)   # too large for a notice, or packaged by an older version
        assert [d.tid for d in await outbox.notices_to_send()] == [with_notice]
        assert await outbox.notice_payload(with_notice) == b"sealed notice"
        await outbox.notice_sent(with_notice)
    finally:
        await outbox.close()
    # A restart (or a power cut) after it was sent: still to send until central answers.
    outbox = await Outbox.open(path)
    try:
        doc = await outbox.get(with_notice)
        assert doc is not None and doc.notice_state is NoticeState.SENT and doc.state is DocState.PACKAGED
        assert [d.tid for d in await outbox.notices_to_send()] == [with_notice]
        await outbox.notice_answered(with_notice, catalogued=True)
        await outbox.notice_answered(with_notice, catalogued=False)   # a late, contradicting repeat
        doc = await outbox.get(with_notice)
        # Noted: nothing more to send, the sealed bytes are dropped, and custody has nothing to act on.
        assert doc is not None and doc.notice_state is NoticeState.NOTED
        assert doc.state is DocState.PACKAGED and doc.receipt_sha256 is None
        assert await outbox.notices_to_send() == [] and await outbox.notice_payload(with_notice) is None
        await outbox.notice_answered(without, catalogued=True)   # no notice: nothing recorded
        other = await outbox.get(without)
        assert other is not None and other.notice_state is None
    finally:
        await outbox.close()


async def test_a_delivered_or_refused_row_sends_no_notice(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "outbox.db")
    try:
        tids = [await add(outbox, n) for n in range(3)]
        for tid in tids:
            await outbox.mark_packaged(tid, envelope_path=f"/o/{tid}.env", signed_header=b"h",
                                       ciphertext_size=10, segment_size=32768, notice=b"n")
        await outbox.mark_delivered(tids[0], central_document_id=1, duplicate=False)
        await outbox.mark_failed(tids[1], "central refused it", "central_refused")
        await outbox.notice_answered(tids[2], catalogued=False)
        assert await outbox.notices_to_send() == []
        assert all([await outbox.notice_payload(t) is None for t in tids])
        doc = await outbox.get(tids[2])
        assert doc is not None and doc.notice_state is NoticeState.REFUSED and doc.state is DocState.PACKAGED
    finally:
        await outbox.close()


async def test_a_version_2_outbox_gains_notices_in_place(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = await Outbox.open(path)
    tid = await add(outbox, 1)
    await package(outbox, tid)
    await outbox.close()
    with sqlite3.connect(path) as db:   # back to what a v2 box has on its card
        db.execute("DROP INDEX docs_notices")
        db.execute("ALTER TABLE docs DROP COLUMN notice_state")
        db.execute("ALTER TABLE docs DROP COLUMN notice")
        db.execute("PRAGMA user_version = 2")
    outbox = await Outbox.open(path)
    try:
        doc = await outbox.get(tid)
        assert doc is not None and doc.state is DocState.PACKAGED and doc.notice_state is None
        assert [d.tid for d in await outbox.sendable()] == [tid] and await outbox.notices_to_send() == []
        new = await add(outbox, 2)
        await outbox.mark_packaged(new, envelope_path="/o/n.env", signed_header=b"h", ciphertext_size=1,
                                   segment_size=32768, notice=b"n")
        assert [d.tid for d in await outbox.notices_to_send()] == [new]
    finally:
        await outbox.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


async def test_a_write_cancelled_at_any_await_leaves_no_transaction_open(tmp_path: Path) -> None:
    """The uplink's session ends with its task group: a task cancelled while its BEGIN (or COMMIT) is
    still queued on aiosqlite's thread must not leave that transaction to the next writer, whose
    ``PRAGMA synchronous`` then failed ("may not be changed inside a transaction") and took the
    whole edge service down (seen in the broker/central kill test)."""
    outbox = await Outbox.open(tmp_path / "outbox.db")
    try:
        cut_at = set()
        for yields in range(12):   # cancel after 0, 1, 2… passes of the loop: each await in turn
            task = asyncio.create_task(add(outbox, 100 + yields))
            for _ in range(yields):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
                cut_at.add("finished")
            except asyncio.CancelledError:
                cut_at.add(yields)
            tid = await add(outbox, yields)   # the next writer: durable, so it sets the PRAGMA again
            await outbox.mark_packaged(tid, envelope_path=f"/outbox/{tid}.env", signed_header=b"\x00hdr",
                                       ciphertext_size=500, segment_size=32768, pages=1)   # not durable
            assert (await outbox.get(tid)) is not None
        assert len(cut_at - {"finished"}) >= 3, cut_at   # the cancellations did land mid-write
    finally:
        await outbox.close()
