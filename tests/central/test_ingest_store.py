"""One contract for every catalog backend the ingest runs on: SQLite (default) and PostgreSQL.

The same operations, through ``IngestStore``, inside a transaction the test owns (the stages never
commit), must give the same answers on both: transfer state and the segment log, job leases, arrivals
and their natural key, clone collisions, and diacritic-free search with đ folded.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from central import catalog
from central.catalog import ArrivalKey, NewDocument, StoredSegment
from central.config import CentralConfig
from central.ingest import Ingestor
from central.ingest.store import AdminStore, SqliteIngestStore
from central.keys import CentralKeys
from protocol.messages import Ack, AckState, Receipt
from protocol.ranges import RangeSet
from tests.central.builders import seal_document, wire
from tests.support.postgres import Postgres

Transaction = Callable[[], AbstractContextManager[AdminStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def transaction(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transaction]:
    if request.param == "sqlite":
        conn: Any = catalog.connect(tmp_path / "catalog.db")
        store: AdminStore = SqliteIngestStore(conn)
        begin = "BEGIN IMMEDIATE"
    else:
        from central.ingest import pgstore  # noqa: PLC0415 - psycopg only where PostgreSQL runs

        server: Postgres = request.getfixturevalue("postgres")
        conn = pgstore.connect(server.create_database())
        pgstore.migrate(conn)
        store = pgstore.PostgresIngestStore(conn)
        begin = "BEGIN"

    @contextmanager
    def tx() -> Iterator[AdminStore]:
        conn.execute(begin)
        try:
            yield store
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    yield tx
    conn.close()


def _document(device: str, tid: str, seq: int, content: bytes, name: str, text: str) -> NewDocument:
    return NewDocument(device=device, tid=tid, seq=seq, filename=name,
                       sha256=hashlib.sha256(content).hexdigest(), size=len(content), pages=1,
                       media_type="application/pdf",
                       received_at="2026-12-01T08:00:00.000Z", text=text, metadata="{}",
                       package_sha256=hashlib.sha256(tid.encode()).hexdigest(),
                       captured_at="2026-11-30T07:00:00Z")


def test_transfer_state_and_the_segment_log(transaction: Transaction) -> None:
    with transaction() as db:
        db.add_device("xa-tan-trao", b"k" * 32)
        db.insert_transfer(tid="a" * 32, device="xa-tan-trao", seq=1, header=b"h1", size=100)
        db.insert_transfer(tid="b" * 32, device="xa-tan-trao", seq=2, header=b"h2", size=50)
    with transaction() as db:
        record = db.get_transfer("a" * 32)
        assert record is not None and (record.state, record.size, record.held, record.complete) == (
            "receiving", 100, (), False)
        assert set(db.get_transfers(["a" * 32, "b" * 32, "c" * 32])) == {"a" * 32, "b" * 32}
        assert db.transfer_by_seq("xa-tan-trao", 2) is not None
        assert db.transfer_by_seq("xa-tan-trao", 3) is None
        db.add_segments("a" * 32, [StoredSegment(60, 40, 7, "journal-w-00000000-00000001.log", 0),
                                   StoredSegment(0, 60, 9, None, None)])
        db.add_segments("a" * 32, [StoredSegment(0, 60, 9, None, None)])   # a repeat is ignored
        db.set_held("a" * 32, RangeSet.of([(0, 60), (60, 100)]))
    with transaction() as db:
        record = db.get_transfer("a" * 32)
        assert record is not None and record.held == ((0, 100),)
        assert record.held_bytes == 100 and record.complete
        held = db.segment_at("a" * 32, 60)
        assert held is not None and (held.length, held.crc) == (40, 7)
        assert db.segment_at("a" * 32, 10) is None
        assert [(s.offset, s.log, s.pos) for s in db.stored_segments("a" * 32)] == [
            (0, None, None), (60, "journal-w-00000000-00000001.log", 0)]
        assert db.journal_in_use("journal-w-00000000-00000001.log")
        assert db.complete_transfers_without_job() == ["a" * 32]
        db.add_job("a" * 32)
        db.reject_transfer("a" * 32, "bad", "BagError")
    with transaction() as db:
        record = db.get_transfer("a" * 32)
        assert record is not None and (record.state, record.error_class) == ("rejected", "BagError")
        assert db.stored_segments("a" * 32) == [] and not db.journal_in_use("journal-w-00000000-00000001.log")
        assert db.claimable_jobs(worker="w1") == []


def test_segments_of_a_journal_file_and_moving_them(transaction: Transaction) -> None:
    """Compaction's view: a file's rows, movable unless their transfer has an assembly job."""
    old, new = "journal-w-00000000-00000001.log", "journal-w-00000000-00000009.log"
    with transaction() as db:
        db.add_device("xa-tan-trao", b"k" * 32)
        db.insert_transfer(tid="a" * 32, device="xa-tan-trao", seq=1, header=b"h1", size=100)
        db.insert_transfer(tid="b" * 32, device="xa-tan-trao", seq=2, header=b"h2", size=10)
        db.add_segments("a" * 32, [StoredSegment(0, 40, 7, old, 0), StoredSegment(40, 20, 8, old, 40)])
        db.add_segments("b" * 32, [StoredSegment(0, 10, 9, old, 60)])
        db.set_held("b" * 32, RangeSet.of([(0, 10)]))
        db.add_job("b" * 32)
    with transaction() as db:
        rows = db.segments_in_journal(old)
        assert [(tid[0], seg.offset, seg.pos, movable) for tid, seg, movable in rows] == [
            ("a", 0, 0, True), ("a", 40, 40, True), ("b", 0, 60, False)]
        db.move_segments([("a" * 32, 0, new, 100), ("a" * 32, 40, new, 140)])
    with transaction() as db:
        assert [(s.offset, s.log, s.pos) for s in db.stored_segments("a" * 32)] == [
            (0, new, 100), (40, new, 140)]
        assert [tid[0] for tid, _, _ in db.segments_in_journal(old)] == ["b"]
        assert db.journal_in_use(new) and db.segments_in_journal("journal-w-00000000-00000002.log") == []


def test_job_leases(transaction: Transaction) -> None:
    with transaction() as db:
        db.add_device("xa-1", b"k" * 32)
        db.insert_transfer(tid="d" * 32, device="xa-1", seq=1, header=b"h", size=10)
        db.add_job("d" * 32)
        db.add_job("d" * 32)   # idempotent
        assert db.claimable_jobs(worker="w1") == ["d" * 32]
        assert db.claim_job("d" * 32, worker="w1", lease_s=60)
    with transaction() as db:
        assert not db.claim_job("d" * 32, worker="w2", lease_s=60)   # held by a live lease
        assert db.claimable_jobs(worker="w2") == []
        assert db.claim_job("d" * 32, worker="w1", lease_s=60)       # its own: a restarted worker resumes
        assert db.claim_job("d" * 32, worker="w1", lease_s=-1)       # …and lets it lapse
    with transaction() as db:
        assert db.claimable_jobs(worker="w2") == ["d" * 32]          # a lapsed lease is anyone's
        assert db.claim_job("d" * 32, worker="w2", lease_s=60)
        db.release_job("d" * 32, "OSError: disk full")
    with transaction() as db:
        assert db.claim_job("d" * 32, worker="w3", lease_s=60)


def test_arrivals_objects_and_search(transaction: Transaction) -> None:
    content = b"%PDF-1.4 cong van"
    with transaction() as db:
        for device in ("xa-tan-trao", "xa-minh-thanh"):
            db.add_device(device, b"k" * 32)
        first = _document("xa-tan-trao", "1" * 32, 1, content, "Công văn 15 – Tân Trào.pdf",
                          "Quyết định về đất đai của Ủy ban")
        second = _document("xa-minh-thanh", "2" * 32, 1, content, "Bản sao Đồng Văn.pdf", "Bản lưu tại xã")
        for doc in (first, second):
            db.insert_transfer(tid=doc.tid, device=doc.device, seq=1, header=b"h", size=1)
        assert not db.object_exists(first.sha256)
        one = db.insert_document(first)
        two = db.insert_document(second)
    with transaction() as db:
        assert db.object_exists(first.sha256) and one != two
        assert db.arrival_by_key(first.key) == one and db.arrival_by_key(second.key) == two
        other = ArrivalKey("xa-tan-trao", first.sha256, first.filename, "2026-01-01T00:00:00Z",
                           first.key.text_sha256)
        assert db.arrival_by_key(other) is None
        for query in ("quyết định", "quyet dinh", "QUYET ĐỊNH", "dat dai", "uy ban"):
            assert db.search(query) == [one], query
        # đ folds to d on both sides, whatever the database's own unaccent does with it.
        assert db.search("dong van") == [two] and db.search("Đồng Văn") == [two]
        assert db.search("tan trao", device="xa-minh-thanh") == []
        assert db.search("%") == [] and db.search("   ") == []


def test_seq_collisions_and_device_status(transaction: Transaction) -> None:
    with transaction() as db:
        db.add_device("xa-1", b"k" * 32)
        db.insert_transfer(tid="e" * 32, device="xa-1", seq=1, header=b"h", size=1)
        assert db.record_seq_collision(device="xa-1", seq=1, tid="f" * 32, other_tid="e" * 32,
                                       at="2026-12-01T00:00:00.000Z")
        assert not db.record_seq_collision(device="xa-1", seq=1, tid="f" * 32, other_tid="e" * 32,
                                           at="2026-12-01T00:00:01.000Z")
        db.update_device_status("xa-1", online=True, backlog_docs=3, backlog_bytes=9, last_error=None,
                                status_json="{}", at="2026-12-01T00:00:02.000Z")
        db.touch_devices(["xa-1"], "2026-12-01T00:00:03.000Z")
        db.mark_offline("xa-1", at="2026-12-01T00:00:04.000Z")
        assert db.set_device_status("xa-1", "revoked")
    with transaction() as db:
        device = db.get_device("xa-1")
        assert device is not None and device.status == "revoked" and db.get_device("xa-2") is None


def test_device_load_quota_state_and_expiry(transaction: Transaction) -> None:
    with transaction() as db:
        db.add_device("xa-tan-trao", b"k" * 32)
        db.add_device("xa-khac", b"k" * 32)
        assert db.device_load("xa-tan-trao") == catalog.DeviceLoad()
        db.insert_transfer(tid="a" * 32, device="xa-tan-trao", seq=1, header=b"h1", size=100)
        db.insert_transfer(tid="b" * 32, device="xa-tan-trao", seq=2, header=b"h2", size=50)
        db.insert_transfer(tid="c" * 32, device="xa-tan-trao", seq=3, header=b"h3", size=70)
        db.reject_transfer("c" * 32, "bad", "BagError")
        db.insert_transfer(tid="d" * 32, device="xa-khac", seq=1, header=b"h4", size=999)
        db.add_segments("a" * 32, [StoredSegment(0, 10, 1, "journal-central-00000000-00000001.log", 0)])
        db.set_held("a" * 32, RangeSet.of([(0, 10)]))
        db.set_init_tokens("xa-tan-trao", 7.5, 1000.0)
        assert db.set_strikes("xa-tan-trao", 3.0, 1001.0, flag_at=None) is False
    with transaction() as db:
        load = db.device_load("xa-tan-trao")
        assert (load.open_transfers, load.open_bytes) == (2, 150)   # receiving only, signed sizes
        assert (load.init_tokens, load.init_tokens_at) == (7.5, 1000.0)
        assert (load.strikes, load.strikes_at) == (3.0, 1001.0)
        assert load.misbehaving_since is None
        assert db.set_strikes("xa-tan-trao", 11.0, 1002.0, flag_at="2026-12-01T08:00:00.000Z") is True
        assert db.set_strikes("xa-tan-trao", 12.0, 1003.0, flag_at="2026-12-02T08:00:00.000Z") is False
    with transaction() as db:
        assert db.device_load("xa-tan-trao").misbehaving_since == "2026-12-01T08:00:00.000Z"   # kept
        assert db.clear_misbehaving(quiet_since=1003.0) == []
        assert db.clear_misbehaving(quiet_since=1003.5) == ["xa-tan-trao"]
        assert db.device_load("xa-tan-trao").misbehaving_since is None
    with transaction() as db:
        db.add_job("b" * 32)   # complete and waiting for an assembler: never expired
        assert db.expire_stalled(before="2000-01-01T00:00:00.000Z") == []
        expired = db.expire_stalled(before="2999-01-01T00:00:00.000Z")
        assert sorted(expired) == [("a" * 32, "xa-tan-trao"), ("d" * 32, "xa-khac")]
    with transaction() as db:
        record = db.get_transfer("a" * 32)
        assert record is not None and (record.state, record.held, record.error_class) == (
            "expired", (), "TransferExpired")
        assert db.stored_segments("a" * 32) == []
        assert not db.journal_in_use("journal-central-00000000-00000001.log")
        assert db.device_load("xa-tan-trao").open_transfers == 1
        db.revive_transfer("a" * 32)
        db.revive_transfer("c" * 32)   # a rejected transfer is never revived
    with transaction() as db:
        revived, rejected = db.get_transfer("a" * 32), db.get_transfer("c" * 32)
        assert revived is not None and (revived.state, revived.held, revived.error) == ("receiving", (), None)
        assert rejected is not None and rejected.state == "rejected"


def test_a_failed_transaction_leaves_nothing(transaction: Transaction) -> None:
    with pytest.raises(RuntimeError), transaction() as db:
        db.add_device("xa-1", b"k" * 32)
        raise RuntimeError("the writer's group failed before COMMIT")
    with transaction() as db:
        assert db.get_device("xa-1") is None


def test_sqlite_store_reads_what_the_catalog_functions_wrote(tmp_path: Path) -> None:
    # The SQLite store is a thin face over central.catalog: the HTTP side reads the same rows.
    conn = catalog.connect(tmp_path / "catalog.db")
    SqliteIngestStore(conn).add_device("xa-1", b"k" * 32)
    conn.commit()
    reader = catalog.connect(tmp_path / "catalog.db", readonly=True)
    assert catalog.get_device(reader, "xa-1") is not None


def test_the_ingest_stages_run_on_postgres(config: CentralConfig, central_keys: CentralKeys,
                                           postgres: Postgres) -> None:
    """Admission, batch, journal and archive unchanged on a PostgreSQL catalog: stored, receipted,
    searchable; a repeat is answered from the catalog; a forged segment is a conflict."""
    from central.ingest import pgstore  # noqa: PLC0415

    conn = pgstore.connect(postgres.create_database())
    pgstore.migrate(conn)
    store = pgstore.PostgresIngestStore(conn)
    key = nacl.signing.SigningKey.generate()
    store.add_device("xa-tan-trao", bytes(key.verify_key))
    ingestor = Ingestor(conn, config.paths, central_keys, max_plaintext=config.ingest.max_plaintext_bytes)
    original = b"%PDF-1.4\n" + secrets.token_bytes(50_000)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=key,
                           central_key=central_keys.encryption.public_key, original=original,
                           text="Quyết định giao đất cho hộ ông Đặng Văn Lâm")
    replies = ingestor.handle_batch(wire(sealed.messages(8192)))
    (receipt,) = [r for r in replies if isinstance(r, Receipt)]
    body = receipt.verify(central_keys.receipt.verify_key)
    assert body.sha256 == hashlib.sha256(original).hexdigest() and not body.duplicate
    assert store.search("dang van lam") == [body.document_id] == store.search("Đặng Văn Lâm")
    again = ingestor.handle_batch(wire(sealed.messages(8192)))
    assert [r for r in again if isinstance(r, Receipt)] and all(
        r.state is AckState.STORED for r in again if isinstance(r, Ack))
    record = store.get_transfer(sealed.tid)
    assert record is not None and record.state == "stored" and store.stored_segments(sealed.tid) == []
    assert not list(config.paths.staging.iterdir())   # the journal file went with the last segment row
    conn.close()


def test_arrivals_awaiting_their_original(transaction: Transaction) -> None:
    """A notice's arrival: searchable, no object, counted apart; completed in place by its original."""
    with transaction() as db:
        db.add_device("xa-tan-trao", b"k" * 32)
        doc = _document("xa-tan-trao", "a" * 32, 1, b"original", "Tờ trình đường.pdf", "Tờ trình sửa đường")
        doc_id = db.insert_document(doc, awaiting=True)
        db.insert_notice(tid="a" * 32, device="xa-tan-trao", seq=1, payload_sha256="p" * 64,
                         document_id=doc_id, at="2026-12-01T08:00:00.000Z")
    with transaction() as db:
        assert not db.object_exists(doc.sha256)
        assert db.search("to trinh duong") == [doc_id]
        assert db.awaiting_load("xa-tan-trao") == (1, len(doc.text.encode()))
        awaiting = db.awaiting_document(device="xa-tan-trao", tid="a" * 32)
        assert awaiting is not None and (awaiting.id, awaiting.sha256) == (doc_id, doc.sha256)
        assert db.awaiting_document(doc_id=doc_id) == awaiting
        notice = db.get_notice("a" * 32)
        assert notice is not None and (notice.seq, notice.document_id) == (1, doc_id)
        assert db.notice_by_seq("xa-tan-trao", 1) == notice and db.notice_by_seq("xa-tan-trao", 2) is None
    with transaction() as db:
        db.complete_document(doc_id, doc)
    with transaction() as db:
        assert db.object_exists(doc.sha256) and db.arrival_by_key(doc.key) == doc_id
        assert db.awaiting_document(doc_id=doc_id) is None and db.awaiting_load("xa-tan-trao") == (0, 0)
        assert db.search("sua duong") == [doc_id]
        other = _document("xa-tan-trao", "b" * 32, 2, b"other", "Khác.pdf", "khác hẳn")
        other_id = db.insert_document(other, awaiting=True)
        db.drop_awaiting_document(other_id, successor=doc_id)
        assert db.search("khac") == [] and db.awaiting_load("xa-tan-trao") == (0, 0)


def test_a_replacement_finds_what_the_boxes_it_replaces_announced(transaction: Transaction) -> None:
    """Through a chain of replacements (a replacement that failed in its turn), and only the bytes the
    new box sent, only while they still await their original, and never another commune's."""
    content = b"the scan the stolen box announced"
    with transaction() as db:
        for device, replaces in (("xa-a", None), ("xa-b", None), ("xa-a-2", "xa-a"), ("xa-a-3", "xa-a-2")):
            db.add_device(device, b"k" * 32, replaces=replaces)
        first = db.insert_document(_document("xa-a", "a" * 32, 1, content, "Quyết định.pdf", "x"),
                                   awaiting=True)
        middle = db.insert_document(_document("xa-a-2", "b" * 32, 1, content, "Quyết định.pdf", "x"),
                                    awaiting=True)
        other = db.insert_document(_document("xa-a", "c" * 32, 2, b"other", "Khác.pdf", "y"), awaiting=True)
        elsewhere = db.insert_document(_document("xa-b", "d" * 32, 1, content, "Quyết định.pdf", "x"),
                                       awaiting=True)
    sha = hashlib.sha256(content).hexdigest()
    with transaction() as db:
        assert db.replaced_awaiting("xa-a-3", sha) == [first, middle]
        assert db.replaced_awaiting("xa-a-2", sha) == [first]
        assert db.replaced_awaiting("xa-a", sha) == [] and db.replaced_awaiting("xa-b", sha) == []
        assert db.replaced_awaiting("xa-a-3", hashlib.sha256(b"other").hexdigest()) == [other]
        assert elsewhere not in db.replaced_awaiting("xa-a-3", sha)
        db.complete_document(first, _document("xa-a", "a" * 32, 1, content, "Quyết định.pdf", "x"))
        assert db.replaced_awaiting("xa-a-3", sha) == [middle]


def test_transfers_whose_journal_is_lost_start_again_from_zero(transaction: Transaction) -> None:
    lost, kept = "journal-central-00000000-00000001.log", "journal-central-00000000-00000002.log"
    with transaction() as db:
        db.add_device("xa-tan-trao", b"k" * 32)
        db.insert_transfer(tid="a" * 32, device="xa-tan-trao", seq=1, header=b"h1", size=100)
        db.insert_transfer(tid="b" * 32, device="xa-tan-trao", seq=2, header=b"h2", size=100)
        db.add_segments("a" * 32, [StoredSegment(0, 10, 1, lost, 0), StoredSegment(10, 10, 1, kept, 0)])
        db.add_segments("b" * 32, [StoredSegment(0, 10, 1, kept, 10)])
        db.set_held("a" * 32, RangeSet.of([(0, 20)]))
        db.add_job("a" * 32)
    with transaction() as db:
        assert sorted(db.journals_of_receiving()) == [lost, kept]
        assert db.transfers_in_journal(lost) == [("a" * 32, "xa-tan-trao")]
        db.forget_held("a" * 32, f"journal {lost} is missing")
    with transaction() as db:
        record = db.get_transfer("a" * 32)
        assert record is not None and (record.state, record.held, record.error_class) == (
            "expired", (), "StagingLost")
        assert db.stored_segments("a" * 32) == [] and db.claimable_jobs(worker="w") == []
        assert db.journals_of_receiving() == [kept]
        db.revive_transfer("a" * 32)   # its init comes again: from zero, same tid
    with transaction() as db:
        revived = db.get_transfer("a" * 32)
        assert revived is not None and (revived.state, revived.held) == ("receiving", ())
