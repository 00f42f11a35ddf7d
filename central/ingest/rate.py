"""Per-device message rate: one enrolled box cannot take a worker's whole time with messages.

Admission (``central.ingest.quota``) weighs new transfers; everything else a device sends — repeats
of held segments, statuses (a catalog UPDATE each), inits with bad signatures (an Ed25519 check
each), notices — used to cost central its full price at whatever rate the box could send. This is a
token bucket per device, checked on the topic alone before a message is decoded (the broker's ACL
makes the topic's device the authenticated one). Over it, the message is dropped unread and counted:

  - Dropping is safe for an honest box: it forgets nothing without a signed receipt and sends again
    any segment, fin or init central has not answered (``protocol.transfer``); a status is replaced
    by the next one. It is never a rejection and never a strike against the device.
  - The defaults (``max_messages_per_second`` 200, ``max_messages_burst`` 2,000) are far above an
    honest box: 3G moves about one 32 KiB segment a second, and a box on a LAN is held by its window
    of 8 unacknowledged segments; a backlog after an outage starts inside the burst.
  - One log line per device per ``LOG_EVERY_S`` with the count, and a metric per drop.

Memory is one small entry per device that sent something (devices are enrolled, so bounded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from central.ingest.quota import refill
from protocol.topics import UP

_UP = UP + "/"

log = logging.getLogger("sohoa.central.ingest")

LOG_EVERY_S = 300.0


@dataclass(frozen=True, slots=True)
class MessageRate:
    """central.toml ``[ingest]``: ``max_messages_per_second`` sustained after ``max_messages_burst``."""

    per_second: float = 200.0
    burst: float = 2000.0

    def __post_init__(self) -> None:
        if self.per_second <= 0 or self.burst < 1:
            raise ValueError(f"a message rate must be positive with a burst of at least one: {self!r}")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    dropped: int = 0            # since the last log line
    logged_at: float | None = None


@dataclass(slots=True)
class RateLimiter:
    """The buckets of one worker (each worker sees its share of the shared subscription)."""

    rate: MessageRate = field(default_factory=MessageRate)
    dropped_total: int = 0
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, device: str, now: float) -> bool:
        """Take one message of ``device`` at ``now``; False: over its rate, drop it unread."""
        bucket = self._buckets.get(device)
        if bucket is None:
            bucket = self._buckets[device] = _Bucket(self.rate.burst, now)
        else:
            bucket.tokens = refill(bucket.tokens, bucket.at, now, per_hour=self.rate.per_second * 3600.0,
                                   burst=self.rate.burst)
            bucket.at = max(bucket.at, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        bucket.dropped += 1
        self.dropped_total += 1
        if bucket.logged_at is None or now - bucket.logged_at >= LOG_EVERY_S:
            log.warning("device %s sends more than %g messages a second: dropped %d unread (it resends what "
                        "matters)", device, self.rate.per_second, bucket.dropped)
            bucket.logged_at = now
            bucket.dropped = 0
        return False


def topic_device(topic: str) -> str | None:
    """The device a device topic names (``sohoa/v1/up/<device>/...``), not validated (the decoder
    does that for the messages admitted); None for any other topic."""
    if not topic.startswith(_UP):
        return None
    device = topic[len(_UP):].split("/", 1)[0]
    return device or None
