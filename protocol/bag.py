"""The package inside an envelope: a BagIt-style (RFC 8493) layout carried as an uncompressed tar.

Member order is fixed so central can verify while streaming: tag files first (the manifest tells
what every payload file must hash to), then the payload. Member names are a closed set; the
original's sender-supplied name lives only in ``metadata.json``.

    bagit.txt
    bag-info.txt
    manifest-sha256.txt
    data/metadata.json
    data/text.txt            OCR text, NFC
    data/ocr.hocr            tesseract hOCR, pages concatenated
    data/original.<ext>      the scanned file, byte-for-byte
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from protocol.errors import BagError
from protocol.names import check_device_id, check_tid, display_name

PACKAGE_FORMAT = "sohoa-package/1"
BAGIT_TXT = b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
MEDIA_EXTENSIONS = {
    "application/pdf": "pdf",
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/tiff": "tif",
}
METADATA = "data/metadata.json"
TEXT = "data/text.txt"
HOCR = "data/ocr.hocr"
TAG_FILES = ("bagit.txt", "bag-info.txt", "manifest-sha256.txt")


def original_member(media_type: str) -> str:
    try:
        return f"data/original.{MEDIA_EXTENSIONS[media_type]}"
    except KeyError:
        raise BagError(f"unsupported media type {media_type!r}") from None


def payload_members(media_type: str) -> tuple[str, ...]:
    return (METADATA, TEXT, HOCR, original_member(media_type))


@dataclass(frozen=True, slots=True)
class OcrInfo:
    engine: str
    languages: tuple[str, ...]
    dpi: int
    seconds: float
    mean_confidence: float | None = None


@dataclass(frozen=True, slots=True)
class PackageMetadata:
    """What central catalogues about one document (never used as a path)."""

    tid: str
    device_id: str
    seq: int
    original_name: str
    original_sha256: str
    original_size: int
    media_type: str
    pages: int
    captured_at: str
    ocr: OcrInfo
    extra: dict[str, str] = field(default_factory=dict)
    format: str = PACKAGE_FORMAT

    def __post_init__(self) -> None:
        check_tid(self.tid)
        check_device_id(self.device_id)
        if self.format != PACKAGE_FORMAT:
            raise BagError(f"unknown package format {self.format!r}")
        if self.media_type not in MEDIA_EXTENSIONS:
            raise BagError(f"unsupported media type {self.media_type!r}")
        if len(self.original_sha256) != 64 or self.original_size < 0 or self.pages < 0:
            raise BagError("metadata sizes or hashes are invalid")
        if display_name(self.original_name) != self.original_name:
            raise BagError("original_name must be a normalised display name")

    def to_json(self) -> bytes:
        obj = asdict(self)
        obj["ocr"]["languages"] = list(self.ocr.languages)
        return json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PackageMetadata:
        try:
            obj: dict[str, Any] = json.loads(data.decode("utf-8"))
            ocr = obj.pop("ocr")
            ocr["languages"] = tuple(ocr["languages"])
            return cls(ocr=OcrInfo(**ocr), **obj)
        except BagError:
            raise
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BagError(f"metadata.json is malformed: {exc!r}") from exc


def manifest(hashes: dict[str, str]) -> bytes:
    """``manifest-sha256.txt`` for the payload members (name → hex sha256)."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items())).encode()


def parse_manifest(data: bytes, media_type: str | None = None) -> dict[str, str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BagError("manifest is not UTF-8") from exc
    result: dict[str, str] = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or name in result:
            raise BagError(f"bad manifest line {line[:80]!r}")
        result[name] = digest
    allowed = set(payload_members(media_type)) if media_type else None
    for name in result:
        if not name.startswith("data/") or (allowed is not None and name not in allowed):
            raise BagError(f"unexpected member {name[:80]!r} in manifest")
    return result


def bag_info(*, device_id: str, tid: str, bagging_date: str, payload_bytes: int,
             payload_files: int) -> bytes:
    lines = [
        f"Source-Organization: sohoa device {device_id}",
        f"External-Identifier: {tid}",
        f"Bagging-Date: {bagging_date}",
        f"Payload-Oxum: {payload_bytes}.{payload_files}",
        "Bag-Software-Agent: sohoa",
    ]
    return ("\n".join(lines) + "\n").encode()


def check_tid_matches(metadata: PackageMetadata, tid: str, device_id: str) -> None:
    if metadata.tid != tid or metadata.device_id != device_id:
        raise BagError("package metadata names another transfer or device", device=device_id, tid=tid)
