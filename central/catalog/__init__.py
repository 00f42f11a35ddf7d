"""The catalog: SQLite schema and the plain SQL functions over it (devices, transfers, documents).

One writer connection (WAL, ``synchronous=FULL``) is owned by the ingest thread; the HTTP side reads
through its own connection. Functions take the connection explicitly and never commit on their own
unless their name says so, so the ingest can make a batch of changes durable with one commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from central.catalog import records_schema
from central.errors import CatalogError
from protocol.errors import ProtocolError
from protocol.names import fold
from protocol.ranges import RangeSet
from protocol.transfer import HeldSegment

log = logging.getLogger("sohoa.central.catalog")

# v2 (issue 7): content once, provenance per arrival — ``objects`` holds one row per stored original,
# ``documents`` one row per arrival; devices carry the possible-clone flag. v3 (issues 10 and 11):
# hourly ``device_history`` for the device page's chart; transfer state lives in the catalog (signed
# size, held ranges) so several workers can share it, segments point into the shared segment journal,
# ``jobs`` holds assemblies to run. v4 (issue 9): archival-copy jobs, metadata corrections, fixity
# events beyond ingest (``central.catalog.records_schema``). v5 (issue 9, progressive sync): a document may be
# catalogued from its notice before its original is stored (``state`` 'awaiting_original', no object
# yet, so ``documents.sha256`` no longer references ``objects``), and ``notices`` records each notice
# taken. v6 (issue 7, hostile devices): per-device admission state on ``devices`` (init token
# bucket, rejected-transfer budget) and the ``expired`` transfer state. v7 (a box replaced): a
# device may name the revoked device it replaces (``devices.replaces``), so the originals the old box
# announced in notices and never sent complete those arrivals when the new box sends them. See
# ``_MIGRATIONS``.
SCHEMA_VERSION = 7
# ``SCHEMA`` below creates this version; a new catalog then runs the later steps like an old one.
SCHEMA_BASE_VERSION = 3

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
    status_json   TEXT,
    -- Set when a validly signed init reused a sequence number of another transfer (two boxes, one
    -- identity); cleared by an admin (``sohoa central device clear-clone``). NULL: no suspicion.
    possible_clone_since TEXT,
    -- Admission (central.ingest.quota): the init token bucket and the rejected-transfer bucket, each a
    -- level and when it was computed (epoch seconds), and since when the device is over its budget of
    -- rejected transfers (NULL: within it; cleared by the reconciler after a clean window).
    -- The revoked device this one replaces (``sohoa central enroll NEW --replaces OLD``): its
    -- arrivals still awaiting their originals are completed by the same bytes sent by this one.
    replaces          TEXT REFERENCES devices (id),
    init_tokens       REAL,
    init_tokens_at    REAL,
    strikes           REAL NOT NULL DEFAULT 0,
    strikes_at        REAL,
    misbehaving_since TEXT
);
-- One row per stored original (content-addressed: the file is objects/<sha256>).
CREATE TABLE IF NOT EXISTS objects (
    sha256     TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    stored_at  TEXT NOT NULL
) WITHOUT ROWID;
-- One row per arrival: who sent it, under which name, captured when, with which text. Several
-- arrivals (communes) may point at one object; the same arrival sent again maps to its row.
CREATE TABLE IF NOT EXISTS documents (
    id             INTEGER PRIMARY KEY,
    device         TEXT NOT NULL REFERENCES devices (id),
    tid            TEXT NOT NULL UNIQUE,   -- the transfer that first brought this arrival
    seq            INTEGER NOT NULL,
    filename       TEXT NOT NULL,
    sha256         TEXT NOT NULL REFERENCES objects (sha256),
    captured_at    TEXT NOT NULL,
    text_sha256    TEXT NOT NULL,
    pages          INTEGER NOT NULL,
    received_at    TEXT NOT NULL,
    text           TEXT NOT NULL,
    metadata       TEXT NOT NULL,
    package_sha256 TEXT NOT NULL,
    -- The arrival's natural key: a transfer with the same key is the same arrival (idempotent).
    UNIQUE (device, sha256, filename, captured_at, text_sha256)
);
CREATE INDEX IF NOT EXISTS documents_by_device ON documents (device, id);
-- "Stored today" on the fleet summary must not scan every document ever received.
CREATE INDEX IF NOT EXISTS documents_by_received ON documents (received_at);
CREATE INDEX IF NOT EXISTS documents_by_sha256 ON documents (sha256, id);
-- Folded copies (protocol.names.fold) so 'quyet dinh' finds 'Quyết định'; rowid = documents.id.
CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5 (
    filename, text, tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TABLE IF NOT EXISTS transfers (
    tid         TEXT PRIMARY KEY,
    device      TEXT NOT NULL REFERENCES devices (id),
    seq         INTEGER NOT NULL,
    header      BLOB NOT NULL,
    -- expired: no progress for ``ingest.expire_after_hours``; its bytes are freed, a late segment or
    -- fin is answered UNKNOWN and its init starts it again from zero (as a new admission).
    state       TEXT NOT NULL CHECK (state IN ('receiving', 'stored', 'rejected', 'expired')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    error       TEXT,
    error_class TEXT,
    document_id INTEGER REFERENCES documents (id),
    duplicate   INTEGER NOT NULL DEFAULT 0,
    receipt     BLOB,
    stored_at   TEXT,
    -- The signed ciphertext size, and what is durably held of it (coalesced [start, end) ranges as
    -- JSON): the transfer's state for every worker, not a cache in one process (issue 11).
    size        INTEGER,
    held        TEXT NOT NULL DEFAULT '[]',
    held_bytes  INTEGER NOT NULL DEFAULT 0,
    -- Replay protection: a sequence number is used by exactly one transfer of a device.
    UNIQUE (device, seq)
);
CREATE INDEX IF NOT EXISTS transfers_by_state ON transfers (state);
-- A device's stored transfers by time: its last receipt, its page's hourly throughput (issue 10).
CREATE INDEX IF NOT EXISTS transfers_by_device ON transfers (device, state, stored_at);
-- Validly signed inits refused because their (device, seq) belongs to another transfer.
CREATE TABLE IF NOT EXISTS seq_collisions (
    device     TEXT NOT NULL REFERENCES devices (id),
    tid        TEXT NOT NULL,      -- the refused transfer
    seq        INTEGER NOT NULL,
    other_tid  TEXT NOT NULL,      -- the transfer that holds (device, seq)
    first_seen TEXT NOT NULL,
    last_seen  TEXT NOT NULL,
    PRIMARY KEY (device, tid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments (
    tid    TEXT NOT NULL REFERENCES transfers (tid),
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    crc    INTEGER NOT NULL,
    -- Where the bytes are: a segment journal file under staging/ and the position in it; NULL for
    -- segments staged before issue 11, which are in staging/<tid>.part at their offset.
    log    TEXT,
    pos    INTEGER,
    PRIMARY KEY (tid, offset)
) WITHOUT ROWID;
-- A journal file may be deleted once no segment points into it.
CREATE INDEX IF NOT EXISTS segments_by_log ON segments (log);
-- Work that any worker may pick up (DESIGN §8: background jobs live in the catalog): today the
-- assembly of a transfer whose bytes are all held. A claim is a lease; an expired one is taken over.
CREATE TABLE IF NOT EXISTS jobs (
    tid         TEXT PRIMARY KEY REFERENCES transfers (tid),
    kind        TEXT NOT NULL CHECK (kind IN ('assemble')),
    created_at  TEXT NOT NULL,
    claimed_by  TEXT,
    lease_until TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT
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
-- One row per device per hour it spoke in (UTC 'YYYY-MM-DDTHH'): the largest backlog it reported and how
-- many of the samples found it online; written by central's presence task, kept HISTORY_DAYS.
CREATE TABLE IF NOT EXISTS device_history (
    device         TEXT NOT NULL REFERENCES devices (id),
    hour           TEXT NOT NULL,
    backlog_docs   INTEGER NOT NULL,
    backlog_bytes  INTEGER NOT NULL,
    samples        INTEGER NOT NULL,
    online_samples INTEGER NOT NULL,
    PRIMARY KEY (device, hour)
) WITHOUT ROWID;
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
    """Open the catalog; the writer creates or migrates the schema, readers only read."""
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
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed segment row must survive power loss, or we would ack bytes we lost.
        conn.execute("PRAGMA synchronous = FULL")
        migrate(conn)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the catalog to ``SCHEMA_VERSION`` in one transaction; return the version found.

    ``PRAGMA user_version`` says which schema the file holds: 0 is a new file (the whole schema is
    created), each older version runs its step in ``_MIGRATIONS`` in turn. A file from a newer
    sohoa is refused rather than guessed at. Foreign keys are off while tables are rebuilt (SQLite's
    own recipe for changing a table), and checked before the commit.
    """
    conn.execute("PRAGMA foreign_keys = OFF")   # a no-op inside a transaction: set it before
    conn.execute("BEGIN IMMEDIATE")   # two writers starting at once: the second waits, then sees v2
    try:
        found = _upgrade(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    if found and found < SCHEMA_VERSION:
        log.warning("catalog migrated from schema version %d to %d", found, SCHEMA_VERSION)
    return found


def _upgrade(conn: sqlite3.Connection) -> int:
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise CatalogError(f"the catalog has schema version {found}; this sohoa knows up to "
                           f"{SCHEMA_VERSION}", hint="run the sohoa version that wrote it, or newer")
    start = found
    if found == 0:
        for statement in _statements(SCHEMA):
            conn.execute(statement)
        start = SCHEMA_BASE_VERSION
    for version in range(start, SCHEMA_VERSION):
        _MIGRATIONS[version](conn)
    problems = conn.execute("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise CatalogError(f"migration would break {len(problems)} references, e.g. {tuple(problems[0])}")
    return found


def _statements(script: str) -> list[str]:
    """Split a schema script into statements (executescript would commit our transaction)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if not current.strip() and line.lstrip().startswith("--"):
            continue   # a comment before a statement: the statement should start with its keyword
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement: {current[:80]!r}")
    return statements


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """v1 kept one document per sha256 (the first sender's); v2 splits content from arrivals.

    Every v1 document becomes one object plus one arrival with the same id (so transfers, fixity
    events, the audit log and the full-text rows keep pointing at it); its capture time comes from
    the package metadata it was stored with.
    """
    conn.create_function("sohoa_sha256", 1, text_sha256, deterministic=True)
    conn.execute("ALTER TABLE devices ADD COLUMN possible_clone_since TEXT")
    for statement in _statements(SCHEMA):
        # New tables only; documents is rebuilt below, the others exist.
        if statement.startswith(("CREATE TABLE IF NOT EXISTS objects",
                                 "CREATE TABLE IF NOT EXISTS seq_collisions")):
            conn.execute(statement)
    conn.execute("INSERT INTO objects (sha256, size, media_type, stored_at)"
                 " SELECT sha256, size, media_type, received_at FROM documents")
    create = _schema_table("documents", "documents_v2")
    _rebuild_table(conn, "documents", "documents_v2", create=create, copy=(
        "INSERT INTO documents_v2 (id, device, tid, seq, filename, sha256, captured_at, text_sha256, pages,"
        " received_at, text, metadata, package_sha256)"
        " SELECT id, device, tid, seq, filename, sha256,"
        " coalesce(json_extract(metadata, '$.captured_at'), received_at), sohoa_sha256(text), pages,"
        " received_at, text, metadata, package_sha256 FROM documents"))


def _schema_table(table: str, renamed: str) -> str:
    """``SCHEMA``'s CREATE TABLE for ``table``, creating it under another name."""
    create = next(s for s in _statements(SCHEMA) if s.startswith(f"CREATE TABLE IF NOT EXISTS {table} "))
    return create.replace(f"IF NOT EXISTS {table}", renamed, 1)


def _rebuild_table(conn: sqlite3.Connection, table: str, temporary: str, *, create: str, copy: str) -> None:
    """SQLite's table-rebuild recipe (ids kept): ``create`` makes ``temporary``, ``copy`` fills it from
    ``table``; the old table goes, the new one takes its name and gets ``SCHEMA``'s indexes again."""
    conn.execute(create)
    conn.execute(copy)
    conn.execute(f"DROP TABLE {table}")
    conn.execute(f"ALTER TABLE {temporary} RENAME TO {table}")
    for statement in _statements(SCHEMA):
        if statement.startswith(f"CREATE INDEX IF NOT EXISTS {table}_"):
            conn.execute(statement)


def _v2_to_v3(conn: sqlite3.Connection) -> None:
    """v3: ``device_history`` (a new table) and transfer state in the catalog: signed size and held
    ranges per transfer, journal positions per segment, and the jobs table. Half-received transfers
    keep their staging/<tid>.part files (segments with ``log`` NULL are read from there), so an
    upgrade mid-transfer loses nothing."""
    from protocol.envelope import SignedHeader  # noqa: PLC0415 - only migrations decode headers here

    for column in ("size INTEGER", "held TEXT NOT NULL DEFAULT '[]'",
                   "held_bytes INTEGER NOT NULL DEFAULT 0"):
        conn.execute(f"ALTER TABLE transfers ADD COLUMN {column}")
    for column in ("log TEXT", "pos INTEGER"):
        conn.execute(f"ALTER TABLE segments ADD COLUMN {column}")
    for statement in _statements(SCHEMA):
        if statement.startswith(("CREATE TABLE IF NOT EXISTS jobs",
                                 "CREATE INDEX IF NOT EXISTS segments_by_log",
                                 "CREATE INDEX IF NOT EXISTS transfers_by_device",
                                 "CREATE TABLE IF NOT EXISTS device_history")):
            conn.execute(statement)
    rows = conn.execute("SELECT tid, header FROM transfers WHERE state = 'receiving'").fetchall()
    for tid, header in rows:
        try:
            size = SignedHeader.decode(bytes(header)).header.ciphertext_size
        except ProtocolError:
            size = None   # unreadable header: the transfer is answered as before, never assembled
        held = RangeSet.of((s.offset, s.offset + s.length) for s in held_segments(conn, tid))
        conn.execute("UPDATE transfers SET size = ?, held = ?, held_bytes = ? WHERE tid = ?",
                     (size, ranges_json(held), held.total(), tid))


DOCUMENTS_V5 = """
CREATE TABLE documents_v5 (
    -- AUTOINCREMENT: an arrival dropped with its notice (central.ingest.archive) never lends its id to
    -- the next one (a bookmarked id, and the archive-job cursor, rely on ids never coming back).
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    device         TEXT NOT NULL REFERENCES devices (id),
    tid            TEXT NOT NULL UNIQUE,   -- the transfer (or its notice) that first brought this arrival
    seq            INTEGER NOT NULL,
    filename       TEXT NOT NULL,
    sha256         TEXT NOT NULL,          -- the original's; in objects once state is 'stored'
    captured_at    TEXT NOT NULL,
    text_sha256    TEXT NOT NULL,
    pages          INTEGER NOT NULL,
    received_at    TEXT NOT NULL,
    text           TEXT NOT NULL,
    metadata       TEXT NOT NULL,
    package_sha256 TEXT NOT NULL,          -- '' while the original is on its way
    state          TEXT NOT NULL DEFAULT 'stored' CHECK (state IN ('stored', 'awaiting_original')),
    UNIQUE (device, sha256, filename, captured_at, text_sha256)
)
"""

NOTICES = """
CREATE TABLE notices (
    tid            TEXT PRIMARY KEY,       -- the document's transfer id (its envelope's, too)
    device         TEXT NOT NULL REFERENCES devices (id),
    seq            INTEGER NOT NULL,
    payload_sha256 TEXT NOT NULL,          -- a repeat is the same bytes; anything else is a replay
    document_id    INTEGER REFERENCES documents (id),
    received_at    TEXT NOT NULL,
    UNIQUE (device, seq)
)
"""


def _v4_to_v5(conn: sqlite3.Connection) -> None:
    """v5: documents may await their original (the table is rebuilt without the reference to
    ``objects``, ids kept, so every table and FTS row pointing at a document still does) and
    ``notices`` is new. Every existing document is 'stored'."""
    _rebuild_table(conn, "documents", "documents_v5", create=DOCUMENTS_V5, copy=(
        "INSERT INTO documents_v5 (id, device, tid, seq, filename, sha256, captured_at, text_sha256, pages,"
        " received_at, text, metadata, package_sha256, state) SELECT id, device, tid, seq, filename, sha256,"
        " captured_at, text_sha256, pages, received_at, text, metadata, package_sha256, 'stored'"
        " FROM documents"))
    conn.execute("CREATE INDEX documents_awaiting ON documents (device) WHERE state = 'awaiting_original'")
    conn.execute(NOTICES)


def _v5_to_v6(conn: sqlite3.Connection) -> None:
    """v6: the admission columns on ``devices`` and the ``expired`` transfer state (a CHECK constraint:
    SQLite's table-rebuild recipe, ids and every column kept). A new catalog already has both from
    ``SCHEMA``, so each part runs only where it is missing."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(devices)")}
    for column in ("init_tokens REAL", "init_tokens_at REAL", "strikes REAL NOT NULL DEFAULT 0",
                   "strikes_at REAL", "misbehaving_since TEXT"):
        if column.split()[0] not in columns:
            conn.execute(f"ALTER TABLE devices ADD COLUMN {column}")
    (table_sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'transfers'").fetchone()
    if "'expired'" in table_sql:
        return
    names = ", ".join(r[1] for r in conn.execute("PRAGMA table_info(transfers)"))
    _rebuild_table(conn, "transfers", "transfers_v6", create=_schema_table("transfers", "transfers_v6"),
                   copy=f"INSERT INTO transfers_v6 ({names}) SELECT {names} FROM transfers")  # noqa: S608


def _v6_to_v7(conn: sqlite3.Connection) -> None:
    """v7: ``devices.replaces`` (a new catalog has it from ``SCHEMA``)."""
    if "replaces" not in {r[1] for r in conn.execute("PRAGMA table_info(devices)")}:
        conn.execute("ALTER TABLE devices ADD COLUMN replaces TEXT REFERENCES devices (id)")
    # One successor per box: a replacement that fails is replaced in its turn (a chain, followed back).
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS devices_by_replaces ON devices (replaces)"
                 " WHERE replaces IS NOT NULL")


# user_version found → the step that brings the file to the next version.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _v1_to_v2, 2: _v2_to_v3, 3: records_schema.v3_to_v4, 4: _v4_to_v5, 5: _v5_to_v6, 6: _v6_to_v7,
}


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- devices ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: str
    verify_key: bytes
    status: str


def add_device(conn: sqlite3.Connection, device_id: str, verify_key: bytes, *,
               replaces: str | None = None) -> None:
    conn.execute("INSERT INTO devices (id, verify_key, enrolled_at, status, replaces)"
                 " VALUES (?, ?, ?, 'active', ?)", (device_id, verify_key, utc_now(), replaces))


# A replacement of a replacement: the chain is followed this far back (a loop cannot be made, since a
# device names its predecessor when it is enrolled, but a bound keeps a hand-edited catalog harmless).
MAX_REPLACED = 16


def replaced_awaiting(conn: sqlite3.Connection, device: str, sha256: str) -> list[int]:
    """Arrivals of the devices ``device`` replaces (directly or through earlier replacements) that
    still await an original with these bytes: the new box has just sent it, so they are complete."""
    rows = conn.execute(
        "WITH RECURSIVE chain (id, depth) AS ("
        " SELECT replaces, 1 FROM devices WHERE id = ? AND replaces IS NOT NULL"
        " UNION SELECT d.replaces, c.depth + 1 FROM devices d JOIN chain c ON d.id = c.id"
        "  WHERE d.replaces IS NOT NULL AND c.depth < ?)"
        " SELECT doc.id FROM documents doc JOIN chain ON doc.device = chain.id"
        " WHERE doc.sha256 = ? AND doc.state = 'awaiting_original' ORDER BY doc.id",
        (device, MAX_REPLACED, sha256))
    return [int(r[0]) for r in rows]


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


# Nothing is retained at the broker (retain_available false), so after a restart of central or the
# broker no status is replayed: a box is online only while it keeps talking. It publishes its status
# every 30 s (edge uplink.status_interval); three missed ones and it is offline, will or no will.
STATUS_INTERVAL_S = 30
STALE_AFTER_S = 3 * STATUS_INTERVAL_S

# A backlog older than this is a problem even on a box that is online and reports no error.
STALE_BACKLOG_S = 6 * 3600

# Online at query time: the last word from the box was not its will, and it is recent.
_ONLINE = "(d.online = 1 AND d.last_seen >= :fresh_since)"
# Problem rank, worst first: two boxes sharing one identity (their scans are being refused), then a
# box over its budget of rejected transfers (bombs, bad signatures: a stolen key or a broken box;
# slowed at admission, never revoked), then offline with documents stuck on the box, then a reported
# error, then a backlog that is not draining, then merely offline; revoked boxes are nobody's problem.
_PROBLEM = f"""CASE
    WHEN d.status != 'active' THEN -1
    WHEN d.possible_clone_since IS NOT NULL THEN 6
    WHEN d.misbehaving_since IS NOT NULL THEN 5
    WHEN NOT {_ONLINE} AND d.backlog_docs > 0 THEN 4
    WHEN coalesce(d.last_error, '') != '' THEN 3
    WHEN d.backlog_docs > 0 AND {{age}} >= {STALE_BACKLOG_S} THEN 2
    WHEN NOT {_ONLINE} THEN 1
    ELSE 0 END"""
_PROBLEM_NAMES = {6: "possible clone", 5: "rejected transfers", 4: "offline with backlog", 3: "error",
                  2: "stale backlog", 1: "offline"}
# The age the box reported with its last status; only meaningful while it holds a backlog.
_OLDEST_AGE = ("CASE WHEN d.backlog_docs > 0 THEN"
               " coalesce(json_extract(d.status_json, '$.oldest_age_s'), 0) ELSE 0 END")
# A seek per device in ``transfers_by_device`` (device, state, stored_at): the newest stored time is
# the last entry of the device's 'stored' range. (Without that index SQLite planned this through the
# state index, which at 200k transfers and 3,000 devices took about a minute.)
_LAST_RECEIPT = ("(SELECT max(t.stored_at) FROM transfers t"
                 " WHERE t.device = d.id AND t.state = 'stored')")

# Sortable columns -> SQL; a whitelist, so a query parameter never becomes SQL text.
DEVICE_SORTS: dict[str, str] = {
    "id": "d.id", "status": "d.status", "online": "online", "last_seen": "d.last_seen",
    "backlog_docs": "d.backlog_docs", "backlog_bytes": "d.backlog_bytes", "last_error": "d.last_error",
    "oldest_age_s": "oldest_age_s", "last_receipt": "last_receipt", "problems": "problem_rank",
}


def fresh_since(now: datetime | None = None) -> str:
    """The oldest ``last_seen`` that still counts as online at ``now`` (the catalog's time format)."""
    at = (now or datetime.now(UTC)) - timedelta(seconds=STALE_AFTER_S)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class DevicePage:
    rows: list[dict[str, Any]]
    total: int   # devices matching the filter, whatever the page


def query_devices(conn: sqlite3.Connection, *, sort: str = "id", descending: bool = False,
                  q: str | None = None, limit: int | None = None, offset: int = 0,
                  now: datetime | None = None) -> DevicePage:
    """One page of devices, sorted and filtered in SQL; ``q`` is a case-insensitive id substring.

    Ties are broken by id so pages never overlap or skip a device. ``sort="problems"`` with
    ``descending=True`` puts the worst first, and the oldest backlog first within a rank.
    ``online`` is decided at ``now`` (default: the wall clock), see ``STALE_AFTER_S``.
    """
    if sort not in DEVICE_SORTS:
        raise ValueError(f"cannot sort devices by {sort!r}")
    where = "WHERE instr(lower(d.id), lower(:q)) > 0" if q else ""
    params: dict[str, Any] = {"q": q, "fresh_since": fresh_since(now),
                              "limit": -1 if limit is None else limit, "offset": offset}
    total = int(conn.execute(f"SELECT count(*) FROM devices d {where}", params).fetchone()[0])  # noqa: S608
    direction = "DESC" if descending else "ASC"
    keys = [f"{DEVICE_SORTS[sort]} {direction} NULLS LAST"]
    if sort == "problems":
        keys += [f"oldest_age_s {direction}", f"d.backlog_docs {direction}"]
    keys.append("d.id ASC")
    sql = (f"SELECT d.id, d.status, {_ONLINE} AS online, d.last_seen, d.backlog_docs,"  # noqa: S608
           f" d.backlog_bytes, d.last_error, d.possible_clone_since, {_OLDEST_AGE} AS oldest_age_s,"
           f" {_PROBLEM.format(age=_OLDEST_AGE)} AS problem_rank, {_LAST_RECEIPT} AS last_receipt"
           f" FROM devices d {where} ORDER BY {', '.join(keys)} LIMIT :limit OFFSET :offset")
    rows = conn.execute(sql, params).fetchall()
    return DevicePage([{
        "id": r["id"], "status": r["status"], "online": bool(r["online"]), "last_seen": r["last_seen"],
        "backlog_docs": r["backlog_docs"], "backlog_bytes": r["backlog_bytes"],
        "last_receipt": r["last_receipt"],
        "last_error": r["last_error"], "oldest_age_s": r["oldest_age_s"],
        "problem": _PROBLEM_NAMES.get(r["problem_rank"]),
        # Rare (a flagged box), so its details are looked up per flagged row only.
        "possible_clone": (possible_clone(conn, r["id"], since=r["possible_clone_since"])
                           if r["possible_clone_since"] else None),
    } for r in rows], total)


def list_devices(conn: sqlite3.Connection, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every device by id (the original unpaged shape of ``GET /api/devices``)."""
    return query_devices(conn, now=now).rows


def fleet_summary(conn: sqlite3.Connection, *, today_since: str,
                  now: datetime | None = None) -> dict[str, Any]:
    """Fleet-wide counts for the dashboard header, aggregated in SQL (one pass over devices).

    Online/offline count active devices only, so total = online + offline + revoked. Backlog, errors
    and possible clones count active devices too: a revoked box's queue will never be accepted.
    """
    d = conn.execute(
        "SELECT count(*) AS total,"  # noqa: S608 - constant fragments only
        f" coalesce(sum(d.status = 'active' AND {_ONLINE}), 0) AS online,"
        f" coalesce(sum(d.status = 'active' AND NOT {_ONLINE}), 0) AS offline,"
        " coalesce(sum(d.status != 'active'), 0) AS revoked,"
        " coalesce(sum(d.status = 'active' AND coalesce(d.last_error, '') != ''), 0) AS with_error,"
        " coalesce(sum(d.status = 'active' AND d.backlog_docs > 0), 0) AS with_backlog,"
        f" coalesce(sum(d.status = 'active' AND NOT {_ONLINE} AND d.backlog_docs > 0), 0)"
        "   AS offline_with_backlog,"
        " coalesce(sum(d.status = 'active' AND d.possible_clone_since IS NOT NULL), 0) AS possible_clone,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_docs END), 0) AS backlog_docs,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_bytes END), 0) AS backlog_bytes"
        " FROM devices d", {"fresh_since": fresh_since(now)}).fetchone()
    oldest = conn.execute(
        f"SELECT d.id, {_OLDEST_AGE} AS age FROM devices d"  # noqa: S608
        " WHERE d.status = 'active' AND d.backlog_docs > 0 ORDER BY age DESC, d.id LIMIT 1").fetchone()
    docs_total = conn.execute(f"SELECT count(*) FROM documents WHERE {_STORED}").fetchone()[0]  # noqa: S608
    awaiting = conn.execute("SELECT count(*) FROM documents WHERE state = 'awaiting_original'").fetchone()[0]
    # Of those, the ones whose box is revoked and replaced by none: nobody will send them.
    stranded = conn.execute(
        "SELECT count(*) FROM documents doc JOIN devices dv ON dv.id = doc.device"
        " WHERE doc.state = 'awaiting_original' AND dv.status != 'active'"
        " AND NOT EXISTS (SELECT 1 FROM devices r WHERE r.replaces = doc.device)").fetchone()[0]
    objects_total, bytes_stored = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM objects").fetchone()
    docs_today = conn.execute(f"SELECT count(*) FROM documents WHERE {_STORED} AND received_at >= ?",  # noqa: S608
                              (today_since,)).fetchone()[0]
    return {
        "devices": {k: int(d[k]) for k in ("total", "online", "offline", "revoked", "with_error",
                                           "with_backlog", "offline_with_backlog", "possible_clone")},
        "backlog": {"docs": int(d["backlog_docs"]), "bytes": int(d["backlog_bytes"]),
                    "oldest_age_s": float(oldest["age"]) if oldest else None,
                    "oldest_device": oldest["id"] if oldest else None},
        # total: arrivals (one per commune that sent a scan); objects/bytes: what is stored, once.
        "documents": {"total": int(docs_total), "objects": int(objects_total), "bytes": int(bytes_stored),
                      "today": int(docs_today), "today_since": today_since,
                      # Catalogued from their notices, searchable, not archived: originals on their way.
                      "awaiting_original": int(awaiting),
                      # ... of which their box was revoked and not replaced: the operator must act.
                      "awaiting_from_revoked": int(stranded)},
    }


# -- possible clones ----------------------------------------------------------------------------

def record_seq_collision(conn: sqlite3.Connection, *, device: str, seq: int, tid: str, other_tid: str,
                         at: str) -> bool:
    """Note that ``tid`` reused ``seq``, which ``other_tid`` holds, and flag the device.

    Returns True the first time this refused transfer is seen (a repeated init only updates
    ``last_seen``), so the caller writes one fixity event per refused transfer, not per retry.
    """
    new = conn.execute(
        "INSERT INTO seq_collisions (device, tid, seq, other_tid, first_seen, last_seen)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, tid) DO NOTHING",
        (device, tid, seq, other_tid, at, at)).rowcount == 1
    if not new:
        conn.execute("UPDATE seq_collisions SET last_seen = ? WHERE device = ? AND tid = ?",
                     (at, device, tid))
    conn.execute("UPDATE devices SET possible_clone_since = coalesce(possible_clone_since, ?) WHERE id = ?",
                 (at, device))
    return new


def possible_clone(conn: sqlite3.Connection, device: str, *,
                   since: str | None = None) -> dict[str, Any] | None:
    """The clone suspicion on ``device``: when first seen, how many refused transfers, the first pair.

    Only collisions seen since the flag was (last) raised count; None when the flag is clear.
    """
    if since is None:
        row = conn.execute("SELECT possible_clone_since FROM devices WHERE id = ?", (device,)).fetchone()
        if row is None or row[0] is None:
            return None
        since = str(row[0])
    rows = conn.execute("SELECT tid, seq, other_tid, first_seen, last_seen FROM seq_collisions"
                        " WHERE device = ? AND last_seen >= ? ORDER BY first_seen, tid",
                        (device, since)).fetchall()
    first = rows[0] if rows else None
    return {"since": since, "count": len(rows),
            "last_seen": max((r["last_seen"] for r in rows), default=since),
            "seq": first["seq"] if first else None,
            # The transfer that holds the sequence number, then the one refused for reusing it.
            "tids": [first["other_tid"], first["tid"]] if first else []}


def clear_possible_clone(conn: sqlite3.Connection, device: str) -> bool:
    """Clear the flag (an admin re-enrolled one of the boxes); True if it was set."""
    return conn.execute("UPDATE devices SET possible_clone_since = NULL"
                        " WHERE id = ? AND possible_clone_since IS NOT NULL", (device,)).rowcount == 1


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
    size: int | None = None                      # the signed ciphertext size
    held: tuple[tuple[int, int], ...] = ()       # durably held, coalesced [start, end) ranges
    held_bytes: int = 0

    @property
    def complete(self) -> bool:
        return self.size is not None and self.held_bytes == self.size and (
            self.size == 0 or self.held == ((0, self.size),))


def ranges_json(ranges: RangeSet) -> str:
    return json.dumps(ranges.as_list(), separators=(",", ":"))


def _ranges(text: str) -> tuple[tuple[int, int], ...]:
    return tuple((int(s), int(e)) for s, e in json.loads(text))


def _transfer(row: sqlite3.Row | None) -> TransferRecord | None:
    if row is None:
        return None
    return TransferRecord(row["tid"], row["device"], row["seq"], bytes(row["header"]), row["state"],
                          row["error"], row["error_class"],
                          bytes(row["receipt"]) if row["receipt"] is not None else None,
                          row["size"], _ranges(row["held"]), row["held_bytes"])


_TRANSFER_COLUMNS = "tid, device, seq, header, state, error, error_class, receipt, size, held, held_bytes"


def get_transfer(conn: sqlite3.Connection, tid: str) -> TransferRecord | None:
    return _transfer(conn.execute(f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE tid = ?",  # noqa: S608
                                  (tid,)).fetchone())


def get_transfers(conn: sqlite3.Connection, tids: Iterable[str]) -> dict[str, TransferRecord]:
    """Several transfers in one query (the batch stage reads every transfer it touches at once)."""
    wanted = list(tids)
    found: dict[str, TransferRecord] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {_TRANSFER_COLUMNS} FROM transfers"  # noqa: S608
                                f" WHERE tid IN ({marks})", chunk):
            record = _transfer(row)
            assert record is not None
            found[record.tid] = record
    return found


def transfer_by_seq(conn: sqlite3.Connection, device: str, seq: int) -> TransferRecord | None:
    return _transfer(conn.execute(
        f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE device = ? AND seq = ?",  # noqa: S608
        (device, seq)).fetchone())


def insert_transfer(conn: sqlite3.Connection, *, tid: str, device: str, seq: int, header: bytes,
                    size: int | None = None) -> None:
    now = utc_now()
    conn.execute("INSERT INTO transfers (tid, device, seq, header, state, created_at, updated_at, size)"
                 " VALUES (?, ?, ?, ?, 'receiving', ?, ?, ?)", (tid, device, seq, header, now, now, size))


def reject_transfer(conn: sqlite3.Connection, tid: str, error: str, error_class: str) -> None:
    """The transfer is refused for good; its segments (and any job) are no longer needed."""
    conn.execute("UPDATE transfers SET state = 'rejected', error = ?, error_class = ?, updated_at = ?"
                 " WHERE tid = ?", (error, error_class, utc_now(), tid))
    conn.execute("DELETE FROM segments WHERE tid = ?", (tid,))
    conn.execute("DELETE FROM jobs WHERE tid = ?", (tid,))


def store_transfer(conn: sqlite3.Connection, tid: str, *, document_id: int, duplicate: bool,
                   receipt: bytes, stored_at: str) -> None:
    conn.execute("UPDATE transfers SET state = 'stored', document_id = ?, duplicate = ?, receipt = ?,"
                 " stored_at = ?, updated_at = ? WHERE tid = ?",
                 (document_id, int(duplicate), receipt, stored_at, stored_at, tid))
    # The segment log is only needed to resume; the stored objects are now the truth.
    conn.execute("DELETE FROM segments WHERE tid = ?", (tid,))
    conn.execute("DELETE FROM jobs WHERE tid = ?", (tid,))


@dataclass(frozen=True, slots=True)
class StoredSegment:
    """A held segment and where its bytes are: journal file ``log`` at ``pos`` (None: the legacy
    ``staging/<tid>.part`` at ``offset``)."""

    offset: int
    length: int
    crc: int
    log: str | None
    pos: int | None


def add_segments(conn: sqlite3.Connection, tid: str,
                 segments: Iterable[HeldSegment | StoredSegment]) -> None:
    conn.executemany("INSERT OR IGNORE INTO segments (tid, offset, length, crc, log, pos)"
                     " VALUES (?, ?, ?, ?, ?, ?)",
                     [(tid, s.offset, s.length, s.crc, getattr(s, "log", None), getattr(s, "pos", None))
                      for s in segments])


def set_held(conn: sqlite3.Connection, tid: str, held: RangeSet) -> None:
    conn.execute("UPDATE transfers SET held = ?, held_bytes = ?, updated_at = ? WHERE tid = ?",
                 (ranges_json(held), held.total(), utc_now(), tid))


def held_segments(conn: sqlite3.Connection, tid: str) -> list[HeldSegment]:
    rows = conn.execute("SELECT offset, length, crc FROM segments WHERE tid = ? ORDER BY offset", (tid,))
    return [HeldSegment(r["offset"], r["length"], r["crc"]) for r in rows]


def segment_at(conn: sqlite3.Connection, tid: str, offset: int) -> HeldSegment | None:
    row = conn.execute("SELECT length, crc FROM segments WHERE tid = ? AND offset = ?",
                       (tid, offset)).fetchone()
    return HeldSegment(offset, row["length"], row["crc"]) if row else None


def stored_segments(conn: sqlite3.Connection, tid: str) -> list[StoredSegment]:
    rows = conn.execute("SELECT offset, length, crc, log, pos FROM segments WHERE tid = ? ORDER BY offset",
                        (tid,))
    return [StoredSegment(r["offset"], r["length"], r["crc"], r["log"], r["pos"]) for r in rows]


def journal_in_use(conn: sqlite3.Connection, log: str) -> bool:
    return conn.execute("SELECT 1 FROM segments WHERE log = ? LIMIT 1", (log,)).fetchone() is not None


def segments_in_journal(conn: sqlite3.Connection, log: str) -> list[tuple[str, StoredSegment, bool]]:
    """Every segment row pointing into journal file ``log``: (tid, segment, movable). Movable: its
    transfer is receiving and has no assembly job (no assembler can be reading its positions)."""
    rows = conn.execute(
        "SELECT s.tid, s.offset, s.length, s.crc, s.log, s.pos,"
        " t.state = 'receiving' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.tid = s.tid) AS movable"
        " FROM segments s JOIN transfers t ON t.tid = s.tid WHERE s.log = ? ORDER BY s.log, s.pos", (log,))
    return [(str(r[0]), StoredSegment(r[1], r[2], r[3], r[4], r[5]), bool(r[6])) for r in rows]


def move_segments(conn: sqlite3.Connection, moves: Iterable[tuple[str, int, str, int]]) -> None:
    """Point segments (tid, offset) at their copies (log, pos): journal compaction."""
    conn.executemany("UPDATE segments SET log = ?, pos = ? WHERE tid = ? AND offset = ?",
                     [(new_log, pos, tid, offset) for tid, offset, new_log, pos in moves])


# -- admission state and expiry (central.ingest.quota) -------------------------------------------

@dataclass(frozen=True, slots=True)
class DeviceLoad:
    """What admission weighs before a device's new transfer: its receiving transfers (count and signed
    bytes: what it announced and central has not stored) and its two buckets."""

    open_transfers: int = 0
    open_bytes: int = 0
    init_tokens: float | None = None     # None: a full bucket (never spent)
    init_tokens_at: float | None = None
    strikes: float = 0.0
    strikes_at: float | None = None
    misbehaving_since: str | None = None


def device_load(conn: sqlite3.Connection, device: str) -> DeviceLoad:
    # A range of transfers_by_device (device, 'receiving'): at most the open-transfer cap of rows.
    row = conn.execute(
        "SELECT d.init_tokens, d.init_tokens_at, d.strikes, d.strikes_at, d.misbehaving_since,"
        " (SELECT count(*) FROM transfers t WHERE t.device = d.id AND t.state = 'receiving') AS n,"
        " (SELECT coalesce(sum(t.size), 0) FROM transfers t WHERE t.device = d.id AND t.state = 'receiving')"
        " AS b FROM devices d WHERE d.id = ?", (device,)).fetchone()
    if row is None:
        return DeviceLoad()
    return DeviceLoad(int(row["n"]), int(row["b"]), row["init_tokens"], row["init_tokens_at"],
                      float(row["strikes"]), row["strikes_at"], row["misbehaving_since"])


def set_init_tokens(conn: sqlite3.Connection, device: str, level: float, at: float) -> None:
    conn.execute("UPDATE devices SET init_tokens = ?, init_tokens_at = ? WHERE id = ?", (level, at, device))


def set_strikes(conn: sqlite3.Connection, device: str, level: float, at: float, *,
                flag_at: str | None) -> bool:
    """Record the rejected-transfer bucket; ``flag_at``: the device is over its budget (kept if already
    flagged). True when the flag is newly raised."""
    row = conn.execute("SELECT misbehaving_since IS NULL FROM devices WHERE id = ?", (device,)).fetchone()
    raised = flag_at is not None and row is not None and bool(row[0])
    conn.execute("UPDATE devices SET strikes = ?, strikes_at = ?,"
                 " misbehaving_since = coalesce(misbehaving_since, ?) WHERE id = ?",
                 (level, at, flag_at, device))
    return raised


def clear_misbehaving(conn: sqlite3.Connection, *, quiet_since: float) -> list[str]:
    """Lower the flag of devices with no counted rejection since ``quiet_since`` (epoch seconds)."""
    rows = conn.execute("UPDATE devices SET misbehaving_since = NULL, strikes = 0"
                        " WHERE misbehaving_since IS NOT NULL AND coalesce(strikes_at, 0) < ? RETURNING id",
                        (quiet_since,)).fetchall()
    return sorted(str(r[0]) for r in rows)


def expire_stalled(conn: sqlite3.Connection, *, before: str, limit: int = 500) -> list[tuple[str, str]]:
    """Receiving transfers without progress since ``before`` (and no assembly job) become ``expired``:
    their segment rows go (the journal files they pinned can then be deleted), the row stays so a late
    segment is answered UNKNOWN and a new init starts the transfer again. Returns (tid, device)."""
    rows = conn.execute("SELECT t.tid, t.device FROM transfers t LEFT JOIN jobs j ON j.tid = t.tid"
                        " WHERE t.state = 'receiving' AND t.updated_at < ? AND j.tid IS NULL"
                        " ORDER BY t.updated_at LIMIT ?", (before, limit)).fetchall()
    now = utc_now()
    for tid, _ in rows:
        conn.execute("UPDATE transfers SET state = 'expired', held = '[]', held_bytes = 0, error = ?,"
                     " error_class = 'TransferExpired', updated_at = ? WHERE tid = ?",
                     (f"no progress since {before} or earlier: its bytes were dropped", now, tid))
        conn.execute("DELETE FROM segments WHERE tid = ?", (tid,))
    return [(str(t), str(d)) for t, d in rows]


def journals_of_receiving(conn: sqlite3.Connection) -> list[str]:
    """The journal files that receiving transfers' segments point into (start-up checks they exist)."""
    rows = conn.execute("SELECT DISTINCT s.log FROM segments s JOIN transfers t ON t.tid = s.tid"
                        " WHERE t.state = 'receiving' AND s.log IS NOT NULL")
    return [str(r[0]) for r in rows]


def transfers_in_journal(conn: sqlite3.Connection, log: str) -> list[tuple[str, str]]:
    rows = conn.execute("SELECT DISTINCT t.tid, t.device FROM segments s JOIN transfers t ON t.tid = s.tid"
                        " WHERE s.log = ? AND t.state = 'receiving' ORDER BY t.tid", (log,))
    return [(str(r[0]), str(r[1])) for r in rows]


def forget_held(conn: sqlite3.Connection, tid: str, reason: str) -> None:
    """The bytes a receiving transfer's rows point at are gone (its journal file was lost: a central
    restored from a backup without ``staging/``): it becomes ``expired`` like a stalled one, so its next
    segment or fin is answered UNKNOWN and the box sends it again from zero under the same tid."""
    conn.execute("UPDATE transfers SET state = 'expired', held = '[]', held_bytes = 0, error = ?,"
                 " error_class = 'StagingLost', updated_at = ? WHERE tid = ? AND state = 'receiving'",
                 (reason[:2000], utc_now(), tid))
    conn.execute("DELETE FROM segments WHERE tid = ?", (tid,))
    conn.execute("DELETE FROM jobs WHERE tid = ?", (tid,))


def revive_transfer(conn: sqlite3.Connection, tid: str) -> None:
    """An expired transfer's init came again (and was admitted): receiving, from zero."""
    conn.execute("UPDATE transfers SET state = 'receiving', held = '[]', held_bytes = 0, error = NULL,"
                 " error_class = NULL, updated_at = ? WHERE tid = ? AND state = 'expired'", (utc_now(), tid))


# -- jobs ----------------------------------------------------------------------------------------

def add_job(conn: sqlite3.Connection, tid: str, *, kind: str = "assemble") -> None:
    conn.execute("INSERT INTO jobs (tid, kind, created_at) VALUES (?, ?, ?) ON CONFLICT (tid) DO NOTHING",
                 (tid, kind, utc_now()))


def claim_job(conn: sqlite3.Connection, tid: str, *, worker: str, lease_s: float) -> bool:
    """Take the job on ``tid`` unless another worker holds an unexpired lease on it."""
    now = datetime.now(UTC)
    return conn.execute(
        "UPDATE jobs SET claimed_by = ?, lease_until = ?, attempts = attempts + 1"
        " WHERE tid = ? AND (claimed_by IS NULL OR claimed_by = ? OR lease_until < ?)",
        (worker, _iso(now + timedelta(seconds=lease_s)), tid, worker, _iso(now))).rowcount == 1


def claimable_jobs(conn: sqlite3.Connection, *, worker: str, limit: int = 100) -> list[str]:
    """Jobs nobody holds: new, or whose lease ran out (a worker died), or this worker's own."""
    rows = conn.execute("SELECT tid FROM jobs WHERE claimed_by IS NULL OR claimed_by = ? OR lease_until < ?"
                        " ORDER BY created_at LIMIT ?", (worker, utc_now(), limit))
    return [str(r[0]) for r in rows]


def release_job(conn: sqlite3.Connection, tid: str, error: str) -> None:
    """Give the job back (our own trouble, e.g. disk): another try later, by anyone."""
    conn.execute("UPDATE jobs SET claimed_by = NULL, lease_until = NULL, last_error = ? WHERE tid = ?",
                 (error[:2000], tid))


def complete_transfers_without_job(conn: sqlite3.Connection, limit: int = 100) -> list[str]:
    """Receiving transfers whose bytes are all held but that have no job (a crash between the two, or a
    catalog from before the jobs table): the reconciler gives them one."""
    rows = conn.execute("SELECT t.tid FROM transfers t LEFT JOIN jobs j ON j.tid = t.tid"
                        " WHERE t.state = 'receiving' AND t.size IS NOT NULL AND t.held_bytes = t.size"
                        " AND j.tid IS NULL LIMIT ?", (limit,))
    return [str(r[0]) for r in rows]


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def count_active_transfers(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM transfers WHERE state = 'receiving'").fetchone()[0])


# -- objects, documents (arrivals) and search -----------------------------------------------------

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
            # Why an original has not come: on its way, or its box revoked (replaced by a box that
            # will send it when its held scans are retried, or not replaced: the operator must act).
            " CASE WHEN d.state != 'awaiting_original' THEN NULL WHEN dv.status = 'active' THEN 'on_its_way'"
            "  WHEN EXISTS (SELECT 1 FROM devices r WHERE r.replaces = d.device) THEN 'box_replaced'"
            "  ELSE 'box_revoked' END AS awaiting_reason")
_WITH_OBJECT = ("LEFT JOIN objects o ON o.sha256 = d.sha256 AND d.state = 'stored'"
                " LEFT JOIN devices dv ON dv.id = d.device AND d.state = 'awaiting_original'")
# Archived arrivals: what counts and totals count (one awaiting its original is not archived yet).
_STORED = "state = 'stored'"


def _summary(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "device": row["device"], "filename": row["filename"], "sha256": row["sha256"],
            "size": row["size"], "pages": row["pages"], "media_type": row["media_type"],
            "captured_at": row["captured_at"], "received_at": row["received_at"], "state": row["state"],
            "awaiting_reason": row["awaiting_reason"]}


def search_documents(conn: sqlite3.Connection, *, device: str | None = None, q: str | None = None,
                     limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Arrivals, newest first: ``device`` lists what that box sent, ``q`` searches their text."""
    clauses: list[str] = []
    params: list[Any] = []
    source = f"documents d {_WITH_OBJECT}"
    if q:
        match = fts_query(q)
        if match is None:
            return []
        source = f"documents_fts f JOIN documents d ON d.id = f.rowid {_WITH_OBJECT}"
        clauses.append("documents_fts MATCH ?")
        params.append(match)
    if device:
        clauses.append("d.device = ?")
        params.append(device)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
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
    same = [int(r[0]) for r in conn.execute(
        "SELECT id FROM documents WHERE sha256 = ? AND id != ? ORDER BY id LIMIT ?",
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


# -- issue 10: what the dashboard's device and document pages, search and /metrics read ----------
# Plain SQL over the same tables; FTS5's bm25() orders search results (PostgreSQL: ts_rank).

HISTORY_DAYS = 14
SNIPPET_CHARS = 220
_SPACES = re.compile(r"\s+")


def _ts(iso: str | None) -> float | None:
    """A catalog time (ISO 8601, 'Z') as a Unix timestamp."""
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _health(status_json: str | None) -> dict[str, Any]:
    """The fields of a box's last status that are about its health, not its queue."""
    if not status_json:
        return {}
    try:
        status = json.loads(status_json)
    except ValueError:
        return {}
    if not isinstance(status, dict):
        return {}
    keys = ("disk_free_bytes", "version", "failed_docs", "alarms", "updated_at", "last_error",
            "oldest_age_s", "queue_docs", "queue_bytes", "last_receipt_at")
    return {key: status.get(key) for key in keys}


def metrics_snapshot(conn: sqlite3.Connection, *, now: datetime | None = None,
                     device_series_max: int = 200) -> dict[str, Any]:
    """Everything ``/metrics`` reads from the catalog, in a handful of aggregate queries.

    ``problem_devices`` are the worst ``device_series_max`` devices with a problem (the bounded
    per-device series); ``problem_devices_dropped`` how many more there were.
    """
    params = {"fresh_since": fresh_since(now)}
    d = conn.execute(
        "SELECT"  # noqa: S608 - constant fragments only
        f" coalesce(sum(d.status = 'active' AND {_ONLINE}), 0) AS online,"
        f" coalesce(sum(d.status = 'active' AND NOT {_ONLINE} AND d.last_seen IS NOT NULL), 0) AS offline,"
        " coalesce(sum(d.status = 'active' AND d.last_seen IS NULL), 0) AS never_seen,"
        " coalesce(sum(d.status != 'active'), 0) AS revoked,"
        " coalesce(sum(d.status = 'active' AND d.possible_clone_since IS NOT NULL), 0) AS possible_clone,"
        " coalesce(sum(d.status = 'active' AND coalesce(d.last_error, '') != ''), 0) AS with_error,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_docs END), 0) AS backlog_docs,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_bytes END), 0) AS backlog_bytes,"
        f" coalesce(max(CASE WHEN d.status = 'active' THEN {_OLDEST_AGE} END), 0) AS oldest_age_s"
        " FROM devices d", params).fetchone()
    problem = _PROBLEM.format(age=_OLDEST_AGE)
    rows = conn.execute(
        f"SELECT d.id, {_ONLINE} AS online, d.last_seen, d.backlog_docs, {_OLDEST_AGE} AS oldest_age_s,"  # noqa: S608
        f" json_extract(d.status_json, '$.disk_free_bytes') AS disk_free_bytes"
        f" FROM devices d WHERE ({problem}) > 0"
        f" ORDER BY ({problem}) DESC, oldest_age_s DESC, d.id LIMIT :limit",
        {**params, "limit": device_series_max}).fetchall()
    problem_total = int(conn.execute(f"SELECT count(*) FROM devices d WHERE ({problem}) > 0",  # noqa: S608
                                     params).fetchone()[0])
    objects, stored = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM objects").fetchone()
    return {
        "transfers_active": count_active_transfers(conn),
        "documents": int(conn.execute(f"SELECT count(*) FROM documents WHERE {_STORED}").fetchone()[0]),  # noqa: S608
        "documents_awaiting_original": int(conn.execute(
            "SELECT count(*) FROM documents WHERE state = 'awaiting_original'").fetchone()[0]),
        "objects": int(objects), "stored_bytes": int(stored),
        "backlog_docs": int(d["backlog_docs"]), "backlog_bytes": int(d["backlog_bytes"]),
        "oldest_age_s": float(d["oldest_age_s"]),
        "devices": {k: int(d[k]) for k in ("online", "offline", "never_seen", "revoked", "possible_clone",
                                           "with_error")},
        "problem_devices": [{"id": r["id"], "online": bool(r["online"]), "last_seen_ts": _ts(r["last_seen"]),
                             "backlog_docs": int(r["backlog_docs"]), "oldest_age_s": float(r["oldest_age_s"]),
                             "disk_free_bytes": r["disk_free_bytes"]} for r in rows],
        "problem_devices_dropped": max(0, problem_total - len(rows)),
    }


def presence(conn: sqlite3.Connection, *, now: datetime | None = None) -> dict[str, tuple[bool, str | None]]:
    """Every active device that ever spoke: online now?, and when it last spoke."""
    rows = conn.execute(f"SELECT d.id, {_ONLINE} AS online, d.last_seen FROM devices d"  # noqa: S608
                        " WHERE d.status = 'active' AND d.last_seen IS NOT NULL",
                        {"fresh_since": fresh_since(now)})
    return {r["id"]: (bool(r["online"]), r["last_seen"]) for r in rows}


def record_history(conn: sqlite3.Connection, *, now: datetime | None = None, interval_s: float = 60.0) -> int:
    """Fold the backlog each device last reported into its row for this hour; prune old hours.

    Only devices heard from within ``interval_s`` are sampled, so an hour a box was silent has no
    row (the chart shows a gap: it was offline). Returns the number of devices sampled. No commit.
    """
    at = now or datetime.now(UTC)
    hour = at.strftime("%Y-%m-%dT%H")
    heard = (at - timedelta(seconds=interval_s)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    cur = conn.execute(
        "INSERT INTO device_history (device, hour, backlog_docs, backlog_bytes, samples, online_samples)"  # noqa: S608
        f" SELECT d.id, :hour, d.backlog_docs, d.backlog_bytes, 1, {_ONLINE} FROM devices d"
        " WHERE d.status = 'active' AND d.last_seen >= :heard"
        " ON CONFLICT (device, hour) DO UPDATE SET"
        " backlog_docs = max(device_history.backlog_docs, excluded.backlog_docs),"
        " backlog_bytes = max(device_history.backlog_bytes, excluded.backlog_bytes),"
        " samples = device_history.samples + 1,"
        " online_samples = device_history.online_samples + excluded.online_samples",
        {"hour": hour, "heard": heard, "fresh_since": fresh_since(at)})
    cutoff = (at - timedelta(days=HISTORY_DAYS)).strftime("%Y-%m-%dT%H")
    conn.execute("DELETE FROM device_history WHERE hour < ?", (cutoff,))
    return cur.rowcount


def device_detail(conn: sqlite3.Connection, device_id: str, *, now: datetime | None = None,
                  hours: int = 72, recent: int = 10) -> dict[str, Any] | None:
    """One device for its page: the fleet row, its health, hourly history, recent documents, errors."""
    at = now or datetime.now(UTC)
    row = conn.execute(
        f"SELECT d.id, d.status, d.enrolled_at, {_ONLINE} AS online, d.last_seen, d.backlog_docs,"  # noqa: S608
        " d.backlog_bytes, d.last_error, d.status_json, d.possible_clone_since, d.replaces,"
        f" {_OLDEST_AGE} AS oldest_age_s, {_PROBLEM.format(age=_OLDEST_AGE)} AS problem_rank"
        " FROM devices d WHERE d.id = :id",
        {"id": device_id, "fresh_since": fresh_since(at)}).fetchone()
    if row is None:
        return None
    since_hour = (at - timedelta(hours=hours - 1)).strftime("%Y-%m-%dT%H")
    backlog = {r["hour"]: r for r in conn.execute(
        "SELECT hour, backlog_docs, backlog_bytes, samples, online_samples FROM device_history"
        " WHERE device = ? AND hour >= ? ORDER BY hour", (device_id, since_hour))}
    stored = {r["hour"]: r for r in conn.execute(
        "SELECT substr(t.stored_at, 1, 13) AS hour, count(*) AS docs, coalesce(sum(o.size), 0) AS bytes"
        " FROM transfers t JOIN documents doc ON doc.id = t.document_id"
        " JOIN objects o ON o.sha256 = doc.sha256"
        " WHERE t.device = ? AND t.state = 'stored' AND t.stored_at >= ? GROUP BY hour",
        (device_id, since_hour))}
    history = []
    for k in range(hours):
        hour = (at - timedelta(hours=hours - 1 - k)).strftime("%Y-%m-%dT%H")
        b, s = backlog.get(hour), stored.get(hour)
        history.append({"hour": hour + ":00Z",
                        "backlog_docs": b["backlog_docs"] if b else None,
                        "online": (b["online_samples"] / b["samples"]) if b and b["samples"] else None,
                        "stored_docs": s["docs"] if s else 0, "stored_bytes": s["bytes"] if s else 0})
    documents = [_summary(r) for r in conn.execute(
        f"SELECT {_SUMMARY} FROM documents d {_WITH_OBJECT} WHERE d.device = ?"  # noqa: S608
        " ORDER BY d.id DESC LIMIT ?", (device_id, recent))]
    errors = [dict(r) for r in conn.execute(
        "SELECT tid, updated_at AS at, error_class, error FROM transfers"
        " WHERE device = ? AND state = 'rejected' ORDER BY updated_at DESC LIMIT ?", (device_id, recent))]
    last_receipt = conn.execute("SELECT max(stored_at) FROM transfers WHERE device = ? AND state = 'stored'",
                                (device_id,)).fetchone()[0]
    documents_total = conn.execute(f"SELECT count(*) FROM documents WHERE device = ? AND {_STORED}",  # noqa: S608
                                   (device_id,)).fetchone()[0]
    documents_awaiting = awaiting_load(conn, device_id)[0]
    replaced_by = conn.execute("SELECT id FROM devices WHERE replaces = ?", (device_id,)).fetchone()
    return {
        "id": row["id"], "status": row["status"], "enrolled_at": row["enrolled_at"],
        "online": bool(row["online"]), "last_seen": row["last_seen"], "backlog_docs": row["backlog_docs"],
        "backlog_bytes": row["backlog_bytes"], "last_error": row["last_error"],
        "oldest_age_s": row["oldest_age_s"], "last_receipt": last_receipt,
        "problem": _PROBLEM_NAMES.get(row["problem_rank"]),
        "possible_clone": (possible_clone(conn, device_id, since=row["possible_clone_since"])
                           if row["possible_clone_since"] else None),
        "health": _health(row["status_json"]), "documents_total": int(documents_total),
        "documents_awaiting_original": documents_awaiting,
        "replaces": row["replaces"], "replaced_by": replaced_by[0] if replaced_by else None,
        "history": history, "recent_documents": documents, "recent_errors": errors,
    }


def document_fixity(conn: sqlite3.Connection, doc_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """The fixity events that name this arrival, oldest first (what was received, hashes, when)."""
    rows = conn.execute(
        "SELECT at, event, device, tid, original_sha256, package_sha256, ciphertext_sha256, detail, actor,"
        " object_sha256"
        " FROM fixity WHERE document_id = ? ORDER BY id LIMIT ?", (doc_id, limit))
    return [dict(r) for r in rows]


def _segments(text: str, terms: set[str], *, limit: int = SNIPPET_CHARS) -> list[list[Any]]:
    """``text`` cut to a window around its first matching word, as [[piece, is_match], ...].

    Matching is done on folded words (as the index does), so the piece shown keeps its diacritics;
    the page inserts the pieces as text, never as HTML.
    """
    words = [(m.start(), m.end()) for m in _WORD.finditer(text) if fold(m.group()) in terms]
    start = 0
    if words and words[0][0] > limit // 3:
        start = text.rfind(" ", 0, words[0][0] - limit // 3) + 1
    end = min(len(text), start + limit)
    if end < len(text):
        space = text.rfind(" ", start, end)
        keep_after = words[0][1] if words and words[0][1] <= end else start
        if space > keep_after:
            end = space   # end on a word boundary, never cutting the first match
    pieces: list[list[Any]] = []
    at = start
    for s, e in words:
        if s < start or e > end:
            continue
        if s > at:
            pieces.append([text[at:s], False])
        pieces.append([text[s:e], True])
        at = e
    if at < end:
        pieces.append([text[at:end], False])
    cleaned = [[_SPACES.sub(" ", p), hit] for p, hit in pieces]
    if cleaned and start > 0:
        cleaned.insert(0, ["… ", False])
    if end < len(text):
        cleaned.append([" …", False])
    return [p for p in cleaned if p[0]]


def search_ranked(conn: sqlite3.Connection, *, device: str | None = None, q: str | None = None,
                  received_from: str | None = None, received_before: str | None = None,
                  limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Arrivals for the dashboard: with ``q``, best match first (bm25) with a highlighted snippet of
    the text and the file name; without, newest first. ``received_from``/``received_before`` are
    catalog times (the day boundaries the caller chose, e.g. midnight in Vietnam)."""
    clauses: list[str] = []
    params: list[Any] = []
    terms: set[str] = set()
    source = f"documents d {_WITH_OBJECT}"
    order = "d.id DESC"
    extra = ""
    if q:
        match = fts_query(q)
        if match is None:
            return []
        terms = set(_WORD.findall(fold(q)))
        source = f"documents_fts f JOIN documents d ON d.id = f.rowid {_WITH_OBJECT}"
        clauses.append("documents_fts MATCH ?")
        params.append(match)
        # The file name weighs more than the body: a clerk's name for a scan says what it is.
        extra = ", d.text, bm25(documents_fts, 4.0, 1.0) AS score"
        order = "score, d.id DESC"
    if device:
        clauses.append("d.device = ?")
        params.append(device)
    if received_from:
        clauses.append("d.received_at >= ?")
        params.append(received_from)
    if received_before:
        clauses.append("d.received_at < ?")
        params.append(received_before)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = (f"SELECT {_SUMMARY}{extra} FROM {source}{where}"  # noqa: S608
           f" ORDER BY {order} LIMIT ? OFFSET ?")
    results = []
    for r in conn.execute(sql, [*params, limit, offset]):
        item = _summary(r)
        if q:
            item["score"] = round(-float(r["score"]), 4)   # higher is better, as people expect
            item["snippet"] = _segments(r["text"], terms)
            item["title"] = _segments(r["filename"], terms, limit=1000)
        results.append(item)
    return results
