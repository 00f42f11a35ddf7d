"""Progressive sync at central: a notice catalogues a document before its original; whatever the
order and however often things come, each drop ends as exactly one document, and only the original's
transfer is ever receipted (custody unchanged)."""

from __future__ import annotations

import hashlib
import secrets

import pytest

from central import catalog
from central.admin import commands
from central.config import CentralConfig
from central.errors import DeviceError
from central.ingest import Ingestor, Reply, batch
from central.keys import CentralKeys
from central.records import archive_jobs
from protocol.messages import Ack, AckState, Noted, NoticeState, Receipt, encode
from tests.central.builders import Sealed, seal_document, seal_notice_for, wire
from tests.central.conftest import Bundle, Enroll
from tests.central.test_ingest import make_ingestor

DEVICE = "xa-tan-trao"
TEXT = "Quyết định về việc số hoá hồ sơ lưu trữ xã Tân Trào"


def noted(replies: list[Reply]) -> list[Noted]:
    return [r for r in replies if isinstance(r, Noted)]


def receipt_of(replies: list[Reply]) -> Receipt:
    (receipt,) = [r for r in replies if isinstance(r, Receipt)]
    return receipt


class Drop:
    """One scan on the box: its original, its envelope and its notice."""

    def __init__(self, device: Bundle, keys: CentralKeys, seq: int, *, text: str = TEXT,
                 name: str = "Công văn số 5 – Tuyên Quang.pdf") -> None:
        self.original = b"%PDF-1.4\n" + secrets.token_bytes(30_000) + b"\n%%EOF\n"
        self.sha256 = hashlib.sha256(self.original).hexdigest()
        self.sealed: Sealed = seal_document(device=DEVICE, seq=seq, signing_key=device.signing_key,
                                            central_key=keys.encryption.public_key, original=self.original,
                                            name=name, text=text)
        self.notice = seal_notice_for(self.sealed, signing_key=device.signing_key,
                                      central_key=keys.encryption.public_key, original=self.original,
                                      name=name, text=text)

    def transfer(self) -> list[tuple[str, bytes]]:
        return wire(self.sealed.messages(8192))


def documents(ingestor: Ingestor) -> list[dict[str, object]]:
    conn = ingestor._conn
    return catalog.search_ranked(conn, limit=100)


@pytest.fixture
def setup(config: CentralConfig, central_keys: CentralKeys, enroll: Enroll) -> tuple[Ingestor, Bundle]:
    return make_ingestor(config, central_keys), enroll(DEVICE)


def test_notice_then_original_is_one_document(setup: tuple[Ingestor, Bundle],
                                               central_keys: CentralKeys) -> None:
    ingestor, device = setup
    drop = Drop(device, central_keys, 1)
    replies = ingestor.handle_batch([encode(drop.notice)])
    (answer,) = noted(replies)
    assert answer.state is NoticeState.CATALOGUED and answer.document_id is not None
    # Never a receipt nor a transfer ack for a notice: the edge may delete nothing on it.
    assert not [r for r in replies if isinstance(r, Receipt | Ack)]
    conn = ingestor._conn
    (found,) = catalog.search_ranked(conn, q="so hoa ho so tan trao")
    assert found["id"] == answer.document_id and found["state"] == catalog.AWAITING
    assert found["size"] == len(drop.original) and found["sha256"] == drop.sha256
    # Searchable, but not archived: not counted, no object, no archival-copy job (whose cursor passes it).
    assert catalog.totals(conn).documents == 0 and not catalog.object_exists(conn, drop.sha256)
    with conn:
        assert archive_jobs.enqueue_new(conn, now=catalog.utc_now()) == 0
    summary = catalog.fleet_summary(conn, today_since="2000-01-01T00:00:00.000Z")
    assert summary["documents"]["awaiting_original"] == 1 and summary["documents"]["total"] == 0

    receipt = receipt_of(ingestor.handle_batch(drop.transfer())).verify(central_keys.receipt.verify_key)
    assert receipt.sha256 == drop.sha256 and receipt.document_id == answer.document_id
    (doc,) = documents(ingestor)
    assert doc["id"] == answer.document_id and doc["state"] == "stored"
    assert catalog.totals(conn).documents == 1 and catalog.object_exists(conn, drop.sha256)
    full = catalog.get_document(conn, answer.document_id)
    assert full is not None and full["package_sha256"] and full["text"] == TEXT
    events = [r[0] for r in conn.execute("SELECT event FROM fixity ORDER BY id")]
    assert events == ["notice", "ingest"]
    # Its archival-copy job is made once its original is there, though the cursor passed its id.
    assert conn.execute("SELECT document_id FROM archive_jobs WHERE sha256 = ?",
                        (drop.sha256,)).fetchone()[0] == answer.document_id


def test_original_then_notice_names_the_stored_document(setup: tuple[Ingestor, Bundle],
                                                        central_keys: CentralKeys) -> None:
    ingestor, device = setup
    drop = Drop(device, central_keys, 1)
    receipt = receipt_of(ingestor.handle_batch(drop.transfer())).body
    (answer,) = noted(ingestor.handle_batch([encode(drop.notice)]))
    assert answer.state is NoticeState.CATALOGUED and answer.document_id == receipt.document_id
    (doc,) = documents(ingestor)
    assert doc["state"] == "stored"


def test_a_notice_sent_twice_is_answered_twice_and_catalogued_once(setup: tuple[Ingestor, Bundle],
                                                                   central_keys: CentralKeys) -> None:
    ingestor, device = setup
    drop = Drop(device, central_keys, 1)
    first = noted(ingestor.handle_batch([encode(drop.notice), encode(drop.notice)]))
    again = noted(ingestor.handle_batch([encode(drop.notice)]))
    assert len(first) == 1 and first[0].document_id == again[0].document_id
    assert again[0].state is NoticeState.CATALOGUED and len(documents(ingestor)) == 1
    # The same tid with other bytes (a forger with the device's key, or a broken box) is a replay.
    other = seal_notice_for(drop.sealed, signing_key=device.signing_key,
                            central_key=central_keys.encryption.public_key, original=drop.original,
                            text="khác")
    (refused,) = noted(ingestor.handle_batch([encode(other)]))
    assert refused.state is NoticeState.REFUSED and refused.error_class == "ReplayError"
    receipt_of(ingestor.handle_batch(drop.transfer()))
    assert len(documents(ingestor)) == 1


def test_original_without_notice_and_notice_without_original(setup: tuple[Ingestor, Bundle],
                                                             central_keys: CentralKeys) -> None:
    ingestor, device = setup
    old_edge, lost = Drop(device, central_keys, 1), Drop(device, central_keys, 2, text="Tờ trình sửa đường")
    receipt_of(ingestor.handle_batch(old_edge.transfer()))
    (answer,) = noted(ingestor.handle_batch([encode(lost.notice)]))
    docs = {d["id"]: d["state"] for d in documents(ingestor)}
    # The one whose original never came stays visibly on its way; it is not archived.
    assert sorted(docs.values()) == ["awaiting_original", "stored"] and docs[answer.document_id] == \
        "awaiting_original"
    conn = ingestor._conn
    assert catalog.totals(conn).documents == 1
    detail = catalog.device_detail(conn, DEVICE)
    assert detail is not None and detail["documents_total"] == 1
    assert detail["documents_awaiting_original"] == 1


def test_the_same_scan_sent_again_completes_the_awaiting_arrival(setup: tuple[Ingestor, Bundle],
                                                                 central_keys: CentralKeys) -> None:
    """A notice whose original never came, then the same drop sent again under another transfer (a
    re-imaged box): one document, completed in place."""
    ingestor, device = setup
    drop = Drop(device, central_keys, 1)
    (answer,) = noted(ingestor.handle_batch([encode(drop.notice)]))
    again = seal_document(device=DEVICE, seq=5, signing_key=device.signing_key,
                          central_key=central_keys.encryption.public_key, original=drop.original)
    receipt = receipt_of(ingestor.handle_batch(wire(again.messages(8192)))).body
    assert receipt.document_id == answer.document_id
    (doc,) = documents(ingestor)
    assert doc["state"] == "stored"


def test_a_notice_announcing_other_bytes_gives_way_to_the_original(setup: tuple[Ingestor, Bundle],
                                                                   central_keys: CentralKeys) -> None:
    ingestor, device = setup
    drop = Drop(device, central_keys, 1)
    liar = seal_notice_for(drop.sealed, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=b"other bytes")
    (answer,) = noted(ingestor.handle_batch([encode(liar)]))
    receipt = receipt_of(ingestor.handle_batch(drop.transfer())).body
    # The notice's row is completed by what came (same device and transfer), with the original's bytes.
    assert receipt.sha256 == drop.sha256 and receipt.document_id == answer.document_id
    (doc,) = documents(ingestor)
    assert doc["state"] == "stored" and doc["sha256"] == drop.sha256
    conn = ingestor._conn
    assert "notice_mismatch" in [r[0] for r in conn.execute("SELECT event FROM fixity")]


def test_hostile_notices_are_refused(setup: tuple[Ingestor, Bundle], central_keys: CentralKeys,
                                     enroll: Enroll) -> None:
    ingestor, device = setup
    other = enroll("xa-khac")
    first = Drop(device, central_keys, 1)
    receipt_of(ingestor.handle_batch(first.transfer()))
    # Signed with another enrolled box's key under this box's name.
    drop = Drop(device, central_keys, 2)
    forged = seal_notice_for(drop.sealed, signing_key=other.signing_key,
                             central_key=central_keys.encryption.public_key, original=drop.original)
    # A validly signed notice reusing the seq of a transfer central already has (another tid).
    reused = seal_notice_for(Drop(device, central_keys, 3).sealed, signing_key=device.signing_key,
                             central_key=central_keys.encryption.public_key, original=b"x", seq=1)
    answers = noted(ingestor.handle_batch([encode(forged)]))
    answers += noted(ingestor.handle_batch([encode(reused)]))
    assert [(a.state, a.error_class) for a in answers] == [
        (NoticeState.REFUSED, "SignatureError"), (NoticeState.REFUSED, "SequenceReusedError")]
    assert len(documents(ingestor)) == 1


def test_a_notice_reusing_a_seq_is_a_replay(setup: tuple[Ingestor, Bundle],
                                            central_keys: CentralKeys) -> None:
    ingestor, device = setup
    receipt_of(ingestor.handle_batch(Drop(device, central_keys, 1).transfer()))
    later = Drop(device, central_keys, 1)   # another tid, the same seq: a replayed or cloned box
    (answer,) = noted(ingestor.handle_batch([encode(later.notice)]))
    assert answer.state is NoticeState.REFUSED and answer.error_class == "SequenceReusedError"


def test_a_box_flooding_notices_is_capped_and_its_originals_still_come(
        setup: tuple[Ingestor, Bundle], central_keys: CentralKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    ingestor, device = setup
    monkeypatch.setattr(batch, "MAX_AWAITING_DOCS", 2)
    drops = [Drop(device, central_keys, n, text=f"Văn bản số {n}") for n in range(1, 4)]
    answers = [noted(ingestor.handle_batch([encode(d.notice)]))[0] for d in drops]
    assert [a.state for a in answers] == [NoticeState.CATALOGUED] * 2 + [NoticeState.REFUSED]
    assert answers[2].error_class == "NoticeQuotaError"
    receipt_of(ingestor.handle_batch(drops[2].transfer()))   # refused notice, original taken whole
    receipt_of(ingestor.handle_batch(drops[0].transfer()))
    # The quota frees as originals arrive.
    (answer,) = noted(ingestor.handle_batch([encode(Drop(device, central_keys, 9).notice)]))
    assert answer.state is NoticeState.CATALOGUED
    assert sorted(str(d["state"]) for d in documents(ingestor)) == [
        "awaiting_original", "awaiting_original", "stored", "stored"]


def test_a_notice_for_a_refused_transfer_is_refused(setup: tuple[Ingestor, Bundle],
                                                    central_keys: CentralKeys) -> None:
    ingestor, device = setup
    drop = Drop(device, central_keys, 1)
    tampered = drop.transfer()
    topic, payload = tampered[1]
    tampered[1] = (topic, payload[:4] + bytes([payload[4] ^ 1]) + payload[5:])
    replies = ingestor.handle_batch(tampered)
    # A checksum error: the segment is dropped. Abort the transfer instead, as a box that gave up does.
    from protocol.messages import Abort  # noqa: PLC0415

    replies = ingestor.handle_batch([encode(Abort(DEVICE, drop.sealed.tid, "gave up"))])
    assert not [r for r in replies if isinstance(r, Ack) and r.state is AckState.STORED]
    (answer,) = noted(ingestor.handle_batch([encode(drop.notice)]))
    assert answer.state is NoticeState.REFUSED and answer.error_class == "LateNoticeError"
    assert documents(ingestor) == []


def test_a_correction_of_a_notice_only_document_survives_whatever_original_comes(
        setup: tuple[Ingestor, Bundle], central_keys: CentralKeys) -> None:
    """An operator corrects a document known only from its notice; then its transfer comes, carrying
    other bytes than the notice announced. The correction is the operator's word about this drop (same
    device and transfer): it stays on the document the drop became, with its history, instead of
    blocking the original's catalogue entry (it used to: the notice's row was deleted, FOREIGN KEY
    failed on the correction, and the transfer was never catalogued)."""
    from central.records import corrections  # noqa: PLC0415

    ingestor, device = setup
    drop = Drop(device, central_keys, 1)
    liar = seal_notice_for(drop.sealed, signing_key=device.signing_key,
                           central_key=central_keys.encryption.public_key, original=b"other bytes")
    (answer,) = noted(ingestor.handle_batch([encode(liar)]))
    conn = ingestor._conn
    assert answer.document_id is not None
    meta = conn.execute("SELECT metadata FROM documents WHERE id = ?", (answer.document_id,)).fetchone()[0]
    with conn:
        corrections.correct(conn, document_id=answer.document_id, metadata_json=meta,
                            changes={"so_ky_hieu": "12/QĐ-UBND"}, actor="op:lan")
    receipt = receipt_of(ingestor.handle_batch(drop.transfer())).body
    assert receipt.sha256 == drop.sha256
    (doc,) = documents(ingestor)
    assert doc["state"] == "stored" and doc["id"] == receipt.document_id
    fixed = corrections.latest_corrections(conn, [receipt.document_id])[receipt.document_id]
    assert fixed["so_ky_hieu"].value == "12/QĐ-UBND" and fixed["so_ky_hieu"].actor == "op:lan"


def test_a_notice_alone_links_no_stored_document_as_the_same_content(setup: tuple[Ingestor, Bundle],
                                                                      central_keys: CentralKeys) -> None:
    """A notice announcing the sha256 of bytes central holds, with no bytes of its own: the stored
    arrival does not list it as the same content, nor it the stored one (a claim is not a copy)."""
    ingestor, device = setup
    stored = Drop(device, central_keys, 1)
    receipt = receipt_of(ingestor.handle_batch(stored.transfer()))
    claim = Drop(device, central_keys, 2, name="Bản sao.pdf")
    notice = seal_notice_for(claim.sealed, signing_key=device.signing_key,
                             central_key=central_keys.encryption.public_key, original=stored.original,
                             name="Bản sao.pdf", text=TEXT)
    (answer,) = noted(ingestor.handle_batch([encode(notice)]))
    conn = ingestor._conn
    mine = catalog.get_document(conn, receipt.body.document_id)
    theirs = catalog.get_document(conn, answer.document_id)
    assert mine is not None and theirs is not None and theirs["state"] == "awaiting_original"
    assert theirs["sha256"] == mine["sha256"]
    assert (mine["same_content"], theirs["same_content"]) == ([], [])


def test_a_box_that_sent_only_a_notice_is_not_removed_but_told_to_revoke(
        setup: tuple[Ingestor, Bundle], central_keys: CentralKeys, config: CentralConfig) -> None:
    """``device remove`` is for a box that never sent anything; one notice is something (its
    document names the box). It used to fail on the catalog's foreign key with a traceback."""
    ingestor, device = setup
    noted(ingestor.handle_batch([encode(Drop(device, central_keys, 1).notice)]))
    with pytest.raises(DeviceError, match="notice") as refused:
        commands.device_remove(config.paths.home, DEVICE)
    assert "revoke" in refused.value.hint
    assert catalog.get_device(ingestor._conn, DEVICE) is not None


def test_a_noticed_document_whose_transfer_was_refused_says_so(setup: tuple[Ingestor, Bundle],
                                                                central_keys: CentralKeys) -> None:
    """Notice first, then the box gives up on the transfer (refused): the document no longer says
    "on its way" for ever; it says its original was refused (the scan is back with the clerk)."""
    from protocol.messages import Abort  # noqa: PLC0415

    ingestor, device = setup
    drop = Drop(device, central_keys, 1)
    (answer,) = noted(ingestor.handle_batch([encode(drop.notice)]))
    conn = ingestor._conn

    def reason() -> object:
        doc = catalog.get_document(conn, answer.document_id)
        assert doc is not None and doc["state"] == "awaiting_original"
        return doc["awaiting_reason"]

    assert reason() == "on_its_way"
    ingestor.handle_batch(drop.transfer()[:1])   # the init only
    assert reason() == "on_its_way"
    ingestor.handle_batch([encode(Abort(DEVICE, drop.sealed.tid, "gave up"))])
    assert reason() == "transfer_refused"
