"""Ingest on real SQLite and real files, driven by a test-side sealer (no broker needed here)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import nacl.signing
import pytest

from central import catalog
from central.admin.commands import verify
from central.config import CentralConfig
from central.errors import CatalogError
from central.ingest import Ingestor, Reply, max_ciphertext_size
from central.ingest.staging import SegmentReader
from central.keys import CentralKeys
from central.storage import ObjectStore
from protocol.envelope import ABYTES, SignedHeader
from protocol.messages import Ack, AckState, Receipt, Segment, Status, encode
from protocol.names import fold
from tests.central.builders import Sealed, seal_document, seal_stream, wire
from tests.central.conftest import Enroll


def make_ingestor(config: CentralConfig, keys: CentralKeys) -> Ingestor:
    conn = catalog.connect(config.paths.catalog)
    return Ingestor(conn, config.paths, keys, max_plaintext=config.ingest.max_plaintext_bytes)


def acks(replies: list[Reply], tid: str) -> list[Ack]:
    return [r for r in replies if isinstance(r, Ack) and r.tid == tid]


def receipts(replies: list[Reply]) -> list[Receipt]:
    return [r for r in replies if isinstance(r, Receipt)]


PDF = b"%PDF-1.4\n" + secrets.token_bytes(40_000) + b"\n%%EOF\n"


def test_round_trip_stores_catalogs_and_signs_a_receipt(config: CentralConfig, central_keys: CentralKeys,
                                                        enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=PDF)
    replies = ingestor.handle_batch(wire(sealed.messages(8192)))

    assert [a.state for a in acks(replies, sealed.tid)][-1] is AckState.STORED
    (receipt,) = receipts(replies)
    body = receipt.verify(central_keys.receipt.verify_key)
    assert body.sha256 == hashlib.sha256(PDF).hexdigest() and not body.duplicate
    stored = ObjectStore(config.paths.objects).path_for(body.sha256)
    assert stored.read_bytes() == PDF
    assert stored.relative_to(config.paths.objects).parts[:2] == (body.sha256[:2], body.sha256[2:4])
    assert not list(config.paths.staging.iterdir())

    conn = catalog.connect(config.paths.catalog, readonly=True)
    doc = catalog.get_document(conn, body.document_id)
    assert doc is not None
    assert doc["filename"] == "Công văn số 5 – Tuyên Quang.pdf"
    assert doc["device"] == "xa-tan-trao" and doc["size"] == len(PDF) and doc["pages"] == 1
    assert json.loads(doc["metadata"])["seq"] == 1
    fixity = conn.execute("SELECT event, original_sha256, package_sha256 FROM fixity").fetchall()
    assert [(f["event"], f["original_sha256"]) for f in fixity] == [("ingest", body.sha256)]
    assert ObjectStore(config.paths.objects).contains(fixity[0]["package_sha256"])


def test_search_with_and_without_diacritics(config: CentralConfig, central_keys: CentralKeys,
                                            enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    texts = ["Quyết định số 12 về đất đai", "Công văn gửi Ủy ban nhân dân huyện"]
    for seq, text in enumerate(texts, start=1):
        sealed = seal_document(device="xa-tan-trao", seq=seq, signing_key=device.signing_key,
                               central_key=central_keys.encryption.public_key,
                               original=PDF + bytes([seq]), text=text, name=f"Hồ sơ {seq}.pdf")
        ingestor.handle_batch(wire(sealed.messages()))
    conn = catalog.connect(config.paths.catalog, readonly=True)
    for query in ("Quyết định", "quyet dinh", "QUYET ĐỊNH", "đất đai"):
        found = catalog.search_documents(conn, q=query)
        assert [d["filename"] for d in found] == ["Hồ sơ 1.pdf"], query
    assert [d["filename"] for d in catalog.search_documents(conn, q="uy ban")] == ["Hồ sơ 2.pdf"]
    newest_first = ["Hồ sơ 2.pdf", "Hồ sơ 1.pdf"]
    assert [d["filename"] for d in catalog.search_documents(conn, q="ho so")] == newest_first
    assert catalog.search_documents(conn, q='" OR * NEAR(') == []   # user input is never FTS syntax
    assert len(catalog.search_documents(conn, device="xa-tan-trao")) == 2
    assert catalog.search_documents(conn, device="xa-khac") == []


def test_one_circular_in_two_communes_is_stored_once_with_two_arrivals(config: CentralConfig,
                                                                        central_keys: CentralKeys,
                                                                        enroll: Enroll) -> None:
    # Issue 7 item 3: the same bytes scanned in two communes. The content is stored once; each commune
    # keeps its own name, text and capture time, and its receipt names its own document.
    one, two = enroll("xa-tan-trao"), enroll("xa-minh-thanh")
    ingestor = make_ingestor(config, central_keys)
    first = seal_document(device="xa-tan-trao", seq=1, signing_key=one.signing_key,
                          central_key=central_keys.encryption.public_key, original=PDF,
                          name="Công văn 15 – Tân Trào.pdf", text="Công văn số 15 gửi xã Tân Trào",
                          captured_at="2026-11-02T07:30:00Z")
    second = seal_document(device="xa-minh-thanh", seq=1, signing_key=two.signing_key,
                           central_key=central_keys.encryption.public_key, original=PDF,
                           name="Bản sao – Minh Thanh.pdf", text="Bản sao lưu tại xã Minh Thanh",
                           captured_at="2026-11-03T09:15:00Z")
    (r1,) = receipts(ingestor.handle_batch(wire(first.messages())))
    (r2,) = receipts(ingestor.handle_batch(wire(second.messages())))
    assert not r1.body.duplicate and r2.body.duplicate   # duplicate: the content was already stored
    assert r1.body.document_id != r2.body.document_id and r2.device == "xa-minh-thanh"
    conn = catalog.connect(config.paths.catalog, readonly=True)
    totals = catalog.totals(conn)
    assert (totals.documents, totals.bytes_stored) == (2, len(PDF))
    assert conn.execute("SELECT count(*) FROM objects").fetchone()[0] == 1
    d1 = catalog.get_document(conn, r1.body.document_id)
    d2 = catalog.get_document(conn, r2.body.document_id)
    assert d1 is not None and d2 is not None
    assert (d2["device"], d2["filename"], d2["captured_at"], d2["text"]) == (
        "xa-minh-thanh", "Bản sao – Minh Thanh.pdf", "2026-11-03T09:15:00Z", "Bản sao lưu tại xã Minh Thanh")
    assert (d1["device"], d1["filename"], d1["captured_at"]) == (
        "xa-tan-trao", "Công văn 15 – Tân Trào.pdf", "2026-11-02T07:30:00Z")
    assert d1["same_content"] == [d2["id"]] and d2["same_content"] == [d1["id"]]
    assert d1["sha256"] == d2["sha256"] and d1["size"] == d2["size"] == len(PDF)
    assert [d["id"] for d in catalog.search_documents(conn, device="xa-minh-thanh")] == [d2["id"]]
    assert [d["id"] for d in catalog.search_documents(conn, q="minh thanh")] == [d2["id"]]
    assert [d["id"] for d in catalog.search_documents(conn, q="tan trao")] == [d1["id"]]
    events = [(r[0], r[1]) for r in conn.execute("SELECT event, document_id FROM fixity ORDER BY id")]
    assert events == [("ingest", d1["id"]), ("duplicate", d2["id"])]
    assert verify(config.home) == []


def test_the_same_arrival_sent_again_maps_to_its_document(config: CentralConfig, central_keys: CentralKeys,
                                                          enroll: Enroll) -> None:
    """Same box, bytes, name, capture time and text under a new transfer: the same arrival (its
    document id, no new row); change any one of name, capture time or text: a new arrival."""
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    base = {"device": "xa-tan-trao", "signing_key": device.signing_key,
            "central_key": central_keys.encryption.public_key, "original": PDF,
            "name": "Tờ trình 3.pdf", "text": "Tờ trình về việc sửa chữa trường học",
            "captured_at": "2026-11-04T10:00:00Z"}
    variants: list[dict[str, str]] = [{}, {}, {"name": "Tờ trình 3 (2).pdf"},
                                      {"captured_at": "2026-11-04T10:05:00Z"},
                                      {"text": "Tờ trình về việc sửa chữa trạm y tế"}]
    ids = []
    for seq, change in enumerate(variants, start=1):
        sealed = seal_document(seq=seq, **{**base, **change})  # type: ignore[arg-type]
        (receipt,) = receipts(ingestor.handle_batch(wire(sealed.messages())))
        assert receipt.body.duplicate is (seq > 1)
        ids.append(receipt.body.document_id)
    assert ids[0] == ids[1] and len(set(ids)) == 4
    conn = catalog.connect(config.paths.catalog, readonly=True)
    assert catalog.totals(conn).documents == 4
    assert catalog.documents_with_content(conn, hashlib.sha256(PDF).hexdigest()) == sorted(set(ids))


@pytest.mark.parametrize("objects_too", [False, True], ids=["catalog-only", "catalog-and-objects"])
def test_central_restored_from_an_older_backup_takes_the_same_bytes_again(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, tmp_path: Path,
        objects_too: bool) -> None:
    """Issue 7 item 2 at central: last night's catalog (and maybe objects) lack a document the edge
    was receipted for; the clerk re-drops it, the edge sends it again under a new transfer: it is
    stored, receipted and searchable again."""
    device = enroll("xa-tan-trao")
    paths = config.paths
    ingestor = make_ingestor(config, central_keys)
    early = seal_document(device="xa-tan-trao", seq=1, signing_key=device.signing_key,
                          central_key=central_keys.encryption.public_key, original=PDF + b"early",
                          name="Sổ hộ tịch 2019.pdf", text="Sổ đăng ký khai sinh năm 2019")
    ingestor.handle_batch(wire(early.messages()))
    # The backup: a consistent copy of the catalog (SQLite's backup API) and of the object store.
    backup = tmp_path / "backup"
    backup.mkdir()
    with contextlib.closing(catalog.connect(paths.catalog, readonly=True)) as source, \
            contextlib.closing(sqlite3.connect(backup / "catalog.db")) as copy:
        source.backup(copy)
    shutil.copytree(paths.objects, backup / "objects")

    original = PDF + b"late"
    late = seal_document(device="xa-tan-trao", seq=2, signing_key=device.signing_key,
                         central_key=central_keys.encryption.public_key, original=original,
                         name="Quyết định 27 – Tân Trào.pdf", text="Quyết định về việc cấp đất ở")
    (lost_receipt,) = receipts(ingestor.handle_batch(wire(late.messages())))

    # The disk fails; central comes back from last night's copy.
    for leftover in paths.catalog.parent.glob("catalog.db*"):
        leftover.unlink()
    shutil.copy2(backup / "catalog.db", paths.catalog)
    if objects_too:
        for stored in paths.objects.rglob("*"):
            stored.chmod(0o700)
        shutil.rmtree(paths.objects)
        shutil.copytree(backup / "objects", paths.objects)
    ingestor = make_ingestor(config, central_keys)
    conn = catalog.connect(paths.catalog, readonly=True)
    assert catalog.search_documents(conn, q="cap dat") == []

    again = seal_document(device="xa-tan-trao", seq=3, signing_key=device.signing_key,
                          central_key=central_keys.encryption.public_key, original=original,
                          name="Quyết định 27 – Tân Trào.pdf", text="Quyết định về việc cấp đất ở")
    assert again.tid != late.tid
    (receipt,) = receipts(ingestor.handle_batch(wire(again.messages())))
    body = receipt.verify(central_keys.receipt.verify_key)
    assert body.tid == again.tid and body.sha256 == hashlib.sha256(original).hexdigest()
    assert not body.duplicate   # the restored catalog did not hold this content
    found = catalog.search_documents(conn, q="cap dat")
    assert [d["id"] for d in found] == [body.document_id]
    assert found[0]["filename"] == "Quyết định 27 – Tân Trào.pdf"
    assert ObjectStore(paths.objects).path_for(body.sha256).read_bytes() == original
    assert verify(config.home) == []
    print(f"\nrestored ({'catalog and objects' if objects_too else 'catalog only'}): re-sent "
          f"{len(again.ciphertext)} ciphertext bytes, receipted as document {body.document_id} "
          f"(the lost receipt named {lost_receipt.body.document_id})")


def test_a_v1_catalog_migrates_in_place(tmp_path: Path) -> None:
    """A catalog written by schema v1 (one document per sha256) opens as v2 without losing a row."""
    path = tmp_path / "catalog.db"
    v1 = sqlite3.connect(path)
    v1.executescript(V1_SCHEMA)
    v1.execute("INSERT INTO devices (id, verify_key, enrolled_at, status) VALUES"
               " ('xa-tan-trao', x'00', '2026-01-01T00:00:00.000Z', 'active')")
    metadata = json.dumps({"captured_at": "2026-10-01T08:00:00Z", "seq": 1}, ensure_ascii=False)
    for doc_id, (name, text) in enumerate([("Công văn 1.pdf", "Quyết định thành lập thôn"),
                                            ("Tờ trình 2.pdf", "Tờ trình sửa đường")], start=1):
        sha = hashlib.sha256(name.encode()).hexdigest()
        v1.execute("INSERT INTO documents (id, device, tid, seq, filename, sha256, size, pages, media_type,"
                   " received_at, text, metadata, package_sha256) VALUES (?, 'xa-tan-trao', ?, ?, ?, ?, ?, 1,"
                   " 'application/pdf', '2026-10-02T00:00:00.000Z', ?, ?, ?)",
                   (doc_id, f"{doc_id:032x}", doc_id, name, sha, 100 * doc_id, text, metadata, "f" * 64))
        v1.execute("INSERT INTO documents_fts (rowid, filename, text) VALUES (?, ?, ?)",
                   (doc_id, fold(name), fold(text)))
        v1.execute("INSERT INTO transfers (tid, device, seq, header, state, created_at, updated_at,"
                   " document_id, receipt, stored_at) VALUES (?, 'xa-tan-trao', ?, x'00', 'stored', 'x', 'x',"
                   " ?, x'00', 'x')", (f"{doc_id:032x}", doc_id, doc_id))
    # A transfer half received when the box was upgraded: its held ranges come from its segments.
    v1.execute("INSERT INTO transfers (tid, device, seq, header, state, created_at, updated_at) VALUES"
               " (?, 'xa-tan-trao', 3, x'00', 'receiving', 'x', 'x')", ("3" * 32,))
    v1.executemany("INSERT INTO segments (tid, offset, length, crc) VALUES (?, ?, ?, 0)",
                   [("3" * 32, 100, 150), ("3" * 32, 0, 100), ("3" * 32, 400, 50)])
    v1.execute("PRAGMA user_version = 1")
    v1.commit()
    v1.close()

    conn = catalog.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == catalog.SCHEMA_VERSION == 7
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    doc = catalog.get_document(conn, 2)
    assert doc is not None
    assert (doc["filename"], doc["size"], doc["captured_at"], doc["same_content"]) == (
        "Tờ trình 2.pdf", 200, "2026-10-01T08:00:00Z", [])
    assert [d["id"] for d in catalog.search_documents(conn, q="quyet dinh")] == [1]
    assert conn.execute("SELECT count(*) FROM objects").fetchone()[0] == 2
    assert catalog.get_device(conn, "xa-tan-trao") is not None
    assert catalog.possible_clone(conn, "xa-tan-trao") is None
    assert catalog.replaced_awaiting(conn, "xa-tan-trao", "0" * 64) == []   # v7: nothing replaced
    half = catalog.get_transfer(conn, "3" * 32)
    assert half is not None
    assert (half.state, half.held, half.held_bytes) == ("receiving", ((0, 250), (400, 450)), 300)
    conn.close()
    # Opening it again is a no-op; a catalog from a newer sohoa is refused, not guessed at.
    catalog.connect(path).close()
    newer = sqlite3.connect(path)
    newer.execute("PRAGMA user_version = 99")
    newer.commit()
    newer.close()
    with pytest.raises(CatalogError, match="schema version 99"):
        catalog.connect(path)


# The v1 schema as released (main at 39f124d), minus the tables that v2 leaves unchanged.
V1_SCHEMA = """
CREATE TABLE devices (id TEXT PRIMARY KEY, verify_key BLOB NOT NULL, enrolled_at TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')), online INTEGER NOT NULL DEFAULT 0,
    last_seen TEXT, backlog_docs INTEGER NOT NULL DEFAULT 0, backlog_bytes INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, status_json TEXT);
CREATE TABLE documents (id INTEGER PRIMARY KEY, device TEXT NOT NULL REFERENCES devices (id),
    tid TEXT NOT NULL UNIQUE, seq INTEGER NOT NULL, filename TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL, pages INTEGER NOT NULL, media_type TEXT NOT NULL, received_at TEXT NOT NULL,
    text TEXT NOT NULL, metadata TEXT NOT NULL, package_sha256 TEXT NOT NULL);
CREATE INDEX documents_by_device ON documents (device, id);
CREATE INDEX documents_by_received ON documents (received_at);
CREATE VIRTUAL TABLE documents_fts USING fts5 (filename, text, tokenize = 'unicode61 remove_diacritics 2');
CREATE TABLE transfers (tid TEXT PRIMARY KEY, device TEXT NOT NULL REFERENCES devices (id),
    seq INTEGER NOT NULL, header BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('receiving', 'stored', 'rejected')), created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, error TEXT, error_class TEXT, document_id INTEGER REFERENCES documents (id),
    duplicate INTEGER NOT NULL DEFAULT 0, receipt BLOB, stored_at TEXT, UNIQUE (device, seq));
CREATE INDEX transfers_by_state ON transfers (state);
CREATE TABLE segments (tid TEXT NOT NULL REFERENCES transfers (tid), offset INTEGER NOT NULL,
    length INTEGER NOT NULL, crc INTEGER NOT NULL, PRIMARY KEY (tid, offset)) WITHOUT ROWID;
CREATE TABLE fixity (id INTEGER PRIMARY KEY, at TEXT NOT NULL, event TEXT NOT NULL, device TEXT NOT NULL,
    tid TEXT NOT NULL, document_id INTEGER, original_sha256 TEXT, package_sha256 TEXT,
    ciphertext_sha256 TEXT, detail TEXT);
CREATE TABLE audit (id INTEGER PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT, remote TEXT, detail TEXT);
CREATE TABLE operators (name TEXT PRIMARY KEY, role TEXT NOT NULL, pwhash BLOB NOT NULL,
    created_at TEXT NOT NULL, disabled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE api_tokens (name TEXT PRIMARY KEY, role TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE sessions (id_hash TEXT PRIMARY KEY, operator TEXT NOT NULL REFERENCES operators (name),
    csrf TEXT NOT NULL, created_at TEXT NOT NULL, expires_at REAL NOT NULL);
"""


def test_every_message_is_idempotent(config: CentralConfig, central_keys: CentralKeys,
                                     enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=PDF)
    messages = wire(sealed.messages(8192))
    first = ingestor.handle_batch(messages)
    again = ingestor.handle_batch(messages)   # init, every segment and fin re-sent
    (receipt,) = receipts(first)
    # The repeated init and fin re-publish the same signed receipt; segments get STORED acks.
    assert all(r == receipt for r in receipts(again)) and receipts(again)
    assert {a.state for a in acks(again, sealed.tid)} == {AckState.STORED}
    conn = catalog.connect(config.paths.catalog, readonly=True)
    assert catalog.totals(conn).documents == 1


def test_bad_signature_is_rejected_before_anything_is_stored(config: CentralConfig, central_keys: CentralKeys,
                                                             enroll: Enroll) -> None:
    enroll("xa-tan-trao")
    impostor = nacl.signing.SigningKey.generate()
    ingestor = make_ingestor(config, central_keys)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=impostor,
                           central_key=central_keys.encryption.public_key, original=PDF)
    replies = ingestor.handle_batch(wire(sealed.messages()))
    states = {(a.state, a.error_class) for a in acks(replies, sealed.tid)}
    assert (AckState.REJECTED, "SignatureError") in states
    assert AckState.RECEIVING not in {s for s, _ in states} and not receipts(replies)
    conn = catalog.connect(config.paths.catalog, readonly=True)
    assert catalog.get_transfer(conn, sealed.tid) is None
    assert not list(config.paths.staging.iterdir())
    assert ingestor.metrics.ingest_errors["SignatureError"] >= 1


def test_unknown_device_and_replayed_seq_are_rejected(config: CentralConfig, central_keys: CentralKeys,
                                                      enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    stranger = seal_document(device="xa-la", seq=1, signing_key=nacl.signing.SigningKey.generate(),
                             central_key=central_keys.encryption.public_key, original=PDF)
    (ack,) = acks(ingestor.handle_batch(wire([stranger.init()])), stranger.tid)
    assert (ack.state, ack.error_class) == (AckState.REJECTED, "UnknownDeviceError")

    first = seal_document(device="xa-tan-trao", seq=7, signing_key=device.signing_key,
                          central_key=central_keys.encryption.public_key, original=PDF)
    ingestor.handle_batch(wire([first.init()]))
    replay = seal_document(device="xa-tan-trao", seq=7, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=PDF + b"x")
    (ack,) = acks(ingestor.handle_batch(wire([replay.init()])), replay.tid)
    # Validly signed, new tid, used seq: a clone (a ReplayError subclass; see tests/central/test_clone.py).
    assert (ack.state, ack.error_class) == (AckState.REJECTED, "SequenceReusedError")
    # A transfer id reused with another header stays a plain replay.
    reused = seal_document(device="xa-tan-trao", seq=8, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=PDF + b"y")
    header = dataclasses.replace(reused.signed.header, doc_id=bytes.fromhex(first.tid))
    signed = SignedHeader(header, device.signing_key.sign(header.encode()).signature)
    forged = Sealed("xa-tan-trao", first.tid, 8, signed, reused.ciphertext)
    (ack,) = acks(ingestor.handle_batch(wire([forged.init()])), first.tid)
    assert (ack.state, ack.error_class) == (AckState.REJECTED, "ReplayError")


def test_restart_mid_transfer_resumes_from_the_segment_log(config: CentralConfig, central_keys: CentralKeys,
                                                           enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    original = secrets.token_bytes(120_000)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=original,
                           media_type="image/png", name="Trang 1.png")
    segments = sealed.segments(16 * 1024)
    half = len(segments) // 2
    before = make_ingestor(config, central_keys)
    replies = before.handle_batch(wire([sealed.init(), *segments[:half]]))
    held = acks(replies, sealed.tid)[-1].ranges
    assert held == ((0, segments[half].offset),)
    del before   # "crash": nothing in memory survives

    after = make_ingestor(config, central_keys)
    (resumed,) = acks(after.handle_batch(wire([sealed.init()])), sealed.tid)
    assert resumed.state is AckState.RECEIVING and resumed.ranges == held
    replies = after.handle_batch(wire([*segments[half:], sealed.fin()]))
    (receipt,) = receipts(replies)
    assert receipt.body.sha256 == hashlib.sha256(original).hexdigest()


def test_conflicting_segment_is_an_error_not_a_merge(config: CentralConfig, central_keys: CentralKeys,
                                                     enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=PDF)
    seg = sealed.segments(4096)[0]
    ingestor.handle_batch(wire([sealed.init(), seg]))
    forged = Segment(seg.device, seg.tid, seg.offset, bytes(len(seg.data)))
    (ack,) = acks(ingestor.handle_batch(wire([forged])), sealed.tid)
    assert ack.state is AckState.RECEIVING and ack.error_class == "TransferError"
    assert ack.ranges == ((0, 4096),)
    conn = catalog.connect(config.paths.catalog, readonly=True)
    (held,) = catalog.stored_segments(conn, sealed.tid)
    assert [data for _, data in SegmentReader(config.paths.staging).chunks(sealed.tid, [held])] == [seg.data]


def test_tampered_ciphertext_is_quarantined_with_a_reason(config: CentralConfig, central_keys: CentralKeys,
                                                          enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=PDF)
    segments = sealed.segments(8192)
    bad = bytearray(segments[1].data)
    bad[10] ^= 0xFF
    segments[1] = Segment(segments[1].device, segments[1].tid, segments[1].offset, bytes(bad))
    replies = ingestor.handle_batch(wire([sealed.init(), *segments, sealed.fin()]))
    final = acks(replies, sealed.tid)[-1]
    assert (final.state, final.error_class) == (AckState.REJECTED, "CiphertextHashError")
    reason = json.loads((config.paths.quarantine / f"{sealed.tid}.reason.json").read_text())
    assert reason["error_class"] == "CiphertextHashError"
    assert (config.paths.quarantine / f"{sealed.tid}.part").stat().st_size == len(sealed.ciphertext)
    (again,) = acks(ingestor.handle_batch(wire([sealed.fin()])), sealed.tid)
    assert again.state is AckState.REJECTED


def test_status_updates_the_device_row(config: CentralConfig, central_keys: CentralKeys,
                                       enroll: Enroll) -> None:
    enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    ingestor.handle_batch([encode(Status("xa-tan-trao", online=True, queue_docs=3, queue_bytes=4096,
                                         last_error="máy quét mất kết nối"))])
    conn = catalog.connect(config.paths.catalog, readonly=True)
    (row,) = catalog.list_devices(conn)
    assert row["online"] and row["backlog_docs"] == 3 and row["backlog_bytes"] == 4096
    assert row["last_error"] == "máy quét mất kết nối" and row["last_seen"]


def test_last_will_marks_offline_but_keeps_the_reported_backlog(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll) -> None:
    enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    ingestor.handle_batch([encode(Status("xa-tan-trao", online=True, queue_docs=7, queue_bytes=70_000,
                                         oldest_age_s=5400.0, updated_at="2026-11-25T08:00:00+00:00"))])
    # The broker publishes the box's last will when the link drops: it knows nothing of the queue.
    ingestor.handle_batch([encode(Status("xa-tan-trao", online=False))])
    conn = catalog.connect(config.paths.catalog, readonly=True)
    (row,) = catalog.list_devices(conn)
    assert not row["online"]
    assert row["backlog_docs"] == 7 and row["backlog_bytes"] == 70_000
    assert row["problem"] == "offline with backlog"


def test_online_is_decided_at_query_time_from_how_recently_the_box_spoke(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll) -> None:
    # No status is retained at the broker any more: after a central or broker restart nothing is
    # replayed, so "online" must not be a flag that only a will can clear.
    enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    ingestor.handle_batch([encode(Status("xa-tan-trao", online=True, queue_docs=2, queue_bytes=9000))])
    conn = catalog.connect(config.paths.catalog, readonly=True)
    seen = datetime.fromisoformat(catalog.list_devices(conn)[0]["last_seen"])
    fresh = seen + timedelta(seconds=catalog.STALE_AFTER_S - 1)
    stale = seen + timedelta(seconds=catalog.STALE_AFTER_S + 1)
    assert catalog.list_devices(conn, now=fresh)[0]["online"]
    assert catalog.totals(conn, now=fresh).devices_online == 1
    (row,) = catalog.list_devices(conn, now=stale)
    assert not row["online"] and row["problem"] == "offline with backlog"
    assert catalog.totals(conn, now=stale).devices_online == 0
    summary = catalog.fleet_summary(conn, today_since="2000-01-01T00:00:00.000Z", now=stale)
    assert (summary["devices"]["online"], summary["devices"]["offline_with_backlog"]) == (0, 1)
    assert catalog.STALE_AFTER_S == 3 * 30   # three missed statuses of the edge's 30 s interval


@pytest.mark.parametrize("mode_path", ["central.toml", "api-token", "keys/encryption.key",
                                       "keys/receipt.key", "mosquitto.passwd", "catalog.db"])
def test_init_writes_private_files(home: Path, mode_path: str) -> None:
    assert (home / mode_path).stat().st_mode & 0o777 == 0o600
    assert os.stat(home / "keys").st_mode & 0o777 == 0o700


def test_verify_finds_a_damaged_object(home: Path, config: CentralConfig, central_keys: CentralKeys,
                                      enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=PDF)
    (receipt,) = receipts(make_ingestor(config, central_keys).handle_batch(wire(sealed.messages())))
    assert verify(home) == []
    stored = ObjectStore(config.paths.objects).path_for(receipt.body.sha256)
    stored.chmod(0o600)
    stored.write_bytes(b"bit rot")
    (problem,) = verify(home)
    assert "does not hash to its name" in problem


@pytest.mark.parametrize("damage", ["missing", "bit rot"])
def test_duplicate_arrival_repairs_a_missing_or_damaged_original(home: Path, config: CentralConfig,
                                                                 central_keys: CentralKeys, enroll: Enroll,
                                                                 damage: str) -> None:
    # The edge's copy may be the only good one left: central must not discard it and still receipt.
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    first = seal_document(device="xa-tan-trao", seq=1, signing_key=device.signing_key,
                          central_key=central_keys.encryption.public_key, original=PDF)
    (r1,) = receipts(ingestor.handle_batch(wire(first.messages())))
    stored = ObjectStore(config.paths.objects).path_for(r1.body.sha256)
    if damage == "missing":
        stored.unlink()
    else:
        stored.chmod(0o600)
        stored.write_bytes(b"bit rot")
    assert verify(home) != []
    again = seal_document(device="xa-tan-trao", seq=2, signing_key=device.signing_key,
                          central_key=central_keys.encryption.public_key, original=PDF)
    (r2,) = receipts(ingestor.handle_batch(wire(again.messages())))
    assert r2.body.duplicate and r2.body.document_id == r1.body.document_id
    assert stored.read_bytes() == PDF
    assert stored.stat().st_mode & 0o777 == 0o400
    assert verify(home) == []
    conn = catalog.connect(config.paths.catalog, readonly=True)
    rows = conn.execute("SELECT event, tid, document_id, original_sha256, detail FROM fixity"
                        " WHERE event != 'fixity_check' ORDER BY id").fetchall()   # verify's own events
    assert [r["event"] for r in rows] == ["ingest", "repaired", "duplicate"]
    repaired = rows[1]
    assert (repaired["tid"], repaired["document_id"]) == (again.tid, r1.body.document_id)
    assert repaired["original_sha256"] == hashlib.sha256(PDF).hexdigest()
    assert json.loads(repaired["detail"])["previous"] == ("missing" if damage == "missing" else "damaged")


def test_duplicate_arrival_keeps_a_good_original_untouched(config: CentralConfig, central_keys: CentralKeys,
                                                           enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    for seq in (1, 2):
        sealed = seal_document(device="xa-tan-trao", seq=seq, signing_key=device.signing_key,
                               central_key=central_keys.encryption.public_key, original=PDF)
        (receipt,) = receipts(ingestor.handle_batch(wire(sealed.messages())))
        if seq == 1:
            inode = ObjectStore(config.paths.objects).path_for(receipt.body.sha256).stat().st_ino
    assert ObjectStore(config.paths.objects).path_for(receipt.body.sha256).stat().st_ino == inode


def resigned(sealed: Sealed, signing_key: nacl.signing.SigningKey, *, ciphertext_size: int) -> Sealed:
    """The same envelope declaring another ciphertext size, validly re-signed by the device."""
    header = dataclasses.replace(sealed.signed.header, ciphertext_size=ciphertext_size)
    signed = SignedHeader(header, signing_key.sign(header.encode()).signature)
    return Sealed(sealed.device, sealed.tid, sealed.seq, signed, sealed.ciphertext)


def test_ciphertext_larger_than_any_sealer_makes_is_rejected_at_init(config: CentralConfig,
                                                                    central_keys: CentralKeys,
                                                                    enroll: Enroll) -> None:
    # A stolen box must not be able to grow one staging file until the disk is full.
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=PDF)
    chunk = sealed.signed.header.chunk_size
    huge = resigned(sealed, device.signing_key, ciphertext_size=(1 << 40) // chunk * (chunk + ABYTES))
    replies = ingestor.handle_batch(wire([huge.init(), huge.segments(16 * 1024)[0]]))
    rejected = [a for a in acks(replies, huge.tid) if a.state is AckState.REJECTED]
    assert rejected and rejected[0].error_class == "SizeLimitError"
    assert not any(a.state is AckState.RECEIVING for a in acks(replies, huge.tid))
    assert list(config.paths.staging.iterdir()) == []
    # Just above the bound is refused too; the bound itself is not.
    for seq, size, state in ((2, max_ciphertext_size(len(PDF), chunk) + chunk + ABYTES, AckState.REJECTED),
                             (3, max_ciphertext_size(len(PDF), chunk), AckState.RECEIVING)):
        probe = seal_stream(device="xa-tan-trao", seq=seq, signing_key=device.signing_key,
                            central_key=central_keys.encryption.public_key, pieces=[PDF], size=len(PDF),
                            chunk_size=chunk)
        whole = size - size % (chunk + ABYTES) if size % (chunk + ABYTES) < ABYTES else size
        probe = resigned(probe, device.signing_key, ciphertext_size=whole)
        (ack,) = acks(ingestor.handle_batch(wire([probe.init()])), probe.tid)
        assert ack.state is state, (size, ack)


def test_ciphertext_size_bound_admits_what_a_sealer_makes(config: CentralConfig, central_keys: CentralKeys,
                                                          enroll: Enroll) -> None:
    # Incompressible bytes in the smallest chunks: the most ciphertext an honest sealer makes per byte.
    device = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)
    for seq, size in enumerate((0, 1, 300_000), start=1):
        sealed = seal_stream(device="xa-tan-trao", seq=seq, signing_key=device.signing_key,
                             central_key=central_keys.encryption.public_key,
                             pieces=[secrets.token_bytes(size)], size=size, chunk_size=1024)
        assert sealed.signed.header.ciphertext_size > size
        (ack,) = acks(ingestor.handle_batch(wire([sealed.init()])), sealed.tid)
        assert ack.state is AckState.RECEIVING, ack
