"""The edge outbox (DESIGN §5): the durable source of truth for every document the box has taken.

paho keeps its session in memory only and a broker PUBACK promises nothing durable, so what has
been taken, packaged, sent and receipted lives here, in SQLite, and survives any crash.

Rules (everything that decides what a row may become lives in this module):

  1. A row has two independent coordinates: its **state** (how far the document has travelled
     towards central) and its **place** (where the original's bytes are on this box). ``state``
     only moves along :data:`TRANSITIONS`, ``place`` only along :data:`PLACE_MOVES`; every write
     below reads those tables, so an illegal move is an :class:`OutboxError`, never a silent update.
  2. Workers record *facts* (taken, packaged, sending, delivered with the receipted sha256, failed
     with a reason); they never move or delete files because of them. The custody reconciler
     (``edge.custody``) reads rows whose place disagrees with their state and acts on the files:
     that is level-triggered, so "what if it crashes here?" has one answer — run it again.
  3. ``delivered`` and ``failed`` are final states. What happens to the files afterwards (deleted,
     kept, returned to the scan folder as a changed file, quarantined for the clerk) is a place.
  4. One writer connection (aiosqlite's thread), WAL. Every write is ``BEGIN IMMEDIATE … COMMIT``
     with ``synchronous=FULL`` for the commits that let something happen outside the database
     (a scan leaving the watch folder, an envelope becoming sendable, a receipt that lets custody
     delete plaintext) and ``NORMAL`` for the rest. SQL lives in plain functions taking the
     connection; :class:`Outbox` only sequences them.
  5. ``seq`` (the envelope header's per-device sequence number) comes from a counter row bumped in
     the same transaction as the insert: monotonic, never reused. A new outbox starts the counter
     at the current time in milliseconds, so a re-imaged box (same identity, empty outbox) never
     reuses a number its earlier life sent; two boxes sharing one identity (a cloned SD card) do
     collide, which is how central notices them.
  6. ``sendable`` pages with a keyset on ``(priority DESC, seq)`` over a partial index: thousands of
     queued rows never delay the first upload.
  7. A row's **notice** (its text and metadata, sealed, sent ahead of the original: protocol.notice) is
     a third coordinate, ``notice_state``, moving only along :data:`NOTICE_MOVES`. It is recorded with
     the envelope in ``mark_packaged``'s one durable commit, so a box that dies between OCR and that
     commit packages (and notices) the document again, and one that dies after it sends the notice
     after the restart. Central's answer to a notice is never a receipt: nothing here lets custody act
     on it, only ``mark_delivered`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # imported where the outbox is opened: `sohoa central` installs lack the edge extra
    import aiosqlite

SCHEMA_VERSION = 3


class DocState(StrEnum):
    STABLE = "stable"          # a settled file was taken; OCR and packaging still to do
    PACKAGED = "packaged"      # envelope on disk, never sent
    SENDING = "sending"        # at least one transfer attempt started: resume from central's ack
    DELIVERED = "delivered"    # central's signed receipt for exactly this content is recorded
    FAILED = "failed"          # refused (by us or by central), with a reason for the clerk


class Place(StrEnum):
    WATCH = "watch"                # still in the scan folder at src_path (the move is pending)
    HELD = "held"                  # HOME/processed/<tid>.<ext>, private to the service
    GONE = "gone"                  # deleted after the receipt matched what was on disk
    KEPT = "kept"                  # kept after delivery (retention.keep_originals)
    RETURNED = "returned"          # changed after it was taken: back in the scan folder as new
    QUARANTINED = "quarantined"    # in the clerk's refused-scans folder, with a reason beside it
    RETRIED = "retried"            # taken back out of the refused folder (edge retry / the clerk)
    MISSING = "missing"            # vanished (deleted by someone else); nothing left to act on


class NoticeState(StrEnum):
    PENDING = "pending"      # sealed with the envelope, not published yet
    SENT = "sent"            # published (again after every reconnect) until central answers
    NOTED = "noted"          # central catalogued it: searchable there, original on its way
    REFUSED = "refused"      # central would not catalogue it (quota, too late): the document travels whole


# Rule 7: notice moves. A row without a notice (too large, or packaged before v3) has state NULL.
NOTICE_MOVES: Mapping[NoticeState, frozenset[NoticeState]] = MappingProxyType({
    NoticeState.PENDING: frozenset({NoticeState.SENT, NoticeState.NOTED, NoticeState.REFUSED}),
    NoticeState.SENT: frozenset({NoticeState.NOTED, NoticeState.REFUSED}),
    NoticeState.NOTED: frozenset(),
    NoticeState.REFUSED: frozenset(),
})
NOTICE_OPEN = (NoticeState.PENDING, NoticeState.SENT)


# Rule 1: the only state moves there are. SENDING → SENDING is a resumed transfer.
TRANSITIONS: Mapping[DocState, frozenset[DocState]] = MappingProxyType({
    DocState.STABLE: frozenset({DocState.PACKAGED, DocState.FAILED}),
    DocState.PACKAGED: frozenset({DocState.SENDING, DocState.DELIVERED, DocState.FAILED}),
    DocState.SENDING: frozenset({DocState.SENDING, DocState.DELIVERED, DocState.FAILED}),
    DocState.DELIVERED: frozenset(),
    DocState.FAILED: frozenset(),
})

# ... and the only place moves. Places after delivery/refusal are ends, except that a quarantined
# file may be taken back by the clerk.
PLACE_MOVES: Mapping[Place, frozenset[Place]] = MappingProxyType({
    Place.WATCH: frozenset({Place.HELD, Place.QUARANTINED, Place.MISSING}),
    Place.HELD: frozenset({Place.GONE, Place.KEPT, Place.RETURNED, Place.QUARANTINED, Place.MISSING}),
    Place.KEPT: frozenset({Place.GONE, Place.MISSING}),
    Place.QUARANTINED: frozenset({Place.RETRIED, Place.MISSING}),
    Place.GONE: frozenset(),
    Place.RETURNED: frozenset(),
    Place.RETRIED: frozenset(),
    Place.MISSING: frozenset(),
})

QUEUED_STATES = (DocState.STABLE, DocState.PACKAGED, DocState.SENDING)
SENDABLE_STATES = (DocState.PACKAGED, DocState.SENDING)
# Where custody still has work: a pending move, or files to release after an ending.
_CUSTODY_WHERE = (
    "(place = 'watch' AND state != 'failed')"
    " OR (state = 'delivered' AND (place = 'held' OR envelope_path IS NOT NULL))"
    " OR (state = 'failed' AND (place IN ('watch', 'held') OR envelope_path IS NOT NULL))"
)


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
    place: Place
    name: str                 # the clerk's file name, NFC (display only, never a path)
    rel_path: str             # where it was in the scan folder, relative (for returns)
    src_path: str             # where the original is now
    size: int
    sha256: str               # of the content this row stands for (what was packaged)
    media_type: str
    pages: int
    priority: int
    captured_at: float        # the file's mtime when taken: when the scanner wrote it
    envelope_path: str | None
    signed_header: bytes | None
    ciphertext_size: int | None
    segment_size: int | None
    attempts: int
    reason: str | None
    reason_code: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None
    central_document_id: int | None
    receipt_sha256: str | None
    pending_path: str | None  # where custody is moving the original right now (an intent)
    notice_state: NoticeState | None = None   # rule 7; the sealed notice itself: Outbox.notice_payload


@dataclass(frozen=True, slots=True)
class OutboxStats:
    counts: Mapping[str, int]
    queued_docs: int
    queued_bytes: int
    oldest_age_s: float
    last_receipt_at: float | None
    failed: int               # refused documents whose file waits in the refused folder


# -- schema -------------------------------------------------------------------------------------

_DOCS_V2 = """
CREATE TABLE docs (
    tid                 TEXT PRIMARY KEY,
    seq                 INTEGER NOT NULL UNIQUE,
    state               TEXT NOT NULL CHECK (state IN
                            ('stable','packaged','sending','delivered','failed')),
    place               TEXT NOT NULL CHECK (place IN
                            ('watch','held','gone','kept','returned','quarantined','retried','missing')),
    name                TEXT NOT NULL,
    rel_path            TEXT NOT NULL,
    src_path            TEXT NOT NULL,
    size                INTEGER NOT NULL CHECK (size >= 0),
    sha256              TEXT NOT NULL,
    media_type          TEXT NOT NULL,
    pages               INTEGER NOT NULL,
    priority            INTEGER NOT NULL DEFAULT 0,
    captured_at         REAL NOT NULL,
    envelope_path       TEXT,
    signed_header       BLOB,
    ciphertext_size     INTEGER,
    segment_size        INTEGER,
    attempts            INTEGER NOT NULL DEFAULT 0,
    reason              TEXT,
    reason_code         TEXT,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    delivered_at        REAL,
    central_document_id INTEGER,
    receipt_sha256      TEXT,
    pending_path        TEXT
) STRICT
"""

_INDEXES_V2 = (
    "CREATE INDEX docs_sendable ON docs (priority DESC, seq) WHERE state IN ('packaged', 'sending')",
    "CREATE INDEX docs_state ON docs (state)",
    "CREATE INDEX docs_src ON docs (src_path) WHERE place = 'watch'",
    f"CREATE INDEX docs_custody ON docs (seq) WHERE {_CUSTODY_WHERE}",
)

_COLUMNS = ("tid, seq, state, place, name, rel_path, src_path, size, sha256, media_type, pages, priority, "
            "captured_at, envelope_path, signed_header, ciphertext_size, segment_size, attempts, reason, "
            "reason_code, created_at, updated_at, delivered_at, central_document_id, receipt_sha256, "
            "pending_path")
# What a Doc is read from: the v2 columns plus the notice's state (never the notice's bytes).
_SELECT = _COLUMNS + ", notice_state"

# v3: the notice (rule 7). Its bytes stay out of every Doc read; the partial index keeps "notices to
# send" cheap however long the history is.
_V3 = (
    "ALTER TABLE docs ADD COLUMN notice BLOB",
    "ALTER TABLE docs ADD COLUMN notice_state TEXT"
    " CHECK (notice_state IN ('pending', 'sent', 'noted', 'refused'))",
    "CREATE INDEX docs_notices ON docs (priority DESC, seq) WHERE notice_state IN ('pending', 'sent')",
)


async def _migrate(db: aiosqlite.Connection, *, seq_base: int) -> None:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise OutboxError(f"outbox schema version {version} is newer than this software "
                          f"({SCHEMA_VERSION}); upgrade sohoa before running it on this database")
    if version == SCHEMA_VERSION:
        return
    await db.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            await db.execute(_DOCS_V2)
            await db.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT")
            await db.execute("INSERT INTO counters (name, value) VALUES ('seq', ?)", (seq_base,))
        elif version == 1:
            await _migrate_v1(db)
        if version < 2:
            for statement in _INDEXES_V2:
                await db.execute(statement)
        # v2 → v3: rows packaged before have no notice (NULL): they travel whole, as they always did.
        for statement in _V3:
            await db.execute(statement)
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise


async def _migrate_v1(db: aiosqlite.Connection) -> None:
    """v1 → v2: 'ocr_done' is gone (nothing was persisted for it), 'duplicate' rows (the old edge
    trusted a past receipt) become delivered rows whose file is gone, and every row gets a place."""
    await db.execute("ALTER TABLE docs RENAME TO docs_v1")
    for index in ("docs_sendable", "docs_state", "docs_sha256", "docs_envelope"):
        await db.execute(f"DROP INDEX IF EXISTS {index}")
    await db.execute(_DOCS_V2)
    async with db.execute(
            "SELECT tid, seq, state, name, src_path, size, sha256, media_type, pages, priority, "
            "envelope_path, signed_header, ciphertext_size, segment_size, attempts, reason, created_at, "
            "updated_at, delivered_at, central_document_id FROM docs_v1") as cur:
        rows = await cur.fetchall()
    for row in rows:
        (tid, seq, state, name, src_path, size, sha256, media_type, pages, priority, envelope_path,
         signed_header, ciphertext_size, segment_size, attempts, reason, created_at, updated_at,
         delivered_at, central_document_id) = tuple(row)
        exists = bool(src_path) and os.path.lexists(src_path)  # noqa: ASYNC240 - once, at upgrade
        held = exists and f"{os.sep}processed{os.sep}" in src_path
        if state in ("stable", "ocr_done"):
            new_state, place = "stable", ("held" if held else "watch" if exists else "missing")
        elif state in ("packaged", "sending"):
            new_state, place = state, ("held" if exists else "missing")
        elif state == "delivered":
            new_state, place = "delivered", ("held" if exists and envelope_path else
                                             "kept" if exists else "gone")
        elif state == "duplicate":
            new_state, place = "delivered", "gone"
        else:
            new_state, place = "failed", ("held" if held else "quarantined")
        await db.execute(
            f"INSERT INTO docs ({_COLUMNS}) VALUES ({', '.join('?' * 26)})",  # noqa: S608 - fixed columns
            (tid, seq, new_state, place, name, name, src_path, size, sha256, media_type, pages, priority,
             created_at, envelope_path, signed_header, ciphertext_size, segment_size, attempts, reason,
             "legacy" if state == "failed" else None, created_at, updated_at,
             delivered_at if state == "delivered" else (updated_at if state == "duplicate" else None),
             central_document_id, sha256 if state == "delivered" else None, None))
    await db.execute("DROP TABLE docs_v1")


def _doc(row: aiosqlite.Row | tuple[Any, ...]) -> Doc:
    (tid, seq, state, place, name, rel_path, src_path, size, sha256, media_type, pages, priority,
     captured_at, envelope_path, signed_header, ciphertext_size, segment_size, attempts, reason,
     reason_code, created_at, updated_at, delivered_at, central_document_id, receipt_sha256,
     pending_path, notice_state) = tuple(row)
    return Doc(tid=tid, seq=seq, state=DocState(state), place=Place(place), name=name, rel_path=rel_path,
               src_path=src_path, size=size, sha256=sha256, media_type=media_type, pages=pages,
               priority=priority, captured_at=captured_at, envelope_path=envelope_path,
               signed_header=bytes(signed_header) if signed_header is not None else None,
               ciphertext_size=ciphertext_size, segment_size=segment_size, attempts=attempts,
               reason=reason, reason_code=reason_code, created_at=created_at, updated_at=updated_at,
               delivered_at=delivered_at, central_document_id=central_document_id,
               receipt_sha256=receipt_sha256, pending_path=pending_path,
               notice_state=NoticeState(notice_state) if notice_state is not None else None)


# -- SQL, one plain function per statement ------------------------------------------------------

async def _next_seq(db: aiosqlite.Connection) -> int:
    async with db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value") as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _insert(db: aiosqlite.Connection, doc: Doc) -> None:
    await db.execute(
        f"INSERT INTO docs ({_COLUMNS}) VALUES ({', '.join('?' * 26)})",  # noqa: S608 - fixed columns
        (doc.tid, doc.seq, doc.state.value, doc.place.value, doc.name, doc.rel_path, doc.src_path,
         doc.size, doc.sha256, doc.media_type, doc.pages, doc.priority, doc.captured_at,
         doc.envelope_path, doc.signed_header, doc.ciphertext_size, doc.segment_size, doc.attempts,
         doc.reason, doc.reason_code, doc.created_at, doc.updated_at, doc.delivered_at,
         doc.central_document_id, doc.receipt_sha256, doc.pending_path))


async def _select_one(db: aiosqlite.Connection, where: str, params: tuple[Any, ...]) -> Doc | None:
    async with db.execute(f"SELECT {_SELECT} FROM docs WHERE {where} LIMIT 1", params) as cur:  # noqa: S608
        row = await cur.fetchone()
    return _doc(row) if row is not None else None


async def _select_many(db: aiosqlite.Connection, where: str, params: tuple[Any, ...]) -> list[Doc]:
    async with db.execute(f"SELECT {_SELECT} FROM docs WHERE {where}", params) as cur:  # noqa: S608
        return [_doc(row) for row in await cur.fetchall()]


async def _update(db: aiosqlite.Connection, tid: str, assignments: str, params: tuple[Any, ...]) -> None:
    await db.execute(f"UPDATE docs SET {assignments} WHERE tid = ?", (*params, tid))  # noqa: S608


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


def _check_move(doc: Doc, state: DocState | None, place: Place | None, what: str) -> None:
    if state is not None and state not in TRANSITIONS[doc.state]:
        raise OutboxError(f"{what}: row {doc.tid} is {doc.state.value}, cannot become {state.value}",
                          tid=doc.tid)
    if place is not None and place is not doc.place and place not in PLACE_MOVES[doc.place]:
        raise OutboxError(f"{what}: row {doc.tid} is {doc.place.value}, cannot move to {place.value}",
                          tid=doc.tid)


class Outbox:
    """The outbox over one aiosqlite writer connection. Open with :meth:`open`."""

    def __init__(self, db: aiosqlite.Connection, *, cap_bytes: int, clock: Callable[[], float]) -> None:
        self._db = db
        self.cap_bytes = cap_bytes
        self._clock = clock
        self._durable: bool | None = False   # the PRAGMA synchronous in force (None: not known)
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, *, cap_bytes: int = 8 * 1024**3,
                   clock: Callable[[], float] = time.time) -> Outbox:
        _create_private(path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so the synchronous level can be
        # switched between transactions (SQLite refuses it inside one).
        import aiosqlite  # noqa: PLC0415 - see the import block: only a box opens an outbox

        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await _configure(db, path)
            await _migrate(db, seq_base=int(clock() * 1000))
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
            try:
                if durable != self._durable:
                    await self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.execute("COMMIT")
            except BaseException:
                # Always roll back, whatever in_transaction says now: a task cancelled while awaiting
                # BEGIN (the uplink's session ending) leaves the statement queued on aiosqlite's
                # thread, where it still runs; a ROLLBACK queued behind it ends that transaction.
                # A COMMIT that failed with SQLITE_FULL may also leave one open. With none open, the
                # ROLLBACK's "no transaction is active" is expected.
                self._durable = None   # unknown if the PRAGMA's await was the one cancelled
                with contextlib.suppress(sqlite3.Error):   # aiosqlite.Error is sqlite3.Error
                    await self._db.execute("ROLLBACK")
                raise

    async def _change(self, tid: str, what: str, *, state: DocState | None = None, place: Place | None = None,
                      durable: bool = False, **values: Any) -> Doc | None:
        """Apply one checked change to a row; None when it is a repeat of what is already recorded."""
        async with self._write(durable=durable) as db:
            doc = await _select_one(db, "tid = ?", (tid,))
            if doc is None:
                raise OutboxError(f"{what}: no outbox row {tid}", tid=tid)
            _check_move(doc, state, place, what)
            assignments = {**values, "updated_at": self._clock()}
            if state is not None:
                assignments["state"] = state.value
            if place is not None:
                assignments["place"] = place.value
            await _update(db, tid, ", ".join(f"{column} = ?" for column in assignments),
                          tuple(assignments.values()))
        return await self.get(tid)

    # -- creation ----------------------------------------------------------------------------------
    def _new(self, *, seq: int, state: DocState, name: str, rel_path: str, src_path: str, size: int,
             sha256: str, media_type: str, pages: int, priority: int, captured_at: float,
             reason: str | None = None, reason_code: str | None = None) -> Doc:
        now = self._clock()
        return Doc(tid=uuid.uuid4().hex, seq=seq, state=state, place=Place.WATCH, name=name,
                   rel_path=rel_path, src_path=src_path, size=size, sha256=sha256, media_type=media_type,
                   pages=pages, priority=priority, captured_at=captured_at, envelope_path=None,
                   signed_header=None, ciphertext_size=None, segment_size=None, attempts=0, reason=reason,
                   reason_code=reason_code, created_at=now, updated_at=now, delivered_at=None,
                   central_document_id=None, receipt_sha256=None, pending_path=None)

    async def add(self, *, name: str, src_path: str, size: int, sha256: str, media_type: str, pages: int,
                  priority: int = 0, rel_path: str | None = None, captured_at: float | None = None) -> Doc:
        """A taken scan, still at ``src_path`` in the watch folder (custody moves it next)."""
        # Durable: the caller moves the scan out of the watch folder right after this commit.
        async with self._write(durable=True) as db:
            doc = self._new(seq=await _next_seq(db), state=DocState.STABLE, name=name,
                            rel_path=rel_path or name, src_path=src_path, size=size, sha256=sha256,
                            media_type=media_type, pages=pages, priority=priority,
                            captured_at=self._clock() if captured_at is None else captured_at)
            await _insert(db, doc)
        return doc

    async def add_refused(self, *, name: str, src_path: str, reason: str, reason_code: str,
                          rel_path: str | None = None, size: int = 0, sha256: str = "",
                          media_type: str = "") -> Doc:
        """A file refused at intake (not a scan, damaged, too large…): custody quarantines it."""
        async with self._write(durable=True) as db:
            now = self._clock()
            doc = self._new(seq=await _next_seq(db), state=DocState.FAILED, name=name,
                            rel_path=rel_path or name, src_path=src_path, size=size, sha256=sha256,
                            media_type=media_type, pages=0, priority=0, captured_at=now, reason=reason,
                            reason_code=reason_code)
            await _insert(db, doc)
        return doc

    # -- facts -------------------------------------------------------------------------------------
    async def intend(self, tid: str, target: str) -> None:
        """Custody is about to move the original to ``target``: if the box dies mid-move, recovery
        finds the file at one end or the other instead of calling it missing."""
        await self._change(tid, "intend", durable=True, pending_path=target)

    async def moved(self, tid: str, place: Place, src_path: str | None = None) -> Doc | None:
        """Custody moved (or deleted, or found missing) the original; durable, it precedes deletes."""
        values: dict[str, Any] = {"pending_path": None}
        if src_path is not None:
            values["src_path"] = src_path
        return await self._change(tid, "moved", place=place, durable=True, **values)

    async def content_changed(self, tid: str, *, sha256: str, size: int, captured_at: float) -> None:
        """The held file changed before it was packaged: the row now stands for the new content."""
        async with self._write() as db:
            doc = await _select_one(db, "tid = ?", (tid,))
            if doc is None or doc.state is not DocState.STABLE:
                raise OutboxError(f"content_changed: row {tid} is not stable", tid=tid)
            await _update(db, tid, "sha256 = ?, size = ?, captured_at = ?, updated_at = ?",
                          (sha256, size, captured_at, self._clock()))

    async def mark_packaged(self, tid: str, *, envelope_path: str, signed_header: bytes,
                            ciphertext_size: int, segment_size: int, pages: int | None = None,
                            sha256: str | None = None, size: int | None = None,
                            notice: bytes | None = None) -> None:
        """The envelope is on disk and sendable; ``notice`` (the encoded Notice message's payload) goes
        out ahead of it, in the same durable commit (rule 7)."""
        values: dict[str, Any] = {"envelope_path": envelope_path, "signed_header": signed_header,
                                  "ciphertext_size": ciphertext_size, "segment_size": segment_size}
        if notice is not None:
            values |= {"notice": notice, "notice_state": NoticeState.PENDING.value}
        values |= {k: v for k, v in (("pages", pages), ("sha256", sha256), ("size", size)) if v is not None}
        await self._change(tid, "mark_packaged", state=DocState.PACKAGED, durable=True, **values)

    async def mark_sending(self, tid: str) -> None:
        await self._change(tid, "mark_sending", state=DocState.SENDING)

    async def mark_delivered(self, tid: str, *, central_document_id: int, duplicate: bool,
                             receipt_sha256: str | None = None) -> None:
        """Record central's verified receipt. Custody may delete plaintext once this returns."""
        doc = await self.get(tid)
        if doc is not None and doc.state is DocState.DELIVERED:
            return   # a repeated receipt: already durable
        now = self._clock()
        await self._change(
            tid, "mark_delivered", state=DocState.DELIVERED, durable=True, delivered_at=now,
            central_document_id=central_document_id, notice=None,
            receipt_sha256=receipt_sha256 or (doc.sha256 if doc else None),
            reason="central already held this content" if duplicate else None)

    async def restart_release_wait(self, tid: str, now: float) -> Doc:
        """The receipt's recorded time lies in the future (the clock was stepped back since):
        count the release delay from ``now`` instead."""
        doc = await self._change(tid, "restart_release_wait", delivered_at=now)
        if doc is None:
            raise OutboxError(f"restart_release_wait: no outbox row {tid}", tid=tid)
        return doc

    async def mark_failed(self, tid: str, reason: str, code: str = "failed") -> None:
        doc = await self.get(tid)
        if doc is not None and doc.state is DocState.FAILED:
            return
        await self._change(tid, "mark_failed", state=DocState.FAILED, durable=True, reason=reason,
                           reason_code=code, notice=None)

    async def bump_attempts(self, tid: str, reason: str) -> int:
        async with self._write() as db:
            async with db.execute(
                    "UPDATE docs SET attempts = attempts + 1, reason = ?, updated_at = ? WHERE tid = ? "
                    "RETURNING attempts", (reason, self._clock(), tid)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise OutboxError(f"bump_attempts: no outbox row {tid}", tid=tid)
            return int(row[0])

    async def notice_sent(self, tid: str) -> None:
        """Published at least once (the row keeps being re-sent until central answers)."""
        await self._notice_move(tid, NoticeState.SENT, durable=False)

    async def notice_answered(self, tid: str, *, catalogued: bool) -> None:
        """Central answered the notice: stop sending it. Custody is not told: only a receipt counts."""
        await self._notice_move(tid, NoticeState.NOTED if catalogued else NoticeState.REFUSED, durable=True)

    async def _notice_move(self, tid: str, to: NoticeState, *, durable: bool) -> None:
        async with self._write(durable=durable) as db:
            doc = await _select_one(db, "tid = ?", (tid,))
            if doc is None or doc.notice_state is None or to not in NOTICE_MOVES[doc.notice_state]:
                return   # a late or repeated answer, or a row without a notice: nothing to record
            # The sealed bytes are only needed while the notice may still be sent.
            drop = ", notice = NULL" if to in (NoticeState.NOTED, NoticeState.REFUSED) else ""
            await _update(db, tid, f"notice_state = ?, updated_at = ?{drop}", (to.value, self._clock()))

    async def notices_to_send(self, limit: int = 64) -> list[Doc]:
        """Rows whose notice is not answered yet, by priority then seq, while their original is queued."""
        return await _select_many(
            self._db, "notice_state IN ('pending', 'sent') AND state IN ('packaged', 'sending')"
            " ORDER BY priority DESC, seq LIMIT ?", (limit,))

    async def notice_payload(self, tid: str) -> bytes | None:
        async with self._db.execute("SELECT notice FROM docs WHERE tid = ?", (tid,)) as cur:
            row = await cur.fetchone()
        return bytes(row[0]) if row is not None and row[0] is not None else None

    async def clear_envelope(self, tid: str) -> None:
        await self._change(tid, "clear_envelope", envelope_path=None)

    # -- queries -----------------------------------------------------------------------------------
    async def get(self, tid: str) -> Doc | None:
        return await _select_one(self._db, "tid = ?", (tid,))

    async def pending_at(self, src_path: str) -> Doc | None:
        """A row whose file is still at ``src_path`` in the watch folder (its move is pending)."""
        return await _select_one(self._db, "place = 'watch' AND src_path = ?", (src_path,))

    async def unfinished(self) -> list[Doc]:
        """STABLE rows (to OCR and package) after a restart, oldest first."""
        return await _select_many(self._db, "state = 'stable' ORDER BY seq", ())

    async def custody_pending(self, limit: int = 200, after_seq: int = 0) -> list[Doc]:
        """Rows whose files custody still has to move, release or quarantine (by seq, keyset-paged)."""
        return await _select_many(self._db, f"({_CUSTODY_WHERE}) AND seq > ? ORDER BY seq LIMIT ?",
                                  (after_seq, limit))

    async def quarantined(self) -> list[Doc]:
        return await _select_many(self._db, "place = 'quarantined' ORDER BY seq", ())

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

    async def recent(self, limit: int = 100) -> list[Doc]:
        """The newest rows, newest first (what the clerk's status shows)."""
        return await _select_many(self._db, "1 ORDER BY seq DESC LIMIT ?", (limit,))

    async def _queued_bytes(self) -> int:
        async with self._db.execute(
                "SELECT COALESCE(SUM(size + COALESCE(ciphertext_size, 0)), 0) FROM docs "
                "WHERE state IN ('stable', 'packaged', 'sending')") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def stats(self) -> OutboxStats:
        async with self._db.execute("SELECT state, COUNT(*) FROM docs GROUP BY state") as cur:
            counts = {str(state): int(n) for state, n in await cur.fetchall()}
        async with self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size + COALESCE(ciphertext_size, 0)), 0), MIN(created_at) "
                "FROM docs WHERE state IN ('stable', 'packaged', 'sending')") as cur:
            row = await cur.fetchone()
        assert row is not None
        queued_docs, queued_bytes, oldest = int(row[0]), int(row[1]), row[2]
        async with self._db.execute("SELECT MAX(delivered_at) FROM docs WHERE state = 'delivered'") as cur:
            last = await cur.fetchone()
        async with self._db.execute("SELECT COUNT(*) FROM docs WHERE place = 'quarantined'") as cur:
            waiting = await cur.fetchone()
        return OutboxStats(
            counts=MappingProxyType({s.value: counts.get(s.value, 0) for s in DocState}),
            queued_docs=queued_docs, queued_bytes=queued_bytes,
            oldest_age_s=max(0.0, self._clock() - oldest) if oldest is not None else 0.0,
            last_receipt_at=last[0] if last else None, failed=int(waiting[0]) if waiting else 0)

    async def room_for(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit under the cap (queued originals plus their envelopes)."""
        return await self._queued_bytes() + nbytes <= self.cap_bytes
