"""The per-device message rate (central.ingest.rate): pure, on a given clock."""

from __future__ import annotations

import logging

import pytest

from central.ingest.rate import MessageRate, RateLimiter, topic_device


def test_a_device_gets_its_burst_then_its_rate_and_others_are_not_touched(
        caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimiter(MessageRate(per_second=10, burst=50))
    with caplog.at_level(logging.WARNING, logger="sohoa.central.ingest"):
        flood = [limiter.admit("xa-tan-trao", 100.0) for _ in range(80)]
        assert flood.count(True) == 50 and flood[:50] == [True] * 50
        assert limiter.admit("xa-kim-binh", 100.0)                # its own bucket
        assert [limiter.admit("xa-tan-trao", 101.0) for _ in range(12)].count(True) == 10
        assert not limiter.admit("xa-tan-trao", 99.0)             # a clock that went back adds nothing
    assert limiter.dropped_total == 30 + 2 + 1
    lines = [r for r in caplog.records if "xa-tan-trao" in r.getMessage()]
    assert len(lines) == 1 and "dropped 1 unread" in lines[0].getMessage()   # once per 5 minutes
    assert limiter.admit("xa-tan-trao", 400.0)                    # refilled to its burst
    with caplog.at_level(logging.WARNING, logger="sohoa.central.ingest"):
        dropped = [limiter.admit("xa-tan-trao", 400.0) for _ in range(60)].count(False)
    assert dropped == 11 and any("dropped" in r.getMessage() for r in caplog.records[len(lines):])


def test_the_device_of_a_topic() -> None:
    assert topic_device("sohoa/v1/up/xa-tan-trao/tx/" + "a" * 32 + "/seg/0") == "xa-tan-trao"
    assert topic_device("sohoa/v1/up/xa-tan-trao/status") == "xa-tan-trao"
    assert topic_device("sohoa/v1/down/xa-tan-trao/ack") is None
    assert topic_device("sohoa/v1/up/") is None and topic_device("other") is None


def test_nonsense_rates_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        MessageRate(per_second=0)
    with pytest.raises(ValueError, match="positive"):
        MessageRate(burst=0.5)
