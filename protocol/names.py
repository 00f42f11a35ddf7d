"""Identifiers and human text: validation of ids, NFC normalisation, diacritic folding for search.

Sender-supplied names are *data*, never paths: this module checks ids that do appear in topics and
file names (device ids, transfer ids) and normalises the names that are only ever displayed.
"""

from __future__ import annotations

import re
import unicodedata

from protocol.errors import DecodeError

DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_NAME_CHARS = 255


def check_device_id(value: str) -> str:
    """Return ``value`` if it is a valid device id (lowercase, digits, dashes; 1–63 chars)."""
    if not DEVICE_ID_RE.fullmatch(value):
        raise DecodeError(f"invalid device id {value!r}: use 1-63 of a-z, 0-9 and '-'")
    return value


def check_tid(value: str) -> str:
    """Return ``value`` if it is a transfer id: 32 lowercase hex digits (a 128-bit random id)."""
    if not TID_RE.fullmatch(value):
        raise DecodeError(f"invalid transfer id {value!r}: expected 32 lowercase hex digits")
    return value


def nfc(text: str) -> str:
    """NFC-normalise: scanners on Windows and macOS shares deliver NFC and NFD respectively."""
    return unicodedata.normalize("NFC", text)


def display_name(raw: str) -> str:
    """A file name safe to *show* and store as metadata: NFC, no control chars, bounded length.

    The result is still never used as a path on central.
    """
    cleaned = "".join(ch if unicodedata.category(ch)[0] != "C" else "\ufffd" for ch in nfc(raw))
    cleaned = cleaned.replace("/", "\u2215").replace("\\", "\u2216")
    if len(cleaned) > MAX_NAME_CHARS:
        _stem, dot, ext = cleaned.rpartition(".")
        keep = ext if dot and len(ext) <= 10 else ""
        cleaned = cleaned[: MAX_NAME_CHARS - len(keep) - 2] + "…" + ("." + keep if keep else "")
    return cleaned or "unnamed"


_FOLD_EXTRA = str.maketrans({"đ": "d", "Đ": "D", "ð": "d", "Ð": "D"})


def fold(text: str) -> str:
    """Fold for diacritic-insensitive search: strip combining marks, đ→d, lower-case.

    ``fold("Quyết định")`` == ``"quyet dinh"``; folding both the index and the query lets a clerk
    type without Vietnamese input method and still find the document.
    """
    decomposed = unicodedata.normalize("NFD", text.translate(_FOLD_EXTRA))
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", stripped).casefold()
