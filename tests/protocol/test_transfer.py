"""Unit tests of the transfer state machines: one input at a time, time passed in by hand."""

from __future__ import annotations

import zlib

import pytest

from protocol.errors import TransferError
from protocol.messages import Ack, AckState, Fin, Segment
from protocol.ranges import RangeSet
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
from tests.protocol.factories import DEVICE, incompressible, make_keys, seal

TID = "ab" * 16


def ack(*ranges: tuple[int, int], state: AckState = AckState.RECEIVING) -> Ack:
    return Ack(DEVICE, TID, state, tuple(ranges))


def sender(size: int = 10_000, *, fresh: bool = True, window: int = 4) -> TransferSender:
    s = TransferSender(TID, size, segment_size=1000, window=window, resend_after=10.0, fresh=fresh)
    s.connected()
    return s


def offsets(actions: list[SendInit | SendSegment | SendFin]) -> list[int]:
    return [a.offset for a in actions if isinstance(a, SendSegment)]


def test_fresh_sender_announces_and_fills_the_window() -> None:
    s = sender()
    actions = s.poll(0.0)
    assert actions[0] == SendInit()
    assert offsets(actions) == [0, 1000, 2000, 3000]
    assert s.poll(1.0) == []
    s.on_ack(ack((0, 2000)))
    assert offsets(s.poll(1.0)) == [4000, 5000]
    assert s.in_flight == 4


def test_resumed_sender_waits_for_the_ack_and_sends_only_the_gaps() -> None:
    s = sender(fresh=False)
    assert s.state is SenderState.ANNOUNCING
    assert s.poll(0.0) == [SendInit()]
    assert s.poll(5.0) == []
    assert s.poll(10.0) == [SendInit()]   # init repeated until central answers
    s.on_ack(ack((0, 3000), (4000, 9000)))
    assert offsets(s.poll(10.0)) == [3000, 9000]


def test_budget_caps_new_segments() -> None:
    s = sender()
    assert offsets(s.poll(0.0, budget=1)) == [0]
    assert offsets(s.poll(0.0, budget=0)) == []
    assert offsets(s.poll(0.0, budget=10)) == [1000, 2000, 3000]


def test_unacked_segments_are_resent_exactly_at_the_deadline() -> None:
    start = 1.3436424411240122   # (start + 1.0) - start < 1.0 in floating point
    assert (start + 1.0) - start < 1.0
    s = TransferSender(TID, 3000, segment_size=1000, window=4, resend_after=1.0)
    s.connected()
    assert offsets(s.poll(start)) == [0, 1000, 2000]
    deadline = s.next_deadline()
    assert deadline is not None
    # Waking up at exactly the deadline must produce the resend, not an empty poll forever.
    assert offsets(s.poll(deadline)) == [0, 1000, 2000]


def test_stale_ack_does_not_undo_a_newer_one() -> None:
    s = sender(size=4000)
    s.poll(0.0)
    s.on_ack(ack((0, 3000)))
    s.on_ack(ack((0, 1000)))           # overtaken by the one above on the way
    assert s.held.covers(0, 3000)
    assert offsets(s.poll(1.0)) == []  # nothing re-sent: 3000 is still in flight


def test_fin_then_gap_resends_the_gap() -> None:
    s = sender(size=3000)
    s.poll(0.0)
    s.on_ack(ack((0, 3000)))
    assert s.poll(1.0) == [SendFin()]
    assert s.state is SenderState.FINISHING
    assert s.next_deadline() == 11.0
    s.on_ack(ack((0, 1000), (2000, 3000)))   # after fin, central still misses a segment
    assert s.state is SenderState.SENDING
    assert offsets(s.poll(2.0)) == [1000]


def test_fin_deadline_at_time_zero() -> None:
    s = TransferSender(TID, 10, segment_size=1000, window=1, resend_after=10.0)
    s.connected()
    s.poll(0.0)
    s.on_ack(ack((0, 10)))
    assert s.poll(0.0) == [SendFin()]
    assert s.next_deadline() == 10.0    # was None when fin went out at t=0.0
    assert s.poll(10.0) == [SendFin()]


def test_stored_receipt_is_asked_for_again_after_reconnect() -> None:
    s = sender(size=1000)
    s.poll(0.0)
    s.on_ack(ack((0, 1000)))
    s.poll(1.0)
    s.disconnected()                       # receipt lost while offline
    s.connected()
    assert s.poll(100.0) == [SendInit()]
    s.on_ack(ack(state=AckState.STORED))   # central answers init: stored, receipt follows…
    assert s.poll(100.0) == []
    assert s.state is SenderState.AWAITING_RECEIPT
    assert s.next_deadline() == 140.0      # …and if it does not, ask again with fin
    assert s.poll(140.0) == [SendFin()]
    s.on_receipt()
    assert s.state is SenderState.DONE
    assert s.poll(1000.0) == [] and s.next_deadline() is None


def test_acks_while_disconnected_do_not_wake_the_sender() -> None:
    for state in (AckState.STORED, AckState.UNKNOWN, AckState.RECEIVING):
        s = sender()
        s.poll(0.0)
        s.disconnected()
        s.on_ack(ack((0, 1000)) if state is AckState.RECEIVING else ack(state=state))
        assert s.state is SenderState.IDLE
        assert s.poll(100.0) == []
        s.connected()
        assert s.poll(100.0) == [SendInit()]


def test_unknown_means_announce_again_and_resend_everything() -> None:
    s = sender(size=2000)
    s.poll(0.0)
    s.on_ack(ack((0, 1000)))
    s.on_ack(ack(state=AckState.UNKNOWN))
    assert s.state is SenderState.ANNOUNCING
    assert s.poll(1.0) == [SendInit()]
    s.on_ack(ack())
    assert offsets(s.poll(1.0)) == [0, 1000]


def test_rejected_is_final() -> None:
    s = sender()
    s.poll(0.0)
    s.on_ack(Ack(DEVICE, TID, AckState.REJECTED, error="chữ ký sai", error_class="SignatureError"))
    assert s.state is SenderState.REJECTED
    assert (s.error, s.error_class) == ("chữ ký sai", "SignatureError")
    s.connected()
    s.on_ack(ack((0, 100)))
    assert s.poll(100.0) == [] and s.state is SenderState.REJECTED


def test_acks_for_other_transfers_are_ignored() -> None:
    s = sender()
    s.poll(0.0)
    s.on_ack(Ack(DEVICE, "cd" * 16, AckState.STORED))
    assert s.state is SenderState.SENDING


def test_ack_ranges_past_the_size_are_clipped() -> None:
    s = sender(size=1500)
    s.poll(0.0)
    s.on_ack(ack((0, 10**9)))
    assert s.held.as_list() == [(0, 1500)]
    assert s.poll(1.0) == [SendFin()]


def test_sender_arguments() -> None:
    for kwargs in ({"segment_size": 0, "window": 1}, {"segment_size": 1, "window": 0},
                   {"segment_size": 1, "window": 1, "resend_after": 0.0}):
        with pytest.raises(ValueError):
            TransferSender(TID, 10, **kwargs)  # type: ignore[arg-type]
    assert TransferSender(TID, 10, segment_size=1, window=1).poll(0.0) == []   # idle until connected


# -- receiver -------------------------------------------------------------------------------------

KEYS = make_keys(21)
SEALED = seal(incompressible(5000), KEYS)
HEADER = SEALED.header
CT = SEALED.ciphertext


def seg(offset: int, length: int, data: bytes | None = None) -> Segment:
    return Segment(DEVICE, HEADER.tid, offset, data if data is not None else CT[offset: offset + length])


def test_receiver_accepts_commits_and_acks() -> None:
    r = TransferReceiver(HEADER)
    assert r.on_segment(seg(0, 1000)) is SegmentVerdict.ACCEPT
    assert r.ack().ranges == ()            # not durable yet, not acked
    assert r.on_segment(seg(0, 1000)) is SegmentVerdict.DUPLICATE   # repeat of a pending one
    r.committed(0)
    assert r.ack().ranges == ((0, 1000),)
    assert r.on_segment(seg(0, 1000)) is SegmentVerdict.DUPLICATE
    assert r.on_segment(seg(2000, 1000)) is SegmentVerdict.ACCEPT
    r.committed(2000)
    assert r.ack().ranges == ((0, 1000), (2000, 3000))
    assert not r.complete


@pytest.mark.parametrize(("offset", "length", "why"), [
    (0, 500, "shorter at a held offset"), (0, 1000, "same length, other bytes"), (500, 1000, "overlap"),
    (999, 2, "overlap at the edge"), (1500, 1000, "overlaps a pending segment"),
])
def test_receiver_refuses_conflicts(offset: int, length: int, why: str) -> None:
    r = TransferReceiver(HEADER)
    r.on_segment(seg(0, 1000))
    r.committed(0)
    r.on_segment(seg(2000, 1000))           # pending
    data = None if why != "same length, other bytes" else bytes(1000)
    with pytest.raises(TransferError):
        r.on_segment(seg(offset, length, data))


def test_receiver_refuses_bytes_past_the_signed_size_and_other_transfers() -> None:
    r = TransferReceiver(HEADER)
    with pytest.raises(TransferError):
        r.on_segment(Segment(DEVICE, HEADER.tid, len(CT) - 1, b"ab"))
    with pytest.raises(TransferError):
        r.on_segment(Segment("xa-khac", HEADER.tid, 0, b"a"))
    with pytest.raises(TransferError):
        r.on_segment(Segment(DEVICE, "0" * 32, 0, b"a"))


def test_abandoned_segment_can_come_again() -> None:
    r = TransferReceiver(HEADER)
    r.on_segment(seg(0, 1000))
    r.abandon(0)
    assert r.on_segment(seg(0, 1000)) is SegmentVerdict.ACCEPT


def test_receiver_rebuilt_from_the_durable_log() -> None:
    r = TransferReceiver(HEADER)
    for offset in range(0, len(CT), 1000):
        r.on_segment(seg(offset, 1000))
        r.committed(offset)
    assert r.complete
    again = TransferReceiver(HEADER, list(reversed(r.held_segments)))
    assert again.ranges.as_list() == [(0, len(CT))] and again.complete
    assert again.on_segment(seg(1000, 1000)) is SegmentVerdict.DUPLICATE


@pytest.mark.parametrize("held", [
    [HeldSegment(0, 100, 0), HeldSegment(50, 100, 0)], [HeldSegment(len(CT) - 1, 2, 0)],
    [HeldSegment(0, 0, 0)], [HeldSegment(-1, 5, 0)],
])
def test_receiver_refuses_a_corrupt_log(held: list[HeldSegment]) -> None:
    with pytest.raises(TransferError):
        TransferReceiver(HEADER, held)


def test_fin_is_checked_against_the_signed_header() -> None:
    r = TransferReceiver(HEADER)
    good = Fin(DEVICE, HEADER.tid, HEADER.ciphertext_size, HEADER.ciphertext_sha256)
    assert r.on_fin(good) is False
    r.on_segment(seg(0, len(CT)))
    r.committed(0)
    assert r.on_fin(good) is True
    for bad in (Fin(DEVICE, HEADER.tid, HEADER.ciphertext_size + 1, HEADER.ciphertext_sha256),
                Fin(DEVICE, HEADER.tid, HEADER.ciphertext_size, b"\0" * 32),
                Fin(DEVICE, "0" * 32, HEADER.ciphertext_size, HEADER.ciphertext_sha256)):
        with pytest.raises(TransferError):
            r.on_fin(bad)


def test_held_segment_crc_matches_the_wire_checksum() -> None:
    s = seg(0, 1000)
    assert s.crc == zlib.crc32(CT[:1000])


def test_rangeset() -> None:
    ranges = RangeSet.of([(10, 20), (0, 5), (5, 10), (30, 40), (25, 31)])
    assert ranges.as_list() == [(0, 20), (25, 40)]
    assert ranges.covers(0, 20) and not ranges.covers(15, 26) and ranges.covers(3, 3)
    assert ranges.overlaps(19, 21) and not ranges.overlaps(20, 25)
    assert ranges.missing(50) == [(20, 25), (40, 50)]
    assert ranges.total() == 35 and len(ranges) == 2
    with pytest.raises(ValueError):
        ranges.add(5, 4)


def deferred(retry_after: int) -> Ack:
    return Ack(DEVICE, TID, AckState.DEFERRED, error="over quota", error_class="QuotaExceededError",
               retry_after=retry_after)


def test_a_deferral_waits_retry_after_then_announces_again_and_is_never_a_failure() -> None:
    s = sender()
    assert offsets(s.poll(0.0)) == [0, 1000, 2000, 3000]   # a fresh transfer starts at once
    s.on_ack(deferred(60))
    assert s.state is SenderState.ANNOUNCING and s.in_flight == 0 and s.deferrals == 1
    assert s.poll(1.0) == []
    # Central answers UNKNOWN to the segments sent before it deferred: that must not cut the wait short.
    s.on_ack(ack(state=AckState.UNKNOWN))
    assert s.poll(2.0) == []
    assert s.next_deadline() == 61.0
    assert s.poll(60.9) == []
    assert s.poll(61.0) == [SendInit()]
    assert s.poll(65.0) == []                 # then the usual init repeat
    s.on_ack(ack())                           # admitted: central holds nothing yet
    assert offsets(s.poll(66.0)) == [0, 1000, 2000, 3000]
    assert s.state is SenderState.SENDING


def test_a_deferral_waits_at_least_resend_after_and_survives_a_reconnect() -> None:
    s = sender(fresh=False)
    assert s.poll(0.0) == [SendInit()]
    s.on_ack(deferred(0))                     # a central asking for no wait still gets resend_after
    assert s.poll(0.5) == []
    s.disconnected()
    s.connected()
    assert s.poll(5.0) == []                  # a reconnect does not end the deferral
    assert s.poll(10.5) == [SendInit()]
    s.on_ack(deferred(30))
    s.on_ack(ack(state=AckState.STORED))      # a stale outcome: central had it after all
    assert s.state is SenderState.AWAITING_RECEIPT
