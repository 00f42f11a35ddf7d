"""Per-device message rate: one enrolled box cannot take a worker's whole time with messages.

Admission (``central.ingest.quota``) weighs new transfers; everything else a device sends — repeats
of held segments, statuses (a catalog UPDATE each), inits with bad signatures (an Ed25519 check
each), notices — used to cost central its full price at whatever rate the box could send. This is a
token bucket per device, checked on the topic alone before a message is decoded (the broker's ACL
makes the topic's device the authenticated one).

Over its rate a device's messages are **paced, not dropped**: they wait in its own small queue (in
order; the broker has its PUBACK, as for parked segments) and go on as its bucket refills. An honest
box never has more than a window of unanswered segments in flight (8 per transfer, 2 transfers), so it
is only slowed to its rate, and loses nothing. Only a box with more than ``max_waiting`` messages
(or 16 MiB) waiting — one that does not wait for answers — has the excess dropped unread and counted:

  - Dropping is safe even for an honest box: it forgets nothing without a signed receipt and sends
    again any segment, fin or init central has not answered (``protocol.transfer``); a status is
    replaced by the next one. It is never a rejection and never a strike against the device.
  - The defaults (``max_messages_per_second`` 200, ``max_messages_burst`` 2,000) are far above an
    honest box on 3G (about one 32 KiB segment a second); on a LAN a box is paced to 200 × 32 KiB,
    about 50 Mbit/s.
  - One log line per device per ``LOG_EVERY_S`` with the count of drops.

Memory is one small entry per device that sent something (devices are enrolled, so bounded) and at
most ``max_waiting`` messages and ``max_waiting_bytes`` per device, and ``max_total_bytes`` for all
devices together: 16 MiB times 3,000 boxes whose keys leaked together would be 48 GB.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

from central.ingest.quota import refill
from protocol.topics import UP

_UP = UP + "/"

log = logging.getLogger("sohoa.central.ingest")

LOG_EVERY_S = 300.0
MAX_WAITING = 256   # messages of one device waiting for its bucket; beyond, dropped unread
# ... and their bytes: a packet may be a whole 1 MiB segment, and 256 of them per device is too much
# memory to hand a stolen key. An honest box waiting for answers (2 transfers × a window of 8) fits.
MAX_WAITING_BYTES = 16 * 1024 * 1024
# ... and all devices' together, per worker: sixteen devices at their bound. Only a device over its
# rate ever waits, so honest boxes are not crowded out by this; over-rate ones are dropped sooner.
MAX_WAITING_TOTAL_BYTES = 256 * 1024 * 1024

M = TypeVar("M")


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
        """Take one message of ``device`` at ``now``; False: its bucket is empty."""
        bucket = self._bucket(device, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def _bucket(self, device: str, now: float) -> _Bucket:
        bucket = self._buckets.get(device)
        if bucket is None:
            bucket = self._buckets[device] = _Bucket(self.rate.burst, now)
        else:
            bucket.tokens = refill(bucket.tokens, bucket.at, now, per_hour=self.rate.per_second * 3600.0,
                                   burst=self.rate.burst)
            bucket.at = max(bucket.at, now)
        return bucket

    def dropped(self, device: str, now: float) -> None:
        """Count a message of ``device`` dropped unread; log once per device per ``LOG_EVERY_S``."""
        bucket = self._bucket(device, now)
        bucket.dropped += 1
        self.dropped_total += 1
        if bucket.logged_at is None or now - bucket.logged_at >= LOG_EVERY_S:
            log.warning("device %s sends more than %g messages a second without waiting for answers: "
                        "dropped %d unread (it resends what it needs answered)", device, self.rate.per_second,
                        bucket.dropped)
            bucket.logged_at = now
            bucket.dropped = 0


class Verdict(Enum):
    NOW = "now"           # within its rate: handle it now
    HELD = "held"         # over its rate: waits in its device's queue, released by ``release``
    DROPPED = "dropped"   # its device's queue is full: dropped unread


class Pacer(Generic[M]):
    """Messages over their device's rate wait in order in a per-device queue of at most
    ``max_waiting`` messages and ``max_waiting_bytes`` (``size_of`` each), all queues together at
    most ``max_total_bytes``, and are released as the device's bucket refills."""

    def __init__(self, limiter: RateLimiter, device_of: Callable[[M], str | None], *,
                 size_of: Callable[[M], int], max_waiting: int = MAX_WAITING,
                 max_waiting_bytes: int = MAX_WAITING_BYTES,
                 max_total_bytes: int = MAX_WAITING_TOTAL_BYTES) -> None:
        self.limiter = limiter
        self._device_of = device_of
        self._size_of = size_of
        self._max_waiting = max_waiting
        self._max_waiting_bytes = max_waiting_bytes
        self._max_total_bytes = max_total_bytes
        self._waiting: dict[str, deque[M]] = {}
        self._waiting_bytes: dict[str, int] = {}
        self._total_bytes = 0

    def offer(self, message: M, now: float) -> Verdict:
        device = self._device_of(message)
        if device is None:
            return Verdict.NOW
        queue = self._waiting.get(device)
        if queue is None and self.limiter.admit(device, now):
            return Verdict.NOW
        if queue is None:
            queue = self._waiting[device] = deque()
        size = self._size_of(message)
        held = self._waiting_bytes.get(device, 0)
        if (len(queue) >= self._max_waiting or held + size > self._max_waiting_bytes
                or self._total_bytes + size > self._max_total_bytes):
            if not queue:
                del self._waiting[device]
            self.limiter.dropped(device, now)
            return Verdict.DROPPED
        queue.append(message)
        self._waiting_bytes[device] = held + size
        self._total_bytes += size
        return Verdict.HELD

    def release(self, now: float) -> list[M]:
        """The waiting messages whose devices have tokens again, each device's in the order sent."""
        out: list[M] = []
        for device in list(self._waiting):
            queue = self._waiting[device]
            while queue and self.limiter.admit(device, now):
                message = queue.popleft()
                size = self._size_of(message)
                self._waiting_bytes[device] -= size
                self._total_bytes -= size
                out.append(message)
            if not queue:
                del self._waiting[device]
                del self._waiting_bytes[device]
        return out

    @property
    def waiting(self) -> bool:
        """Some device's messages wait for its bucket (the receive loop then wakes to release them)."""
        return bool(self._waiting)


def topic_device(topic: str) -> str | None:
    """The device a device topic names (``sohoa/v1/up/<device>/...``), not validated (the decoder
    does that for the messages admitted); None for any other topic."""
    if not topic.startswith(_UP):
        return None
    device = topic[len(_UP):].split("/", 1)[0]
    return device or None
