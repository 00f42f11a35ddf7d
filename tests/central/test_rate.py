"""The per-device message rate (central.ingest.rate): pure, on a given clock."""

from __future__ import annotations

import logging

import pytest

from central.ingest.rate import MessageRate, Pacer, RateLimiter, Verdict, topic_device
from protocol.topics import Kind, Topic


def test_a_device_gets_its_burst_then_its_rate_and_others_are_not_touched() -> None:
    limiter = RateLimiter(MessageRate(per_second=10, burst=50))
    flood = [limiter.admit("xa-tan-trao", 100.0) for _ in range(80)]
    assert flood == [True] * 50 + [False] * 30
    assert limiter.admit("xa-kim-binh", 100.0)                # its own bucket
    assert [limiter.admit("xa-tan-trao", 101.0) for _ in range(12)].count(True) == 10
    assert not limiter.admit("xa-tan-trao", 99.0)             # a clock that went back adds nothing
    assert [limiter.admit("xa-tan-trao", 400.0) for _ in range(60)].count(True) == 50   # full again


def test_over_its_rate_a_device_waits_in_order_and_beyond_its_queue_is_dropped_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    pacer: Pacer[tuple[str, int]] = Pacer(RateLimiter(MessageRate(per_second=2, burst=3)),
                                          lambda m: m[0] or None, size_of=lambda _: 1, max_waiting=4)
    with caplog.at_level(logging.WARNING, logger="sohoa.central.ingest"):
        verdicts = [pacer.offer(("xa-a", n), 0.0) for n in range(10)]
        assert pacer.offer(("", 99), 0.0) is Verdict.NOW        # not a device topic: never paced
        assert pacer.offer(("xa-b", 0), 0.0) is Verdict.NOW     # another device is not held up
    assert verdicts == [Verdict.NOW] * 3 + [Verdict.HELD] * 4 + [Verdict.DROPPED] * 3
    assert pacer.waiting and pacer.limiter.dropped_total == 3
    lines = [r.getMessage() for r in caplog.records if "xa-a" in r.getMessage()]
    assert len(lines) == 1 and "dropped 1 unread" in lines[0]
    # Its bucket refills at 2 a second: the waiting messages go on in the order they came, and a new
    # message waits behind them even when a token is there.
    assert pacer.release(0.4) == []
    assert pacer.release(1.0) == [("xa-a", 3), ("xa-a", 4)]
    assert pacer.offer(("xa-a", 10), 1.6) is Verdict.HELD
    assert pacer.release(2.0) == [("xa-a", 5), ("xa-a", 6)]
    assert pacer.release(3.0) == [("xa-a", 10)] and not pacer.waiting


def test_what_waits_is_bounded_in_bytes_too() -> None:
    """A stolen key sending the largest packets the broker takes cannot park 256 MiB per worker:
    past the byte bound its messages are dropped, and what is released frees its room."""
    pacer: Pacer[bytes] = Pacer(RateLimiter(MessageRate(per_second=1, burst=1)), lambda _: "xa-a",
                                size_of=len, max_waiting=100, max_waiting_bytes=10)
    assert [pacer.offer(b"x" * 4, 0.0) for _ in range(5)] == [
        Verdict.NOW, Verdict.HELD, Verdict.HELD, Verdict.DROPPED, Verdict.DROPPED]
    assert pacer.offer(b"xx", 0.0) is Verdict.HELD                 # 4 + 4 + 2: exactly the bound
    assert pacer.release(1.0) == [b"x" * 4]
    assert pacer.offer(b"y" * 4, 1.0) is Verdict.HELD              # room again, behind the others
    assert [pacer.release(at) for at in (2.0, 3.0, 4.0)] == [[b"x" * 4], [b"xx"], [b"y" * 4]]
    assert not pacer.waiting
    assert pacer.limiter.dropped_total == 2


def test_all_devices_together_are_bounded_in_bytes() -> None:
    """Many stolen keys at once: each under its own bound, together they are stopped at the
    worker's; a device under its rate still goes through at once, whatever waits."""
    pacer: Pacer[tuple[str, bytes]] = Pacer(
        RateLimiter(MessageRate(per_second=1, burst=1)), lambda m: m[0], size_of=lambda m: len(m[1]),
        max_waiting=100, max_waiting_bytes=8, max_total_bytes=12)
    offered = [pacer.offer((device, b"x" * 4), 0.0) for device in ("xa-a", "xa-b", "xa-c", "xa-d")
               for _ in range(3)]
    assert offered == [Verdict.NOW, Verdict.HELD, Verdict.HELD,       # xa-a: 8 bytes wait
                       Verdict.NOW, Verdict.HELD, Verdict.DROPPED,    # xa-b: 4 more, 12 in all
                       Verdict.NOW, Verdict.DROPPED, Verdict.DROPPED,
                       Verdict.NOW, Verdict.DROPPED, Verdict.DROPPED]
    assert pacer.release(1.0) == [("xa-a", b"x" * 4), ("xa-b", b"x" * 4)]
    assert pacer.offer(("xa-c", b"y" * 4), 1.0) is Verdict.NOW      # its bucket refilled
    assert pacer.offer(("xa-c", b"z" * 4), 1.0) is Verdict.HELD     # room again: 4 + 4 waiting
    assert pacer.limiter.dropped_total == 5


def test_the_device_of_a_topic() -> None:
    assert topic_device(str(Topic(Kind.SEG, "xa-tan-trao", "a" * 32, 0))) == "xa-tan-trao"
    assert topic_device(str(Topic(Kind.STATUS, "xa-tan-trao"))) == "xa-tan-trao"
    assert topic_device(str(Topic(Kind.ACK, "xa-tan-trao"))) is None
    assert topic_device("sohoa/v1/up/") is None and topic_device("other") is None


def test_nonsense_rates_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        MessageRate(per_second=0)
    with pytest.raises(ValueError, match="positive"):
        MessageRate(burst=0.5)
