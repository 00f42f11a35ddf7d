"""The uplink against a real Mosquitto and a fake central built on the real protocol machines."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nacl.public
import nacl.signing
import psutil
import pytest

from edge.outbox import Doc, DocState, Outbox, Place
from edge.uplink import Uplink
from protocol.envelope import EnvelopeSealer
from tests.edge.fake_central import FakeCentral
from tests.edge.test_mqtt import acl_broker_config
from tests.support.broker import Broker, free_port, running_broker

DEVICE = "xa-tan-trao-01"
SEGMENT = 16 * 1024
WINDOW = 8


@dataclass
class Keys:
    device: nacl.signing.SigningKey = field(default_factory=nacl.signing.SigningKey.generate)
    central: nacl.public.PrivateKey = field(default_factory=nacl.public.PrivateKey.generate)
    receipt: nacl.signing.SigningKey = field(default_factory=nacl.signing.SigningKey.generate)


class Outcomes:
    """What the uplink recorded (delivered / failed rows); ``on_settled`` is its only callback."""

    def __init__(self) -> None:
        self.delivered: list[Doc] = []
        self.rejected: list[tuple[Doc, str]] = []
        self.outbox: Outbox | None = None
        self._settled = asyncio.Event()

    def on_settled(self) -> None:
        self._settled.set()

    async def refresh(self) -> None:
        assert self.outbox is not None
        rows = [d for d in await self.outbox.recent(10_000) if d.state in (DocState.DELIVERED,
                                                                             DocState.FAILED)]
        rows.sort(key=lambda d: d.updated_at)
        self.delivered = [d for d in rows if d.state is DocState.DELIVERED]
        self.rejected = [(d, d.reason or "") for d in rows if d.state is DocState.FAILED]

    async def wait(self, delivered: int = 0, rejected: int = 0, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                self._settled.clear()
                await self.refresh()
                if len(self.delivered) >= delivered and len(self.rejected) >= rejected:
                    return
                await self._settled.wait()


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    box = await Outbox.open(tmp_path / "outbox.db")
    yield box
    await box.close()


@pytest.fixture
def central(mosquitto: Broker, keys: Keys) -> Iterator[FakeCentral]:
    fake = FakeCentral(mosquitto, device_keys={DEVICE: keys.device.verify_key}, central_key=keys.central,
                       receipt_key=keys.receipt).start()
    yield fake
    fake.stop()


async def enqueue(outbox: Outbox, keys: Keys, directory: Path, plaintext: bytes, name: str,
                  priority: int = 0, device: str = DEVICE) -> Doc:
    """An outbox row in state PACKAGED with a real sealed envelope on disk."""
    doc = await outbox.add(name=name, src_path=str(directory / name), size=len(plaintext),
                           sha256=hashlib.sha256(plaintext).hexdigest(), media_type="application/pdf",
                           pages=1, priority=priority)
    await outbox.moved(doc.tid, Place.HELD, str(directory / name))
    sealer = EnvelopeSealer(device_id=device, doc_id=bytes.fromhex(doc.tid), seq=doc.seq,
                            signing_key=keys.device, central_public_key=keys.central.public_key,
                            plaintext_size=len(plaintext), created_at=int(time.time()), level=1)
    body = sealer.update(plaintext)
    tail, signed = sealer.finish()
    envelope = directory / f"{doc.tid}.env"
    envelope.write_bytes(body + tail)
    await outbox.mark_packaged(doc.tid, envelope_path=str(envelope), signed_header=signed.encode(),
                               ciphertext_size=signed.header.ciphertext_size, segment_size=SEGMENT)
    got = await outbox.get(doc.tid)
    assert got is not None
    return got


def document(n: int, size: int) -> bytes:
    """Incompressible bytes with a Vietnamese preamble: ciphertext size ≈ plaintext size."""
    return f"Quyết định số {n} – UBND xã Tân Trào\n".encode() + os.urandom(size)


def make_uplink(broker_url: str, outbox: Outbox, keys: Keys, outcomes: Outcomes, **kwargs: object) -> Uplink:
    options: dict[str, object] = {"segment_size": SEGMENT, "window": WINDOW, "backoff_initial": 0.1,
                                  "backoff_max": 1.0, **kwargs}
    outcomes.outbox = outbox
    return Uplink(device_id=DEVICE, broker_url=broker_url, username=DEVICE, password="mật-khẩu",
                  outbox=outbox, receipt_key=keys.receipt.verify_key, on_settled=outcomes.on_settled,
                  **options)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(uplink: Uplink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(uplink.run(), name="uplink")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_delivers_documents_byte_exact_exactly_once(
        tmp_path: Path, mosquitto: Broker, central: FakeCentral, outbox: Outbox, keys: Keys) -> None:
    sizes = [10, 5000, SEGMENT - 100, SEGMENT * 3, 200_000, 70_000]
    total = 0
    for n, size in enumerate(sizes):
        doc = await enqueue(outbox, keys, tmp_path, document(n, size), f"Công văn số {n} – Tuyên Quang.pdf")
        total += doc.ciphertext_size or 0
    originals = {d.tid: d.sha256 for d in await outbox.sendable(limit=100)}
    outcomes = Outcomes()
    uplink = make_uplink(mosquitto.url, outbox, keys, outcomes)
    async with running(uplink):
        await outcomes.wait(delivered=len(sizes))
        assert uplink.connected
    # Stopping the uplink leaves the retained status saying offline (the will, sent on purpose).
    assert await asyncio.to_thread(central.wait_for, lambda c: not c.statuses[-1].online, 10)
    assert sorted(d.tid for d in outcomes.delivered) == sorted(originals)
    assert all(count == 1 for count in central.assembled.values()) and len(central.assembled) == len(sizes)
    for tid, sha in originals.items():
        held = central.transfers[tid]
        assert held.plaintext is not None and hashlib.sha256(held.plaintext).hexdigest() == sha
        got = await outbox.get(tid)
        assert got is not None and got.state is DocState.DELIVERED
        assert got.central_document_id == held.document_id
    stats = await outbox.stats()
    assert stats.queued_docs == 0 and stats.last_receipt_at is not None
    # Nothing re-sent on a clean link; every payload byte counted.
    assert uplink.segment_bytes == total == central.segment_bytes
    assert uplink.bytes_on_wire > total
    assert central.statuses and central.statuses[0].online and central.statuses[0].device == DEVICE
    assert central.errors == []


@pytest.mark.parametrize("receipt_is_stored", [False, True], ids=["older-central", "receipt-only"])
async def test_the_init_says_a_receipt_is_stored_and_either_central_gets_documents_delivered(
        tmp_path: Path, mosquitto: Broker, central: FakeCentral, outbox: Outbox, keys: Keys,
        receipt_is_stored: bool) -> None:
    """The edge's inits carry RECEIPT_IS_STORED. A central that still sends STORED before the receipt
    (an older release) and one that sends the receipt alone both get every document delivered once,
    and the edge forgets nothing without a verified receipt naming its bytes."""
    central.receipt_is_stored = receipt_is_stored
    docs = [await enqueue(outbox, keys, tmp_path, document(n, size), f"Tờ trình {n}.pdf")
            for n, size in enumerate([3000, SEGMENT * 2 + 7])]
    central.bad_receipt_once.add(docs[0].tid)   # a forged receipt is still no proof, STORED or not
    outcomes = Outcomes()
    async with running(make_uplink(mosquitto.url, outbox, keys, outcomes, resend_after=0.5)):
        await outcomes.wait(delivered=len(docs))
    assert central.declared == {DEVICE: True}
    assert (central.sent_stored == 0) is receipt_is_stored
    assert sorted(d.tid for d in outcomes.delivered) == sorted(d.tid for d in docs)
    for doc in docs:
        got = await outbox.get(doc.tid)
        assert got is not None and got.state is DocState.DELIVERED and got.receipt_sha256 == doc.sha256
    assert all(count == 1 for count in central.assembled.values())


async def test_broker_restart_mid_transfer_resumes_from_central_ack(
        tmp_path: Path, mosquitto: Broker, central: FakeCentral, outbox: Outbox, keys: Keys) -> None:
    docs = [await enqueue(outbox, keys, tmp_path, document(n, 500_000), f"Tờ trình {n}.pdf")
            for n in range(3)]
    total = sum(d.ciphertext_size or 0 for d in docs)
    outcomes = Outcomes()
    # ~2 MB/s so the cut lands mid-transfer. The edge usually reconnects before the fake central
    # (non-persistent test broker: its subscription is gone until paho's 1 s reconnect), so the first
    # re-announce can go unheard; resend_after bounds how long that costs (acks take milliseconds).
    uplink = make_uplink(mosquitto.url, outbox, keys, outcomes, rate_kbit=16_000, resend_after=2.0)
    async with running(uplink):
        assert await asyncio.to_thread(central.wait_for, lambda c: c.held_bytes() >= total // 3, 20)
        await asyncio.to_thread(mosquitto.restart)
        await outcomes.wait(delivered=3, timeout=40)
    assert uplink.connects >= 2
    assert all(central.assembled[d.tid] == 1 for d in docs)
    resent = uplink.segment_bytes - total
    print(f"\nbroker restart: re-sent {resent} bytes (window {WINDOW} × {SEGMENT})")
    assert 0 <= resent <= WINDOW * SEGMENT


async def test_rejected_ack_marks_failed(
        tmp_path: Path, mosquitto: Broker, central: FakeCentral, outbox: Outbox, keys: Keys) -> None:
    bad = await enqueue(outbox, keys, tmp_path, document(1, 40_000), "Biên bản bị từ chối.pdf", priority=5)
    good = await enqueue(outbox, keys, tmp_path, document(2, 40_000), "Biên bản tốt.pdf")
    central.reject.add(bad.tid)
    outcomes = Outcomes()
    uplink = make_uplink(mosquitto.url, outbox, keys, outcomes)
    async with running(uplink):
        await outcomes.wait(delivered=1, rejected=1)
    (doc, reason), = outcomes.rejected
    assert doc.tid == bad.tid and "Refused" in reason
    failed = await outbox.get(bad.tid)
    assert failed is not None and failed.state is DocState.FAILED and failed.reason == reason
    assert [d.tid for d in outcomes.delivered] == [good.tid]
    assert central.assembled[bad.tid] == 0


async def test_receipt_with_bad_signature_is_ignored(
        tmp_path: Path, mosquitto: Broker, central: FakeCentral, outbox: Outbox, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    doc = await enqueue(outbox, keys, tmp_path, document(1, 30_000), "Giấy khai sinh.pdf")
    central.bad_receipt_once.add(doc.tid)
    outcomes = Outcomes()
    # No receipt after fin → the sender asks again after 4 × resend_after; central then signs properly.
    uplink = make_uplink(mosquitto.url, outbox, keys, outcomes, resend_after=0.5)
    with caplog.at_level(logging.WARNING, logger="sohoa.edge.uplink"):
        async with running(uplink):
            await outcomes.wait(delivered=1)
    assert central.fins[doc.tid] >= 2      # the forged receipt did not end the transfer
    assert "signature does not verify" in caplog.text
    assert len(outcomes.delivered) == 1 and central.assembled[doc.tid] == 1


class _Flag(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.seen.set()


async def test_publish_refused_by_acl_surfaces(tmp_path: Path, outbox: Outbox, keys: Keys) -> None:
    port = free_port()
    directory = tmp_path / "broker"
    directory.mkdir()
    conf = acl_broker_config(directory, port)   # dev-1 may only write its status
    doc = await enqueue(outbox, keys, tmp_path, document(1, 1000), "Quyết định.pdf", device="dev-1")
    flag = _Flag("0x87")
    logger = logging.getLogger("sohoa.edge.uplink")
    logger.addHandler(flag)
    try:
        with running_broker(conf, port, directory / "mosquitto.log") as broker:
            outcomes = Outcomes()
            uplink = Uplink(device_id="dev-1", broker_url=broker.url, username="dev-1", password="mật-khẩu-1",
                            outbox=outbox, receipt_key=keys.receipt.verify_key, backoff_initial=5.0)
            async with running(uplink):
                assert await asyncio.to_thread(flag.seen.wait, 10)
    finally:
        logger.removeHandler(flag)
    assert uplink.last_error is not None and "0x87" in uplink.last_error
    assert "refused" in uplink.last_error
    still = await outbox.get(doc.tid)
    assert still is not None and still.state is DocState.SENDING and outcomes.delivered == []


async def test_rate_cap_is_respected(
        tmp_path: Path, mosquitto: Broker, central: FakeCentral, outbox: Outbox, keys: Keys) -> None:
    for n in range(2):
        await enqueue(outbox, keys, tmp_path, document(n, 250_000), f"Sổ hộ tịch {n}.pdf")
    rate_kbit = 2400.0                       # 300 kB/s
    rate = rate_kbit * 1000 / 8
    outcomes = Outcomes()
    uplink = make_uplink(mosquitto.url, outbox, keys, outcomes, rate_kbit=rate_kbit)
    started = time.monotonic()
    async with running(uplink):
        await outcomes.wait(delivered=2)
        elapsed = time.monotonic() - started
    sent = uplink.bytes_on_wire
    print(f"\nrate cap {rate / 1000:.0f} kB/s: {sent} bytes in {elapsed:.2f} s "
          f"= {sent / elapsed / 1000:.0f} kB/s")
    # Generous margins: allow a full second of burst below, 50 % overshoot above.
    assert elapsed >= 0.9 * (sent - rate) / rate
    assert sent / elapsed <= 1.5 * rate


async def test_idle_cpu_near_zero_while_broker_is_down(
        tmp_path: Path, mosquitto: Broker, central: FakeCentral, outbox: Outbox, keys: Keys) -> None:
    doc = await enqueue(outbox, keys, tmp_path, document(1, 50_000), "Đơn xin cấp phép.pdf")
    outcomes = Outcomes()
    uplink = make_uplink(mosquitto.url, outbox, keys, outcomes, backoff_initial=0.2, backoff_max=1.0)
    async with running(uplink):
        await outcomes.wait(delivered=1)
        await enqueue(outbox, keys, tmp_path, document(2, 50_000), "Đơn thứ hai.pdf")
        central.stop()
        mosquitto.kill()
        uplink.wake()
        process = psutil.Process()
        before = process.cpu_times()
        await asyncio.sleep(3.0)             # the measurement window, not a synchronisation
        after = process.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        print(f"\nCPU while the broker is down: {used:.3f} s over 3 s")
        assert used < 0.3
        assert not uplink.connected
    assert doc.tid in {d.tid for d in outcomes.delivered}
