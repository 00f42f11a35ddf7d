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
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from protocol.errors import BagError, DecodeError
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
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ANY_PAYLOAD_MEMBER = frozenset(
    {METADATA, TEXT, HOCR} | {f"data/original.{ext}" for ext in MEDIA_EXTENSIONS.values()})


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

    def __post_init__(self) -> None:
        if not isinstance(self.engine, str) or not isinstance(self.languages, tuple) or not all(
                isinstance(lang, str) for lang in self.languages):
            raise BagError("ocr engine and languages must be strings")
        numbers = (self.dpi, self.seconds, self.mean_confidence or 0.0)
        if not isinstance(self.dpi, int) or any(
                isinstance(n, bool) or not isinstance(n, int | float) for n in numbers):
            raise BagError("ocr dpi, seconds and mean_confidence must be numbers")


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
        types: tuple[tuple[str, object, type | tuple[type, ...]], ...] = (
            ("tid", self.tid, str), ("device_id", self.device_id, str), ("seq", self.seq, int),
            ("original_name", self.original_name, str), ("original_sha256", self.original_sha256, str),
            ("original_size", self.original_size, int), ("media_type", self.media_type, str),
            ("pages", self.pages, int), ("captured_at", self.captured_at, str),
            ("ocr", self.ocr, OcrInfo), ("extra", self.extra, dict), ("format", self.format, str))
        for name, value, expected in types:
            if not isinstance(value, expected) or isinstance(value, bool):
                raise BagError(f"metadata field {name!r} has the wrong type: {value!r:.80}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.extra.items()):
            raise BagError("metadata extra must map strings to strings")
        try:
            check_tid(self.tid)
            check_device_id(self.device_id)
        except DecodeError as exc:
            raise BagError(str(exc)) from exc
        if self.format != PACKAGE_FORMAT:
            raise BagError(f"unknown package format {self.format!r}")
        if self.media_type not in MEDIA_EXTENSIONS:
            raise BagError(f"unsupported media type {self.media_type!r}")
        if not _HEX64.fullmatch(self.original_sha256) or self.original_size < 0 or self.pages < 0 or (
                self.seq < 0):
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
            ocr["languages"] = _languages(ocr["languages"])
            return cls(ocr=OcrInfo(**ocr), **obj)
        except BagError:
            raise
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError,
                RecursionError) as exc:
            raise BagError(f"metadata.json is malformed: {exc!r}") from exc


def _languages(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BagError("metadata ocr.languages must be a list")
    return tuple(value)


def manifest(hashes: dict[str, str]) -> bytes:
    """``manifest-sha256.txt`` for the payload members (name → hex sha256)."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items())).encode()


def parse_manifest(data: bytes, media_type: str | None = None) -> dict[str, str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BagError("manifest is not UTF-8") from exc
    result: dict[str, str] = {}
    # Lines end in "\n" only: splitlines() would also split on \x1c, \u2028 and friends.
    if text and not text.endswith("\n"):
        raise BagError("manifest does not end with a newline")
    allowed = set(payload_members(media_type)) if media_type else _ANY_PAYLOAD_MEMBER
    for line in text.split("\n")[:-1] if text else []:
        digest, sep, name = line.partition("  ")
        if not sep or not _HEX64.fullmatch(digest) or name in result:
            raise BagError(f"bad manifest line {line[:80]!r}")
        if name not in allowed:
            raise BagError(f"unexpected member {name[:80]!r} in manifest")
        result[name] = digest
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
