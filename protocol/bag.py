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

import datetime as dt
import json
import math
import re
import unicodedata
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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class OcrPage:
    """How one page was prepared and read. Its hOCR coordinates are those of the prepared image:
    the original turned by ``rotation`` degrees clockwise, then by ``skew`` degrees (deskew)."""

    dpi: int                      # the resolution tesseract worked at (0: unknown)
    dpi_estimated: bool = False   # the file declared none: tesseract estimated it
    rotation: int = 0             # 0, 90, 180 or 270
    skew: float = 0.0
    orientation_confidence: float | None = None   # tesseract OSD's, when it was asked
    width: int = 0                # the prepared image, in pixels
    height: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.dpi, int) or isinstance(self.dpi, bool) or not 0 <= self.dpi <= 10_000:
            raise BagError(f"ocr page dpi is invalid: {self.dpi!r:.40}")
        if not isinstance(self.dpi_estimated, bool) or self.rotation not in (0, 90, 180, 270):
            raise BagError("ocr page dpi_estimated must be a bool and rotation 0/90/180/270")
        if not _is_number(self.skew) or not -45 <= self.skew <= 45:
            raise BagError(f"ocr page skew is invalid: {self.skew!r:.40}")
        if self.orientation_confidence is not None and not _is_number(self.orientation_confidence):
            raise BagError("ocr page orientation_confidence must be a number")
        for side in (self.width, self.height):
            if not isinstance(side, int) or isinstance(side, bool) or not 0 <= side <= 1_000_000:
                raise BagError(f"ocr page size is invalid: {side!r:.40}")


@dataclass(frozen=True, slots=True)
class OcrInfo:
    engine: str
    languages: tuple[str, ...]
    dpi: int
    seconds: float
    mean_confidence: float | None = None
    dpi_estimated: bool = False           # any page's resolution was estimated
    page_info: tuple[OcrPage, ...] = ()   # one per page (packages before 2026-12 have none)

    def __post_init__(self) -> None:
        if not isinstance(self.engine, str) or not isinstance(self.languages, tuple) or not all(
                isinstance(lang, str) for lang in self.languages):
            raise BagError("ocr engine and languages must be strings")
        numbers = (self.dpi, self.seconds, self.mean_confidence or 0.0)
        if not isinstance(self.dpi, int) or any(
                isinstance(n, bool) or not isinstance(n, int | float) for n in numbers):
            raise BagError("ocr dpi, seconds and mean_confidence must be numbers")
        # Bounded like every other field a device sends (it is catalogued and served back).
        if len(self.engine) > MAX_SHORT_TEXT or len(self.languages) > 16 or any(
                len(lang) > 64 for lang in self.languages):
            raise BagError("ocr engine or languages are too long")
        if not 0 <= self.dpi <= 10_000 or not _is_number(self.seconds) or not 0 <= self.seconds <= 1e7 or (
                self.mean_confidence is not None and not (_is_number(self.mean_confidence)
                                                          and -1 <= self.mean_confidence <= 100)):
            raise BagError("ocr dpi, seconds or mean_confidence is out of range")
        if len(self.page_info) > MAX_PAGES:
            raise BagError(f"ocr page_info has more than {MAX_PAGES} pages")
        if not isinstance(self.dpi_estimated, bool) or not isinstance(self.page_info, tuple) or not all(
                isinstance(page, OcrPage) for page in self.page_info):
            raise BagError("ocr dpi_estimated must be a bool and page_info a list of pages")


# Bounds on what a device's metadata may carry: generous for any honest box (a register of a few
# hundred pages, a tesseract version string), small enough that one hostile package cannot make a
# catalogue row or an API answer megabytes long.
MAX_PAGES = 100_000
MAX_SHORT_TEXT = 200
MAX_EXTRA_KEYS = 32


def _is_timestamp(value: str) -> bool:
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


# The fields an archivist types for a "văn bản" (TT 02/2019/TT-BNV; see edge/ocr/schemas/).
DOCUMENT_FIELDS = ("so_ky_hieu", "ngay", "loai", "co_quan", "trich_yeu", "nguoi_ky")
MAX_FIELD_CHARS = 2000
_ISO_DATE = re.compile(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])")


@dataclass(frozen=True, slots=True)
class DocumentField:
    """One extracted metadata value and how sure the extractor is of it (0-1)."""

    value: str
    confidence: float

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not self.value or len(self.value) > MAX_FIELD_CHARS:
            raise BagError("document field value must be a non-empty string of bounded length")
        if unicodedata.normalize("NFC", self.value) != self.value or any(
                unicodedata.category(c) in ("Cc", "Cf") for c in self.value):
            raise BagError("document field value must be NFC text without control characters")
        if not _is_number(self.confidence) or not 0.0 <= self.confidence <= 1.0:
            raise BagError(f"document field confidence must be in 0..1: {self.confidence!r:.40}")


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
    # Extracted from the layout on the edge, keyed by DOCUMENT_FIELDS (absent: not found).
    document: dict[str, DocumentField] = field(default_factory=dict)

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
        if not isinstance(self.document, dict) or not all(
                k in DOCUMENT_FIELDS and isinstance(v, DocumentField) for k, v in self.document.items()):
            raise BagError(f"metadata document fields must be among {DOCUMENT_FIELDS}")
        if "ngay" in self.document and not _ISO_DATE.fullmatch(self.document["ngay"].value):
            raise BagError("metadata document date (ngay) must be YYYY-MM-DD")
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
        if self.pages > MAX_PAGES:
            raise BagError(f"metadata pages is more than {MAX_PAGES}")
        if len(self.captured_at) > MAX_SHORT_TEXT or not _is_timestamp(self.captured_at):
            raise BagError(f"metadata captured_at is not an ISO 8601 time: {self.captured_at[:40]!r}")
        if len(self.extra) > MAX_EXTRA_KEYS or any(
                len(k) > MAX_SHORT_TEXT or len(v) > MAX_FIELD_CHARS for k, v in self.extra.items()):
            raise BagError(f"metadata extra holds more than {MAX_EXTRA_KEYS} short fields")

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
            ocr["page_info"] = tuple(OcrPage(**page) for page in _list(ocr.get("page_info", [])))
            fields = _document(obj.pop("document", {}))
            return cls(ocr=OcrInfo(**ocr), document=fields, **obj)
        except BagError:
            raise
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError,
                RecursionError) as exc:
            raise BagError(f"metadata.json is malformed: {exc!r}") from exc


def _document(value: object) -> dict[str, DocumentField]:
    if not isinstance(value, dict):
        raise BagError("metadata document must be an object")
    return {name: DocumentField(**fields) for name, fields in value.items()}


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise BagError("metadata ocr.page_info must be a list")
    return value


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
