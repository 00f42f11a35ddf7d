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

from edge.outbox import DocState, Outbox, OutboxError

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
                               ciphertext_size=ciphertext_size, segment_size=32768)


async def test_lifecycle_and_fields(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path / "outbox.db")
    try:
        doc = await outbox.add(name=NAME, src_path="/scans/a.pdf", size=1234, sha256=sha(1),
                               media_type="application/pdf", pages=0)
        assert doc.state is DocState.STABLE and doc.name == NAME and doc.seq == 1
        assert len(doc.tid) == 32 and doc.attempts == 0 and doc.envelope_path is None
        assert [d.tid for d in await outbox.unfinished()] == [doc.tid]
        await outbox.update_src(doc.tid, "/processed/a.pdf")
        await outbox.mark_ocr_done(doc.tid, pages=3)
        await package(outbox, doc.tid)
        assert await outbox.unfinished() == []
        got = await outbox.get(doc.tid)
        assert got is not None and got.state is DocState.PACKAGED and got.pages == 3
        assert got.src_path == "/processed/a.pdf" and got.signed_header == b"\x00hdr"
        assert [d.tid for d in await outbox.sendable()] == [doc.tid]
        await outbox.mark_sending(doc.tid)
        await outbox.mark_delivered(doc.tid, central_document_id=42, duplicate=False)
        await outbox.mark_delivered(doc.tid, central_document_id=42, duplicate=False)  # idempotent
        got = await outbox.get(doc.tid)
        assert got is not None and got.state is DocState.DELIVERED and got.central_document_id == 42
        assert await outbox.sendable() == []
        assert [d.tid for d in await outbox.delivered_with_files()] == [doc.tid]
        await outbox.clear_envelope(doc.tid)
        assert await outbox.delivered_with_files() == []
        # delivered content still counts as known: a rescan of the same bytes is a duplicate
        assert (await outbox.find_active_by_sha256(sha(1))) is not None
        dup = await outbox.add_duplicate(name="bản sao.pdf", sha256=sha(1), size=1234, of_tid=doc.tid)
        assert dup.state is DocState.DUPLICATE and dup.seq == 2
        found = await outbox.find_active_by_sha256(sha(1))
        assert found is not None and found.tid == doc.tid
        with pytest.raises(OutboxError):
            await outbox.mark_sending(dup.tid)
        with pytest.raises(OutboxError):
            await outbox.mark_ocr_done("0" * 32, pages=1)
    finally:
        await outbox.close()


async def test_failed_attempts_and_stats(tmp_path: Path) -> None:
    now = [1000.0]
    outbox = await Outbox.open(tmp_path / "outbox.db", cap_bytes=10_000, clock=lambda: now[0])
    try:
        a = await add(outbox, 1, size=3000)
        now[0] += 10
        b = await add(outbox, 2, size=2000)
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
        await outbox.mark_failed(a, "không đọc được tệp")
        got = await outbox.get(a)
        assert got is not None and got.state is DocState.FAILED and got.attempts == 2
        assert got.reason == "không đọc được tệp"
        assert await outbox.find_active_by_sha256(sha(1)) is None
        stats = await outbox.stats()
        assert stats.failed == 1 and stats.queued_bytes == 3500 and stats.last_receipt_at is None
        await outbox.mark_delivered(b, central_document_id=7, duplicate=True)
        stats = await outbox.stats()
        assert stats.queued_docs == 0 and stats.queued_bytes == 0 and stats.last_receipt_at == now[0]
        with pytest.raises(OutboxError):
            await outbox.mark_failed(b, "too late")
    finally:
        await outbox.close()


async def test_seq_survives_restart_and_is_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = await Outbox.open(path)
    for n in range(3):
        await add(outbox, n)
    await outbox.close()
    # Deleting the newest row must not let its seq come back.
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM docs WHERE seq = 3")
    outbox = await Outbox.open(path)
    try:
        doc = await outbox.add(name=NAME, src_path="/x", size=1, sha256=sha(9), media_type="image/png",
                               pages=1)
        assert doc.seq == 4
    finally:
        await outbox.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


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
            "INSERT INTO docs (tid, seq, state, name, src_path, size, sha256, media_type, pages, "
            "created_at, updated_at, envelope_path, signed_header, ciphertext_size, segment_size) "
            "VALUES (?, ?, 'packaged', ?, '/x', 100000, ?, 'application/pdf', 2, 0, 0, '/e', x'00', "
            "90000, 32768)",
            [(f"{n:032x}", n, NAME, sha(n)) for n in range(1, 5001)])
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
from edge.outbox import Outbox

async def main():
    outbox = await Outbox.open(Path(sys.argv[1]))
    n = 0
    while True:
        n += 1
        doc = await outbox.add(name="Tờ trình %d.pdf" % n, src_path="/s/%d" % n, size=n,
                               sha256="%064x" % n, media_type="application/pdf", pages=1)
        if n % 3 == 0:
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
