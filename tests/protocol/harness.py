"""Two-sided in-memory harness: an edge TransferSender and a central TransferReceiver over a lossy link.

Like h11's ConnectionPair, but for whole transfers: every message goes through the real wire format
(``encode`` → link → ``decode``), the ciphertext comes from the real ``EnvelopeSealer``, and central's
side ends with ``verify_ciphertext`` and ``EnvelopeOpener``. Time is a fake clock; faults (drops,
duplicates, reorders, disconnects, central restarts) come from a seeded ``random.Random`` so any
failing run replays exactly from its seed.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import nacl.signing

from protocol.envelope import EnvelopeOpener, SignedHeader, verify_ciphertext
from protocol.errors import ProtocolError
from protocol.messages import (
    Ack,
    AckState,
    Fin,
    Init,
    Message,
    Receipt,
    ReceiptBody,
    Segment,
    decode,
    encode,
)
from protocol.transfer import (
    HeldSegment,
    SegmentVerdict,
    SenderState,
    SendFin,
    SendInit,
    SendSegment,
    TransferReceiver,
    TransferSender,
)
from tests.protocol.factories import DEVICE, Keys, make_keys, seal


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0


@dataclass(frozen=True)
class LinkModel:
    """Per-message fault probabilities; latency is uniform in [latency, latency + jitter]."""

    drop: float = 0.0
    duplicate: float = 0.0
    latency: float = 0.05
    jitter: float = 0.0          # > 0 reorders messages whose send times are closer than this
    disconnect: float = 0.0      # chance, per delivered uplink message, that the connection drops
    restart: float = 0.0         # chance, per delivered uplink message, that central restarts
    crash: float = 0.0           # chance, per accepted segment, that central dies before the write
    outage: float = 2.0          # seconds offline after a disconnect
    max_faults: int = 6          # disconnects + restarts per run, so every run can finish


class Link:
    """One direction of the connection: a timed queue that may drop, duplicate and reorder."""

    def __init__(self, model: LinkModel, rng: random.Random, clock: FakeClock) -> None:
        self._model, self._rng, self._clock = model, rng, clock
        self._queue: list[tuple[float, int, str, bytes]] = []
        self._order = itertools.count()

    def send(self, topic: str, payload: bytes) -> None:
        if self._rng.random() < self._model.drop:
            return
        copies = 2 if self._rng.random() < self._model.duplicate else 1
        for _ in range(copies):
            at = self._clock.now + self._model.latency + self._rng.random() * self._model.jitter
            heapq.heappush(self._queue, (at, next(self._order), topic, payload))

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def pop_due(self) -> tuple[str, bytes] | None:
        if self._queue and self._queue[0][0] <= self._clock.now:
            _, _, topic, payload = heapq.heappop(self._queue)
            return topic, payload
        return None

    def clear(self) -> None:
        """The connection dropped: whatever was in flight is lost."""
        self._queue.clear()


@dataclass
class Central:
    """Central's protocol end with an in-memory 'durable' store (survives ``restart``)."""

    keys: Keys
    receipt_key: nacl.signing.SigningKey
    durable_header: SignedHeader | None = None
    durable_segments: dict[int, bytes] = field(default_factory=dict)
    documents: list[bytes] = field(default_factory=list)
    receipt: Receipt | None = None
    receiver: TransferReceiver | None = None
    pending: dict[int, bytes] = field(default_factory=dict)
    errors: list[ProtocolError] = field(default_factory=list)
    crash_before_commit: Callable[[], bool] = lambda: False

    def restart(self) -> None:
        """Process restart: memory is gone, the durable log is rebuilt into a fresh receiver."""
        self.pending.clear()
        self.receiver = None
        if self.durable_header is not None:
            self.receiver = TransferReceiver(self.durable_header.header, self._held_from_log())

    def _held_from_log(self) -> list[HeldSegment]:
        return [HeldSegment(o, len(d), zlib.crc32(d)) for o, d in sorted(self.durable_segments.items())]

    def handle(self, topic: str, payload: bytes) -> list[Message]:
        try:
            msg = decode(topic, payload)
        except ProtocolError as exc:
            self.errors.append(exc)
            return []
        if isinstance(msg, Init):
            msg.signed_header.verify(self.keys.device_verify)
            if self.durable_header is None:
                self.durable_header = msg.signed_header
                self.receiver = TransferReceiver(msg.signed_header.header)
            return [self._ack(msg.tid)]
        if isinstance(msg, Segment):
            if self.receiver is None:
                return [Ack(DEVICE, msg.tid, AckState.UNKNOWN)]
            if self.receipt is not None:
                return [Ack(DEVICE, msg.tid, AckState.STORED)]
            verdict = self.receiver.on_segment(msg)
            if verdict is SegmentVerdict.ACCEPT:
                if self.crash_before_commit():
                    self.restart()   # accepted, never written, never acked: the edge must resend
                    return []
                self.durable_segments[msg.offset] = msg.data   # "fsync", then tell the receiver
                self.receiver.committed(msg.offset)
            return [self._ack(msg.tid)]
        if isinstance(msg, Fin):
            if self.receiver is None:
                return [Ack(DEVICE, msg.tid, AckState.UNKNOWN)]
            if self.receipt is None and self.receiver.on_fin(msg):
                self._assemble()
            replies: list[Message] = [self._ack(msg.tid)]
            if self.receipt is not None:
                replies.append(self.receipt)
            return replies
        raise AssertionError(f"unexpected message at central: {msg!r}")

    def _ack(self, tid: str) -> Ack:
        if self.receipt is not None:
            return Ack(DEVICE, tid, AckState.STORED)
        assert self.receiver is not None
        return self.receiver.ack()

    def _assemble(self) -> None:
        assert self.durable_header is not None
        ciphertext = b"".join(self.durable_segments[o] for o in sorted(self.durable_segments))
        verified = verify_ciphertext(self.durable_header, self.keys.device_verify, size=len(ciphertext),
                                     sha256=hashlib.sha256(ciphertext).digest())
        pieces: list[bytes] = []
        opener = EnvelopeOpener(verified, self.keys.central, max_plaintext=1 << 30, sink=pieces.append)
        for start in range(0, len(ciphertext), 777):
            opener.update(ciphertext[start: start + 777])
        opener.finish()
        document = b"".join(pieces)
        self.documents.append(document)
        header = self.durable_header.header
        body = ReceiptBody(DEVICE, header.tid, hashlib.sha256(document).hexdigest(),
                           "2024-11-25T07:00:00Z", len(self.documents))
        self.receipt = Receipt.sign(body, self.receipt_key)


@dataclass
class RunReport:
    finished: bool
    sim_seconds: float
    segments_sent: int
    bytes_sent: int
    resent_bytes: int
    disconnects: int
    restarts: int
    resent_per_session: list[int]


class TransferPair:
    """Drive one document from edge to central through a :class:`LinkModel`."""

    def __init__(self, plaintext: bytes, *, seed: int, model: LinkModel, segment_size: int = 1024,
                 window: int = 4, resend_after: float = 1.0, chunk_size: int = 1024) -> None:
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.model = model
        self.keys = make_keys(11)
        self.receipt_key = make_keys(12).device
        self.sealed = seal(plaintext, self.keys, chunk_size=chunk_size)
        self.plaintext = plaintext
        self.ciphertext = self.sealed.ciphertext
        self.sender = TransferSender(self.sealed.header.tid, len(self.ciphertext), segment_size=segment_size,
                                     window=window, resend_after=resend_after)
        self.central = Central(self.keys, self.receipt_key, crash_before_commit=self._crash_roll)
        self.up = Link(model, self.rng, self.clock)
        self.down = Link(model, self.rng, self.clock)
        self.online = False
        self.reconnect_at: float | None = 0.0
        self.receipts: list[ReceiptBody] = []
        self._sent_offsets: set[int] = set()
        self._faults = 0
        self.report = RunReport(False, 0.0, 0, 0, 0, 0, 0, [0])

    # -- edge side --------------------------------------------------------------------------------
    def _edge_send(self, action: SendInit | SendSegment | SendFin) -> None:
        header = self.sealed.header
        msg: Message
        if isinstance(action, SendInit):
            msg = Init(DEVICE, header.tid, self.sealed.signed)
        elif isinstance(action, SendSegment):
            data = self.ciphertext[action.offset: action.offset + action.length]
            msg = Segment(DEVICE, header.tid, action.offset, data)
            self.report.segments_sent += 1
            self.report.bytes_sent += len(data)
            if action.offset in self._sent_offsets:
                self.report.resent_bytes += len(data)
                self.report.resent_per_session[-1] += len(data)
            self._sent_offsets.add(action.offset)
        else:
            msg = Fin(DEVICE, header.tid, header.ciphertext_size, header.ciphertext_sha256)
        self.up.send(*encode(msg))

    def _edge_receive(self, topic: str, payload: bytes) -> None:
        msg = decode(topic, payload)
        if isinstance(msg, Ack):
            self.sender.on_ack(msg)
        elif isinstance(msg, Receipt):
            self.receipts.append(msg.verify(self.receipt_key.verify_key))
            self.sender.on_receipt()

    def _disconnect(self) -> None:
        self.online = False
        self.sender.disconnected()
        self.up.clear()
        self.down.clear()
        self.reconnect_at = self.clock.now + self.model.outage
        self.report.disconnects += 1

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, limit: float = 3600.0) -> RunReport:
        spins, last_now = 0, -1.0
        while self.sender.state is not SenderState.DONE and self.clock.now <= limit:
            assert self.sender.state is not SenderState.REJECTED, self.sender.error
            spins = spins + 1 if self.clock.now == last_now else 0
            last_now = self.clock.now
            assert spins < 100_000, f"livelock at t={self.clock.now} in {self.sender.state}"
            if not self.online and self.reconnect_at is not None and self.clock.now >= self.reconnect_at:
                self.online, self.reconnect_at = True, None
                self.sender.connected()
                self.report.resent_per_session.append(0)
            if self.online:
                for action in self.sender.poll(self.clock.now):
                    self._edge_send(action)
            if (item := self.up.pop_due()) is not None:
                for reply in self.central.handle(*item):
                    self.down.send(*encode(reply))
                self._maybe_fault()
                continue
            if (item := self.down.pop_due()) is not None:
                self._edge_receive(*item)
                continue
            times = [t for t in (self.up.next_time(), self.down.next_time(), self.reconnect_at,
                                 self.sender.next_deadline() if self.online else None) if t is not None]
            assert times, f"stalled in {self.sender.state} at {self.clock.now}"
            self.clock.now = max(self.clock.now, min(times))
        self.report.finished = self.sender.state is SenderState.DONE
        self.report.sim_seconds = self.clock.now
        return self.report

    def _crash_roll(self) -> bool:
        if self._faults >= self.model.max_faults or self.rng.random() >= self.model.crash:
            return False
        self._faults += 1
        self.report.restarts += 1
        return True

    def _maybe_fault(self) -> None:
        if self._faults >= self.model.max_faults or not self.online:
            return
        roll = self.rng.random()
        if roll < self.model.disconnect:
            self._faults += 1
            self._disconnect()
        elif roll < self.model.disconnect + self.model.restart:
            self._faults += 1
            self.report.restarts += 1
            self.central.restart()
