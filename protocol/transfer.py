"""Transfer state machines for both ends of one envelope's upload.

Rules:

Sender (edge), one per transfer id:
  - After every (re)connect it announces the transfer with ``init``. A *fresh* transfer (never
    sent before) may start sending segments right away; a resumed one waits for central's ack so
    it sends only what central does not hold — a cut costs at most one window of re-sent bytes.
  - Segments lie on a fixed grid of ``segment_size`` bytes; at most ``window`` are in flight.
  - A segment counts as delivered only when an ack's ranges cover it (a PUBACK promises nothing
    durable). An in-flight segment not covered after ``resend_after`` seconds is sent again.
  - Central acks only durably stored bytes, so what it holds only grows: RECEIVING acks are merged
    into what the sender knows, and a stale ack overtaken by a newer one costs nothing. The one
    exception is an ack that shows a gap *after* fin was sent: central has seen everything we sent
    and still misses bytes, so its view replaces ours and the gap is sent again.
  - Acks that arrive while disconnected update what is held but never make the sender active.
  - Call ``poll`` after every input (connected, ack, receipt); ``next_deadline`` is only
    meaningful after a ``poll``.
  - When acks cover ``[0, size)`` it sends ``fin`` (repeated every ``resend_after`` until
    central answers STORED). A STORED ack means "receipt follows"; the receipt ends the transfer,
    with or without a STORED before it (the edge says so on its init: ``RECEIPT_IS_STORED``).
  - A REJECTED ack ends the transfer as failed; UNKNOWN means central lost it: announce again.
  - A DEFERRED ack (central is not taking this transfer now: a per-device quota) is not a failure:
    nothing is in flight any more and init is sent again only after ``retry_after`` (at least
    ``resend_after``). UNKNOWN acks for segments sent before the deferral do not cut that wait short.

Receiver (central), one per transfer id, rebuilt from the durable segment log after a restart:
  - A segment is accepted only after ``init`` was verified; it must lie within the signed
    ciphertext size. A repeat of a held segment (same offset, length and checksum) is a
    duplicate: acknowledged, not written. Any other overlap is a conflict: an error, never a merge.
  - The caller writes an accepted segment durably, then calls ``committed``; only then do its
    bytes appear in acked ranges.
  - The transfer is complete when the held ranges cover ``[0, ciphertext_size)``; a ``fin`` must
    name the signed ciphertext size and hash, anything else is a conflict.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocol.envelope import EnvelopeHeader
from protocol.errors import TransferError
from protocol.messages import Ack, AckState, Fin, Segment
from protocol.ranges import RangeSet


class SenderState(StrEnum):
    IDLE = "idle"                 # not connected
    ANNOUNCING = "announcing"     # init sent, waiting for the first ack (resumed transfers)
    SENDING = "sending"
    FINISHING = "finishing"       # everything acked, fin sent
    AWAITING_RECEIPT = "awaiting_receipt"
    DONE = "done"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class SendInit:
    pass


@dataclass(frozen=True, slots=True)
class SendSegment:
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class SendFin:
    pass


Action = SendInit | SendSegment | SendFin


class TransferSender:
    """What to send next for one transfer; time is passed in, nothing is sent from here."""

    def __init__(self, tid: str, size: int, *, segment_size: int, window: int,
                 resend_after: float = 30.0, fresh: bool = True) -> None:
        if segment_size <= 0 or window <= 0 or size <= 0 or not resend_after > 0:
            raise ValueError("size, segment_size, window and resend_after must be positive")
        self.tid = tid
        self.size = size
        self.segment_size = segment_size
        self.window = window
        self.resend_after = resend_after
        self.state = SenderState.IDLE
        self.held = RangeSet()
        self.error: str | None = None
        self.error_class: str | None = None
        self.bytes_sent = 0
        self._fresh = fresh
        self._in_flight: dict[int, float] = {}
        self._init_sent_at: float | None = None
        self._fin_sent_at: float | None = None
        self._deferred_for: float | None = None    # a DEFERRED ack's wait, started at the next poll
        self._not_before: float | None = None      # no init before this time (a deferral)
        self.deferrals = 0

    # -- inputs ---------------------------------------------------------------------------------
    def connected(self) -> None:
        if self.state in (SenderState.DONE, SenderState.REJECTED):
            return
        self.state = SenderState.SENDING if self._fresh else SenderState.ANNOUNCING
        self._in_flight.clear()
        self._init_sent_at = None
        self._fin_sent_at = None
        if self._not_before is not None or self._deferred_for is not None:
            # A reconnect does not end a deferral: announce only once the wait is over.
            self.state = SenderState.ANNOUNCING

    def disconnected(self) -> None:
        if self.state not in (SenderState.DONE, SenderState.REJECTED):
            self.state = SenderState.IDLE
            self._fresh = False
            self._in_flight.clear()

    def on_ack(self, ack: Ack) -> None:
        if ack.tid != self.tid or self.state in (SenderState.DONE, SenderState.REJECTED):
            return
        self._fresh = False
        idle = self.state is SenderState.IDLE
        if ack.state in (AckState.RECEIVING, AckState.STORED):
            self._not_before = self._deferred_for = None   # central took it after all
        if ack.state is AckState.REJECTED:
            self.state = SenderState.REJECTED
            self.error, self.error_class = ack.error or "rejected by central", ack.error_class
            self._in_flight.clear()
            return
        if ack.state is AckState.STORED:
            self.held = RangeSet.of([(0, self.size)])
            self._in_flight.clear()
            if not idle:
                self.state = SenderState.AWAITING_RECEIPT
                self._fin_sent_at = None   # poll() starts the wait for the receipt
            return
        if ack.state is AckState.DEFERRED:
            self.deferrals += 1
            self.error, self.error_class = ack.error, ack.error_class
            self._in_flight.clear()
            self._deferred_for = max(float(ack.retry_after or 0), self.resend_after)
            if not idle:
                self.state = SenderState.ANNOUNCING
            return
        if ack.state is AckState.UNKNOWN:
            self.held = RangeSet()
            self._in_flight.clear()
            if self._not_before is None and self._deferred_for is None:
                self._init_sent_at = None
            if not idle:
                self.state = SenderState.ANNOUNCING
            return
        ranges = [(start, min(end, self.size)) for start, end in ack.ranges if start < self.size]
        if self.state is SenderState.FINISHING and not RangeSet.of(ranges).covers(0, self.size):
            # fin was sent and central still misses bytes: its view is the truth, send the gap.
            self.held = RangeSet.of(ranges)
            self._fin_sent_at = None
            self.state = SenderState.SENDING
        else:
            for start, end in ranges:
                self.held.add(start, end)
        for offset in [o for o in self._in_flight if self.held.covers(o, self._end(o))]:
            del self._in_flight[offset]
        if self.state is SenderState.ANNOUNCING:
            self.state = SenderState.SENDING

    def on_receipt(self) -> None:
        self.state = SenderState.DONE
        self._in_flight.clear()

    # -- outputs --------------------------------------------------------------------------------
    def poll(self, now: float, budget: int | None = None) -> list[Action]:
        """Actions due now. ``budget`` caps new segments (a window shared across transfers)."""
        actions: list[Action] = []
        if self.state in (SenderState.IDLE, SenderState.DONE, SenderState.REJECTED):
            return actions
        if self._deferred_for is not None:
            self._not_before = now + self._deferred_for
            self._deferred_for = None
            self._init_sent_at = now   # counts as just announced: the next init waits for the deferral
        if self._not_before is not None:
            if now < self._not_before:
                return actions
            self._not_before = None
            self._init_sent_at = None
        if self._init_sent_at is None or (
                self.state is SenderState.ANNOUNCING and self._due(self._init_sent_at, now)):
            self._init_sent_at = now
            actions.append(SendInit())
        if self.state is SenderState.SENDING:
            if self.held.covers(0, self.size):
                self.state = SenderState.FINISHING
            else:
                actions.extend(self._segments(now, budget))
        if self.state is SenderState.FINISHING and (
                self._fin_sent_at is None or self._due(self._fin_sent_at, now)):
            self._fin_sent_at = now
            actions.append(SendFin())
        if self.state is SenderState.AWAITING_RECEIPT and self._fin_sent_at is None:
            # The STORED ack may have come in answer to init after a reconnect, with the receipt
            # lost on the way: start the clock so the receipt is asked for again below.
            self._fin_sent_at = now
        if self.state is SenderState.AWAITING_RECEIPT and self._fin_sent_at is not None and (
                self._due(self._fin_sent_at, now, 4)):
            # No receipt for a long time: ask again; central answers fin idempotently.
            self._fin_sent_at = now
            actions.append(SendFin())
        return actions

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def next_deadline(self) -> float | None:
        """Earliest time at which ``poll`` may have something new without any input."""
        if self._not_before is not None:
            return self._not_before
        times = [t + self.resend_after for t in self._in_flight.values()]
        if self.state is SenderState.ANNOUNCING and self._init_sent_at is not None:
            times.append(self._init_sent_at + self.resend_after)
        if self.state in (SenderState.FINISHING, SenderState.AWAITING_RECEIPT) and (
                self._fin_sent_at is not None):
            factor = 1 if self.state is SenderState.FINISHING else 4
            times.append(self._fin_sent_at + self.resend_after * factor)
        return min(times) if times else None

    def _due(self, sent_at: float, now: float, factor: int = 1) -> bool:
        # The same expression as next_deadline(): "now - sent_at >= resend_after" can be False at
        # exactly the deadline (0.9664… + 1.0 - 0.9664… < 1.0), and a caller that sleeps until the
        # deadline would then spin.
        return now >= sent_at + self.resend_after * factor

    def _end(self, offset: int) -> int:
        return min(offset + self.segment_size, self.size)

    def _segments(self, now: float, budget: int | None) -> list[Action]:
        for offset, sent_at in list(self._in_flight.items()):
            if self._due(sent_at, now):
                del self._in_flight[offset]   # timed out: eligible again below
        room = self.window - len(self._in_flight)
        if budget is not None:
            room = min(room, budget)
        actions: list[Action] = []
        for gap_start, gap_end in self.held.missing(self.size):
            offset = gap_start - gap_start % self.segment_size
            while offset < gap_end and room > 0:
                end = self._end(offset)
                if offset not in self._in_flight and not self.held.covers(offset, end):
                    self._in_flight[offset] = now
                    self.bytes_sent += end - offset
                    actions.append(SendSegment(offset, end - offset))
                    room -= 1
                offset += self.segment_size
            if room <= 0:
                break
        return actions


class SegmentVerdict(StrEnum):
    ACCEPT = "accept"         # new bytes: write durably, then call committed()
    DUPLICATE = "duplicate"   # already held byte-for-byte: just ack


@dataclass(frozen=True, slots=True)
class HeldSegment:
    offset: int
    length: int
    crc: int


class TransferReceiver:
    """Central's view of one transfer: which segments are durably held."""

    def __init__(self, header: EnvelopeHeader,
                 held: list[HeldSegment] | tuple[HeldSegment, ...] = ()) -> None:
        self.header = header
        self._segments: dict[int, HeldSegment] = {}
        self._pending: dict[int, HeldSegment] = {}
        self.ranges = RangeSet()
        # The durable log is ours, but a bug or a torn write there must not turn into a merge.
        for seg in sorted(held, key=lambda h: h.offset):
            end = seg.offset + seg.length
            if seg.length <= 0 or seg.offset < 0 or end > self.size or self.ranges.overlaps(seg.offset, end):
                raise TransferError(f"held segment [{seg.offset}, {end}) is invalid or overlaps another",
                                    device=header.device_id, tid=header.tid, offset=seg.offset)
            self._segments[seg.offset] = seg
            self.ranges.add(seg.offset, end)

    @property
    def tid(self) -> str:
        return self.header.tid

    @property
    def size(self) -> int:
        return self.header.ciphertext_size

    @property
    def complete(self) -> bool:
        return self.ranges.covers(0, self.size)

    @property
    def held_segments(self) -> tuple[HeldSegment, ...]:
        """Committed segments in offset order (what a restarted receiver is rebuilt from)."""
        return tuple(self._segments[o] for o in sorted(self._segments))

    def on_segment(self, seg: Segment) -> SegmentVerdict:
        def conflict(message: str) -> TransferError:
            return TransferError(message, device=seg.device, tid=seg.tid, offset=seg.offset)

        if seg.tid != self.tid or seg.device != self.header.device_id:
            raise conflict("segment for another transfer")
        if seg.end > self.size:
            raise conflict(f"segment [{seg.offset}, {seg.end}) past the signed size {self.size}")
        held = self._segments.get(seg.offset) or self._pending.get(seg.offset)
        if held is not None:
            if held.length == len(seg.data) and held.crc == seg.crc:
                return SegmentVerdict.DUPLICATE
            raise conflict("conflicting segment at a held offset")
        if self.ranges.overlaps(seg.offset, seg.end) or any(
                p.offset < seg.end and seg.offset < p.offset + p.length for p in self._pending.values()):
            raise conflict("segment overlaps held bytes with a different geometry")
        self._pending[seg.offset] = HeldSegment(seg.offset, len(seg.data), seg.crc)
        return SegmentVerdict.ACCEPT

    def committed(self, offset: int) -> HeldSegment:
        """The caller has durably stored the accepted segment at ``offset``."""
        seg = self._pending.pop(offset)
        self._segments[offset] = seg
        self.ranges.add(seg.offset, seg.offset + seg.length)
        return seg

    def abandon(self, offset: int) -> None:
        """The durable write failed (disk full): forget the pending segment so it can come again."""
        self._pending.pop(offset, None)

    def on_fin(self, fin: Fin) -> bool:
        """Check a fin against the signed header; True if every byte is durably held."""
        if fin.tid != self.tid or fin.device != self.header.device_id:
            raise TransferError("fin for another transfer", device=fin.device, tid=fin.tid)
        if fin.size != self.size or fin.sha256 != self.header.ciphertext_sha256:
            raise TransferError(f"fin names {fin.size} bytes sha256 {fin.sha256.hex()[:16]}…, the signed "
                                f"header {self.size} bytes {self.header.ciphertext_sha256.hex()[:16]}…",
                                device=fin.device, tid=fin.tid)
        return self.complete

    def ack(self) -> Ack:
        return Ack(self.header.device_id, self.tid, AckState.RECEIVING, tuple(self.ranges.as_list()))
