"""The archival-copy job: after an original is stored, central builds its PDF/A-2b (from the stored
original and the hOCR in the stored package), signs it (PAdES), stores it content-addressed and
records a fixity event. Jobs live in the catalog (DESIGN §8), not in a separate queue.

Rules (the job's states and moves):
  - One job per stored original (``archive_jobs.sha256``): several arrivals of the same bytes get one
    archival copy, built from the first arrival's package.
  - Level-triggered: the reconciler (``enqueue_new``) turns every document past the cursor into a job,
    so nothing in ingest calls us, and a catalog from before v3 gets its backlog built too.
  - pending/failed --claim (due)--> running (lease, attempts + 1)
    running --built, stored, recorded--> done
    running --failure--> failed (reason, next attempt after a growing pause; never given up)
    running --lease ran out (the worker died: kill -9, power cut)--> claimed again
    done --``verify`` finds the copy damaged or missing--> pending (rebuilt from the original)
  - Crash-safe without a second copy: the built file's sha256 is recorded (``candidate_sha256``)
    before it is put in the store, so a retry after a crash finishes storing that file, or finds it
    already stored, instead of building a different one (a signature is never byte-identical twice).
  - Only the lease holder may record the outcome: a worker that lost its lease changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from central import catalog
from central.catalog import fixity
from central.catalog.db import Database
from central.fsutil import make_private_dir
from central.paths import CentralPaths
from central.records.archive_build import BuildRequest
from central.records.archive_sign import CERT_NAME, DEFAULT_ARCHIVE_NAME, KEY_NAME, ensure_signing_identity
from central.storage import ObjectStore, file_sha256

log = logging.getLogger("sohoa.central.archive")

T = TypeVar("T")
ACTOR = "central:archive"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    poll_s: float = 2.0                   # how often new documents and due retries are looked for
    lease_s: float = 60.0                 # a dead worker's job is taken again after this
    timeout_s: float = 900.0              # one build, whatever its size
    backoff_initial_s: float = 60.0
    backoff_max_s: float = 6 * 3600.0     # a failing job is still tried four times a day
    address_space_mib: int = 2048


def archive_tmp(paths: CentralPaths) -> Path:
    """Where builds are written: on the store's filesystem (a rename stores them), and not ``tmp/``,
    which ingest empties when it (re)starts."""
    return paths.home / "archive-tmp"


def signing_dir(paths: CentralPaths) -> Path:
    return paths.keys


# -- SQL (plain functions; the caller owns the transaction) ---------------------------------------------

def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse(at: str) -> datetime:
    return datetime.fromisoformat(at.replace("Z", "+00:00"))


def enqueue_new(conn: sqlite3.Connection, *, now: str) -> int:
    """Make a job for every stored original first seen in a document past the cursor; return how many.

    Document ids only grow and one writer commits at a time (BEGIN IMMEDIATE), so every id below the
    current maximum is visible here. (PostgreSQL sequences commit out of order: there, use an anti-join.)
    """
    row = conn.execute("SELECT last_document_id FROM archive_cursor WHERE id = 1").fetchone()
    last = int(row[0]) if row else 0
    top = int(conn.execute("SELECT coalesce(max(id), 0) FROM documents").fetchone()[0])
    if top <= last:
        return 0
    added = conn.execute(
        "INSERT INTO archive_jobs (sha256, document_id, state, next_attempt_at, created_at, updated_at)"
        " SELECT sha256, min(id), 'pending', ?, ?, ? FROM documents WHERE id > ? AND id <= ?"
        # One awaiting its original has no object yet: central.catalog.complete_document makes its
        # job once it has one, if this cursor has passed it by then.
        " AND state = 'stored'"
        " GROUP BY sha256 ON CONFLICT (sha256) DO NOTHING", (now, now, now, last, top)).rowcount
    conn.execute("INSERT INTO archive_cursor (id, last_document_id) VALUES (1, ?)"
                 " ON CONFLICT (id) DO UPDATE SET last_document_id = excluded.last_document_id", (top,))
    return int(added)


@dataclass(frozen=True, slots=True)
class Job:
    sha256: str               # the original's
    document_id: int          # the arrival whose package builds it
    attempts: int             # including this one
    candidate_sha256: str | None
    media_type: str
    filename: str
    package_sha256: str
    received_at: str


def claim(conn: sqlite3.Connection, *, owner: str, now: str, lease_s: float) -> Job | None:
    """Take the most overdue job (or one whose lease ran out) for ``owner``; None if none is due."""
    row = conn.execute(
        "SELECT sha256 FROM archive_jobs WHERE (state IN ('pending', 'failed') AND next_attempt_at <= ?)"
        " OR (state = 'running' AND lease_until <= ?) ORDER BY next_attempt_at, document_id LIMIT 1",
        (now, now)).fetchone()
    if row is None:
        return None
    until = _iso(_parse(now) + timedelta(seconds=lease_s))
    conn.execute("UPDATE archive_jobs SET state = 'running', owner = ?, lease_until = ?,"
                 " attempts = attempts + 1, updated_at = ? WHERE sha256 = ?", (owner, until, now, row[0]))
    job = conn.execute(
        "SELECT j.sha256, j.document_id, j.attempts, j.candidate_sha256, o.media_type, d.filename,"
        " d.package_sha256, d.received_at FROM archive_jobs j JOIN documents d ON d.id = j.document_id"
        " JOIN objects o ON o.sha256 = j.sha256 WHERE j.sha256 = ?", (row[0],)).fetchone()
    return Job(job["sha256"], int(job["document_id"]), int(job["attempts"]), job["candidate_sha256"],
               job["media_type"], job["filename"], job["package_sha256"], job["received_at"])


def _holds(conn: sqlite3.Connection, sha256: str, owner: str) -> bool:
    return conn.execute("SELECT 1 FROM archive_jobs WHERE sha256 = ? AND state = 'running' AND owner = ?",
                        (sha256, owner)).fetchone() is not None


def extend_lease(conn: sqlite3.Connection, sha256: str, *, owner: str, until: str) -> bool:
    return conn.execute("UPDATE archive_jobs SET lease_until = ? WHERE sha256 = ? AND state = 'running'"
                        " AND owner = ?", (until, sha256, owner)).rowcount == 1


def record_candidate(conn: sqlite3.Connection, sha256: str, *, owner: str, candidate: str, now: str) -> bool:
    return conn.execute("UPDATE archive_jobs SET candidate_sha256 = ?, updated_at = ? WHERE sha256 = ?"
                        " AND state = 'running' AND owner = ?", (candidate, now, sha256, owner)).rowcount == 1


def complete(conn: sqlite3.Connection, job: Job, *, owner: str, archival_sha256: str, size: int,
             now: str, detail: dict[str, Any]) -> bool:
    if not _holds(conn, job.sha256, owner):
        return False
    conn.execute("UPDATE archive_jobs SET state = 'done', archival_sha256 = ?, archival_size = ?,"
                 " candidate_sha256 = NULL, owner = NULL, lease_until = NULL, last_error = NULL,"
                 " done_at = ?, updated_at = ? WHERE sha256 = ?",
                 (archival_sha256, size, now, now, job.sha256))
    fixity.add_event(conn, event="archival_copy", actor=ACTOR, document_id=job.document_id,
                     object_sha256=archival_sha256, original_sha256=job.sha256, outcome="success",
                     detail={"package_sha256": job.package_sha256, "size": size, "attempt": job.attempts,
                             **detail}, at=now)
    return True


def fail(conn: sqlite3.Connection, job: Job, *, owner: str, error: str, retry_at: str, now: str) -> bool:
    """Record a failed attempt. A recorded candidate is kept: the next attempt re-checks its hash before
    using it, and it may already be in the store."""
    if not _holds(conn, job.sha256, owner):
        return False
    conn.execute("UPDATE archive_jobs SET state = 'failed', last_error = ?, next_attempt_at = ?,"
                 " owner = NULL, lease_until = NULL, updated_at = ? WHERE sha256 = ?",
                 (error[:2000], retry_at, now, job.sha256))
    fixity.add_event(conn, event="archival_copy", actor=ACTOR, document_id=job.document_id,
                     original_sha256=job.sha256, outcome="failure",
                     detail={"error": error[:2000], "attempt": job.attempts, "retry_at": retry_at}, at=now)
    return True


def release(conn: sqlite3.Connection, sha256: str, *, owner: str, now: str) -> bool:
    """Give a job back at shutdown: due again at once (the attempt stays counted)."""
    return conn.execute("UPDATE archive_jobs SET state = 'pending', owner = NULL, lease_until = NULL,"
                        " next_attempt_at = ?, updated_at = ? WHERE sha256 = ? AND state = 'running'"
                        " AND owner = ?", (now, now, sha256, owner)).rowcount == 1


def release_dead_owners(conn: sqlite3.Connection, *, host: str, alive: Callable[[int], bool],
                        now: str) -> int:
    """Give back at once the running jobs of workers on this host whose process is gone (kill -9, a
    crash), instead of waiting for their leases. A reused pid looks alive: then the lease decides."""
    released = 0
    for row in conn.execute("SELECT sha256, owner FROM archive_jobs WHERE state = 'running'").fetchall():
        parts = str(row["owner"] or "").rsplit(":", 2)   # host:pid:nonce
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or alive(int(parts[1])):
            continue
        released += release(conn, row["sha256"], owner=str(row["owner"]), now=now)
    return released


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_view(conn: sqlite3.Connection, sha256: str) -> dict[str, Any]:
    """What ``GET /api/documents/{id}`` says about the archival copy of an original."""
    row = conn.execute("SELECT state, attempts, archival_sha256, archival_size, last_error, next_attempt_at,"
                       " done_at, document_id FROM archive_jobs WHERE sha256 = ?", (sha256,)).fetchone()
    if row is None:   # stored moments ago: the reconciler makes its job within a poll
        return {"state": "pending", "attempts": 0}
    view: dict[str, Any] = {"state": row["state"], "attempts": row["attempts"]}
    if row["state"] == "done":
        view.update(sha256=row["archival_sha256"], size=row["archival_size"], created_at=row["done_at"],
                    built_from_document=row["document_id"], media_type="application/pdf",
                    profile="PDF/A-2b, PAdES B-B")
    elif row["last_error"]:
        view.update(last_error=row["last_error"], next_attempt_at=row["next_attempt_at"])
    return view


def work_waiting(conn: sqlite3.Connection, *, now: str) -> bool:
    """Is there a document past the cursor or a due job? (Reads only; a hint, re-checked under the lock.)"""
    row = conn.execute("SELECT last_document_id FROM archive_cursor WHERE id = 1").fetchone()
    top = int(conn.execute("SELECT coalesce(max(id), 0) FROM documents").fetchone()[0])
    if top > (int(row[0]) if row else 0):
        return True
    due = conn.execute("SELECT 1 FROM archive_jobs WHERE (state IN ('pending', 'failed')"
                       " AND next_attempt_at <= ?) OR (state = 'running' AND lease_until <= ?) LIMIT 1",
                       (now, now)).fetchone()
    return due is not None


def in_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(conn, ...)`` in one BEGIN IMMEDIATE transaction (the writer lock taken up front, so a
    concurrent writer makes us wait rather than fail on a stale snapshot)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn, *args, **kwargs)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return result


# -- the worker ------------------------------------------------------------------------------------------

class BuildFailed(Exception):
    """This attempt failed; the reason is recorded and the job retried later."""


class LeaseLost(Exception):
    """Another worker took the job (ours looked dead): stop without recording anything."""


class ArchiveWorker:
    """Claims due jobs one at a time and builds each in a child process
    (``central.records.archive_build``)."""

    def __init__(self, paths: CentralPaths, db: Database, settings: WorkerSettings | None = None, *,
                 archive_name: str = DEFAULT_ARCHIVE_NAME) -> None:
        self.paths = paths
        self.db = db
        self.settings = settings or WorkerSettings()
        self.archive_name = archive_name
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"   # release_dead_owners
        self.store = ObjectStore(paths.objects)
        self.tmp = archive_tmp(paths)
        self.wake = asyncio.Event()
        self.built = 0
        self.failed = 0

    async def start(self) -> None:
        """Start-up, before the loop: the signing identity (made if missing), a clean build directory."""
        keys = signing_dir(self.paths)
        if await asyncio.to_thread(ensure_signing_identity, keys, archive_name=self.archive_name):
            log.warning("the archive signing key was missing: created %s and its self-signed certificate %s",
                        keys / KEY_NAME, keys / CERT_NAME)
        make_private_dir(self.tmp)
        released = await self._write(release_dead_owners, host=socket.gethostname(), alive=pid_alive,
                                     now=catalog.utc_now())
        if released:
            log.warning("%d archival job(s) of a central that died on this host are taken up again", released)
        candidates = await self.db.call(lambda conn: {r[0] for r in conn.execute(
            "SELECT candidate_sha256 FROM archive_jobs WHERE candidate_sha256 IS NOT NULL")})
        for leftover in self.tmp.iterdir():
            # Half-built files of a killed child, and built files never recorded: a recorded candidate
            # is kept for its job's next attempt (which re-checks its hash).
            if leftover.is_file() and leftover.name.removesuffix(".pdf") not in candidates:
                leftover.unlink()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                job = await self.db.call(self._next)
            except sqlite3.Error as exc:
                failures += 1
                log.error("archive jobs: catalog unavailable (%s); retrying", exc)  # noqa: TRY400
                await asyncio.sleep(min(60.0, self.settings.poll_s * 2 ** min(failures, 5)))
                continue
            failures = 0
            if job is None:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.settings.poll_s)
                continue
            await self.process(job)

    def _next(self, conn: sqlite3.Connection) -> Job | None:
        if not work_waiting(conn, now=catalog.utc_now()):
            return None   # the idle poll only reads: it never takes the write lock from ingest

        def step(conn: sqlite3.Connection) -> Job | None:
            now = catalog.utc_now()
            added = enqueue_new(conn, now=now)
            if added:
                log.info("%d new archival cop%s to build", added, "y" if added == 1 else "ies")
            return claim(conn, owner=self.owner, now=now, lease_s=self.settings.lease_s)
        return in_transaction(conn, step)

    async def process(self, job: Job) -> None:
        """One attempt at one job; every outcome but a lost lease is recorded."""
        try:
            sha, size = await self._store(job)
            self.built += 1
            log.info("archival copy of %s (document %d) stored as %s, %d bytes", job.sha256[:12],
                     job.document_id, sha[:12], size)
        except LeaseLost:
            log.warning("archival job %s was taken by another worker; leaving it", job.sha256[:12])
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._write(release, job.sha256, owner=self.owner,
                                                 now=catalog.utc_now()))
            raise
        except Exception as exc:   # recorded with its reason, retried later: never a crash loop
            reason = str(exc) if isinstance(exc, BuildFailed) else f"{type(exc).__name__}: {exc}"
            self.failed += 1
            delay = self._backoff(job.attempts)
            retry_at = _iso(datetime.now(UTC) + timedelta(seconds=delay))
            log.warning("archival copy of %s (document %d) failed, attempt %d, retry in %.0f s: %s",
                        job.sha256[:12], job.document_id, job.attempts, delay, reason)
            with contextlib.suppress(sqlite3.Error):
                await self._write(fail, job, owner=self.owner, error=reason, retry_at=retry_at,
                                  now=catalog.utc_now())

    async def _store(self, job: Job) -> tuple[str, int]:
        """Build (or find) the copy, record it as the candidate, store it, mark the job done."""
        sha, path = await self._candidate(job)
        if path is not None:
            recorded = await self._write(record_candidate, job.sha256, owner=self.owner, candidate=sha,
                                         now=catalog.utc_now())
            if not recorded:
                path.unlink(missing_ok=True)
                raise LeaseLost(job.sha256)
            await asyncio.to_thread(self.store.put_file, path, sha)
        size = self.store.path_for(sha).stat().st_size
        if not await self._write(complete, job, owner=self.owner, archival_sha256=sha, size=size,
                                 now=catalog.utc_now(), detail={"from_candidate": path is None}):
            raise LeaseLost(job.sha256)
        return sha, size

    async def _write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.db.call(lambda conn: in_transaction(conn, fn, *args, **kwargs))

    async def _candidate(self, job: Job) -> tuple[str, Path | None]:
        """The archival copy to store: (sha256, file to put), or (sha256, None) if already stored."""
        if job.candidate_sha256 is not None:
            # A previous attempt built this file and may have stored it before dying.
            stored = self.store.path_for(job.candidate_sha256)
            if await asyncio.to_thread(_hashes_to, stored, job.candidate_sha256):
                return job.candidate_sha256, None
            built = self.tmp / f"{job.candidate_sha256}.pdf"
            if await asyncio.to_thread(_hashes_to, built, job.candidate_sha256):
                return job.candidate_sha256, built
        answer = await self._build(job)
        return str(answer["sha256"]), Path(str(answer["path"]))

    async def _build(self, job: Job) -> dict[str, Any]:
        original = self.store.path_for(job.sha256)
        package = self.store.path_for(job.package_sha256)
        for what, path in (("original", original), ("package", package)):
            if not path.is_file():
                raise BuildFailed(f"the stored {what} {path.name} is missing (run `sohoa central verify`)")
        keys = signing_dir(self.paths)
        request = BuildRequest(original=original, media_type=job.media_type, package=package,
                               out_dir=self.tmp, title=job.filename, created=job.received_at,
                               key=keys / KEY_NAME, cert=keys / CERT_NAME,
                               address_space_mib=self.settings.address_space_mib, parent_pid=os.getpid())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "central.records.archive_build", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        talk = asyncio.ensure_future(proc.communicate(request.to_json()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout_s
        try:
            while not talk.done():
                left = deadline - loop.time()
                if left <= 0:
                    raise BuildFailed(f"the build took longer than {self.settings.timeout_s:.0f} s")
                await asyncio.wait({talk}, timeout=min(left, self.settings.lease_s / 3))
                if not talk.done():
                    until = _iso(datetime.now(UTC) + timedelta(seconds=self.settings.lease_s))
                    if not await self._write(extend_lease, job.sha256, owner=self.owner, until=until):
                        raise LeaseLost(job.sha256)
            stdout, stderr = talk.result()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await talk
        try:
            answer: dict[str, Any] = json.loads(stdout)
        except ValueError:
            tail = stderr.decode("utf-8", errors="replace").strip().splitlines()[-3:]
            raise BuildFailed(f"the build process ended with status {proc.returncode}: "
                              f"{' | '.join(tail) or 'no output'}") from None
        if not answer.get("ok"):
            raise BuildFailed(f"{answer.get('kind', 'error')}: {answer.get('error')}")
        return answer

    def _backoff(self, attempts: int) -> float:
        ceiling = min(self.settings.backoff_max_s,
                      self.settings.backoff_initial_s * 2 ** min(max(attempts - 1, 0), 20))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 - jitter, not crypto


def _hashes_to(path: Path, sha256: str) -> bool:
    try:
        return file_sha256(path) == sha256
    except FileNotFoundError:
        return False


# -- wiring ----------------------------------------------------------------------------------------------

ARCHIVE_WORKER: web.AppKey[ArchiveWorker] = web.AppKey("archive_worker")


def worker_ctx(paths: CentralPaths) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx running the archival worker, with its own catalog connection, for the app's lifetime."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        db = Database(paths.catalog, readonly=False, name="catalog-archive")
        worker = ArchiveWorker(paths, db)
        try:
            await worker.start()
        except BaseException:
            await db.close()
            raise
        app[ARCHIVE_WORKER] = worker
        task = asyncio.create_task(worker.run(), name="archive-worker")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await db.close()

    return ctx
