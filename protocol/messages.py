"""Typed sohoa/v1 messages and their (topic, payload) encoding.

Up (edge → central): Init, Segment, Fin, Abort, Status. Down (central → edge): Ack, Receipt.
``encode(msg)`` gives ``(topic, payload)``; ``decode(topic, payload)`` gives the message back or
raises :class:`DecodeError`. Binary payloads for the bulk path, canonical JSON for the small ones.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import nacl.exceptions
import nacl.signing

from protocol.envelope import SignedHeader
from protocol.errors import DecodeError, ProtocolError, ReceiptError
from protocol.names import check_device_id, check_tid
from protocol.topics import Kind, Topic, parse_topic

MAX_SEGMENT = 1024 * 1024
_FIN = struct.Struct(">4sQ32s")
_FIN_MAGIC = b"SFIN"


class AckState(str, Enum):
    """What central holds for a transfer."""

    RECEIVING = "receiving"   # ranges tell what is durably held; send the rest
    STORED = "stored"         # assembled, verified and stored: a receipt follows (or was sent)
    REJECTED = "rejected"     # permanently refused: error says why; do not resend
    UNKNOWN = "unknown"       # central has no init for this tid: send init again


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
        if self.offset < 0 or not 0 < len(self.data) <= MAX_SEGMENT:
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
        if len(self.sha256) != 32 or self.size < 0:
            raise DecodeError("fin needs a size and a 32-byte sha256", device=self.device, tid=self.tid)


@dataclass(frozen=True, slots=True)
class Abort:
    device: str
    tid: str
    reason: str

    def __post_init__(self) -> None:
        check_device_id(self.device)
        check_tid(self.tid)


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


@dataclass(frozen=True, slots=True)
class Ack:
    device: str
    tid: str
    state: AckState
    ranges: tuple[tuple[int, int], ...] = ()
    error: str | None = None
    error_class: str | None = None

    def __post_init__(self) -> None:
        check_device_id(self.device)
        check_tid(self.tid)
        previous = -1
        for start, end in self.ranges:
            if not previous < start < end if previous >= 0 else not 0 <= start < end:
                raise DecodeError("ack ranges must be sorted, disjoint and non-empty",
                                  device=self.device, tid=self.tid)
            previous = end


@dataclass(frozen=True, slots=True)
class ReceiptBody:
    device: str
    tid: str
    sha256: str            # of the original file, hex
    stored_at: str         # ISO 8601, UTC
    document_id: int       # central catalog id
    duplicate: bool = False

    def __post_init__(self) -> None:
        check_device_id(self.device)
        check_tid(self.tid)
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ReceiptError("receipt sha256 must be 64 lowercase hex digits")

    def canonical(self) -> bytes:
        return _canonical({"device": self.device, "tid": self.tid, "sha256": self.sha256,
                           "stored_at": self.stored_at, "document_id": self.document_id,
                           "duplicate": self.duplicate})


@dataclass(frozen=True, slots=True)
class Receipt:
    body: ReceiptBody
    signature: bytes = field(repr=False)

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


Message = Init | Segment | Fin | Abort | Status | Ack | Receipt


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
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
        return str(Topic(Kind.ACK, msg.device)), _canonical(body)
    if isinstance(msg, Receipt):
        return str(Topic(Kind.RECEIPT, msg.device)), msg.signature + msg.body.canonical()
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
        return Abort(device, tid, payload.decode("utf-8", errors="replace")[:1000])
    if kind is Kind.STATUS:
        obj = _json(payload, "status")
        if obj.get("device") != device:
            raise DecodeError("status device does not match its topic")
        return Status(
            device=device, online=bool(obj["online"]), queue_docs=int(obj.get("queue_docs", 0)),
            queue_bytes=int(obj.get("queue_bytes", 0)), oldest_age_s=float(obj.get("oldest_age_s", 0)),
            failed_docs=int(obj.get("failed_docs", 0)), last_receipt_at=obj.get("last_receipt_at"),
            disk_free_bytes=obj.get("disk_free_bytes"), version=obj.get("version"),
            last_error=obj.get("last_error"), alarms=tuple(str(a) for a in obj.get("alarms", [])),
            updated_at=obj.get("updated_at"))
    if kind is Kind.ACK:
        obj = _json(payload, "ack")
        ranges = tuple((int(s), int(e)) for s, e in obj.get("ranges", []))
        return Ack(device, str(obj["tid"]), AckState(obj["state"]), ranges, obj.get("error"),
                   obj.get("error_class"))
    if kind is Kind.RECEIPT:
        if len(payload) < 65:
            raise ReceiptError(f"receipt payload truncated at {len(payload)} bytes")
        obj = _json(payload[64:], "receipt")
        body = ReceiptBody(device=str(obj["device"]), tid=str(obj["tid"]), sha256=str(obj["sha256"]),
                           stored_at=str(obj["stored_at"]), document_id=int(obj["document_id"]),
                           duplicate=bool(obj["duplicate"]))
        if body.device != device or body.canonical() != payload[64:]:
            raise ReceiptError("receipt body is not canonical or names another device")
        return Receipt(body, payload[:64])
    raise DecodeError(f"unexpected topic kind {kind}")
