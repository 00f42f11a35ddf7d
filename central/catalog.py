"""The catalog: SQLite schema and the plain SQL functions over it (devices, transfers, documents).

One writer connection (WAL, ``synchronous=FULL``) is owned by the ingest thread; the HTTP side reads
through its own connection. Functions take the connection explicitly and never commit on their own
unless their name says so, so the ingest can make a batch of changes durable with one commit.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol.names import fold
from protocol.transfer import HeldSegment

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id            TEXT PRIMARY KEY,
    verify_key    BLOB NOT NULL,
    enrolled_at   TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    online        INTEGER NOT NULL DEFAULT 0,
    last_seen     TEXT,
    backlog_docs  INTEGER NOT NULL DEFAULT 0,
    backlog_bytes INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    status_json   TEXT
);
CREATE TABLE IF NOT EXISTS documents (
    id             INTEGER PRIMARY KEY,
    device         TEXT NOT NULL REFERENCES devices (id),
    tid            TEXT NOT NULL UNIQUE,
    seq            INTEGER NOT NULL,
    filename       TEXT NOT NULL,
    sha256         TEXT NOT NULL UNIQUE,
    size           INTEGER NOT NULL,
    pages          INTEGER NOT NULL,
    media_type     TEXT NOT NULL,
    received_at    TEXT NOT NULL,
    text           TEXT NOT NULL,
    metadata       TEXT NOT NULL,
    package_sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_by_device ON documents (device, id);
-- "Stored today" on the fleet summary must not scan every document ever received.
CREATE INDEX IF NOT EXISTS documents_by_received ON documents (received_at);
-- Folded copies (protocol.names.fold) so 'quyet dinh' finds 'Quyết định'; rowid = documents.id.
CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5 (
    filename, text, tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TABLE IF NOT EXISTS transfers (
    tid         TEXT PRIMARY KEY,
    device      TEXT NOT NULL REFERENCES devices (id),
    seq         INTEGER NOT NULL,
    header      BLOB NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('receiving', 'stored', 'rejected')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    error       TEXT,
    error_class TEXT,
    document_id INTEGER REFERENCES documents (id),
    duplicate   INTEGER NOT NULL DEFAULT 0,
    receipt     BLOB,
    stored_at   TEXT,
    -- Replay protection: a sequence number is used by exactly one transfer of a device.
    UNIQUE (device, seq)
);
CREATE INDEX IF NOT EXISTS transfers_by_state ON transfers (state);
CREATE TABLE IF NOT EXISTS segments (
    tid    TEXT NOT NULL REFERENCES transfers (tid),
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    crc    INTEGER NOT NULL,
    PRIMARY KEY (tid, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fixity (
    id                INTEGER PRIMARY KEY,
    at                TEXT NOT NULL,
    event             TEXT NOT NULL,
    device            TEXT NOT NULL,
    tid               TEXT NOT NULL,
    document_id       INTEGER,
    original_sha256   TEXT,
    package_sha256    TEXT,
    ciphertext_sha256 TEXT,
    detail            TEXT
);
-- Who did what to the archive (logins, downloads of originals, revocations, tokens): append-only.
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY,
    at      TEXT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT,
    remote  TEXT,
    detail  TEXT
);
CREATE TABLE IF NOT EXISTS operators (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    pwhash     BLOB NOT NULL,
    created_at TEXT NOT NULL,
    disabled   INTEGER NOT NULL DEFAULT 0
);
-- Only sha256 of a token or session id is stored: a stolen catalog holds no usable credential.
CREATE TABLE IF NOT EXISTS api_tokens (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash    TEXT PRIMARY KEY,
    operator   TEXT NOT NULL REFERENCES operators (name),
    csrf       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the catalog; the writer creates the schema, readers only read."""
    if readonly:
        # Not SQLite's mode=ro: a WAL reader must still write the -shm index. query_only suffices.
        conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA query_only = ON")
    else:
        if not path.exists():
            # Document text and device keys live here: private from the first byte.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed segment row must survive power loss, or we would ack bytes we lost.
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.commit()
    return conn


# -- devices ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: str
    verify_key: bytes
    status: str


def add_device(conn: sqlite3.Connection, device_id: str, verify_key: bytes) -> None:
    conn.execute("INSERT INTO devices (id, verify_key, enrolled_at, status) VALUES (?, ?, ?, 'active')",
                 (device_id, verify_key, utc_now()))


def get_device(conn: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
    row = conn.execute("SELECT id, verify_key, status FROM devices WHERE id = ?", (device_id,)).fetchone()
    return DeviceRecord(row["id"], bytes(row["verify_key"]), row["status"]) if row else None


def set_device_status(conn: sqlite3.Connection, device_id: str, status: str) -> bool:
    cur = conn.execute("UPDATE devices SET status = ? WHERE id = ?", (status, device_id))
    return cur.rowcount == 1


def add_audit(conn: sqlite3.Connection, *, actor: str, action: str, target: str | None = None,
              remote: str | None = None, detail: str | None = None) -> None:
    conn.execute("INSERT INTO audit (at, actor, action, target, remote, detail) VALUES (?, ?, ?, ?, ?, ?)",
                 (utc_now(), actor, action, target, remote, detail))


def list_audit(conn: sqlite3.Connection, limit: int = 1000) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT id, at, actor, action, target, remote, detail FROM audit"
                        " ORDER BY id DESC LIMIT ?", (limit,))
    return [dict(r) for r in rows]


def touch_devices(conn: sqlite3.Connection, device_ids: Iterable[str], at: str) -> None:
    conn.executemany("UPDATE devices SET last_seen = ? WHERE id = ?", [(at, d) for d in device_ids])


def update_device_status(conn: sqlite3.Connection, device_id: str, *, online: bool, backlog_docs: int,
                         backlog_bytes: int, last_error: str | None, status_json: str, at: str) -> None:
    conn.execute(
        "UPDATE devices SET online = ?, backlog_docs = ?, backlog_bytes = ?, last_error = ?,"
        " status_json = ?, last_seen = ? WHERE id = ?",
        (int(online), backlog_docs, backlog_bytes, last_error, status_json, at, device_id))


def mark_offline(conn: sqlite3.Connection, device_id: str, *, at: str) -> None:
    """The box's last will: offline now; everything it last reported stays as it was."""
    conn.execute("UPDATE devices SET online = 0, last_seen = ? WHERE id = ?", (at, device_id))


# A backlog older than this is a problem even on a box that is online and reports no error.
STALE_BACKLOG_S = 6 * 3600

# Problem rank, worst first: offline with documents stuck on the box, then a reported error, then
# a backlog that is not draining, then merely offline; revoked boxes are nobody's problem any more.
_PROBLEM = f"""CASE
    WHEN d.status != 'active' THEN -1
    WHEN d.online = 0 AND d.backlog_docs > 0 THEN 4
    WHEN coalesce(d.last_error, '') != '' THEN 3
    WHEN d.backlog_docs > 0 AND {{age}} >= {STALE_BACKLOG_S} THEN 2
    WHEN d.online = 0 THEN 1
    ELSE 0 END"""
_PROBLEM_NAMES = {4: "offline with backlog", 3: "error", 2: "stale backlog", 1: "offline"}
# The age the box reported with its retained status; only meaningful while it holds a backlog.
_OLDEST_AGE = ("CASE WHEN d.backlog_docs > 0 THEN"
               " coalesce(json_extract(d.status_json, '$.oldest_age_s'), 0) ELSE 0 END")
# One grouped pass, not a correlated subquery: SQLite plans that per device through the state index,
# which at 200k transfers and 3,000 devices took about a minute.
_LAST_RECEIPTS = ("LEFT JOIN (SELECT device, max(stored_at) AS last_receipt FROM transfers"
                  " WHERE state = 'stored' GROUP BY device) r ON r.device = d.id")

# Sortable columns -> SQL; a whitelist, so a query parameter never becomes SQL text.
DEVICE_SORTS: dict[str, str] = {
    "id": "d.id", "status": "d.status", "online": "d.online", "last_seen": "d.last_seen",
    "backlog_docs": "d.backlog_docs", "backlog_bytes": "d.backlog_bytes", "last_error": "d.last_error",
    "oldest_age_s": "oldest_age_s", "last_receipt": "last_receipt", "problems": "problem_rank",
}


@dataclass(frozen=True, slots=True)
class DevicePage:
    rows: list[dict[str, Any]]
    total: int   # devices matching the filter, whatever the page


def query_devices(conn: sqlite3.Connection, *, sort: str = "id", descending: bool = False,
                  q: str | None = None, limit: int | None = None, offset: int = 0) -> DevicePage:
    """One page of devices, sorted and filtered in SQL; ``q`` is a case-insensitive id substring.

    Ties are broken by id so pages never overlap or skip a device. ``sort="problems"`` with
    ``descending=True`` puts the worst first, and the oldest backlog first within a rank.
    """
    if sort not in DEVICE_SORTS:
        raise ValueError(f"cannot sort devices by {sort!r}")
    where, params = ("WHERE instr(lower(d.id), lower(?)) > 0", [q]) if q else ("", [])
    total = int(conn.execute(f"SELECT count(*) FROM devices d {where}", params).fetchone()[0])  # noqa: S608
    direction = "DESC" if descending else "ASC"
    keys = [f"{DEVICE_SORTS[sort]} {direction} NULLS LAST"]
    if sort == "problems":
        keys += [f"oldest_age_s {direction}", f"d.backlog_docs {direction}"]
    keys.append("d.id ASC")
    # The receipt time costs a lookup per device: for a small page, look up only that page's devices
    # afterwards (one IN query); sorting by it or listing everything joins one grouped pass instead.
    receipt_in_page = sort == "last_receipt" or limit is None or limit > 1000
    sql = (f"SELECT d.id, d.status, d.online, d.last_seen, d.backlog_docs, d.backlog_bytes,"  # noqa: S608
           f" d.last_error, {_OLDEST_AGE} AS oldest_age_s,"
           f" {_PROBLEM.format(age=_OLDEST_AGE)} AS problem_rank"
           f"{', r.last_receipt' if receipt_in_page else ''}"
           f" FROM devices d {_LAST_RECEIPTS if receipt_in_page else ''} {where}"
           f" ORDER BY {', '.join(keys)} LIMIT ? OFFSET ?")
    rows = conn.execute(sql, [*params, -1 if limit is None else limit, offset]).fetchall()
    receipts: dict[str, str | None] = {}
    if rows and not receipt_in_page:
        ids = [r["id"] for r in rows]
        marks = ",".join("?" * len(ids))
        receipts = dict(conn.execute(
            f"SELECT device, max(stored_at) FROM transfers WHERE state = 'stored'"  # noqa: S608
            f" AND device IN ({marks}) GROUP BY device", ids).fetchall())
    return DevicePage([{
        "id": r["id"], "status": r["status"], "online": bool(r["online"]), "last_seen": r["last_seen"],
        "backlog_docs": r["backlog_docs"], "backlog_bytes": r["backlog_bytes"],
        "last_receipt": r["last_receipt"] if receipt_in_page else receipts.get(r["id"]),
        "last_error": r["last_error"], "oldest_age_s": r["oldest_age_s"],
        "problem": _PROBLEM_NAMES.get(r["problem_rank"]),
    } for r in rows], total)


def list_devices(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every device by id (the original unpaged shape of ``GET /api/devices``)."""
    return query_devices(conn).rows


def fleet_summary(conn: sqlite3.Connection, *, today_since: str) -> dict[str, Any]:
    """Fleet-wide counts for the dashboard header, aggregated in SQL (one pass over devices).

    Online/offline count active devices only, so total = online + offline + revoked. Backlog and
    errors count active devices too: a revoked box's queue will never be accepted.
    """
    d = conn.execute(
        "SELECT count(*) AS total,"
        " coalesce(sum(d.status = 'active' AND d.online = 1), 0) AS online,"
        " coalesce(sum(d.status = 'active' AND d.online = 0), 0) AS offline,"
        " coalesce(sum(d.status != 'active'), 0) AS revoked,"
        " coalesce(sum(d.status = 'active' AND coalesce(d.last_error, '') != ''), 0) AS with_error,"
        " coalesce(sum(d.status = 'active' AND d.backlog_docs > 0), 0) AS with_backlog,"
        " coalesce(sum(d.status = 'active' AND d.online = 0 AND d.backlog_docs > 0), 0)"
        "   AS offline_with_backlog,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_docs END), 0) AS backlog_docs,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_bytes END), 0) AS backlog_bytes"
        " FROM devices d").fetchone()
    oldest = conn.execute(
        f"SELECT d.id, {_OLDEST_AGE} AS age FROM devices d"  # noqa: S608
        " WHERE d.status = 'active' AND d.backlog_docs > 0 ORDER BY age DESC, d.id LIMIT 1").fetchone()
    docs_total, bytes_stored = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM documents").fetchone()
    docs_today = conn.execute("SELECT count(*) FROM documents WHERE received_at >= ?",
                              (today_since,)).fetchone()[0]
    return {
        "devices": {k: int(d[k]) for k in ("total", "online", "offline", "revoked", "with_error",
                                           "with_backlog", "offline_with_backlog")},
        "backlog": {"docs": int(d["backlog_docs"]), "bytes": int(d["backlog_bytes"]),
                    "oldest_age_s": float(oldest["age"]) if oldest else None,
                    "oldest_device": oldest["id"] if oldest else None},
        "documents": {"total": int(docs_total), "bytes": int(bytes_stored), "today": int(docs_today),
                      "today_since": today_since},
    }


# -- transfers and the segment log -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TransferRecord:
    tid: str
    device: str
    seq: int
    header: bytes
    state: str
    error: str | None
    error_class: str | None
    receipt: bytes | None


def _transfer(row: sqlite3.Row | None) -> TransferRecord | None:
    if row is None:
        return None
    return TransferRecord(row["tid"], row["device"], row["seq"], bytes(row["header"]), row["state"],
                          row["error"], row["error_class"],
                          bytes(row["receipt"]) if row["receipt"] is not None else None)


_TRANSFER_COLUMNS = "tid, device, seq, header, state, error, error_class, receipt"


def get_transfer(conn: sqlite3.Connection, tid: str) -> TransferRecord | None:
    return _transfer(conn.execute(f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE tid = ?",  # noqa: S608
                                  (tid,)).fetchone())


def transfer_by_seq(conn: sqlite3.Connection, device: str, seq: int) -> TransferRecord | None:
    return _transfer(conn.execute(
        f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE device = ? AND seq = ?",  # noqa: S608
        (device, seq)).fetchone())


def insert_transfer(conn: sqlite3.Connection, *, tid: str, device: str, seq: int, header: bytes) -> None:
    now = utc_now()
    conn.execute("INSERT INTO transfers (tid, device, seq, header, state, created_at, updated_at)"
                 " VALUES (?, ?, ?, ?, 'receiving', ?, ?)", (tid, device, seq, header, now, now))


def reject_transfer(conn: sqlite3.Connection, tid: str, error: str, error_class: str) -> None:
    conn.execute("UPDATE transfers SET state = 'rejected', error = ?, error_class = ?, updated_at = ?"
                 " WHERE tid = ?", (error, error_class, utc_now(), tid))


def store_transfer(conn: sqlite3.Connection, tid: str, *, document_id: int, duplicate: bool,
                   receipt: bytes, stored_at: str) -> None:
    conn.execute("UPDATE transfers SET state = 'stored', document_id = ?, duplicate = ?, receipt = ?,"
                 " stored_at = ?, updated_at = ? WHERE tid = ?",
                 (document_id, int(duplicate), receipt, stored_at, stored_at, tid))
    # The segment log is only needed to resume; the stored objects are now the truth.
    conn.execute("DELETE FROM segments WHERE tid = ?", (tid,))


def add_segments(conn: sqlite3.Connection, tid: str, segments: Iterable[HeldSegment]) -> None:
    conn.executemany("INSERT OR IGNORE INTO segments (tid, offset, length, crc) VALUES (?, ?, ?, ?)",
                     [(tid, s.offset, s.length, s.crc) for s in segments])


def held_segments(conn: sqlite3.Connection, tid: str) -> list[HeldSegment]:
    rows = conn.execute("SELECT offset, length, crc FROM segments WHERE tid = ? ORDER BY offset", (tid,))
    return [HeldSegment(r["offset"], r["length"], r["crc"]) for r in rows]


def count_active_transfers(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM transfers WHERE state = 'receiving'").fetchone()[0])


# -- documents and search -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NewDocument:
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


def document_by_sha256(conn: sqlite3.Connection, sha256: str) -> int | None:
    row = conn.execute("SELECT id FROM documents WHERE sha256 = ?", (sha256,)).fetchone()
    return int(row[0]) if row else None


def insert_document(conn: sqlite3.Connection, doc: NewDocument) -> int:
    cur = conn.execute(
        "INSERT INTO documents (device, tid, seq, filename, sha256, size, pages, media_type, received_at,"
        " text, metadata, package_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (doc.device, doc.tid, doc.seq, doc.filename, doc.sha256, doc.size, doc.pages, doc.media_type,
         doc.received_at, doc.text, doc.metadata, doc.package_sha256))
    doc_id = int(cur.lastrowid or 0)
    conn.execute("INSERT INTO documents_fts (rowid, filename, text) VALUES (?, ?, ?)",
                 (doc_id, fold(doc.filename), fold(doc.text)))
    return doc_id


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


_SUMMARY = "d.id, d.device, d.filename, d.sha256, d.size, d.pages, d.media_type, d.received_at"


def _summary(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "device": row["device"], "filename": row["filename"], "sha256": row["sha256"],
            "size": row["size"], "pages": row["pages"], "media_type": row["media_type"],
            "received_at": row["received_at"]}


def search_documents(conn: sqlite3.Connection, *, device: str | None = None, q: str | None = None,
                     limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    source = "documents d"
    if q:
        match = fts_query(q)
        if match is None:
            return []
        source = "documents_fts f JOIN documents d ON d.id = f.rowid"
        clauses.append("documents_fts MATCH ?")
        params.append(match)
    if device:
        clauses.append("d.device = ?")
        params.append(device)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {_SUMMARY} FROM {source}{where} ORDER BY d.id DESC LIMIT ? OFFSET ?"  # noqa: S608
    return [_summary(r) for r in conn.execute(sql, [*params, limit, offset])]


def get_document(conn: sqlite3.Connection, doc_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_SUMMARY}, d.text, d.metadata, d.tid, d.seq, d.package_sha256"  # noqa: S608
                       " FROM documents d WHERE d.id = ?", (doc_id,)).fetchone()
    if row is None:
        return None
    doc = _summary(row)
    doc.update(text=row["text"], metadata=row["metadata"], tid=row["tid"], seq=row["seq"],
               package_sha256=row["package_sha256"])
    return doc


@dataclass(frozen=True, slots=True)
class CatalogTotals:
    documents: int
    bytes_stored: int
    transfers_active: int
    devices_online: int


def totals(conn: sqlite3.Connection) -> CatalogTotals:
    docs, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM documents").fetchone()
    online = conn.execute("SELECT count(*) FROM devices WHERE online = 1").fetchone()[0]
    return CatalogTotals(int(docs), int(size), count_active_transfers(conn), int(online))
