"""The edge outbox (DESIGN §5): the durable source of truth for every document the box has taken.

paho keeps its session in memory only and a broker PUBACK promises nothing durable, so what has
been taken, packaged, sent and receipted lives here, in SQLite, and survives any crash.

Rules:
  - One writer connection (aiosqlite's thread), WAL. SQL lives in plain functions below that take
    the connection; :class:`Outbox` only sequences them.
  - ``synchronous=NORMAL`` for ordinary commits (a crash may lose the last few, never corrupt), and
    ``synchronous=FULL`` for the commits that let something happen outside the database: an
    envelope that may now be sent (``mark_packaged``) and a receipt that lets the caller delete the
    plaintext original (``mark_delivered``). SQLite refuses to change the level inside a
    transaction, so every write is an explicit ``BEGIN IMMEDIATE … COMMIT`` with the level set first.
  - ``seq`` is the per-device sequence number of the envelope header: taken from a counter row in
    the same transaction as the insert, so it is monotonic and never reused, even after deleting rows.
  - ``sendable`` pages with a keyset on ``(priority DESC, seq)`` over a partial index: thousands of
    queued rows never delay the first upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiosqlite

SCHEMA_VERSION = 1


class DocState(StrEnum):
    STABLE = "stable"          # settled file taken; original still in the scan folder or processed/
    OCR_DONE = "ocr_done"
    PACKAGED = "packaged"      # envelope on disk, never sent
    SENDING = "sending"        # at least one transfer attempt started: resume from central's ack
    DELIVERED = "delivered"    # central's signed receipt arrived: plaintext may go
    FAILED = "failed"          # quarantined, with a reason
    DUPLICATE = "duplicate"    # same content as another row; never sent


QUEUED_STATES = (DocState.STABLE, DocState.OCR_DONE, DocState.PACKAGED, DocState.SENDING)
SENDABLE_STATES = (DocState.PACKAGED, DocState.SENDING)


class OutboxError(Exception):
    """A state transition the outbox refuses (unknown tid, or a row in the wrong state)."""

    hint = "the outbox row changed under the caller; re-read it with Outbox.get"

    def __init__(self, message: str, *, tid: str | None = None) -> None:
        super().__init__(message)
        self.tid = tid


@dataclass(frozen=True, slots=True)
class Doc:
    tid: str
    seq: int
    state: DocState
    name: str
    src_path: str
    size: int
    sha256: str
    media_type: str
    pages: int
    priority: int
    envelope_path: str | None
    signed_header: bytes | None
    ciphertext_size: int | None
    segment_size: int | None
    attempts: int
    reason: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None
    central_document_id: int | None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    counts: Mapping[str, int]
    queued_docs: int
    queued_bytes: int
    oldest_age_s: float
    last_receipt_at: float | None
    failed: int


# -- schema -------------------------------------------------------------------------------------

_SCHEMA_V1 = """
CREATE TABLE docs (
    tid                 TEXT PRIMARY KEY,
    seq                 INTEGER NOT NULL UNIQUE,
    state               TEXT NOT NULL CHECK (state IN
                            ('stable','ocr_done','packaged','sending','delivered','failed','duplicate')),
    name                TEXT NOT NULL,
    src_path            TEXT NOT NULL,
    size                INTEGER NOT NULL CHECK (size >= 0),
    sha256              TEXT NOT NULL,
    media_type          TEXT NOT NULL,
    pages               INTEGER NOT NULL,
    priority            INTEGER NOT NULL DEFAULT 0,
    envelope_path       TEXT,
    signed_header       BLOB,
    ciphertext_size     INTEGER,
    segment_size        INTEGER,
    attempts            INTEGER NOT NULL DEFAULT 0,
    reason              TEXT,
    duplicate_of        TEXT,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    delivered_at        REAL,
    central_document_id INTEGER
) STRICT;
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
INSERT INTO counters (name, value) VALUES ('seq', 0);
CREATE INDEX docs_sendable ON docs (priority DESC, seq) WHERE state IN ('packaged', 'sending');
CREATE INDEX docs_state ON docs (state);
CREATE INDEX docs_sha256 ON docs (sha256);
CREATE INDEX docs_envelope ON docs (delivered_at) WHERE state = 'delivered' AND envelope_path IS NOT NULL;
"""

_COLUMNS = ("tid, seq, state, name, src_path, size, sha256, media_type, pages, priority, envelope_path, "
            "signed_header, ciphertext_size, segment_size, attempts, reason, created_at, updated_at, "
            "delivered_at, central_document_id")


async def _migrate(db: aiosqlite.Connection) -> None:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise OutboxError(f"outbox schema version {version} is newer than this software "
                          f"({SCHEMA_VERSION}); upgrade sohoa before running it on this database")
    if version == 0:
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA_V1.split(";"):
                if statement.strip():
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise


def _doc(row: aiosqlite.Row | tuple[Any, ...]) -> Doc:
    (tid, seq, state, name, src_path, size, sha256, media_type, pages, priority, envelope_path,
     signed_header, ciphertext_size, segment_size, attempts, reason, created_at, updated_at,
     delivered_at, central_document_id) = tuple(row)
    return Doc(tid=tid, seq=seq, state=DocState(state), name=name, src_path=src_path, size=size,
               sha256=sha256, media_type=media_type, pages=pages, priority=priority,
               envelope_path=envelope_path,
               signed_header=bytes(signed_header) if signed_header is not None else None,
               ciphertext_size=ciphertext_size, segment_size=segment_size, attempts=attempts,
               reason=reason, created_at=created_at, updated_at=updated_at, delivered_at=delivered_at,
               central_document_id=central_document_id)


# -- SQL, one plain function per statement ------------------------------------------------------

async def _next_seq(db: aiosqlite.Connection) -> int:
    async with db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value") as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _insert(db: aiosqlite.Connection, *, tid: str, seq: int, state: DocState, name: str,
                  src_path: str, size: int, sha256: str, media_type: str, pages: int, priority: int,
                  now: float, duplicate_of: str | None = None) -> None:
    await db.execute(
        "INSERT INTO docs (tid, seq, state, name, src_path, size, sha256, media_type, pages, priority, "
        "duplicate_of, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (tid, seq, state.value, name, src_path, size, sha256, media_type, pages, priority,
         duplicate_of, now, now))


async def _select_one(db: aiosqlite.Connection, where: str, params: tuple[Any, ...]) -> Doc | None:
    async with db.execute(f"SELECT {_COLUMNS} FROM docs WHERE {where} LIMIT 1", params) as cur:  # noqa: S608
        row = await cur.fetchone()
    return _doc(row) if row is not None else None


async def _select_many(db: aiosqlite.Connection, where: str, params: tuple[Any, ...]) -> list[Doc]:
    async with db.execute(f"SELECT {_COLUMNS} FROM docs WHERE {where}", params) as cur:  # noqa: S608
        return [_doc(row) for row in await cur.fetchall()]


async def _transition(db: aiosqlite.Connection, tid: str, allowed: tuple[DocState, ...],
                      assignments: str, params: tuple[Any, ...]) -> int:
    states = ",".join(f"'{s.value}'" for s in allowed)
    cur = await db.execute(
        f"UPDATE docs SET {assignments} WHERE tid = ? AND state IN ({states})",  # noqa: S608
        (*params, tid))
    return cur.rowcount


async def _state_of(db: aiosqlite.Connection, tid: str) -> DocState | None:
    async with db.execute("SELECT state FROM docs WHERE tid = ?", (tid,)) as cur:
        row = await cur.fetchone()
    return DocState(row[0]) if row else None


def _create_private(path: Path) -> None:
    """Create the database file 0600 in a 0700 dir before SQLite does (its -wal/-shm copy the mode)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))


async def _configure(db: aiosqlite.Connection, path: Path) -> None:
    async with db.execute("PRAGMA journal_mode=WAL") as cur:
        mode = await cur.fetchone()
    if mode is None or str(mode[0]).lower() != "wal":
        raise OutboxError(f"could not switch {path} to WAL journaling (got {mode!r})")
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.execute("PRAGMA busy_timeout=5000")


class Outbox:
    """The outbox over one aiosqlite writer connection. Open with :meth:`open`."""

    def __init__(self, db: aiosqlite.Connection, *, cap_bytes: int, clock: Callable[[], float]) -> None:
        self._db = db
        self.cap_bytes = cap_bytes
        self._clock = clock
        self._durable = False
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, *, cap_bytes: int = 8 * 1024**3,
                   clock: Callable[[], float] = time.time) -> Outbox:
        _create_private(path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so the synchronous level can be
        # switched between transactions (SQLite refuses it inside one).
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await _configure(db, path)
            await _migrate(db)
        except BaseException:
            await db.close()
            raise
        return cls(db, cap_bytes=cap_bytes, clock=clock)

    async def close(self) -> None:
        await self._db.close()

    @contextlib.asynccontextmanager
    async def _write(self, *, durable: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        # Several tasks share the one connection; a transaction spans awaits, so serialise them.
        async with self._write_lock:
            if durable != self._durable:
                await self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._durable = durable
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                await self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that fails with SQLITE_FULL may leave the transaction open; without the
                # rollback every later BEGIN would fail ("within a transaction") after space is back.
                if self._db.in_transaction:
                    with contextlib.suppress(aiosqlite.Error):
                        await self._db.execute("ROLLBACK")
                raise

    async def _require(self, tid: str, rowcount: int, what: str) -> None:
        if rowcount == 1:
            return
        state = await _state_of(self._db, tid)
        if state is None:
            raise OutboxError(f"{what}: no outbox row {tid}", tid=tid)
        raise OutboxError(f"{what}: row {tid} is {state.value}", tid=tid)

    # -- creation ----------------------------------------------------------------------------------
    async def find_active_by_sha256(self, sha256: str) -> Doc | None:
        """Any row with this content that is not failed or a duplicate (delivered included)."""
        return await _select_one(self._db, "sha256 = ? AND state NOT IN ('failed', 'duplicate') "
                                           "ORDER BY seq", (sha256,))

    async def add(self, *, name: str, src_path: str, size: int, sha256: str, media_type: str,
                  pages: int, priority: int = 0) -> Doc:
        tid = uuid.uuid4().hex
        # Durable: the caller moves the scan out of the watch folder right after this commit.
        async with self._write(durable=True) as db:
            seq = await _next_seq(db)
            await _insert(db, tid=tid, seq=seq, state=DocState.STABLE, name=name, src_path=src_path,
                          size=size, sha256=sha256, media_type=media_type, pages=pages,
                          priority=priority, now=self._clock())
        doc = await self.get(tid)
        assert doc is not None
        return doc

    async def add_duplicate(self, *, name: str, sha256: str, size: int, of_tid: str) -> Doc:
        tid = uuid.uuid4().hex
        async with self._write() as db:
            seq = await _next_seq(db)
            await _insert(db, tid=tid, seq=seq, state=DocState.DUPLICATE, name=name, src_path="",
                          size=size, sha256=sha256, media_type="", pages=0, priority=0,
                          now=self._clock(), duplicate_of=of_tid)
            await db.execute("UPDATE docs SET reason = ? WHERE tid = ?", (f"duplicate of {of_tid}", tid))
        doc = await self.get(tid)
        assert doc is not None
        return doc

    # -- transitions -------------------------------------------------------------------------------
    async def update_src(self, tid: str, src_path: str) -> None:
        async with self._write() as db:
            cur = await db.execute("UPDATE docs SET src_path = ?, updated_at = ? WHERE tid = ?",
                                   (src_path, self._clock(), tid))
            await self._require(tid, cur.rowcount, "update_src")

    async def mark_ocr_done(self, tid: str, pages: int) -> None:
        async with self._write() as db:
            n = await _transition(db, tid, (DocState.STABLE, DocState.OCR_DONE),
                                  "state = 'ocr_done', pages = ?, updated_at = ?", (pages, self._clock()))
            await self._require(tid, n, "mark_ocr_done")

    async def mark_packaged(self, tid: str, *, envelope_path: str, signed_header: bytes,
                            ciphertext_size: int, segment_size: int) -> None:
        async with self._write(durable=True) as db:
            n = await _transition(
                db, tid, (DocState.STABLE, DocState.OCR_DONE),
                "state = 'packaged', envelope_path = ?, signed_header = ?, ciphertext_size = ?, "
                "segment_size = ?, updated_at = ?",
                (envelope_path, signed_header, ciphertext_size, segment_size, self._clock()))
            await self._require(tid, n, "mark_packaged")

    async def mark_sending(self, tid: str) -> None:
        async with self._write() as db:
            n = await _transition(db, tid, SENDABLE_STATES, "state = 'sending', updated_at = ?",
                                  (self._clock(),))
            await self._require(tid, n, "mark_sending")

    async def mark_delivered(self, tid: str, *, central_document_id: int, duplicate: bool) -> None:
        """Record central's receipt. Once this returns, the caller may delete the plaintext."""
        now = self._clock()
        async with self._write(durable=True) as db:
            n = await _transition(
                db, tid, SENDABLE_STATES,
                "state = 'delivered', delivered_at = ?, central_document_id = ?, reason = ?, "
                "updated_at = ?",
                (now, central_document_id, "central already held this content" if duplicate else None,
                 now))
            if n == 0 and await _state_of(db, tid) is DocState.DELIVERED:
                return   # a repeated receipt: already durable
            await self._require(tid, n, "mark_delivered")

    async def mark_failed(self, tid: str, reason: str) -> None:
        async with self._write(durable=True) as db:
            # FAILED → FAILED only updates the reason: the uplink records a rejection and the
            # service's quarantine step records it again with the file's new place.
            n = await _transition(db, tid, (*QUEUED_STATES, DocState.FAILED),
                                  "state = 'failed', reason = ?, updated_at = ?", (reason, self._clock()))
            await self._require(tid, n, "mark_failed")

    async def bump_attempts(self, tid: str, reason: str) -> int:
        async with self._write() as db:
            async with db.execute(
                    "UPDATE docs SET attempts = attempts + 1, reason = ?, updated_at = ? WHERE tid = ? "
                    "RETURNING attempts", (reason, self._clock(), tid)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise OutboxError(f"bump_attempts: no outbox row {tid}", tid=tid)
            return int(row[0])

    async def clear_envelope(self, tid: str) -> None:
        async with self._write() as db:
            cur = await db.execute("UPDATE docs SET envelope_path = NULL, updated_at = ? WHERE tid = ?",
                                   (self._clock(), tid))
            await self._require(tid, cur.rowcount, "clear_envelope")

    # -- queries -----------------------------------------------------------------------------------
    async def get(self, tid: str) -> Doc | None:
        return await _select_one(self._db, "tid = ?", (tid,))

    async def unfinished(self) -> list[Doc]:
        """STABLE / OCR_DONE rows to resume after a restart, oldest first."""
        return await _select_many(self._db, "state IN ('stable', 'ocr_done') ORDER BY seq", ())

    async def sendable(self, limit: int = 16, after_seq: int | None = None) -> list[Doc]:
        """PACKAGED/SENDING rows by priority (high first) then seq; one page of at most ``limit``.

        ``after_seq`` is the seq of the last row of the previous page (keyset paging).
        """
        where = "state IN ('packaged', 'sending')"
        params: tuple[Any, ...] = ()
        if after_seq is not None:
            async with self._db.execute("SELECT priority FROM docs WHERE seq = ?", (after_seq,)) as cur:
                row = await cur.fetchone()
            if row is not None:
                where += " AND (priority < ? OR (priority = ? AND seq > ?))"
                params = (row[0], row[0], after_seq)
            else:
                where += " AND seq > ?"
                params = (after_seq,)
        return await _select_many(self._db, f"{where} ORDER BY priority DESC, seq LIMIT ?",
                                  (*params, limit))

    async def delivered_with_files(self, limit: int = 100) -> list[Doc]:
        return await _select_many(
            self._db, "state = 'delivered' AND envelope_path IS NOT NULL ORDER BY delivered_at LIMIT ?",
            (limit,))

    async def _queued_bytes(self) -> int:
        async with self._db.execute(
                "SELECT COALESCE(SUM(size + COALESCE(ciphertext_size, 0)), 0) FROM docs "
                "WHERE state IN ('stable', 'ocr_done', 'packaged', 'sending')") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def stats(self) -> OutboxStats:
        async with self._db.execute("SELECT state, COUNT(*) FROM docs GROUP BY state") as cur:
            counts = {str(state): int(n) for state, n in await cur.fetchall()}
        async with self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size + COALESCE(ciphertext_size, 0)), 0), MIN(created_at) "
                "FROM docs WHERE state IN ('stable', 'ocr_done', 'packaged', 'sending')") as cur:
            row = await cur.fetchone()
        assert row is not None
        queued_docs, queued_bytes, oldest = int(row[0]), int(row[1]), row[2]
        async with self._db.execute("SELECT MAX(delivered_at) FROM docs WHERE state = 'delivered'") as cur:
            last = await cur.fetchone()
        return OutboxStats(
            counts=MappingProxyType({s.value: counts.get(s.value, 0) for s in DocState}),
            queued_docs=queued_docs, queued_bytes=queued_bytes,
            oldest_age_s=max(0.0, self._clock() - oldest) if oldest is not None else 0.0,
            last_receipt_at=last[0] if last else None, failed=counts.get(DocState.FAILED.value, 0))

    async def room_for(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit under the cap (queued originals plus their envelopes)."""
        return await self._queued_bytes() + nbytes <= self.cap_bytes
