"""Test-side edge stand-in: build a BagIt tar per protocol/bag.py, seal it, cut it into messages."""

from __future__ import annotations

import hashlib
import io
import secrets
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass

import nacl.public
import nacl.signing

from protocol.bag import (
    BAGIT_TXT,
    HOCR,
    METADATA,
    TEXT,
    OcrInfo,
    PackageMetadata,
    bag_info,
    manifest,
    original_member,
)
from protocol.envelope import EnvelopeSealer, SignedHeader
from protocol.messages import Fin, Init, Message, Notice, Segment, encode
from protocol.notice import NoticeContent, seal_notice

CAPTURED_AT = "2024-05-01T08:00:00Z"


def build_package(*, device: str, tid: str, seq: int, original: bytes, name: str, text: str,
                  media_type: str = "application/pdf", pages: int = 1,
                  captured_at: str = CAPTURED_AT) -> bytes:
    members = package_members(device=device, tid=tid, seq=seq, original=original, name=name, text=text,
                              media_type=media_type, pages=pages, captured_at=captured_at)
    return tar_of([(n, d, tarfile.REGTYPE, "") for n, d in members])


def tar_of(members: list[tuple[str, bytes, bytes, str]]) -> bytes:
    """A PAX tar of (name, data, type, linkname) members, in order, exactly as given."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data, kind, link in members:
            info = tarfile.TarInfo(member)
            info.type = kind
            info.linkname = link
            info.mode = 0o600
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


def package_members(*, device: str, tid: str, seq: int, original: bytes, name: str, text: str,
                    media_type: str = "application/pdf", pages: int = 1,
                    captured_at: str = CAPTURED_AT) -> list[tuple[str, bytes]]:
    """The (name, bytes) members of a valid package, in protocol/bag.py's order."""
    metadata = PackageMetadata(
        tid=tid, device_id=device, seq=seq, original_name=name,
        original_sha256=hashlib.sha256(original).hexdigest(), original_size=len(original),
        media_type=media_type, pages=pages, captured_at=captured_at,
        ocr=OcrInfo(engine="tesseract 5.3", languages=("vie",), dpi=300, seconds=0.6))
    payload = {METADATA: metadata.to_json(), TEXT: text.encode(), HOCR: b"<html>hocr</html>",
               original_member(media_type): original}
    hashes = {n: hashlib.sha256(d).hexdigest() for n, d in payload.items()}
    tags = {"bagit.txt": BAGIT_TXT,
            "bag-info.txt": bag_info(device_id=device, tid=tid, bagging_date="2024-05-01",
                                     payload_bytes=sum(map(len, payload.values())),
                                     payload_files=len(payload)),
            "manifest-sha256.txt": manifest(hashes)}
    return [*tags.items(), *payload.items()]


@dataclass(frozen=True, slots=True)
class Sealed:
    device: str
    tid: str
    seq: int
    signed: SignedHeader
    ciphertext: bytes

    def init(self) -> Init:
        return Init(self.device, self.tid, self.signed)

    def segments(self, size: int) -> list[Segment]:
        return [Segment(self.device, self.tid, off, self.ciphertext[off: off + size])
                for off in range(0, len(self.ciphertext), size)]

    def fin(self) -> Fin:
        return Fin(self.device, self.tid, len(self.ciphertext), hashlib.sha256(self.ciphertext).digest())

    def messages(self, segment_size: int = 16 * 1024) -> list[Message]:
        return [self.init(), *self.segments(segment_size), self.fin()]


def seal_document(*, device: str, seq: int, signing_key: nacl.signing.SigningKey,
                  central_key: nacl.public.PublicKey, original: bytes,
                  name: str = "Công văn số 5 – Tuyên Quang.pdf",
                  text: str = "Quyết định về việc số hoá hồ sơ lưu trữ xã Tân Trào",
                  media_type: str = "application/pdf", chunk_size: int = 4096,
                  captured_at: str = CAPTURED_AT) -> Sealed:
    doc_id = secrets.token_bytes(16)
    package = build_package(device=device, tid=doc_id.hex(), seq=seq, original=original, name=name,
                            text=text, media_type=media_type, captured_at=captured_at)
    return seal_stream(device=device, seq=seq, signing_key=signing_key, central_key=central_key,
                       pieces=[package], size=len(package), doc_id=doc_id, chunk_size=chunk_size)


def seal_stream(*, device: str, seq: int, signing_key: nacl.signing.SigningKey,
                central_key: nacl.public.PublicKey, pieces: Iterable[bytes], size: int,
                doc_id: bytes | None = None, chunk_size: int = 64 * 1024) -> Sealed:
    """Seal any package bytes (hostile ones included), validly signed by the device."""
    doc_id = doc_id or secrets.token_bytes(16)
    sealer = EnvelopeSealer(device_id=device, doc_id=doc_id, seq=seq, signing_key=signing_key,
                            central_public_key=central_key, plaintext_size=size,
                            created_at=int(time.time()), chunk_size=chunk_size, level=3)
    body = bytearray()
    for piece in pieces:
        body += sealer.update(piece)
    tail, signed = sealer.finish()
    return Sealed(device, doc_id.hex(), seq, signed, bytes(body + tail))


def wire(messages: list[Message]) -> list[tuple[str, bytes]]:
    return [encode(m) for m in messages]


def seal_notice_for(sealed: Sealed, *, signing_key: nacl.signing.SigningKey,
                    central_key: nacl.public.PublicKey, original: bytes,
                    name: str = "Công văn số 5 – Tuyên Quang.pdf",
                    text: str = "Quyết định về việc số hoá hồ sơ lưu trữ xã Tân Trào",
                    media_type: str = "application/pdf", captured_at: str = CAPTURED_AT,
                    seq: int | None = None) -> Notice:
    """The notice an edge sends ahead of ``sealed``: the same metadata and text as its package."""
    metadata = PackageMetadata(
        tid=sealed.tid, device_id=sealed.device, seq=sealed.seq if seq is None else seq, original_name=name,
        original_sha256=hashlib.sha256(original).hexdigest(), original_size=len(original),
        media_type=media_type, pages=1, captured_at=captured_at,
        ocr=OcrInfo(engine="tesseract 5.3", languages=("vie",), dpi=300, seconds=0.6))
    signed, ciphertext = seal_notice(NoticeContent(metadata, text), signing_key=signing_key,
                                     central_public_key=central_key, created_at=int(time.time()))
    return Notice(sealed.device, sealed.tid, signed, ciphertext)
