"""Package stage: the BagIt-style tar of one document (protocol/bag.py), then its sealed envelope.

The original is streamed byte-for-byte into the tar (never loaded whole), hashed on the way and
checked against the sha256 recorded for the row, so a file changed under us (a scanner still
writing) is never packaged under the old hash: ``ContentChangedError`` sends the row round again.
Tar headers use fixed owner and time: the same inputs give
the same bytes. Both outputs are written crash-safe (temp file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
import unicodedata
from pathlib import Path
from typing import BinaryIO

import nacl.public
import nacl.signing

from edge.errors import ContentChangedError
from edge.fsutil import atomic_writer
from edge.media import MediaInfo, open_regular
from edge.ocr import OcrResult
from edge.transcode import ENCODING, JxlTranscoder, Transcoded
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
    payload_members,
)
from protocol.envelope import EnvelopeSealer, SignedHeader
from protocol.errors import SizeLimitError
from protocol.messages import Notice, encode
from protocol.names import display_name
from protocol.notice import NoticeContent, seal_notice

# Fixed tar header fields: reproducible output, and nothing about the edge box leaks into it.
TAR_MTIME = 0
TAR_OWNER = "sohoa"


class _HashingReader(io.RawIOBase):
    """Read-through wrapper that hashes and counts what tarfile copies."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self.digest = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = TAR_OWNER
    info.type = tarfile.REGTYPE
    return info


def build_package(original: Path, out: Path, *, media: MediaInfo, ocr: OcrResult, tid: str,
                  device_id: str, seq: int, original_name: str, original_sha256: str,
                  captured_at: str, bagging_date: str | None = None,
                  transcoder: JxlTranscoder | None = None) -> int:
    """Write the package tar to ``out``; return its size in bytes.

    With a ``transcoder``, a JPEG travels as its lossless JPEG XL transcode when that restores the
    identical bytes (``edge.transcode``); the metadata keeps the JPEG's size and sha256.
    """
    jxl = None
    if transcoder is not None and media.media_type == "image/jpeg":
        jxl = transcoder.transcode(original, original_sha256, out.parent)
    try:
        return _build(original, out, media=media, ocr=ocr, tid=tid, device_id=device_id, seq=seq,
                      original_name=original_name, original_sha256=original_sha256, captured_at=captured_at,
                      bagging_date=bagging_date, jxl=jxl)
    finally:
        if jxl is not None:
            jxl.path.unlink(missing_ok=True)


def _metadata(*, media: MediaInfo, ocr: OcrResult, tid: str, device_id: str, seq: int, original_name: str,
              original_sha256: str, size: int, captured_at: str, jxl: Transcoded | None) -> PackageMetadata:
    """The package's metadata.json; the notice carries the same (without the wire encoding)."""
    return PackageMetadata(
        tid=tid, device_id=device_id, seq=seq, original_name=display_name(original_name),
        original_sha256=original_sha256, original_size=size, media_type=media.media_type,
        pages=ocr.pages, captured_at=captured_at,
        ocr=OcrInfo(engine=ocr.engine, languages=tuple(ocr.languages), dpi=ocr.dpi,
                    seconds=ocr.seconds, mean_confidence=ocr.mean_confidence,
                    dpi_estimated=ocr.dpi_estimated, page_info=tuple(ocr.page_info)),
        document=dict(ocr.fields),
        extra={"original_encoding": ENCODING} if jxl is not None else {})


def build_notice(*, media: MediaInfo, ocr: OcrResult, tid: str, device_id: str, seq: int,
                 original_name: str, original_sha256: str, size: int, captured_at: str,
                 signing_key: nacl.signing.SigningKey, central_public_key: nacl.public.PublicKey,
                 created_at: int) -> bytes | None:
    """The payload of the document's Notice message (protocol.notice), or None when its text is too
    large for one: such a document is found at central once its original arrives, as before."""
    metadata = _metadata(media=media, ocr=ocr, tid=tid, device_id=device_id, seq=seq,
                         original_name=original_name, original_sha256=original_sha256, size=size,
                         captured_at=captured_at, jxl=None)
    content = NoticeContent(metadata, unicodedata.normalize("NFC", ocr.text))
    try:
        signed, ciphertext = seal_notice(content, signing_key=signing_key,
                                         central_public_key=central_public_key, created_at=created_at)
    except SizeLimitError:
        return None
    return encode(Notice(device_id, tid, signed, ciphertext))[1]


def _build(original: Path, out: Path, *, media: MediaInfo, ocr: OcrResult, tid: str, device_id: str,
           seq: int, original_name: str, original_sha256: str, captured_at: str, bagging_date: str | None,
           jxl: Transcoded | None) -> int:
    text = unicodedata.normalize("NFC", ocr.text).encode("utf-8")
    hocr = ocr.hocr.encode("utf-8")
    with open_regular(original, max_bytes=1 << 62) as (source, size):
        metadata = _metadata(media=media, ocr=ocr, tid=tid, device_id=device_id, seq=seq,
                             original_name=original_name, original_sha256=original_sha256, size=size,
                             captured_at=captured_at, jxl=jxl)
        meta = metadata.to_json()
        original_name_in_bag = original_member(media.media_type)
        member_sha256 = jxl.sha256 if jxl is not None else original_sha256
        hashes = {METADATA: hashlib.sha256(meta).hexdigest(), TEXT: hashlib.sha256(text).hexdigest(),
                  HOCR: hashlib.sha256(hocr).hexdigest(), original_name_in_bag: member_sha256}
        assert set(hashes) == set(payload_members(media.media_type))
        member_size = jxl.size if jxl is not None else size
        info = bag_info(device_id=device_id, tid=tid, bagging_date=bagging_date or captured_at[:10],
                        payload_bytes=len(meta) + len(text) + len(hocr) + member_size, payload_files=4)
        small = [("bagit.txt", BAGIT_TXT), ("bag-info.txt", info), ("manifest-sha256.txt", manifest(hashes)),
                 (METADATA, meta), (TEXT, text), (HOCR, hocr)]
        with atomic_writer(out, 0o600) as handle:
            with tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name, data in small:
                    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                with contextlib.ExitStack() as stack:
                    member = stack.enter_context(jxl.path.open("rb")) if jxl is not None else source
                    reader = _HashingReader(member)
                    try:
                        tar.addfile(_tarinfo(original_name_in_bag, member_size), reader)
                    except OSError as exc:  # tarfile's "unexpected end of data": the file shrank
                        raise ContentChangedError(f"{original_name} changed while it was being packaged "
                                                  f"({exc})") from exc
            # A transcode was checked against the row's sha256 when djxl restored it (edge.transcode).
            if reader.count != member_size or reader.digest.hexdigest() != member_sha256:
                raise ContentChangedError(f"{original_name} changed since it was taken")
            handle.flush()
            return handle.tell()


def seal_package(package: Path, envelope: Path, *, device_id: str, tid: str, seq: int,
                 signing_key: nacl.signing.SigningKey, central_public_key: nacl.public.PublicKey,
                 created_at: int, chunk_size: int = 65536) -> SignedHeader:
    """Stream ``package`` through zstd + secretstream into ``envelope`` (ciphertext only)."""
    with open_regular(package, max_bytes=1 << 62) as (source, size):
        sealer = EnvelopeSealer(device_id=device_id, doc_id=bytes.fromhex(tid), seq=seq,
                                signing_key=signing_key, central_public_key=central_public_key,
                                plaintext_size=size, created_at=created_at, chunk_size=chunk_size)
        with atomic_writer(envelope, 0o600) as sink:
            while block := source.read(1 << 20):
                sink.write(sealer.update(block))
            tail, signed = sealer.finish()
            sink.write(tail)
    return signed
