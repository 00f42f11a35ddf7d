"""The catalog's SQLite schema, its migrations, and opening a connection to it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from central.catalog import records_schema
from central.errors import CatalogError
from protocol.errors import ProtocolError
from protocol.ranges import RangeSet

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
        # The SQL of this step is its own (not the transfers module's helpers): a migration has to
        # keep doing what it did when today's functions change.
        held = RangeSet.of((offset, offset + length) for offset, length in conn.execute(
            "SELECT offset, length FROM segments WHERE tid = ?", (tid,)))
        conn.execute("UPDATE transfers SET size = ?, held = ?, held_bytes = ? WHERE tid = ?",
                     (size, json.dumps(held.as_list(), separators=(",", ":")), held.total(), tid))


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


# A document whose original is stored (not one catalogued from its notice, still on its way).
_STORED = "state = 'stored'"
