"""Typed sohoa/v1 messages and their (topic, payload) encoding.

Up (edge → central): Init, Segment, Fin, Abort, Status, Notice. Down (central → edge): Ack, Receipt,
Noted (the answer to a notice: it never lets the edge forget anything, only a Receipt does).
``encode(msg)`` gives ``(topic, payload)``; ``decode(topic, payload)`` gives the message back or
raises :class:`DecodeError`. Binary payloads for the bulk path, canonical JSON for the small ones.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import nacl.exceptions
import nacl.signing

from protocol.envelope import SIGNATURE_BYTES, SignedHeader
from protocol.errors import DecodeError, ProtocolError, ReceiptError
from protocol.names import check_device_id, check_tid
from protocol.notice import MAX_NOTICE_BYTES
from protocol.topics import MAX_OFFSET, Kind, Topic, parse_topic

MAX_SEGMENT = 1024 * 1024
MAX_ACK_RANGES = 4096       # an ack with more ranges is hostile: a sane receiver coalesces them
MAX_TEXT = 4000             # error strings, abort reasons, status texts: enough for a hint, no more
MAX_JSON_BYTES = 64 * 1024  # acks, status and receipts are small; refuse to parse anything bigger
MAX_RETRY_AFTER = 24 * 3600  # a longer deferral is a misconfigured central
# The MQTT v5 user property an edge puts on its init to say "a receipt is my STORED ack": central then
# answers a stored transfer with the receipt alone instead of STORED + receipt (one QoS 1 publish
# less per document). Central keeps sending STORED to edges that do not say so (older releases);
# an older central ignores user properties and sends both, which such an edge handles as before.
# Custody is unchanged: only a receipt that verifies and names the bytes on disk lets the edge forget.
RECEIPT_IS_STORED = ("sohoa-receipt-is-stored", "1")
_FIN = struct.Struct(">4sQ32s")
_FIN_MAGIC = b"SFIN"


class AckState(StrEnum):
    """What central holds for a transfer."""

    RECEIVING = "receiving"   # ranges tell what is durably held; send the rest
    STORED = "stored"         # assembled, verified and stored: a receipt follows (or was sent)
    REJECTED = "rejected"     # permanently refused: error says why; do not resend
    UNKNOWN = "unknown"       # central has no init for this tid: send init again
    # Not now: the device is over a quota (open transfers, bytes, init rate). Nothing is held and
    # nothing is lost: send init again after ``retry_after`` seconds. Edges that predate this state
    # cannot decode it and so ignore the ack; they resend the init after their resend interval.
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class Init:
    device: str
    tid: str
    signed_header: SignedHeader

    def __post_init__(self) -> None:
        header = self.signed_header.header
        if header.device_id != self.device or header.tid != self.tid:
            raise DecodeError("init header does not match its topic", device=self.device, tid=self.tid)


@dataclass(frozen=True, slots=True)
class Segment:
    device: str
    tid: str
    offset: int
    data: bytes

    def __post_init__(self) -> None:
        check_device_id(self.device)
        check_tid(self.tid)
        if not 0 <= self.offset < MAX_OFFSET or not 0 < len(self.data) <= MAX_SEGMENT:
            raise DecodeError(f"segment of {len(self.data)} bytes at {self.offset} is out of bounds",
                              device=self.device, tid=self.tid, offset=self.offset)

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    @property
    def crc(self) -> int:
        return zlib.crc32(self.data)


@dataclass(frozen=True, slots=True)
class Fin:
    device: str
    tid: str
    size: int
    sha256: bytes

    def __post_init__(self) -> None:
        check_device_id(self.device)
        check_tid(self.tid)
        if len(self.sha256) != 32 or not 0 <= self.size < MAX_OFFSET:
            raise DecodeError("fin needs a size and a 32-byte sha256", device=self.device, tid=self.tid)


@dataclass(frozen=True, slots=True)
class Abort:
    device: str
    tid: str
    reason: str

    def __post_init__(self) -> None:
        check_device_id(self.device)
        check_tid(self.tid)


# What a box can plausibly hold (128 TiB, a century): a status beyond it is refused, so the fleet's
# sums over tens of thousands of boxes stay within SQLite's 64-bit integers (one box reporting
# 2^63 - 1 bytes used to make the dashboard's fleet summary and /metrics fail with an overflow).
MAX_STATUS_COUNT = 1 << 47
MAX_STATUS_AGE_S = 100 * 365 * 86400


@dataclass(frozen=True, slots=True)
class Status:
    """Retained device status; the last will is ``Status(device, online=False)``."""

    device: str
    online: bool
    queue_docs: int = 0
    queue_bytes: int = 0
    oldest_age_s: float = 0.0
    failed_docs: int = 0
    last_receipt_at: str | None = None
    disk_free_bytes: int | None = None
    version: str | None = None
    last_error: str | None = None
    alarms: tuple[str, ...] = ()
    updated_at: str | None = None

    def __post_init__(self) -> None:
        check_device_id(self.device)
        counts = (self.queue_docs, self.queue_bytes, self.failed_docs, self.disk_free_bytes or 0)
        if any(not _is_int(c) or not 0 <= c <= MAX_STATUS_COUNT for c in counts):
            raise DecodeError(f"status counts must be integers from 0 to {MAX_STATUS_COUNT}",
                              device=self.device)
        if not math.isfinite(self.oldest_age_s) or not 0 <= self.oldest_age_s <= MAX_STATUS_AGE_S:
            raise DecodeError(f"status oldest_age_s must be a number from 0 to {MAX_STATUS_AGE_S}",
                              device=self.device)


class NoticeState(StrEnum):
    """Central's answer to a notice."""

    CATALOGUED = "catalogued"   # searchable at central (its original on its way, or already stored)
    REFUSED = "refused"         # not catalogued from the notice: the document travels whole, as before


@dataclass(frozen=True, slots=True)
class Notice:
    """A document's sealed text and metadata (``protocol.notice``), ahead of its original's transfer."""

    device: str
    tid: str
    signed_header: SignedHeader
    ciphertext: bytes = field(repr=False)

    def __post_init__(self) -> None:
        header = self.signed_header.header
        if header.device_id != self.device or header.tid != self.tid:
            raise DecodeError("notice header does not match its topic", device=self.device, tid=self.tid)
        if len(self.ciphertext) != header.ciphertext_size:
            raise DecodeError(f"notice carries {len(self.ciphertext)} bytes of ciphertext, its header says "
                              f"{header.ciphertext_size}", device=self.device, tid=self.tid)
        if len(self.signed_header.encode()) + len(self.ciphertext) > MAX_NOTICE_BYTES:
            raise DecodeError(f"notice is larger than {MAX_NOTICE_BYTES} bytes", device=self.device,
                              tid=self.tid)


@dataclass(frozen=True, slots=True)
class Noted:
    """Central's answer to a notice. Only stops the edge re-sending it: custody waits for a Receipt."""

    device: str
    tid: str
    state: NoticeState
    document_id: int | None = None
    error: str | None = None
    error_class: str | None = None

    def __post_init__(self) -> None:
        check_device_id(self.device)
        check_tid(self.tid)
        if not isinstance(self.state, NoticeState):
            raise DecodeError(f"noted state {self.state!r} is not a NoticeState", device=self.device,
                              tid=self.tid)
        if self.document_id is not None and (not _is_int(self.document_id) or self.document_id < 0):
            raise DecodeError("noted document_id must be a non-negative integer", device=self.device,
                              tid=self.tid)


@dataclass(frozen=True, slots=True)
class Ack:
    device: str
    tid: str
    state: AckState
    ranges: tuple[tuple[int, int], ...] = ()
    error: str | None = None
    error_class: str | None = None
    retry_after: int | None = None   # seconds; only with DEFERRED

    def __post_init__(self) -> None:
        check_device_id(self.device)
        check_tid(self.tid)
        if not isinstance(self.state, AckState):
            raise DecodeError(f"ack state {self.state!r} is not an AckState", device=self.device,
                              tid=self.tid)
        if self.retry_after is not None and (
                self.state is not AckState.DEFERRED or not _is_int(self.retry_after)
                or not 0 <= self.retry_after <= MAX_RETRY_AFTER):
            raise DecodeError(f"ack retry_after {self.retry_after!r:.40} needs a deferred ack and 0..."
                              f"{MAX_RETRY_AFTER} seconds", device=self.device, tid=self.tid)
        if len(self.ranges) > MAX_ACK_RANGES:
            raise DecodeError(f"ack carries {len(self.ranges)} ranges, at most {MAX_ACK_RANGES}",
                              device=self.device, tid=self.tid)
        # Canonical form: sorted, disjoint, non-adjacent (coalesced), non-empty, within offsets.
        previous_end: int | None = None
        for item in self.ranges:
            if len(item) != 2 or not all(_is_int(v) for v in item):
                raise DecodeError(f"ack range {item!r} is not a pair of integers",
                                  device=self.device, tid=self.tid)
            start, end = item
            lower_ok = start >= 0 if previous_end is None else start > previous_end
            if not (lower_ok and start < end <= MAX_OFFSET):
                raise DecodeError("ack ranges must be sorted, disjoint, coalesced and non-empty",
                                  device=self.device, tid=self.tid)
            previous_end = end


@dataclass(frozen=True, slots=True)
class ReceiptBody:
    device: str
    tid: str
    sha256: str            # of the original file, hex
    stored_at: str         # ISO 8601, UTC
    document_id: int       # central catalog id
    duplicate: bool = False
    # The signed bytes, made once: signing, storing and publishing a receipt each need them.
    _bytes: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_device_id(self.device)
        check_tid(self.tid)
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ReceiptError("receipt sha256 must be 64 lowercase hex digits")
        object.__setattr__(self, "_bytes", _canonical({
            "device": self.device, "tid": self.tid, "sha256": self.sha256, "stored_at": self.stored_at,
            "document_id": self.document_id, "duplicate": self.duplicate}))

    def canonical(self) -> bytes:
        return self._bytes


@dataclass(frozen=True, slots=True)
class Receipt:
    body: ReceiptBody
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.signature) != 64:
            raise ReceiptError("receipt signature must be 64 bytes", device=self.body.device,
                               tid=self.body.tid)

    @property
    def device(self) -> str:
        return self.body.device

    @property
    def tid(self) -> str:
        return self.body.tid

    @classmethod
    def sign(cls, body: ReceiptBody, key: nacl.signing.SigningKey) -> Receipt:
        return cls(body, key.sign(b"sohoa-receipt\0" + body.canonical()).signature)

    def verify(self, key: nacl.signing.VerifyKey) -> ReceiptBody:
        try:
            key.verify(b"sohoa-receipt\0" + self.body.canonical(), self.signature)
        except nacl.exceptions.BadSignatureError as exc:
            raise ReceiptError("receipt signature does not verify", device=self.device,
                               tid=self.tid) from exc
        return self.body


Message = Init | Segment | Fin | Abort | Status | Ack | Receipt | Notice | Noted


def _is_int(value: object) -> bool:
    # bool is an int subclass; JSON true/false is never an offset or a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _int(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise DecodeError(f"field {key!r} must be a non-negative integer, got {value!r:.80}")
    return value


def _opt_int(obj: dict[str, Any], key: str) -> int | None:
    return None if obj.get(key) is None else _int(obj, key)


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DecodeError(f"field {key!r} must be a string or null, got {value!r:.80}")
    return value[:MAX_TEXT] if value is not None else None


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise DecodeError(f"field {key!r} must be a string, got {value!r:.80}")
    return value


def _bool(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key)
    if not isinstance(value, bool):
        raise DecodeError(f"field {key!r} must be true or false, got {value!r:.80}")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


# One encoder for every canonical payload: json.dumps with options builds a new one per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(obj: object) -> bytes:
    return _CANONICAL.encode(obj).encode()


def _json(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_JSON_BYTES:
        raise DecodeError(f"{what} payload is {len(payload)} bytes, at most {MAX_JSON_BYTES}")
    try:
        # NaN/Infinity are not JSON (and int(inf) raises OverflowError); deep nesting raises
        # RecursionError inside the parser.
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"{what} payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DecodeError(f"{what} payload must be a JSON object")
    return obj


def encode(msg: Message) -> tuple[str, bytes]:
    """Topic and payload for a message."""
    if isinstance(msg, Init):
        return str(Topic(Kind.INIT, msg.device, msg.tid)), msg.signed_header.encode()
    if isinstance(msg, Segment):
        return (str(Topic(Kind.SEG, msg.device, msg.tid, msg.offset)),
                struct.pack(">I", msg.crc) + msg.data)
    if isinstance(msg, Fin):
        return str(Topic(Kind.FIN, msg.device, msg.tid)), _FIN.pack(_FIN_MAGIC, msg.size, msg.sha256)
    if isinstance(msg, Abort):
        return str(Topic(Kind.ABORT, msg.device, msg.tid)), msg.reason.encode()
    if isinstance(msg, Status):
        body = {"device": msg.device, "online": msg.online, "queue_docs": msg.queue_docs,
                "queue_bytes": msg.queue_bytes, "oldest_age_s": msg.oldest_age_s,
                "failed_docs": msg.failed_docs, "last_receipt_at": msg.last_receipt_at,
                "disk_free_bytes": msg.disk_free_bytes, "version": msg.version,
                "last_error": msg.last_error, "alarms": list(msg.alarms), "updated_at": msg.updated_at}
        return str(Topic(Kind.STATUS, msg.device)), _canonical(body)
    if isinstance(msg, Ack):
        body = {"tid": msg.tid, "state": msg.state.value, "ranges": [list(r) for r in msg.ranges],
                "error": msg.error, "error_class": msg.error_class}
        if msg.retry_after is not None:   # absent otherwise: the bytes of every other ack unchanged
            body["retry_after"] = msg.retry_after
        return str(Topic(Kind.ACK, msg.device)), _canonical(body)
    if isinstance(msg, Receipt):
        return str(Topic(Kind.RECEIPT, msg.device)), msg.signature + msg.body.canonical()
    if isinstance(msg, Notice):
        return str(Topic(Kind.NOTICE, msg.device, msg.tid)), msg.signed_header.encode() + msg.ciphertext
    if isinstance(msg, Noted):
        body = {"tid": msg.tid, "state": msg.state.value, "document_id": msg.document_id,
                "error": msg.error, "error_class": msg.error_class}
        return str(Topic(Kind.NOTED, msg.device)), _canonical(body)
    raise TypeError(f"not a sohoa message: {msg!r}")


def decode(topic: str, payload: bytes) -> Message:
    """Parse one received message; every malformed input raises :class:`DecodeError`."""
    parsed = parse_topic(topic)
    device, tid = parsed.device, parsed.tid
    try:
        return _decode(parsed, device, tid, payload)
    except ProtocolError as exc:
        if exc.device is None:
            exc.device, exc.tid, exc.offset = device, tid, parsed.offset
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"malformed {parsed.kind.value} payload: {exc!r}", device=device,
                          tid=tid) from exc


def _decode(parsed: Topic, device: str, tid: str | None, payload: bytes) -> Message:
    kind = parsed.kind
    if kind is Kind.INIT:
        assert tid is not None
        return Init(device, tid, SignedHeader.decode(payload))
    if kind is Kind.SEG:
        assert tid is not None and parsed.offset is not None
        if len(payload) < 5:
            raise DecodeError(f"segment payload truncated at {len(payload)} bytes")
        (crc,) = struct.unpack(">I", payload[:4])
        seg = Segment(device, tid, parsed.offset, payload[4:])
        if seg.crc != crc:
            raise DecodeError("segment checksum mismatch", offset=parsed.offset)
        return seg
    if kind is Kind.FIN:
        assert tid is not None
        if len(payload) != _FIN.size:
            raise DecodeError(f"fin payload is {len(payload)} bytes, expected {_FIN.size}")
        magic, size, digest = _FIN.unpack(payload)
        if magic != _FIN_MAGIC:
            raise DecodeError("fin payload has a bad magic")
        return Fin(device, tid, size, digest)
    if kind is Kind.ABORT:
        assert tid is not None
        return Abort(device, tid, payload[: MAX_TEXT * 4].decode("utf-8", errors="replace")[:MAX_TEXT])
    if kind is Kind.STATUS:
        obj = _json(payload, "status")
        if obj.get("device") != device:
            raise DecodeError("status device does not match its topic")
        age = obj.get("oldest_age_s", 0.0)
        if not isinstance(age, int | float) or isinstance(age, bool) or not math.isfinite(age):
            raise DecodeError(f"field 'oldest_age_s' must be a number, got {age!r:.80}")
        alarms = obj.get("alarms", [])
        if not isinstance(alarms, list) or len(alarms) > 100 or not all(
                isinstance(a, str) for a in alarms):
            raise DecodeError("field 'alarms' must be a list of at most 100 strings")
        return Status(
            device=device, online=_bool(obj, "online"), queue_docs=_int(obj, "queue_docs", 0),
            queue_bytes=_int(obj, "queue_bytes", 0), oldest_age_s=float(age),
            failed_docs=_int(obj, "failed_docs", 0), last_receipt_at=_opt_str(obj, "last_receipt_at"),
            disk_free_bytes=_opt_int(obj, "disk_free_bytes"), version=_opt_str(obj, "version"),
            last_error=_opt_str(obj, "last_error"), alarms=tuple(a[:MAX_TEXT] for a in alarms),
            updated_at=_opt_str(obj, "updated_at"))
    if kind is Kind.ACK:
        obj = _json(payload, "ack")
        raw_ranges = obj.get("ranges", [])
        if not isinstance(raw_ranges, list) or not all(
                isinstance(r, list) and len(r) == 2 for r in raw_ranges):
            raise DecodeError("field 'ranges' must be a list of [start, end] pairs")
        try:
            state = AckState(_str(obj, "state"))
        except ValueError as exc:
            raise DecodeError(f"unknown ack state {obj.get('state')!r:.80}") from exc
        return Ack(device, _str(obj, "tid"), state, tuple((r[0], r[1]) for r in raw_ranges),
                   _opt_str(obj, "error"), _opt_str(obj, "error_class"), _opt_int(obj, "retry_after"))
    if kind is Kind.RECEIPT:
        if len(payload) < 65:
            raise ReceiptError(f"receipt payload truncated at {len(payload)} bytes")
        obj = _json(payload[64:], "receipt")
        body = ReceiptBody(device=_str(obj, "device"), tid=_str(obj, "tid"), sha256=_str(obj, "sha256"),
                           stored_at=_str(obj, "stored_at"), document_id=_int(obj, "document_id"),
                           duplicate=_bool(obj, "duplicate"))
        if body.device != device or body.canonical() != payload[64:]:
            raise ReceiptError("receipt body is not canonical or names another device")
        return Receipt(body, payload[:64])
    if kind is Kind.NOTICE:
        assert tid is not None
        if len(payload) > MAX_NOTICE_BYTES:
            raise DecodeError(f"notice payload is {len(payload)} bytes, at most {MAX_NOTICE_BYTES}")
        if len(payload) < 2:
            raise DecodeError(f"notice payload truncated at {len(payload)} bytes")
        (length,) = struct.unpack(">H", payload[:2])
        split = 2 + length + SIGNATURE_BYTES
        if len(payload) <= split:
            raise DecodeError(f"notice payload truncated at {len(payload)} bytes")
        return Notice(device, tid, SignedHeader.decode(payload[:split]), payload[split:])
    if kind is Kind.NOTED:
        obj = _json(payload, "noted")
        try:
            noted_state = NoticeState(_str(obj, "state"))
        except ValueError as exc:
            raise DecodeError(f"unknown noted state {obj.get('state')!r:.80}") from exc
        return Noted(device, _str(obj, "tid"), noted_state, _opt_int(obj, "document_id"),
                     _opt_str(obj, "error"), _opt_str(obj, "error_class"))
    raise DecodeError(f"unexpected topic kind {kind}")
