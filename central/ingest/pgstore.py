"""``IngestStore`` on PostgreSQL (15, Debian's): the catalog several central workers share.

Same rows and rules as the SQLite catalog (``central.catalog``), with what PostgreSQL changes:
  - Transactions run concurrently (READ COMMITTED), so every read of a transfer inside the writer's
    transaction locks its row (``FOR UPDATE``, several rows in tid order so two workers never
    deadlock): the held ranges are read, extended and written back by one worker at a time.
  - Jobs are claimed with ``FOR UPDATE SKIP LOCKED`` (DESIGN §8: background jobs live in the catalog).
  - Search: the application folds text (``protocol.names.fold``: marks stripped, đ→d, case-folded:
    neither FTS5's remove_diacritics nor every ``unaccent`` build folds đ), PostgreSQL indexes the
    folded words with the ``simple`` configuration, ``unaccent`` guards the query side, and
    ``pg_trgm`` serves substring search on file names.
  - Migrations are numbered in ``sohoa_schema``; each step runs in one transaction.
  - A device's load (admission quotas) is read without a lock: two workers admitting inits of one
    device at the same instant may each let one through, so a quota can be exceeded by at most one
    transfer per extra worker (locking the device row would deadlock against ``touch_devices``).

Timestamps stay ISO-8601 text (the catalog's format), so both backends order and compare alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from central.catalog import (
    MAX_REPLACED,
    ArrivalKey,
    AwaitingDocument,
    DeviceLoad,
    DeviceRecord,
    NewDocument,
    NoticeRecord,
    StoredSegment,
    TransferRecord,
    ranges_json,
    utc_now,
)
from central.errors import CatalogError
from protocol.names import fold
from protocol.ranges import RangeSet
from protocol.transfer import HeldSegment

SCHEMA_VERSION = 4

_V1 = """
CREATE EXTENSION IF NOT EXISTS unaccent;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE TABLE devices (
    id text PRIMARY KEY, verify_key bytea NOT NULL, enrolled_at text NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'revoked')), online boolean NOT NULL DEFAULT false,
    last_seen text, backlog_docs bigint NOT NULL DEFAULT 0, backlog_bytes bigint NOT NULL DEFAULT 0,
    last_error text, status_json text, possible_clone_since text);
CREATE TABLE objects (sha256 text PRIMARY KEY, size bigint NOT NULL, media_type text NOT NULL,
    stored_at text NOT NULL);
CREATE TABLE documents (
    id bigserial PRIMARY KEY, device text NOT NULL REFERENCES devices (id), tid text NOT NULL UNIQUE,
    seq bigint NOT NULL, filename text NOT NULL, sha256 text NOT NULL REFERENCES objects (sha256),
    captured_at text NOT NULL, text_sha256 text NOT NULL, pages integer NOT NULL, received_at text NOT NULL,
    text text NOT NULL, metadata text NOT NULL, package_sha256 text NOT NULL,
    folded_filename text NOT NULL, search tsvector NOT NULL,
    UNIQUE (device, sha256, filename, captured_at, text_sha256));
CREATE INDEX documents_by_device ON documents (device, id);
CREATE INDEX documents_by_received ON documents (received_at);
CREATE INDEX documents_by_sha256 ON documents (sha256, id);
CREATE INDEX documents_search ON documents USING gin (search);
CREATE INDEX documents_filename_trgm ON documents USING gin (folded_filename gin_trgm_ops);
CREATE TABLE transfers (
    tid text PRIMARY KEY, device text NOT NULL REFERENCES devices (id), seq bigint NOT NULL,
    header bytea NOT NULL, state text NOT NULL CHECK (state IN ('receiving', 'stored', 'rejected')),
    created_at text NOT NULL, updated_at text NOT NULL, error text, error_class text,
    document_id bigint REFERENCES documents (id), duplicate boolean NOT NULL DEFAULT false, receipt bytea,
    stored_at text, size bigint, held text NOT NULL DEFAULT '[]', held_bytes bigint NOT NULL DEFAULT 0,
    UNIQUE (device, seq));
CREATE INDEX transfers_by_state ON transfers (state);
CREATE TABLE seq_collisions (device text NOT NULL REFERENCES devices (id), tid text NOT NULL,
    seq bigint NOT NULL, other_tid text NOT NULL, first_seen text NOT NULL, last_seen text NOT NULL,
    PRIMARY KEY (device, tid));
CREATE TABLE segments (tid text NOT NULL REFERENCES transfers (tid), "offset" bigint NOT NULL,
    length integer NOT NULL, crc bigint NOT NULL, log text, pos bigint, PRIMARY KEY (tid, "offset"));
CREATE INDEX segments_by_log ON segments (log);
CREATE TABLE jobs (tid text PRIMARY KEY REFERENCES transfers (tid),
    kind text NOT NULL CHECK (kind IN ('assemble')), created_at text NOT NULL, claimed_by text,
    lease_until text, attempts integer NOT NULL DEFAULT 0, last_error text);
CREATE TABLE fixity (id bigserial PRIMARY KEY, at text NOT NULL, event text NOT NULL, device text NOT NULL,
    tid text NOT NULL, document_id bigint, original_sha256 text, package_sha256 text,
    ciphertext_sha256 text, detail text);
"""

# v2 (progressive sync): arrivals catalogued from their notice before the original is stored.
_V2 = """
ALTER TABLE documents DROP CONSTRAINT IF EXISTS documents_sha256_fkey;
ALTER TABLE documents ADD COLUMN state text NOT NULL DEFAULT 'stored'
    CHECK (state IN ('stored', 'awaiting_original'));
CREATE INDEX documents_awaiting ON documents (device) WHERE state = 'awaiting_original';
CREATE TABLE notices (tid text PRIMARY KEY, device text NOT NULL REFERENCES devices (id), seq bigint NOT NULL,
    payload_sha256 text NOT NULL, document_id bigint REFERENCES documents (id), received_at text NOT NULL,
    UNIQUE (device, seq));
"""

# v3: admission state per device (central.ingest.quota) and the 'expired' transfer state.
_V3 = """
ALTER TABLE devices ADD COLUMN init_tokens double precision, ADD COLUMN init_tokens_at double precision,
    ADD COLUMN strikes double precision NOT NULL DEFAULT 0, ADD COLUMN strikes_at double precision,
    ADD COLUMN misbehaving_since text;
ALTER TABLE transfers DROP CONSTRAINT transfers_state_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_state_check
    CHECK (state IN ('receiving', 'stored', 'rejected', 'expired'));
CREATE INDEX transfers_by_device ON transfers (device, state);
"""

# v4: the revoked device a device replaces (central.catalog v7).
_V4 = """
ALTER TABLE devices ADD COLUMN replaces text REFERENCES devices (id);
CREATE UNIQUE INDEX devices_by_replaces ON devices (replaces) WHERE replaces IS NOT NULL;
"""

# schema version found → the SQL that brings it to the next one.
_MIGRATIONS: dict[int, str] = {0: _V1, 1: _V2, 2: _V3, 3: _V4}


def connect(url: str, *, ensure_schema: bool = False) -> psycopg.Connection[Any]:
    """A connection in autocommit mode: the writer issues BEGIN/SAVEPOINT/COMMIT itself."""
    conn = psycopg.connect(url, autocommit=True)
    if ensure_schema:
        migrate(conn)
    return conn


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the catalog to ``SCHEMA_VERSION`` (one transaction per step, under an advisory lock so
    workers starting together migrate once); return the version found."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7411)")
        conn.execute("CREATE TABLE IF NOT EXISTS sohoa_schema (version integer NOT NULL)")
        row = conn.execute("SELECT version FROM sohoa_schema").fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise CatalogError(f"the catalog has schema version {found}; this sohoa knows up to "
                               f"{SCHEMA_VERSION}", hint="run the sohoa version that wrote it, or newer")
        for version in range(found, SCHEMA_VERSION):
            for statement in _MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)   # constant schema text
        if row is None:
            conn.execute("INSERT INTO sohoa_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        else:
            conn.execute("UPDATE sohoa_schema SET version = %s", (SCHEMA_VERSION,))
    return found


_TRANSFER = ("tid, device, seq, header, state, error, error_class, receipt, size, held, held_bytes")


def _transfer(row: tuple[Any, ...] | None) -> TransferRecord | None:
    if row is None:
        return None
    (tid, device, seq, header, state, error, error_class, receipt, size, held, held_bytes) = row
    return TransferRecord(tid, device, int(seq), bytes(header), state, error, error_class,
                          bytes(receipt) if receipt is not None else None,
                          None if size is None else int(size),
                          tuple((int(s), int(e)) for s, e in json.loads(held)), int(held_bytes))


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PostgresIngestStore:
    """``IngestStore`` over one psycopg connection (the writer's)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def _one(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return self.conn.execute(sql, params).fetchone()

    def _run(self, sql: str, params: tuple[Any, ...]) -> int:
        return int(self.conn.execute(sql, params).rowcount)

    # -- devices ----------------------------------------------------------------------------------
    def add_device(self, device_id: str, verify_key: bytes, *, replaces: str | None = None) -> None:
        self._run("INSERT INTO devices (id, verify_key, enrolled_at, status, replaces)"
                  " VALUES (%s, %s, %s, 'active', %s)", (device_id, verify_key, utc_now(), replaces))

    def get_device(self, device_id: str) -> DeviceRecord | None:
        row = self._one("SELECT id, verify_key, status FROM devices WHERE id = %s", (device_id,))
        return DeviceRecord(row[0], bytes(row[1]), row[2]) if row else None

    def set_device_status(self, device_id: str, status: str) -> bool:
        return self._run("UPDATE devices SET status = %s WHERE id = %s", (status, device_id)) == 1

    def touch_devices(self, device_ids: Iterable[str], at: str) -> None:
        self._run("UPDATE devices SET last_seen = %s WHERE id = ANY(%s)", (at, sorted(set(device_ids))))

    def update_device_status(self, device_id: str, *, online: bool, backlog_docs: int, backlog_bytes: int,
                             last_error: str | None, status_json: str, at: str) -> None:
        self._run("UPDATE devices SET online = %s, backlog_docs = %s, backlog_bytes = %s, last_error = %s,"
                  " status_json = %s, last_seen = %s WHERE id = %s",
                  (online, backlog_docs, backlog_bytes, last_error, status_json, at, device_id))

    def mark_offline(self, device_id: str, *, at: str) -> None:
        self._run("UPDATE devices SET online = false, last_seen = %s WHERE id = %s", (at, device_id))

    def record_seq_collision(self, *, device: str, seq: int, tid: str, other_tid: str, at: str) -> bool:
        new = self._run("INSERT INTO seq_collisions (device, tid, seq, other_tid, first_seen, last_seen)"
                        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (device, tid) DO NOTHING",
                        (device, tid, seq, other_tid, at, at)) == 1
        if not new:
            self._run("UPDATE seq_collisions SET last_seen = %s WHERE device = %s AND tid = %s",
                      (at, device, tid))
        self._run("UPDATE devices SET possible_clone_since = coalesce(possible_clone_since, %s)"
                  " WHERE id = %s", (at, device))
        return new

    # -- admission state ----------------------------------------------------------------------------
    def device_load(self, device: str) -> DeviceLoad:
        row = self._one(
            "SELECT d.init_tokens, d.init_tokens_at, d.strikes, d.strikes_at, d.misbehaving_since,"
            " (SELECT count(*) FROM transfers t WHERE t.device = d.id AND t.state = 'receiving'),"
            " (SELECT coalesce(sum(t.size), 0) FROM transfers t"
            "  WHERE t.device = d.id AND t.state = 'receiving')"
            " FROM devices d WHERE d.id = %s", (device,))
        if row is None:
            return DeviceLoad()
        tokens, tokens_at, strikes, strikes_at, since, count, size = row
        return DeviceLoad(int(count), int(size), tokens, tokens_at, float(strikes), strikes_at, since)

    def set_init_tokens(self, device: str, level: float, at: float) -> None:
        self._run("UPDATE devices SET init_tokens = %s, init_tokens_at = %s WHERE id = %s",
                  (level, at, device))

    def set_strikes(self, device: str, level: float, at: float, *, flag_at: str | None) -> bool:
        row = self._one("SELECT misbehaving_since IS NULL FROM devices WHERE id = %s FOR UPDATE", (device,))
        self._run("UPDATE devices SET strikes = %s, strikes_at = %s,"
                  " misbehaving_since = coalesce(misbehaving_since, %s) WHERE id = %s",
                  (level, at, flag_at, device))
        return flag_at is not None and row is not None and bool(row[0])

    def clear_misbehaving(self, *, quiet_since: float) -> list[str]:
        rows = self.conn.execute("UPDATE devices SET misbehaving_since = NULL, strikes = 0"
                                 " WHERE misbehaving_since IS NOT NULL AND coalesce(strikes_at, 0) < %s"
                                 " RETURNING id", (quiet_since,)).fetchall()
        return sorted(str(r[0]) for r in rows)

    def expire_stalled(self, *, before: str, limit: int = 500) -> list[tuple[str, str]]:
        rows = self.conn.execute(
            "SELECT t.tid, t.device FROM transfers t WHERE t.state = 'receiving' AND t.updated_at < %s"
            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.tid = t.tid)"
            " ORDER BY t.updated_at LIMIT %s FOR UPDATE SKIP LOCKED", (before, limit)).fetchall()
        now = utc_now()
        for tid, _ in rows:
            self._run("UPDATE transfers SET state = 'expired', held = '[]', held_bytes = 0, error = %s,"
                      " error_class = 'TransferExpired', updated_at = %s WHERE tid = %s",
                      (f"no progress since {before} or earlier: its bytes were dropped", now, tid))
            self._run("DELETE FROM segments WHERE tid = %s", (tid,))
        return [(str(t), str(d)) for t, d in rows]

    def revive_transfer(self, tid: str) -> None:
        self._run("UPDATE transfers SET state = 'receiving', held = '[]', held_bytes = 0, error = NULL,"
                  " error_class = NULL, updated_at = %s WHERE tid = %s AND state = 'expired'",
                  (utc_now(), tid))

    def journals_of_receiving(self) -> list[str]:
        rows = self.conn.execute("SELECT DISTINCT s.log FROM segments s JOIN transfers t ON t.tid = s.tid"
                                 " WHERE t.state = 'receiving' AND s.log IS NOT NULL").fetchall()
        return [str(r[0]) for r in rows]

    def transfers_in_journal(self, log: str) -> list[tuple[str, str]]:
        rows = self.conn.execute(
            "SELECT DISTINCT t.tid, t.device FROM segments s JOIN transfers t ON t.tid = s.tid"
            " WHERE s.log = %s AND t.state = 'receiving' ORDER BY t.tid", (log,)).fetchall()
        return [(str(t), str(d)) for t, d in rows]

    def forget_held(self, tid: str, reason: str) -> None:
        self._run("UPDATE transfers SET state = 'expired', held = '[]', held_bytes = 0, error = %s,"
                  " error_class = 'StagingLost', updated_at = %s WHERE tid = %s AND state = 'receiving'",
                  (reason[:2000], utc_now(), tid))
        self._run("DELETE FROM segments WHERE tid = %s", (tid,))
        self._run("DELETE FROM jobs WHERE tid = %s", (tid,))

    # -- transfers and the segment log (rows locked: workers write them concurrently) --------------
    def get_transfer(self, tid: str) -> TransferRecord | None:
        return _transfer(self._one(f"SELECT {_TRANSFER} FROM transfers WHERE tid = %s"  # noqa: S608 - constant
                                   " FOR UPDATE", (tid,)))

    def get_transfers(self, tids: Iterable[str]) -> dict[str, TransferRecord]:
        sql = f"SELECT {_TRANSFER} FROM transfers WHERE tid = ANY(%s) ORDER BY tid FOR UPDATE"  # noqa: S608
        rows = self.conn.execute(sql, (sorted(set(tids)),)).fetchall()
        records = (_transfer(row) for row in rows)
        return {r.tid: r for r in records if r is not None}

    def transfer_by_seq(self, device: str, seq: int) -> TransferRecord | None:
        return _transfer(self._one(f"SELECT {_TRANSFER} FROM transfers"  # noqa: S608 - constant columns
                                   " WHERE device = %s AND seq = %s", (device, seq)))

    def insert_transfer(self, *, tid: str, device: str, seq: int, header: bytes, size: int | None) -> None:
        now = utc_now()
        self._run("INSERT INTO transfers (tid, device, seq, header, state, created_at, updated_at, size)"
                  " VALUES (%s, %s, %s, %s, 'receiving', %s, %s, %s)",
                  (tid, device, seq, header, now, now, size))

    def reject_transfer(self, tid: str, error: str, error_class: str) -> None:
        self._run("UPDATE transfers SET state = 'rejected', error = %s, error_class = %s, updated_at = %s"
                  " WHERE tid = %s", (error, error_class, utc_now(), tid))
        self._run("DELETE FROM segments WHERE tid = %s", (tid,))
        self._run("DELETE FROM jobs WHERE tid = %s", (tid,))

    def store_transfer(self, tid: str, *, document_id: int, duplicate: bool, receipt: bytes,
                       stored_at: str) -> None:
        self._run("UPDATE transfers SET state = 'stored', document_id = %s, duplicate = %s, receipt = %s,"
                  " stored_at = %s, updated_at = %s WHERE tid = %s",
                  (document_id, duplicate, receipt, stored_at, stored_at, tid))
        self._run("DELETE FROM segments WHERE tid = %s", (tid,))
        self._run("DELETE FROM jobs WHERE tid = %s", (tid,))

    def add_segments(self, tid: str, segments: Iterable[StoredSegment]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(
                'INSERT INTO segments (tid, "offset", length, crc, log, pos) VALUES (%s, %s, %s, %s, %s, %s)'
                ' ON CONFLICT (tid, "offset") DO NOTHING',
                [(tid, s.offset, s.length, s.crc, s.log, s.pos) for s in segments])

    def set_held(self, tid: str, held: RangeSet) -> None:
        self._run("UPDATE transfers SET held = %s, held_bytes = %s, updated_at = %s WHERE tid = %s",
                  (ranges_json(held), held.total(), utc_now(), tid))

    def segment_at(self, tid: str, offset: int) -> HeldSegment | None:
        row = self._one('SELECT length, crc FROM segments WHERE tid = %s AND "offset" = %s', (tid, offset))
        return HeldSegment(offset, int(row[0]), int(row[1])) if row else None

    def stored_segments(self, tid: str) -> list[StoredSegment]:
        rows = self.conn.execute('SELECT "offset", length, crc, log, pos FROM segments WHERE tid = %s'
                                 ' ORDER BY "offset"', (tid,)).fetchall()
        return [StoredSegment(int(o), int(n), int(c), log, None if pos is None else int(pos))
                for o, n, c, log, pos in rows]

    def journal_in_use(self, log: str) -> bool:
        return self._one("SELECT 1 FROM segments WHERE log = %s LIMIT 1", (log,)) is not None

    def segments_in_journal(self, log: str) -> list[tuple[str, StoredSegment, bool]]:
        # FOR UPDATE on the transfers: another worker completing one of them (and giving it a job,
        # whose assembler reads these rows) waits for this move to commit, then reads the new rows.
        rows = self.conn.execute(
            "SELECT s.tid, s.\"offset\", s.length, s.crc, s.log, s.pos,"
            " t.state = 'receiving' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.tid = s.tid)"
            " FROM segments s JOIN transfers t ON t.tid = s.tid WHERE s.log = %s ORDER BY s.pos"
            " FOR UPDATE OF t", (log,)).fetchall()
        return [(str(r[0]), StoredSegment(r[1], r[2], r[3], r[4], r[5]), bool(r[6])) for r in rows]

    def move_segments(self, moves: Iterable[tuple[str, int, str, int]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany("UPDATE segments SET log = %s, pos = %s WHERE tid = %s AND \"offset\" = %s",
                            [(new_log, pos, tid, offset) for tid, offset, new_log, pos in moves])

    # -- jobs ---------------------------------------------------------------------------------------
    def add_job(self, tid: str) -> None:
        self._run("INSERT INTO jobs (tid, kind, created_at) VALUES (%s, 'assemble', %s)"
                  " ON CONFLICT (tid) DO NOTHING", (tid, utc_now()))

    def claim_job(self, tid: str, *, worker: str, lease_s: float) -> bool:
        now = datetime.now(UTC)
        return self._run("UPDATE jobs SET claimed_by = %s, lease_until = %s, attempts = attempts + 1"
                         " WHERE tid = %s AND (claimed_by IS NULL OR claimed_by = %s OR lease_until < %s)",
                         (worker, _iso(now + timedelta(seconds=lease_s)), tid, worker, _iso(now))) == 1

    def claimable_jobs(self, *, worker: str, limit: int = 100) -> list[str]:
        rows = self.conn.execute(
            "SELECT tid FROM jobs WHERE claimed_by IS NULL OR claimed_by = %s OR lease_until < %s"
            " ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED", (worker, utc_now(), limit)).fetchall()
        return [str(r[0]) for r in rows]

    def release_job(self, tid: str, error: str) -> None:
        self._run("UPDATE jobs SET claimed_by = NULL, lease_until = NULL, last_error = %s WHERE tid = %s",
                  (error[:2000], tid))

    def complete_transfers_without_job(self, limit: int = 100) -> list[str]:
        rows = self.conn.execute(
            "SELECT t.tid FROM transfers t LEFT JOIN jobs j ON j.tid = t.tid WHERE t.state = 'receiving'"
            " AND t.size IS NOT NULL AND t.held_bytes = t.size AND j.tid IS NULL LIMIT %s",
            (limit,)).fetchall()
        return [str(r[0]) for r in rows]

    # -- objects, arrivals, fixity ----------------------------------------------------------------
    def object_exists(self, sha256: str) -> bool:
        return self._one("SELECT 1 FROM objects WHERE sha256 = %s", (sha256,)) is not None

    def arrival_by_key(self, key: ArrivalKey) -> int | None:
        row = self._one("SELECT id FROM documents WHERE device = %s AND sha256 = %s AND filename = %s"
                        " AND captured_at = %s AND text_sha256 = %s",
                        (key.device, key.sha256, key.filename, key.captured_at, key.text_sha256))
        return int(row[0]) if row else None

    def insert_document(self, doc: NewDocument, *, awaiting: bool = False) -> int:
        if not awaiting:
            self._run("INSERT INTO objects (sha256, size, media_type, stored_at) VALUES (%s, %s, %s, %s)"
                      " ON CONFLICT (sha256) DO NOTHING",
                      (doc.sha256, doc.size, doc.media_type, doc.received_at))
        key = doc.key
        folded_name = fold(doc.filename)
        row = self._one(
            "INSERT INTO documents (device, tid, seq, filename, sha256, captured_at, text_sha256, pages,"
            " received_at, text, metadata, package_sha256, folded_filename, search, state) VALUES (%s, %s,"
            " %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, to_tsvector('simple', %s), %s) RETURNING id",
            (doc.device, doc.tid, doc.seq, doc.filename, doc.sha256, doc.captured_at, key.text_sha256,
             doc.pages, doc.received_at, doc.text, doc.metadata, doc.package_sha256, folded_name,
             f"{folded_name} {fold(doc.text)}", "awaiting_original" if awaiting else "stored"))
        assert row is not None
        return int(row[0])

    # -- notices ----------------------------------------------------------------------------------
    def get_notice(self, tid: str) -> NoticeRecord | None:
        row = self._one("SELECT tid, device, seq, payload_sha256, document_id FROM notices WHERE tid = %s",
                        (tid,))
        return NoticeRecord(*tuple(row)) if row else None

    def notice_by_seq(self, device: str, seq: int) -> NoticeRecord | None:
        row = self._one("SELECT tid, device, seq, payload_sha256, document_id FROM notices"
                        " WHERE device = %s AND seq = %s", (device, seq))
        return NoticeRecord(*tuple(row)) if row else None

    def insert_notice(self, *, tid: str, device: str, seq: int, payload_sha256: str,
                      document_id: int | None, at: str) -> None:
        self._run("INSERT INTO notices (tid, device, seq, payload_sha256, document_id, received_at)"
                  " VALUES (%s, %s, %s, %s, %s, %s)", (tid, device, seq, payload_sha256, document_id, at))

    def awaiting_load(self, device: str) -> tuple[int, int]:
        row = self._one("SELECT count(*), coalesce(sum(octet_length(text)), 0) FROM documents"
                        " WHERE device = %s AND state = 'awaiting_original'", (device,))
        assert row is not None
        return int(row[0]), int(row[1])

    def awaiting_document(self, *, device: str | None = None, tid: str | None = None,
                          doc_id: int | None = None) -> AwaitingDocument | None:
        if doc_id is not None:
            row = self._one("SELECT id, sha256 FROM documents WHERE id = %s AND state = 'awaiting_original'"
                            " FOR UPDATE", (doc_id,))
        else:
            row = self._one("SELECT id, sha256 FROM documents WHERE tid = %s AND device = %s"
                            " AND state = 'awaiting_original' FOR UPDATE", (tid, device))
        return AwaitingDocument(int(row[0]), str(row[1])) if row else None

    def complete_document(self, doc_id: int, doc: NewDocument) -> None:
        self._run("INSERT INTO objects (sha256, size, media_type, stored_at) VALUES (%s, %s, %s, %s)"
                  " ON CONFLICT (sha256) DO NOTHING", (doc.sha256, doc.size, doc.media_type, doc.received_at))
        folded_name = fold(doc.filename)
        self._run(
            "UPDATE documents SET filename = %s, sha256 = %s, captured_at = %s, text_sha256 = %s, pages = %s,"
            " received_at = %s, text = %s, metadata = %s, package_sha256 = %s, folded_filename = %s,"
            " search = to_tsvector('simple', %s), state = 'stored' WHERE id = %s",
            (doc.filename, doc.sha256, doc.captured_at, doc.key.text_sha256, doc.pages, doc.received_at,
             doc.text, doc.metadata, doc.package_sha256, folded_name, f"{folded_name} {fold(doc.text)}",
             doc_id))

    def replaced_awaiting(self, device: str, sha256: str) -> list[int]:
        rows = self.conn.execute(
            "WITH RECURSIVE chain (id, depth) AS ("
            " SELECT replaces, 1 FROM devices WHERE id = %s AND replaces IS NOT NULL"
            " UNION SELECT d.replaces, c.depth + 1 FROM devices d JOIN chain c ON d.id = c.id"
            "  WHERE d.replaces IS NOT NULL AND c.depth < %s)"
            " SELECT doc.id FROM documents doc JOIN chain ON doc.device = chain.id"
            " WHERE doc.sha256 = %s AND doc.state = 'awaiting_original' ORDER BY doc.id",
            (device, MAX_REPLACED, sha256)).fetchall()
        return [int(r[0]) for r in rows]

    def drop_awaiting_document(self, doc_id: int, *, successor: int) -> None:
        # Corrections are not in PostgreSQL yet (the HTTP side reads SQLite): only the notice moves.
        self._run("UPDATE notices SET document_id = %s WHERE document_id = %s", (successor, doc_id))
        self._run("DELETE FROM documents WHERE id = %s AND state = 'awaiting_original'", (doc_id,))

    def add_fixity(self, *, event: str, device: str, tid: str, at: str, document_id: int | None = None,
                   original_sha256: str | None = None, package_sha256: str | None = None,
                   ciphertext_sha256: str | None = None, detail: str | None = None) -> None:
        self._run("INSERT INTO fixity (at, event, device, tid, document_id, original_sha256, package_sha256,"
                  " ciphertext_sha256, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                  (at, event, device, tid, document_id, original_sha256, package_sha256, ciphertext_sha256,
                   detail))

    # -- search (what GET /api/documents?q= needs; the HTTP side still reads SQLite) -----------------
    def search(self, q: str, *, device: str | None = None, limit: int = 100) -> list[int]:
        """Arrival ids, newest first: every folded word of ``q`` in the name or text, or ``q`` a
        substring of the folded file name (trigram index)."""
        folded = fold(q).strip()
        if not folded:
            return []
        literal = folded.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.conn.execute(
            "SELECT id FROM documents WHERE (search @@ plainto_tsquery('simple', unaccent(%s))"
            " OR folded_filename LIKE '%%' || %s || '%%' ESCAPE '\\') AND (%s::text IS NULL OR device = %s)"
            " ORDER BY id DESC LIMIT %s", (folded, literal, device, device, limit)).fetchall()
        return [int(r[0]) for r in rows]
