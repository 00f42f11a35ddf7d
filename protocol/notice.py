"""The notice: a document's small first part (text + metadata), sent ahead of its original.

Rules of the format (DECISIONS "Searchable at central behind a big scan"):

1. A notice is sealed and signed exactly like an envelope (``protocol.envelope``): a random stream
   key sealed to central's public key, zstd + secretstream, a signed header in the clear. Its header
   names the same device, transfer id and sequence number as the document's own envelope: a notice
   is a first part of that transfer, not a transfer of its own.
2. The device's signature covers ``NOTICE_CONTEXT`` + header, an envelope's the header alone, so a
   notice's header never passes for an envelope's init, nor the reverse.
3. The plaintext is canonical JSON ``{"format", "metadata", "text"}``: ``metadata`` is the package's
   ``metadata.json`` (``protocol.bag.PackageMetadata``: file name, capture time, the original's sha256
   and size, pages, extracted fields) and must name the header's device, tid and seq. No hOCR: it is
   5-10 times the text, and what needs it (the archival copy) waits for the original anyway.
4. Caps before work: the whole message is at most ``MAX_NOTICE_BYTES``, the plaintext at most
   ``MAX_NOTICE_PLAINTEXT`` (checked from the signed header before anything is decrypted, and again
   while decompressing). A document whose notice would be larger travels whole, as before.
5. A notice proves nothing about the original's bytes: the receipt the edge may delete on is only
   ever given for the original's transfer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import nacl.public
import nacl.signing

from protocol.bag import PackageMetadata
from protocol.envelope import (
    EnvelopeOpener,
    EnvelopeSealer,
    SignedHeader,
    verify_ciphertext,
)
from protocol.errors import BagError, SizeLimitError

NOTICE_FORMAT = "sohoa-notice/1"
NOTICE_CONTEXT = b"sohoa-notice\0"
MAX_NOTICE_PLAINTEXT = 256 * 1024   # about 80 pages of text; more travels whole with the original
MAX_NOTICE_BYTES = 320 * 1024       # header + ciphertext on the wire (zstd never grows 256 KiB by 64 KiB)
NOTICE_CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class NoticeContent:
    """What a notice says: the package's metadata and the OCR text."""

    metadata: PackageMetadata
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.metadata, PackageMetadata) or not isinstance(self.text, str):
            raise BagError("notice content needs package metadata and a text")

    def to_bytes(self) -> bytes:
        obj = {"format": NOTICE_FORMAT, "metadata": json.loads(self.metadata.to_json()), "text": self.text}
        return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> NoticeContent:
        if len(data) > MAX_NOTICE_PLAINTEXT:
            raise SizeLimitError(f"notice is {len(data)} bytes, at most {MAX_NOTICE_PLAINTEXT}")
        try:
            obj: Any = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise BagError(f"notice is not JSON: {exc}") from exc
        if not isinstance(obj, dict) or set(obj) != {"format", "metadata", "text"}:
            raise BagError("notice must be an object with exactly format, metadata and text")
        if obj["format"] != NOTICE_FORMAT:
            raise BagError(f"unknown notice format {obj['format']!r:.40}")
        if not isinstance(obj["metadata"], dict) or not isinstance(obj["text"], str):
            raise BagError("notice metadata must be an object and text a string")
        metadata = PackageMetadata.from_json(json.dumps(obj["metadata"]).encode())
        return cls(metadata, obj["text"])


def seal_notice(content: NoticeContent, *, signing_key: nacl.signing.SigningKey,
                central_public_key: nacl.public.PublicKey, created_at: int) -> tuple[SignedHeader, bytes]:
    """The notice's signed header and ciphertext; raises :class:`SizeLimitError` past the caps."""
    plaintext = content.to_bytes()
    if len(plaintext) > MAX_NOTICE_PLAINTEXT:
        raise SizeLimitError(f"notice would be {len(plaintext)} bytes, at most {MAX_NOTICE_PLAINTEXT}",
                             device=content.metadata.device_id, tid=content.metadata.tid)
    meta = content.metadata
    sealer = EnvelopeSealer(device_id=meta.device_id, doc_id=bytes.fromhex(meta.tid), seq=meta.seq,
                            signing_key=signing_key, central_public_key=central_public_key,
                            plaintext_size=len(plaintext), created_at=created_at,
                            chunk_size=NOTICE_CHUNK_SIZE, context=NOTICE_CONTEXT)
    body = sealer.update(plaintext)
    tail, signed = sealer.finish()
    ciphertext = body + tail
    if len(signed.encode()) + len(ciphertext) > MAX_NOTICE_BYTES:
        raise SizeLimitError(f"sealed notice is {len(ciphertext)} bytes, more than fits in one message",
                             device=meta.device_id, tid=meta.tid)
    return signed, ciphertext


def open_notice(signed: SignedHeader, ciphertext: bytes, device_key: nacl.signing.VerifyKey,
                central_private_key: nacl.public.PrivateKey) -> NoticeContent:
    """Verify (signature with the notice context, size, hash), decrypt with caps, parse and check
    that the content names the header's device, tid and seq."""
    verified = verify_ciphertext(signed, device_key, size=len(ciphertext),
                                 sha256=hashlib.sha256(ciphertext).digest(), context=NOTICE_CONTEXT)
    header = verified.header
    out = bytearray()
    opener = EnvelopeOpener(verified, central_private_key, max_plaintext=MAX_NOTICE_PLAINTEXT,
                            sink=out.extend)
    opener.update(ciphertext)
    opener.finish()
    content = NoticeContent.from_bytes(bytes(out))
    meta = content.metadata
    if meta.device_id != header.device_id or meta.tid != header.tid or meta.seq != header.seq:
        raise BagError("notice content names another device, transfer or sequence number",
                       device=header.device_id, tid=header.tid)
    return content
