"""Per-device quotas at admission: what one enrolled device may make central hold, and how fast.

Pure: the caller reads the device's load (``catalog.DeviceLoad``) and the clock, and records the
bucket levels these functions return. Rules (docs/DECISIONS.md "Hostile enrolled device"):
  - Only a *new* transfer (or an expired one started again) is weighed; a repeated init, segment or
    fin of an open transfer never is, so the per-message cost stays on the init of a new transfer.
  - A device may have ``max_open_transfers`` receiving transfers, and announce ``max_open_bytes`` of
    ciphertext central has not stored yet — except that one transfer alone is always admitted (the
    largest document ``max_plaintext`` allows must stay possible).
  - New transfers draw from a token bucket (``new_transfers_per_hour``, ``new_transfers_burst``).
  - Rejected transfers that an honest box does not produce (bad signatures, bombs, bag errors)
    fill a second bucket that drains over ``rejected_window_s``; above ``rejected_budget`` the device
    is flagged (shown as a problem in the fleet view) and slowed to one open transfer and
    ``flagged_new_transfers_per_hour``. Nothing here ever revokes a device.
  - A refusal is a deferral, never a rejection: the edge keeps the document and asks again after
    ``retry_after`` seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from central.catalog import DeviceLoad

GiB = 1024 * 1024 * 1024

# Rejections an honest box never causes. Not counted: revocation, the device's own abort, a
# reused sequence number (a clone has its own flag), and a key central no longer holds (a key
# rotation would turn a whole fleet's backlog into "hostile" devices).
COUNTED_REJECTIONS = frozenset({
    "SignatureError", "HeaderError", "ReplayError", "SizeLimitError", "CiphertextHashError", "DecryptError",
    "TruncatedStreamError", "TrailingDataError", "DecompressError", "BagError", "EnvelopeError",
})


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-device admission limits (central.toml ``[ingest]``; defaults argued in DECISIONS.md)."""

    max_open_transfers: int = 8
    max_open_bytes: int = 1 * GiB
    new_transfers_per_hour: int = 1800
    new_transfers_burst: int = 120
    rejected_budget: int = 10
    rejected_window_s: float = 24 * 3600.0
    flagged_new_transfers_per_hour: int = 6
    open_retry_after_s: int = 60      # a deferral for a full slot or byte quota: a transfer may finish

    def __post_init__(self) -> None:
        numbers = (self.max_open_transfers, self.max_open_bytes, self.new_transfers_per_hour,
                   self.new_transfers_burst, self.rejected_budget, self.rejected_window_s,
                   self.flagged_new_transfers_per_hour, self.open_retry_after_s)
        if any(n <= 0 for n in numbers):
            raise ValueError(f"every quota must be positive: {self!r}")


@dataclass(frozen=True, slots=True)
class OverQuota:
    """Not now: which quota, a sentence for the device and the log, and when to ask again."""

    quota: str
    reason: str
    retry_after: int


def refill(level: float | None, at: float | None, now: float, *, per_hour: float, burst: float) -> float:
    """A token bucket's level at ``now`` (a bucket never spent is full; a clock that went back adds
    nothing)."""
    if level is None or at is None:
        return burst
    return min(burst, level + max(0.0, now - at) * per_hour / 3600.0)


def weigh(load: DeviceLoad, size: int, now: float, quotas: Quotas) -> OverQuota | float:
    """May a device with ``load`` open a transfer of ``size`` signed bytes now? The init bucket's
    level after taking its token, or why not."""
    flagged = load.misbehaving_since is not None
    max_open = 1 if flagged else quotas.max_open_transfers
    if load.open_transfers >= max_open:
        return OverQuota("open_transfers",
                         f"{load.open_transfers} transfers of this device are open (at most {max_open}"
                         f"{' while it is over its rejected-transfer budget' if flagged else ''}); "
                         "finish one first", quotas.open_retry_after_s)
    if load.open_transfers and load.open_bytes + size > quotas.max_open_bytes:
        return OverQuota("open_bytes",
                         f"this device has {load.open_bytes} announced bytes not yet stored; {size} more "
                         f"would exceed {quotas.max_open_bytes}", quotas.open_retry_after_s)
    per_hour = quotas.flagged_new_transfers_per_hour if flagged else quotas.new_transfers_per_hour
    burst = 1.0 if flagged else float(quotas.new_transfers_burst)
    level = refill(load.init_tokens, load.init_tokens_at, now, per_hour=per_hour, burst=burst)
    if level < 1.0:
        wait = math.ceil((1.0 - level) * 3600.0 / per_hour)
        return OverQuota("new_transfers",
                         f"this device starts transfers faster than {per_hour} an hour"
                         f"{' (slowed: over its rejected-transfer budget)' if flagged else ''}",
                         max(1, wait))
    return level - 1.0


def strike(load: DeviceLoad, now: float, quotas: Quotas) -> tuple[float, bool]:
    """One more counted rejection: the bucket's new level, and whether the device is now over budget.

    The bucket drains ``rejected_budget`` per ``rejected_window_s``, so a device flagged for a burst
    is let go once it has been clean for about a window (the reconciler lowers the flag).
    """
    drained = 0.0 if load.strikes_at is None else max(0.0, now - load.strikes_at) * (
        quotas.rejected_budget / quotas.rejected_window_s)
    level = max(0.0, load.strikes - drained) + 1.0
    return level, level > quotas.rejected_budget
