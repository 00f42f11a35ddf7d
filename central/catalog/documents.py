"""Objects (content once), documents (one per arrival), notices, fixity events and search."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from central.catalog.devices import _ONLINE, fresh_since
from central.catalog.schema import _STORED, text_sha256
from central.catalog.transfers import count_active_transfers
from protocol.names import fold


@dataclass(frozen=True, slots=True)
class NewDocument:
    """One arrival to catalogue; ``size`` and ``media_type`` describe its stored object."""

    device: str
    tid: str
    seq: int
    filename: str
    sha256: str
    size: int
    pages: int
    media_type: str
    received_at: str
    text: str
    metadata: str
    package_sha256: str
    captured_at: str

    @property
    def key(self) -> ArrivalKey:
        return ArrivalKey(self.device, self.sha256, self.filename, self.captured_at, text_sha256(self.text))


@dataclass(frozen=True, slots=True)
class ArrivalKey:
    """What makes two transfers the same arrival: the same box sent the same bytes under the same
    name, captured at the same time, with the same text. Anything else is a new arrival."""

    device: str
    sha256: str
    filename: str
    captured_at: str
    text_sha256: str


def object_exists(conn: sqlite3.Connection, sha256: str) -> bool:
    return conn.execute("SELECT 1 FROM objects WHERE sha256 = ?", (sha256,)).fetchone() is not None


def arrival_by_key(conn: sqlite3.Connection, key: ArrivalKey) -> int | None:
    row = conn.execute("SELECT id FROM documents WHERE device = ? AND sha256 = ? AND filename = ?"
                       " AND captured_at = ? AND text_sha256 = ?",
                       (key.device, key.sha256, key.filename, key.captured_at, key.text_sha256)).fetchone()
    return int(row[0]) if row else None


def documents_with_content(conn: sqlite3.Connection, sha256: str) -> list[int]:
    """Ids of every arrival whose original has this sha256, oldest first."""
    rows = conn.execute("SELECT id FROM documents WHERE sha256 = ? ORDER BY id", (sha256,))
    return [int(r[0]) for r in rows]


AWAITING = "awaiting_original"


def insert_document(conn: sqlite3.Connection, doc: NewDocument, *, awaiting: bool = False) -> int:
    """Catalogue a new arrival (and its object, the first time that content is stored). ``awaiting``:
    from its notice, before the original is stored (no object yet; searchable all the same)."""
    if not awaiting:
        conn.execute("INSERT INTO objects (sha256, size, media_type, stored_at) VALUES (?, ?, ?, ?)"
                     " ON CONFLICT (sha256) DO NOTHING",
                     (doc.sha256, doc.size, doc.media_type, doc.received_at))
    key = doc.key
    cur = conn.execute(
        "INSERT INTO documents (device, tid, seq, filename, sha256, captured_at, text_sha256, pages,"
        " received_at, text, metadata, package_sha256, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (doc.device, doc.tid, doc.seq, doc.filename, doc.sha256, doc.captured_at, key.text_sha256, doc.pages,
         doc.received_at, doc.text, doc.metadata, doc.package_sha256, AWAITING if awaiting else "stored"))
    doc_id = int(cur.lastrowid or 0)
    conn.execute("INSERT INTO documents_fts (rowid, filename, text) VALUES (?, ?, ?)",
                 (doc_id, fold(doc.filename), fold(doc.text)))
    return doc_id


def complete_document(conn: sqlite3.Connection, doc_id: int, doc: NewDocument) -> None:
    """The original of an arrival catalogued from its notice is stored: the same row (same id, so
    whatever a clerk found or bookmarked stays valid) takes the package's name, text and metadata,
    which are authoritative, and its object; an archival-copy job is made at once if the job
    reconciler's cursor has already passed this id (``central.records.archive_jobs.enqueue_new``)."""
    conn.execute("INSERT INTO objects (sha256, size, media_type, stored_at) VALUES (?, ?, ?, ?)"
                 " ON CONFLICT (sha256) DO NOTHING", (doc.sha256, doc.size, doc.media_type, doc.received_at))
    conn.execute(
        "UPDATE documents SET filename = ?, sha256 = ?, captured_at = ?, text_sha256 = ?, pages = ?,"
        " received_at = ?, text = ?, metadata = ?, package_sha256 = ?, state = 'stored' WHERE id = ?",
        (doc.filename, doc.sha256, doc.captured_at, doc.key.text_sha256, doc.pages, doc.received_at, doc.text,
         doc.metadata, doc.package_sha256, doc_id))
    conn.execute("DELETE FROM documents_fts WHERE rowid = ?", (doc_id,))
    conn.execute("INSERT INTO documents_fts (rowid, filename, text) VALUES (?, ?, ?)",
                 (doc_id, fold(doc.filename), fold(doc.text)))
    conn.execute(
        "INSERT INTO archive_jobs (sha256, document_id, state, next_attempt_at, created_at, updated_at)"
        " SELECT ?, ?, 'pending', ?, ?, ?"
        " WHERE ? <= (SELECT last_document_id FROM archive_cursor WHERE id = 1)"
        " ON CONFLICT (sha256) DO NOTHING",
        (doc.sha256, doc_id, doc.received_at, doc.received_at, doc.received_at, doc_id))


def drop_awaiting_document(conn: sqlite3.Connection, doc_id: int, *, successor: int) -> None:
    """Remove an arrival catalogued from a notice whose original turned out to be another (or to be an
    arrival already catalogued): the original's transfer is catalogued on its own terms instead, as
    ``successor``. The drop's notice names the successor, and operators' corrections of the awaiting
    row move to it (they are about this drop; deleting them failed on their foreign key)."""
    conn.execute("UPDATE notices SET document_id = ? WHERE document_id = ?", (successor, doc_id))
    conn.execute("UPDATE metadata_corrections SET document_id = ? WHERE document_id = ?", (successor, doc_id))
    conn.execute("DELETE FROM documents_fts WHERE rowid = ?", (doc_id,))
    conn.execute("DELETE FROM documents WHERE id = ? AND state = 'awaiting_original'", (doc_id,))


@dataclass(frozen=True, slots=True)
class AwaitingDocument:
    id: int
    sha256: str   # the original the notice announced


def awaiting_document(conn: sqlite3.Connection, *, device: str | None = None, tid: str | None = None,
                      doc_id: int | None = None) -> AwaitingDocument | None:
    """The arrival awaiting its original, by the device and transfer its notice named, or by id."""
    if doc_id is not None:
        row = conn.execute("SELECT id, sha256 FROM documents WHERE id = ? AND state = 'awaiting_original'",
                           (doc_id,)).fetchone()
    else:
        row = conn.execute("SELECT id, sha256 FROM documents WHERE tid = ? AND device = ?"
                           " AND state = 'awaiting_original'", (tid, device)).fetchone()
    return AwaitingDocument(int(row[0]), str(row[1])) if row else None


@dataclass(frozen=True, slots=True)
class NoticeRecord:
    tid: str
    device: str
    seq: int
    payload_sha256: str
    document_id: int | None


def get_notice(conn: sqlite3.Connection, tid: str) -> NoticeRecord | None:
    row = conn.execute("SELECT tid, device, seq, payload_sha256, document_id FROM notices WHERE tid = ?",
                       (tid,)).fetchone()
    return NoticeRecord(*tuple(row)) if row else None


def notice_by_seq(conn: sqlite3.Connection, device: str, seq: int) -> NoticeRecord | None:
    row = conn.execute("SELECT tid, device, seq, payload_sha256, document_id FROM notices"
                       " WHERE device = ? AND seq = ?", (device, seq)).fetchone()
    return NoticeRecord(*tuple(row)) if row else None


def insert_notice(conn: sqlite3.Connection, *, tid: str, device: str, seq: int, payload_sha256: str,
                  document_id: int | None, at: str) -> None:
    conn.execute("INSERT INTO notices (tid, device, seq, payload_sha256, document_id, received_at)"
                 " VALUES (?, ?, ?, ?, ?, ?)", (tid, device, seq, payload_sha256, document_id, at))


def awaiting_load(conn: sqlite3.Connection, device: str) -> tuple[int, int]:
    """How many of a device's arrivals await their original, and their text's bytes (its quota)."""
    row = conn.execute("SELECT count(*), coalesce(sum(length(CAST(text AS BLOB))), 0) FROM documents"
                       " WHERE device = ? AND state = 'awaiting_original'", (device,)).fetchone()
    return int(row[0]), int(row[1])


def add_fixity(conn: sqlite3.Connection, *, event: str, device: str, tid: str, at: str,
               document_id: int | None = None, original_sha256: str | None = None,
               package_sha256: str | None = None, ciphertext_sha256: str | None = None,
               detail: str | None = None) -> None:
    conn.execute(
        "INSERT INTO fixity (at, event, device, tid, document_id, original_sha256, package_sha256,"
        " ciphertext_sha256, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (at, event, device, tid, document_id, original_sha256, package_sha256, ciphertext_sha256, detail))


_WORD = re.compile(r"\w+")


def fts_query(q: str) -> str | None:
    """Folded words of ``q`` as quoted FTS5 terms (implicit AND); None if there are none.

    Quoting every word means user input can never be parsed as FTS5 syntax (NEAR, *, columns...).
    """
    words = _WORD.findall(fold(q))
    return " ".join(f'"{w}"' for w in words) if words else None


# An arrival awaiting its original has no object yet: its size and type are what its notice announced.
_SUMMARY = ("d.id, d.device, d.filename, d.sha256,"
            " coalesce(o.size, json_extract(d.metadata, '$.original_size')) AS size, d.pages,"
            " coalesce(o.media_type, json_extract(d.metadata, '$.media_type')) AS media_type, d.captured_at,"
            " d.received_at, d.state,"
            # Why an original has not come: its transfer was refused (the scan went back to the
            # commune's clerk with the reason), on its way, or its box revoked (replaced by a box that
            # will send it when its held scans are retried, or not replaced: the operator must act).
            " CASE WHEN d.state != 'awaiting_original' THEN NULL"
            "  WHEN EXISTS (SELECT 1 FROM transfers t WHERE t.tid = d.tid AND t.state = 'rejected')"
            "   THEN 'transfer_refused'"
            "  WHEN dv.status = 'active' THEN 'on_its_way'"
            "  WHEN EXISTS (SELECT 1 FROM devices r WHERE r.replaces = d.device) THEN 'box_replaced'"
            "  ELSE 'box_revoked' END AS awaiting_reason")
_WITH_OBJECT = ("LEFT JOIN objects o ON o.sha256 = d.sha256 AND d.state = 'stored'"
                " LEFT JOIN devices dv ON dv.id = d.device AND d.state = 'awaiting_original'")
# Archived arrivals: what counts and totals count (one awaiting its original is not archived yet).


def _summary(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "device": row["device"], "filename": row["filename"], "sha256": row["sha256"],
            "size": row["size"], "pages": row["pages"], "media_type": row["media_type"],
            "captured_at": row["captured_at"], "received_at": row["received_at"], "state": row["state"],
            "awaiting_reason": row["awaiting_reason"]}


def _arrivals(*, q: str | None, device: str | None, received_from: str | None = None,
              received_before: str | None = None) -> tuple[str, str, list[Any]] | None:
    """FROM and WHERE (and their parameters) for arrivals filtered by search terms, device and
    reception time; ``None`` when ``q`` holds no searchable word (nothing can match)."""
    clauses: list[str] = []
    params: list[Any] = []
    source = f"documents d {_WITH_OBJECT}"
    if q:
        match = fts_query(q)
        if match is None:
            return None
        source = f"documents_fts f JOIN documents d ON d.id = f.rowid {_WITH_OBJECT}"
        clauses.append("documents_fts MATCH ?")
        params.append(match)
    for clause, value in (("d.device = ?", device), ("d.received_at >= ?", received_from),
                          ("d.received_at < ?", received_before)):
        if value:
            clauses.append(clause)
            params.append(value)
    return source, f" WHERE {' AND '.join(clauses)}" if clauses else "", params


def search_documents(conn: sqlite3.Connection, *, device: str | None = None, q: str | None = None,
                     limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Arrivals, newest first: ``device`` lists what that box sent, ``q`` searches their text."""
    found = _arrivals(q=q, device=device)
    if found is None:
        return []
    source, where, params = found
    sql = f"SELECT {_SUMMARY} FROM {source}{where} ORDER BY d.id DESC LIMIT ? OFFSET ?"  # noqa: S608
    return [_summary(r) for r in conn.execute(sql, [*params, limit, offset])]


MAX_SAME_CONTENT = 100


def get_document(conn: sqlite3.Connection, doc_id: int) -> dict[str, Any] | None:
    """One arrival with its text and metadata; ``same_content`` lists other arrivals of its bytes."""
    row = conn.execute(f"SELECT {_SUMMARY}, d.text, d.metadata, d.tid, d.seq, d.package_sha256"  # noqa: S608
                       f" FROM documents d {_WITH_OBJECT} WHERE d.id = ?", (doc_id,)).fetchone()
    if row is None:
        return None
    doc = _summary(row)
    # Only bytes central received and verified are "the same content": a notice's sha256 is a
    # claim, and an unverified one must not link one commune's stored circular to another's.
    same = [] if row["state"] != "stored" else [int(r[0]) for r in conn.execute(
        f"SELECT id FROM documents WHERE sha256 = ? AND id != ? AND {_STORED} ORDER BY id LIMIT ?",  # noqa: S608
        (row["sha256"], doc_id, MAX_SAME_CONTENT))]
    doc.update(text=row["text"], metadata=row["metadata"], tid=row["tid"], seq=row["seq"],
               package_sha256=row["package_sha256"], same_content=same)
    return doc


@dataclass(frozen=True, slots=True)
class CatalogTotals:
    documents: int        # arrivals
    bytes_stored: int     # originals, each stored once
    transfers_active: int
    devices_online: int


def totals(conn: sqlite3.Connection, *, now: datetime | None = None) -> CatalogTotals:
    docs = conn.execute(f"SELECT count(*) FROM documents WHERE {_STORED}").fetchone()[0]  # noqa: S608
    size = conn.execute("SELECT coalesce(sum(size), 0) FROM objects").fetchone()[0]
    online = conn.execute(f"SELECT count(*) FROM devices d WHERE {_ONLINE}",  # noqa: S608
                          {"fresh_since": fresh_since(now)}).fetchone()[0]
    return CatalogTotals(int(docs), int(size), count_active_transfers(conn), int(online))
