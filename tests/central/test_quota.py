"""Per-device quotas, the rejected-transfer budget and expiry: the pure verdicts, then the ingest on real
SQLite and files, then an honest edge's own sender state machine against central across an expiry."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable

import nacl.signing
import pytest

from central import catalog
from central.catalog import DeviceLoad, DeviceRecord
from central.config import CentralConfig
from central.ingest import Ingestor, Reply
from central.ingest.admission import Defer, Known, Refuse, Revive, admit
from central.ingest.quota import COUNTED_REJECTIONS, OverQuota, Quotas, strike, weigh
from central.keys import CentralKeys
from central.storage import ObjectStore
from protocol.envelope import key_id
from protocol.messages import Ack, AckState, Fin, Init, Receipt, Segment, decode, encode
from protocol.transfer import SendFin, SendInit, SendSegment, TransferSender
from tests.central.builders import Sealed, seal_document, seal_stream, wire
from tests.central.conftest import Bundle, Enroll

MiB = 1024 * 1024
DEVICE = "xa-tan-trao"


# -- pure verdicts ---------------------------------------------------------------------------------

def test_weigh_open_transfers_bytes_and_the_token_bucket() -> None:
    q = Quotas(max_open_transfers=3, max_open_bytes=100 * MiB, new_transfers_per_hour=3600,
               new_transfers_burst=2)
    assert weigh(DeviceLoad(), 10, 0.0, q) == 1.0                       # a full bucket, one token taken
    over = weigh(DeviceLoad(open_transfers=3, open_bytes=30), 10, 0.0, q)
    assert isinstance(over, OverQuota) and over.quota == "open_transfers" and over.retry_after == 60
    # One transfer alone always fits, however big (the largest document max_plaintext allows).
    assert weigh(DeviceLoad(), 2048 * MiB, 0.0, q) == 1.0
    over = weigh(DeviceLoad(open_transfers=1, open_bytes=90 * MiB), 20 * MiB, 0.0, q)
    assert isinstance(over, OverQuota) and over.quota == "open_bytes"
    # 3600 an hour = one a second: an empty bucket is one second from a token.
    over = weigh(DeviceLoad(init_tokens=0.25, init_tokens_at=100.0), 10, 100.0, q)
    assert isinstance(over, OverQuota) and over.quota == "new_transfers" and over.retry_after == 1
    assert weigh(DeviceLoad(init_tokens=0.25, init_tokens_at=100.0), 10, 101.0, q) == pytest.approx(0.25)
    assert weigh(DeviceLoad(init_tokens=0.0, init_tokens_at=100.0), 10, 1e6, q) == 1.0   # capped at burst
    assert weigh(DeviceLoad(init_tokens=0.5, init_tokens_at=100.0), 10, 50.0, q) != 1.0  # clock went back


def test_a_flagged_device_is_slowed_not_stopped() -> None:
    q = Quotas(flagged_new_transfers_per_hour=6)
    flagged = DeviceLoad(misbehaving_since="2026-12-01T00:00:00.000Z")
    assert weigh(flagged, 10, 0.0, q) == 0.0                            # burst of one
    over = weigh(DeviceLoad(open_transfers=1, misbehaving_since="x"), 10, 0.0, q)
    assert isinstance(over, OverQuota) and over.quota == "open_transfers"
    over = weigh(DeviceLoad(init_tokens=0.0, init_tokens_at=0.0, misbehaving_since="x"), 10, 60.0, q)
    assert isinstance(over, OverQuota) and over.retry_after == 540     # 6 an hour: 600 s per token


def test_strikes_drain_over_the_window() -> None:
    q = Quotas(rejected_budget=2, rejected_window_s=100.0)
    assert strike(DeviceLoad(), 0.0, q) == (1.0, False)
    assert strike(DeviceLoad(strikes=2.0, strikes_at=0.0), 0.0, q) == (3.0, True)
    assert strike(DeviceLoad(strikes=2.0, strikes_at=0.0), 50.0, q) == (2.0, False)   # one drained
    assert "UnknownKeyError" not in COUNTED_REJECTIONS and "RevokedDeviceError" not in COUNTED_REJECTIONS
    assert {"SignatureError", "BagError", "SizeLimitError"} <= COUNTED_REJECTIONS


def _sealed(bundle: Bundle, keys: CentralKeys, seq: int, *, size: int = 20_000,
            signing_key: nacl.signing.SigningKey | None = None) -> Sealed:
    return seal_document(device=bundle.device_id, seq=seq, signing_key=signing_key or bundle.signing_key,
                         central_key=keys.encryption.public_key,
                         original=b"%PDF-1.4\n" + secrets.token_bytes(size) + b"\n%%EOF\n")


def test_admission_verdicts(central_keys: CentralKeys, enroll: Enroll) -> None:
    bundle = enroll(DEVICE)
    device = DeviceRecord(DEVICE, bytes(bundle.signing_key.verify_key), "active")
    sealed = _sealed(bundle, central_keys, 1)
    kid = key_id(bytes(central_keys.encryption.public_key))
    full = DeviceLoad(open_transfers=8)
    q = Quotas()

    def verdict(init: Init, load: DeviceLoad, existing: catalog.TransferRecord | None = None) -> object:
        return admit(init, device=device, existing=existing, seq_holder=None, key_id=kid,
                     max_plaintext=1 << 30, quotas=q, load=load, now=0.0)

    assert isinstance(verdict(sealed.init(), full), Defer)
    # The signature is checked before any quota: a forged init is refused, never merely deferred.
    forged = _sealed(bundle, central_keys, 2, signing_key=nacl.signing.SigningKey.generate())
    refused = verdict(forged.init(), full)
    assert isinstance(refused, Refuse) and type(refused.error).__name__ == "SignatureError"
    header = sealed.signed.encode()
    record = catalog.TransferRecord(sealed.tid, DEVICE, 1, header, "receiving", None, None, None)
    assert isinstance(verdict(sealed.init(), full, record), Known)      # an open transfer is never weighed
    expired = catalog.TransferRecord(sealed.tid, DEVICE, 1, header, "expired", None, None, None)
    assert isinstance(verdict(sealed.init(), full, expired), Defer)
    assert verdict(sealed.init(), DeviceLoad(), expired) == Revive(float(q.new_transfers_burst - 1))


# -- the ingest ------------------------------------------------------------------------------------

def ingestor(config: CentralConfig, keys: CentralKeys, quotas: Quotas,
             clock: Callable[[], float] = time.time) -> Ingestor:
    return Ingestor(catalog.connect(config.paths.catalog), config.paths, keys,
                    max_plaintext=config.ingest.max_plaintext_bytes, quotas=quotas, clock=clock)


def states(replies: list[Reply], tid: str) -> list[AckState]:
    return [r.state for r in replies if isinstance(r, Ack) and r.tid == tid]


def test_over_a_quota_new_transfers_are_deferred_logged_once_and_admitted_later(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll,
        caplog: pytest.LogCaptureFixture) -> None:
    bundle = enroll(DEVICE)
    ing = ingestor(config, central_keys, Quotas(max_open_transfers=2))
    docs = [_sealed(bundle, central_keys, seq) for seq in range(1, 8)]
    ing.handle_batch(wire([docs[0].init(), docs[1].init()]))
    with caplog.at_level(logging.INFO, logger="sohoa.central.ingest"):
        replies = [r for d in docs[2:] for r in ing.handle_batch(wire([d.init()]))]
    deferred = [r for r in replies if isinstance(r, Ack)]
    assert {(a.state, a.error_class, a.retry_after) for a in deferred} == {
        (AckState.DEFERRED, "QuotaExceededError", 60)}
    assert "transfers of this device are open (at most 2)" in (deferred[0].error or "")
    lines = [r for r in caplog.records if "deferred a new transfer of xa-tan-trao" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO   # once per device per interval
    conn = ing._conn
    assert conn.execute("SELECT count(*) FROM transfers").fetchone()[0] == 2   # nothing recorded
    # One transfer finishes: the next deferred one is admitted and delivered.
    assert AckState.STORED in states(ing.handle_batch(wire(docs[0].messages())), docs[0].tid)
    replies = ing.handle_batch(wire(docs[2].messages()))
    assert AckState.STORED in states(replies, docs[2].tid)
    assert conn.execute("SELECT count(*) FROM documents").fetchone()[0] == 2


def test_new_transfers_per_hour_and_announced_bytes(config: CentralConfig, central_keys: CentralKeys,
                                                    enroll: Enroll) -> None:
    bundle = enroll(DEVICE)
    ing = ingestor(config, central_keys, Quotas(new_transfers_per_hour=60, new_transfers_burst=3,
                                                max_open_bytes=2 * MiB))
    small = [_sealed(bundle, central_keys, seq, size=2000) for seq in range(1, 6)]
    replies = ing.handle_batch([m for d in small for m in wire(d.messages())])
    assert [AckState.STORED in states(replies, d.tid) for d in small] == [True, True, True, False, False]
    late = [a for a in replies if isinstance(a, Ack) and a.state is AckState.DEFERRED]
    assert {a.retry_after for a in late} == {60} and all("faster than 60" in (a.error or "") for a in late)
    # Bytes: one big transfer alone is admitted; a second while it is open is deferred. (Another box:
    # the buckets live in the catalog, so this one's is spent whatever the process.)
    bundle = enroll("xa-khac")
    ing2 = ingestor(config, central_keys, Quotas(max_open_bytes=1 * MiB))
    big = seal_stream(device="xa-khac", seq=100, signing_key=bundle.signing_key,
                      central_key=central_keys.encryption.public_key, pieces=[secrets.token_bytes(2 * MiB)],
                      size=2 * MiB)
    assert states(ing2.handle_batch(wire([big.init()])), big.tid) == [AckState.RECEIVING]
    more = _sealed(bundle, central_keys, 101, size=10_000)
    (ack,) = [r for r in ing2.handle_batch(wire([more.init()])) if isinstance(r, Ack)]
    assert ack.state is AckState.DEFERRED and "would exceed 1048576" in (ack.error or "")


def test_rejected_transfers_flag_the_device_slow_it_and_the_flag_drops_after_a_clean_window(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll,
        caplog: pytest.LogCaptureFixture) -> None:
    bundle = enroll(DEVICE)
    quotas = Quotas(rejected_budget=2, rejected_window_s=3600.0)
    ing = ingestor(config, central_keys, quotas)
    stranger = nacl.signing.SigningKey.generate()
    with caplog.at_level(logging.WARNING, logger="sohoa.central.ingest"):
        for seq in (1, 2):   # validly framed inits, signed with a key that is not the device's
            forged = _sealed(bundle, central_keys, seq, signing_key=stranger)
            assert states(ing.handle_batch(wire([forged.init()])), forged.tid) == [AckState.REJECTED]
        junk = seal_stream(device=DEVICE, seq=3, signing_key=bundle.signing_key,
                           central_key=central_keys.encryption.public_key, pieces=[b"not a tar" * 100],
                           size=900)
        replies = ing.handle_batch(wire(junk.messages()))   # rejected at assembly (a bag error)
    (rejected,) = [a for a in replies if isinstance(a, Ack) and a.tid == junk.tid]
    assert rejected.state is AckState.REJECTED and rejected.error_class in COUNTED_REJECTIONS
    assert any("over its budget of 2 rejected transfers" in r.getMessage() for r in caplog.records)
    conn = catalog.connect(config.paths.catalog, readonly=True)
    (row,) = catalog.list_devices(conn)
    assert row["problem"] == "rejected transfers" and row["status"] == "active"   # never revoked
    flagged = conn.execute("SELECT count(*) FROM fixity WHERE event = 'over_rejection_budget'").fetchone()[0]
    assert flagged == 1
    # Slowed: one new transfer, then deferred for ten minutes (6 an hour).
    honest = [_sealed(bundle, central_keys, seq) for seq in (4, 5)]
    assert AckState.STORED in states(ing.handle_batch(wire(honest[0].messages())), honest[0].tid)
    (ack,) = [r for r in ing.handle_batch(wire([honest[1].init()])) if isinstance(r, Ack)]
    assert ack.state is AckState.DEFERRED and ack.retry_after == 600
    ing.sweep(now=time.time() + 3601)   # clean for a whole window: the flag drops
    assert catalog.list_devices(conn)[0]["problem"] != "rejected transfers"


def test_a_stalled_transfer_expires_frees_its_journal_and_the_document_still_arrives_once(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll) -> None:
    bundle = enroll(DEVICE)
    ing = ingestor(config, central_keys, Quotas())
    sealed = _sealed(bundle, central_keys, 1, size=200_000)
    messages = sealed.messages(16 * 1024)
    segments = [m for m in messages if isinstance(m, Segment)]
    ing.handle_batch(wire([sealed.init(), *segments[: len(segments) // 2]]))
    journal = config.paths.staging
    assert [p.name for p in journal.iterdir() if p.name.startswith("journal-")]
    assert ing.sweep(now=time.time() + 3600) == []                  # an hour: not stalled yet
    assert ing.sweep(now=time.time() + 73 * 3600) == [sealed.tid]   # 73 h without progress
    assert [p.name for p in journal.iterdir()] == []                # its journal file is gone
    record = catalog.get_transfer(ing._conn, sealed.tid)
    assert record is not None and record.state == "expired"
    # A late segment or fin is answered UNKNOWN: the box announces the transfer again ...
    assert states(ing.handle_batch(wire([segments[-1]])), sealed.tid) == [AckState.UNKNOWN]
    assert states(ing.handle_batch(wire([sealed.fin()])), sealed.tid) == [AckState.UNKNOWN]
    # ... and that init starts it again from zero (UNKNOWN: forget what central held), then as usual.
    assert states(ing.handle_batch(wire([sealed.init()])), sealed.tid) == [AckState.UNKNOWN]
    replies = ing.handle_batch(wire(messages))
    assert AckState.STORED in states(replies, sealed.tid) and any(isinstance(r, Receipt) for r in replies)
    again = ing.handle_batch(wire(messages))                         # and nothing twice
    assert AckState.STORED in states(again, sealed.tid)
    assert ing._conn.execute("SELECT count(*) FROM documents").fetchone()[0] == 1
    events = [r[0] for r in ing._conn.execute("SELECT event FROM fixity WHERE tid = ? ORDER BY id",
                                              (sealed.tid,))]
    assert events == ["expired", "ingest"]


def test_a_transfer_kept_barely_alive_does_not_pin_journal_files(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll) -> None:
    """A box that sends a segment every few hours keeps its transfer from expiring; before compaction
    each journal file one of its segments landed in stayed on disk whole, whatever else it held.
    Now its live segments move to the current file and the old file goes; the document still
    arrives exactly once, its bytes intact."""
    bundle = enroll(DEVICE)
    ing = ingestor(config, central_keys, Quotas())
    ing.journal.rotate_bytes = 128 * 1024
    staging = config.paths.staging
    trickle = _sealed(bundle, central_keys, 1, size=120_000)
    messages = trickle.messages(16 * 1024)
    segments = [m for m in messages if isinstance(m, Segment)]
    ing.handle_batch(wire([trickle.init(), segments[0]]))
    first = {p.name for p in staging.iterdir()}
    assert len(first) == 1
    for seq in range(2, 6):                      # honest documents fill the journal and are stored
        doc = _sealed(bundle, central_keys, seq, size=60_000)
        assert any(isinstance(r, Receipt) for r in ing.handle_batch(wire(doc.messages(16 * 1024))))
    ing.handle_batch(wire([segments[1]]))        # hours later, one more segment
    pinned = {p.name for p in staging.iterdir()}
    assert first <= pinned and len(pinned) >= 2  # the first file is pinned by one 16 KiB segment
    pinned_bytes = sum((staging / name).stat().st_size for name in first)
    assert pinned_bytes > 4 * 16 * 1024

    assert ing.sweep(now=time.time() + 600) == []        # written minutes ago: left alone
    assert first <= {p.name for p in staging.iterdir()}
    assert ing.sweep(now=time.time() + 2 * 3600) == []   # idle for hours, mostly dead: compacted
    left = {p.name for p in staging.iterdir()}
    assert not first & left and len(left) == 1
    assert sum((staging / name).stat().st_size for name in left) < pinned_bytes
    replies = ing.handle_batch(wire([*segments[2:], trickle.fin()]))
    receipts = [r for r in replies if isinstance(r, Receipt)]
    assert len(receipts) == 1 and receipts[0].body.tid == trickle.tid
    stored = ObjectStore(config.paths.objects).path_for(receipts[0].body.sha256).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == receipts[0].body.sha256     # assembled from the copies
    assert ing._conn.execute("SELECT count(*) FROM documents").fetchone()[0] == 5
    assert [p.name for p in staging.iterdir()] == []


def test_the_edge_sender_survives_an_expiry_and_central_deferrals(config: CentralConfig,
                                                                  central_keys: CentralKeys,
                                                                  enroll: Enroll) -> None:
    """The edge's own TransferSender against central's ingest, in memory, on one clock: half a
    document, a three-day outage (central expires the transfer), then the box comes back with its
    init bucket spent: deferred, it waits, is admitted, restarts from zero, and is stored once."""
    bundle = enroll(DEVICE)
    clock = [0.0]
    start = time.time()
    ing = ingestor(config, central_keys, Quotas(new_transfers_per_hour=60, new_transfers_burst=1),
                   clock=lambda: start + clock[0])
    sealed = _sealed(bundle, central_keys, 1, size=150_000)
    ct = sealed.ciphertext
    sender = TransferSender(sealed.tid, len(ct), segment_size=16 * 1024, window=4, resend_after=30.0)

    def exchange(limit: int | None = None) -> list[Reply]:
        actions = sender.poll(clock[0])
        out: list[tuple[str, bytes]] = []
        for action in actions:
            if isinstance(action, SendInit):
                out.append(encode(sealed.init()))
            elif isinstance(action, SendSegment):
                out.append(encode(Segment(DEVICE, sealed.tid, action.offset,
                                          ct[action.offset: action.offset + action.length])))
            elif isinstance(action, SendFin):
                out.append(encode(Fin(DEVICE, sealed.tid, len(ct), sealed.fin().sha256)))
        replies = ing.handle_batch(out[:limit])
        for reply in replies:
            if isinstance(reply, Ack):
                sender.on_ack(decode(*encode(reply)))   # type: ignore[arg-type]
            elif isinstance(reply, Receipt):
                sender.on_receipt()
        return replies

    sender.connected()
    for _ in range(2):
        exchange()
    assert 0 < sender.held.total() < len(ct)
    sender.disconnected()
    clock[0] += 80 * 3600                                  # the box was away for three days
    ing.sweep()
    other = _sealed(bundle, central_keys, 2)               # it came back with another scan first
    assert states(ing.handle_batch(wire([other.init()])), other.tid) == [AckState.RECEIVING]
    sender.connected()
    receipts = 0
    for _ in range(400):
        receipts += sum(isinstance(r, Receipt) for r in exchange())
        if receipts:
            break
        clock[0] += 1.0
    assert receipts == 1 and sender.deferrals == 1        # deferred once, then admitted, then stored
    assert ing._conn.execute("SELECT count(*) FROM documents").fetchone()[0] == 1
