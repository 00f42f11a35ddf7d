"""Admission: a pure verdict on an init — may this transfer start, is it one we know, or a clone?

No I/O here: the caller looks up the device, the transfer with this tid and the transfer holding
this (device, seq), the device's load (``catalog.DeviceLoad``) and the clock, and records whatever
the verdict says. The order of the checks is the point: nothing of a transfer is accepted or answered
before the device is known, active and its signature valid; a tid is never reused for another
header; a seq is never reused by another tid; a new transfer (or an expired one started again)
takes a token of the device's quotas (``central.ingest.quota``) before anything of it is recorded,
and a device over a quota is deferred (asked to come back later), never rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import nacl.signing

from central.catalog import DeviceLoad, DeviceRecord, TransferRecord
from central.errors import ReplayError, RevokedDeviceError, UnknownDeviceError
from central.ingest.quota import OverQuota, Quotas, weigh
from protocol.envelope import ABYTES
from protocol.errors import EnvelopeError, ProtocolError, SizeLimitError, UnknownKeyError
from protocol.messages import Init


@dataclass(frozen=True, slots=True)
class Admit:
    """A new transfer: record it as receiving (and the device's init bucket at ``tokens``)."""

    tokens: float | None = None


@dataclass(frozen=True, slots=True)
class Revive:
    """An expired transfer announced again: receiving once more, from zero (bucket at ``tokens``)."""

    tokens: float | None = None


@dataclass(frozen=True, slots=True)
class Defer:
    """Not now: the device is over a quota; nothing is recorded, the device asks again later."""

    over: OverQuota


@dataclass(frozen=True, slots=True)
class Known:
    """A repeated init of a transfer central already has: answer it from its record."""

    record: TransferRecord


@dataclass(frozen=True, slots=True)
class Clone:
    """A validly signed init whose (device, seq) another transfer holds: two boxes, one identity."""

    holder: TransferRecord


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refused. ``record``: keep it as a rejected transfer, so its seq stays spent and a repeated
    init gets the same answer (only once the signature is known good)."""

    error: ProtocolError
    record: bool = False
    tokens: float | None = None


Verdict = Admit | Revive | Defer | Known | Clone | Refuse


def admit(init: Init, *, device: DeviceRecord | None, existing: TransferRecord | None,
          seq_holder: TransferRecord | None, key_id: bytes, max_plaintext: int,
          quotas: Quotas | None = None, load: DeviceLoad | None = None, now: float = 0.0) -> Verdict:
    """``quotas`` None: no per-device quota (tools); ``load``: the device's, needed for a new transfer."""
    signed = init.signed_header
    header = signed.header
    if device is None:
        return Refuse(UnknownDeviceError(f"device {init.device!r} is not enrolled", device=init.device,
                                         tid=init.tid))
    if device.status != "active":
        return Refuse(RevokedDeviceError(f"device {init.device!r} is {device.status}", device=init.device,
                                         tid=init.tid))
    try:
        signed.verify(nacl.signing.VerifyKey(device.verify_key))
    except EnvelopeError as exc:
        return Refuse(exc)
    if existing is not None:
        if existing.header != signed.encode():
            return Refuse(ReplayError("transfer id reused with a different header", device=init.device,
                                      tid=init.tid))
        if existing.state == "expired" and quotas is not None:
            weighed = weigh(load or DeviceLoad(), header.ciphertext_size, now, quotas)
            return Defer(weighed) if isinstance(weighed, OverQuota) else Revive(weighed)
        return Known(existing)
    if seq_holder is not None:
        return Clone(seq_holder)
    tokens = None
    if quotas is not None:
        # Before the key and size checks: a refused transfer is a catalog row too.
        weighed = weigh(load or DeviceLoad(), header.ciphertext_size, now, quotas)
        if isinstance(weighed, OverQuota):
            return Defer(weighed)
        tokens = weighed
    if header.central_key_id != key_id:
        return Refuse(UnknownKeyError("sealed to a key this central does not hold", device=init.device,
                                      tid=init.tid), record=True, tokens=tokens)
    if header.plaintext_size > max_plaintext:
        return Refuse(SizeLimitError(f"declared package of {header.plaintext_size} bytes exceeds "
                                     f"{max_plaintext}", device=init.device, tid=init.tid), record=True,
                      tokens=tokens)
    if header.ciphertext_size > max_ciphertext_size(header.plaintext_size, header.chunk_size):
        # Staged bytes are only hash-checked once all have arrived: bound them before any lands.
        return Refuse(SizeLimitError(f"declared ciphertext of {header.ciphertext_size} bytes is more than "
                                     f"a {header.plaintext_size}-byte package can seal to",
                                     device=init.device, tid=init.tid), record=True, tokens=tokens)
    return Admit(tokens)


def max_ciphertext_size(plaintext_size: int, chunk_size: int) -> int:
    """The most ciphertext an honest sealer can make of ``plaintext_size`` bytes (generously).

    zstd's worst case is a little over its input (ZSTD_compressBound ≈ n + n/256 + 128 KiB at
    most); we allow n + n/128 + 1 MiB. secretstream adds ABYTES per chunk, and the sealer makes at
    most one chunk per ``chunk_size`` compressed bytes plus the final one.
    """
    compressed = plaintext_size + plaintext_size // 128 + (1 << 20)
    return compressed + ABYTES * (compressed // chunk_size + 1)
