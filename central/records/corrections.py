"""The document's archival metadata as the API shows it (extracted on the edge, corrected by operators),
operator corrections (validated, kept with who and when, each a fixity event), and their history.

The extracted values never change: they stay in ``documents.metadata`` (the package's own
``metadata.json``); a correction is a new row in ``metadata_corrections`` and the latest one per field
wins. SQL in plain functions that never commit.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from central import catalog
from central.catalog import fixity
from central.records import archive_jobs
from protocol.bag import DOCUMENT_FIELDS

# Longest accepted value per field (characters, after NFC): a number/symbol is short, a subject
# (trích yếu) can be a paragraph; protocol.bag caps extracted values at 2,000.
MAX_CHARS = {"so_ky_hieu": 100, "ngay": 10, "loai": 100, "co_quan": 300, "trich_yeu": 2000, "nguoi_ky": 200}
MAX_NOTE_CHARS = 500
EXTRACTED, CORRECTED = "extracted", "corrected"
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_SPACES = re.compile(r"\s+")
EARLIEST_YEAR = 1900   # older records exist, but a typo is far likelier than a 19th-century scan


class CorrectionError(ValueError):
    """A correction that cannot be accepted; names the field and the value."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


def clean_text(field: str, raw: object, *, limit: int | None = None) -> str:
    """NFC, whitespace runs made single spaces, no control or format characters, bounded length."""
    if not isinstance(raw, str):
        raise CorrectionError(f"{field} must be a string (or null to clear it)", field=field, value=raw)
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CorrectionError(f"{field} is not valid UTF-8 text", field=field) from exc
    text = _SPACES.sub(" ", unicodedata.normalize("NFC", raw)).strip()
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn")), None)
    if bad is not None:
        raise CorrectionError(f"{field} contains the control character U+{ord(bad):04X}", field=field,
                              value=raw[:80])
    if not text:
        raise CorrectionError(f"{field} is empty: send null to clear a field", field=field, value=raw[:80])
    maximum = limit if limit is not None else MAX_CHARS[field]
    if len(text) > maximum:
        raise CorrectionError(f"{field} is {len(text)} characters, at most {maximum} are accepted",
                              field=field, value=raw[:80])
    return text


def validate(field: str, raw: object) -> str | None:
    """The value to store for ``field`` (None clears it), or a CorrectionError saying why not."""
    if field not in DOCUMENT_FIELDS:
        raise CorrectionError(f"unknown field {field[:40]!r}: the fields are {', '.join(DOCUMENT_FIELDS)}",
                              field=field[:40])
    if raw is None:
        return None
    text = clean_text(field, raw)
    if field == "ngay":
        try:
            date = dt.date.fromisoformat(text) if _ISO_DATE.fullmatch(text) else None
        except ValueError:
            date = None
        if date is None:
            raise CorrectionError("ngay must be a real date written YYYY-MM-DD, e.g. 2025-03-14",
                                  field=field, value=text[:40])
        if not EARLIEST_YEAR <= date.year <= dt.datetime.now(dt.UTC).year + 1:
            raise CorrectionError(f"ngay {text} is outside {EARLIEST_YEAR}..next year", field=field,
                                  value=text)
    return text


def validate_changes(body: object) -> tuple[dict[str, str | None], str | None]:
    """A PATCH body ``{"ngay": "2025-03-14", "loai": null, "note": "why"}`` → (changes, note)."""
    if not isinstance(body, dict):
        raise CorrectionError('send a JSON object such as {"ngay": "2025-03-14"} (null clears a field)')
    fields = {str(k): v for k, v in body.items() if k != "note"}
    if not fields:
        raise CorrectionError(f"name at least one field to correct: {', '.join(DOCUMENT_FIELDS)}")
    changes = {name: validate(name, value) for name, value in fields.items()}
    note_raw = body.get("note")
    note = clean_text("note", note_raw, limit=MAX_NOTE_CHARS) if note_raw is not None else None
    return changes, note


# -- the current view -------------------------------------------------------------------------------------

def extracted(metadata_json: str) -> dict[str, dict[str, Any]]:
    """The edge's extracted fields from the stored package metadata (absent: not found)."""
    try:
        document = json.loads(metadata_json).get("document") or {}
    except (ValueError, AttributeError):
        return {}
    return {k: v for k, v in document.items() if k in DOCUMENT_FIELDS and isinstance(v, dict)}


@dataclass(frozen=True, slots=True)
class Correction:
    field: str
    value: str | None
    actor: str
    at: str


def latest_corrections(conn: sqlite3.Connection,
                       document_ids: Iterable[int]) -> dict[int, dict[str, Correction]]:
    ids = list(document_ids)
    found: dict[int, dict[str, Correction]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(f"SELECT document_id, field, value, actor, at FROM metadata_corrections"  # noqa: S608
                            f" WHERE document_id IN ({marks}) ORDER BY id", chunk)
        for row in rows:   # ascending: the latest correction of a field overwrites earlier ones
            found.setdefault(int(row[0]), {})[row[1]] = Correction(row[1], row[2], row[3], row[4])
    return found


def current(metadata_json: str, corrections: Mapping[str, Correction]) -> dict[str, dict[str, Any]]:
    """Every field, each ``{value, confidence, source}``: a correction wins over the extracted value
    (an operator's value has confidence 1; a cleared field has value null)."""
    found = extracted(metadata_json)
    view: dict[str, dict[str, Any]] = {}
    for name in DOCUMENT_FIELDS:
        correction = corrections.get(name)
        if correction is not None:
            view[name] = {"value": correction.value,
                          "confidence": 1.0 if correction.value is not None else None,
                          "source": CORRECTED, "corrected_by": correction.actor,
                          "corrected_at": correction.at}
        elif name in found:
            view[name] = {"value": found[name].get("value"), "confidence": found[name].get("confidence"),
                          "source": EXTRACTED}
        else:
            view[name] = {"value": None, "confidence": None, "source": None}
    return view


def document_view(conn: sqlite3.Connection, doc: dict[str, Any]) -> dict[str, Any]:
    """``catalog.get_document``'s dict as ``GET /api/documents/{id}`` shows it: ``metadata`` is the six
    archival fields, ``package_metadata`` what the edge sent, ``archival`` the archival copy's state."""
    corrections = latest_corrections(conn, [doc["id"]]).get(doc["id"], {})
    raw = doc["metadata"]
    doc["metadata"] = current(raw, corrections)
    doc["package_metadata"] = json.loads(raw)
    doc["archival"] = archive_jobs.job_view(conn, doc["sha256"])
    return doc


# -- corrections ------------------------------------------------------------------------------------------

def correct(conn: sqlite3.Connection, *, document_id: int, metadata_json: str,
            changes: Mapping[str, str | None], actor: str, note: str | None = None) -> list[str]:
    """Record each change that differs from the current value; return the fields changed.

    Each is a correction row and a fixity event (who, which field, from what, to what)."""
    now = catalog.utc_now()
    before = current(metadata_json, latest_corrections(conn, [document_id]).get(document_id, {}))
    changed = []
    for name, value in changes.items():
        previous, source = before[name]["value"], before[name]["source"]
        if (source == CORRECTED and value == previous) or (source is None and value is None):
            continue   # nothing new. (The extracted value sent back is recorded: an operator confirmed it.)
        conn.execute("INSERT INTO metadata_corrections (document_id, field, value, previous, actor, at, note)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", (document_id, name, value, previous, actor, now, note))
        fixity.add_event(conn, event="metadata_correction", actor=actor, document_id=document_id,
                         detail={"field": name, "from": previous, "to": value, "note": note}, at=now)
        changed.append(name)
    return changed


def history(conn: sqlite3.Connection, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per field, the extracted value (by the device, at arrival) then every correction, oldest first."""
    entries: list[dict[str, Any]] = []
    for name, value in extracted(doc["metadata"]).items():
        entries.append({"field": name, "value": value.get("value"), "confidence": value.get("confidence"),
                        "source": EXTRACTED, "actor": f"device:{doc['device']}", "at": doc["received_at"]})
    for row in conn.execute("SELECT field, value, previous, actor, at, note FROM metadata_corrections"
                            " WHERE document_id = ? ORDER BY id", (doc["id"],)):
        entry = {"field": row["field"], "value": row["value"], "previous": row["previous"],
                 "source": CORRECTED, "actor": row["actor"], "at": row["at"]}
        if row["note"]:
            entry["note"] = row["note"]
        entries.append(entry)
    order = {name: index for index, name in enumerate(DOCUMENT_FIELDS)}
    return sorted(entries, key=lambda e: order[e["field"]])   # stable: per field, extracted first
