"""``Ingestor``: the pipeline's stages run one after the other on one connection.

The same admission, batch and archive code as the service's pipeline, without the concurrency: a
batch is applied and committed, then each transfer it completed is claimed, assembled and recorded,
each in its own transaction. Tests and tools that feed messages by hand use it; so may a central
that wants no threads.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from central.ingest.archive import Archiver, tmp_leftovers
from central.ingest.batch import BatchStage, Reply
from central.ingest.compact import compact
from central.ingest.durability import Durability
from central.ingest.expire import EXPIRE_AFTER_S, sweep
from central.ingest.quota import Quotas
from central.ingest.staging import SegmentJournal
from central.ingest.store import OUR_TROUBLE, IngestStore, SqliteIngestStore
from central.keys import CentralKeys
from central.metrics import Metrics
from central.paths import CentralPaths
from protocol.envelope import key_id
from protocol.messages import Receipt

log = logging.getLogger("sohoa.central.ingest")

T = TypeVar("T")
LEASE_S = 120.0   # a worker that died holds its jobs this long; its own restart resumes them at once


class Ingestor:
    """Central's ingest over the catalog, the segment journal and the object store, inline."""

    def __init__(self, conn: sqlite3.Connection | Any, paths: CentralPaths, keys: CentralKeys, *,
                 max_plaintext: int, metrics: Metrics | None = None, worker: str = "central",
                 durability: str = "syncfs", quotas: Quotas | None = None,
                 expire_after_s: float = EXPIRE_AFTER_S, clock: Callable[[], float] = time.time) -> None:
        """``conn``: the SQLite catalog, or a PostgreSQL connection (``central.ingest.pgstore``)."""
        self._conn = conn
        self._sqlite = isinstance(conn, sqlite3.Connection)
        self._db: IngestStore
        if self._sqlite:
            self._db = SqliteIngestStore(conn)
        else:
            from central.ingest.pgstore import PostgresIngestStore  # noqa: PLC0415 - psycopg is optional

            self._db = PostgresIngestStore(conn)  # type: ignore[arg-type]
        self.metrics = metrics or Metrics()
        self.journal = SegmentJournal(paths.staging, worker)
        self.durability = Durability(durability, self.journal, [paths.staging, paths.objects])
        self.batch = BatchStage(paths, self.journal, key_id=key_id(bytes(keys.encryption.public_key)),
                                max_plaintext=max_plaintext, worker=worker, metrics=self.metrics,
                               lease_s=LEASE_S, notice_key=keys.encryption, quotas=quotas,
                               clock=clock)
        self.archive = Archiver(paths, keys, max_plaintext=max_plaintext, metrics=self.metrics,
                                durability=self.durability, quotas=quotas, work_dir=paths.worker_tmp(worker))
        self.expire_after_s = expire_after_s
        remove_stale_staging(self._db, paths)
        tmp_leftovers(paths.tmp, self.archive.work_dir)

    def transaction(self, fn: Callable[[IngestStore], T]) -> T:
        """Run ``fn`` in one write transaction; the journal is made durable before the commit."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE" if self._sqlite else "BEGIN")
        try:
            result = fn(self._db)
            self.durability.before_commit()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    def handle_batch(self, items: Sequence[tuple[str, bytes]]) -> list[Reply]:
        """Apply received (topic, payload) pairs; return the acks and receipts to publish."""
        try:
            outcome = self.transaction(lambda conn: self.batch.apply(conn, list(items)))
        except OUR_TROUBLE as exc:
            self.metrics.error(type(exc).__name__)
            log.error("batch not made durable, nothing acknowledged: %s", exc)  # noqa: TRY400 - the cause is enough
            return []
        self.metrics.segments_received += outcome.segments
        self.metrics.bytes_received += outcome.bytes
        replies = list(outcome.replies)
        for tid in outcome.ready:
            replies += self.archive_one(tid)
        self.collect()
        return replies

    def archive_one(self, tid: str) -> list[Reply]:
        revoke = self.batch.revoke_transfer
        job, replies = self.transaction(lambda conn: self.archive.claim(conn, tid, revoke))
        if job is None:
            return replies
        result = self.archive.assemble(job)
        replies = self.transaction(lambda conn: self.archive.record(conn, result, revoke))
        self.metrics.documents_ingested += sum(isinstance(r, Receipt) for r in replies)
        return replies

    def sweep(self, now: float | None = None) -> list[str]:
        """Expire stalled transfers (as the service's reconciler does), commit, then free their journal."""
        at = self.batch.clock() if now is None else now

        def sweep_and_compact(db: IngestStore) -> list[str]:
            expired = sweep(db, self.batch, now=at, expire_after_s=self.expire_after_s)
            compact(db, self.journal, now=at)
            return expired

        expired = self.transaction(sweep_and_compact)
        self.collect()
        return expired

    def collect(self) -> None:
        """Delete journal files nothing points into any more."""
        self.journal.collect(self._db.journal_in_use)


def remove_stale_staging(db: IngestStore, paths: CentralPaths) -> None:
    """Drop legacy ``.part`` files of transfers that are no longer receiving (a crash between the
    commit and the unlink, or a catalog v2 staging directory)."""
    for part in paths.staging.glob("*.part"):
        record = db.get_transfer(part.stem)
        if record is not None and record.state != "receiving":
            part.unlink()
