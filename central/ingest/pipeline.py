"""The ingest pipeline over MQTT: receive → batch (writer) → ack and answer; complete → assemble → record.

Stages and what may wait for what:
  - ``receive`` takes whatever the broker delivered (up to ``batch_max`` messages) and hands it to
    the writer at once; up to ``batches_in_flight`` batches are queued behind the writer, which
    commits all of them that are waiting as one group (one journal fsync, one WAL commit).
  - A segment or fin of a transfer not announced yet (its init is in another worker's batch) is
    parked in memory and tried again with the next batches for a few seconds before UNKNOWN.
  - ``answer`` takes the batches back in the order they were received, acknowledges their MQTT
    messages (PUBACKs go out in order) and publishes the replies without waiting for the broker's
    PUBACKs; transfers that became complete go to the assemblers.
  - ``assemble`` workers claim a job (a writer call), assemble it on a thread, and post the one short
    write that catalogs it; then the STORED ack and the receipt are published. A big document never
    holds up the acks of anybody's segments.
  - ``reconcile`` is level-triggered: once at start and every few seconds it gives complete transfers
    without a job one, takes over jobs whose lease ran out (a worker died), and deletes journal files
    nothing points into; every ``sweep_every_s`` it also expires transfers without progress for
    ``expire_after_s`` (their journal files go at the next pass, after that commit) and lowers the
    flag of devices back within their rejected-transfer budget. Start-up recovery is the same loop
    run once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from central.fsutil import make_private_dir
from central.ingest.archive import (
    Archiver,
    Assembly,
    AssemblyJob,
    RevokeFn,
    assemble_in_process,
    check_journals,
    init_process,
    tmp_leftovers,
)
from central.ingest.batch import BatchOutcome, BatchStage, Reply
from central.ingest.compact import compact
from central.ingest.durability import Durability
from central.ingest.expire import EXPIRE_AFTER_S, sweep
from central.ingest.inline import remove_stale_staging
from central.ingest.mqtt import Inbound, MqttClient, PublishError
from central.ingest.quota import Quotas
from central.ingest.rate import MessageRate, Pacer, RateLimiter, Verdict, topic_device
from central.ingest.staging import SegmentJournal
from central.ingest.store import OUR_TROUBLE, IngestStore
from central.ingest.writer import GroupWriter
from central.keys import CentralKeys
from central.metrics import Metrics
from central.paths import CentralPaths
from protocol.envelope import key_id
from protocol.messages import RECEIPT_IS_STORED, Ack, AckState, Receipt, encode

log = logging.getLogger("sohoa.central.ingest")

RECONCILE_EVERY_S = 5.0
LEASE_S = 120.0   # a worker that died holds its jobs this long; its own restart resumes them at once
MAX_UNANSWERED_PUBLISHES = 2048
# With several workers on one shared subscription a transfer's first segments may reach a worker
# before its init has been committed by another: such segments wait here (in memory; the device is
# only acked what is durable) and are tried again, for up to PARK_S, before UNKNOWN is answered.
PARK_S = 5.0
PARK_RETRY_S = 0.05
PARK_MAX_BYTES = 64 * 1024 * 1024   # beyond this, segments of unknown transfers are answered at once
SWEEP_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    worker: str
    batch_max: int = 512
    batches_in_flight: int = 4
    assemblers: int = 16
    assembler_processes: int = 0        # 0: assemble on threads of this process; N: in N processes
    reconcile_every_s: float = RECONCILE_EVERY_S
    lease_s: float = LEASE_S
    durability: str = "syncfs"
    quotas: Quotas = field(default_factory=Quotas)
    expire_after_s: float = EXPIRE_AFTER_S
    sweep_every_s: float = SWEEP_EVERY_S
    message_rate: MessageRate = field(default_factory=MessageRate)


@dataclass(slots=True)
class IngestCore:
    """The stages and the journal one worker runs; ``writer`` owns the catalog connection."""

    paths: CentralPaths
    settings: PipelineSettings
    journal: SegmentJournal
    durability: Durability
    batch: BatchStage
    archive: Archiver
    metrics: Metrics
    assembling: set[str] = field(default_factory=set)
    next_sweep: float = 0.0

    @classmethod
    def create(cls, paths: CentralPaths, keys: CentralKeys, settings: PipelineSettings, *,
               max_plaintext: int, metrics: Metrics) -> IngestCore:
        for transient in (paths.staging, paths.tmp, paths.quarantine):
            if not transient.is_dir():
                # Restored from a backup that did not carry it: what it held is re-sent by the boxes
                # (start_up forgets transfers whose journal is gone); refusing to start helps nobody.
                log.warning("%s was missing; created empty", transient)
                make_private_dir(transient)
        journal = SegmentJournal(paths.staging, settings.worker)
        durability = Durability(settings.durability, journal, [paths.staging, paths.objects])
        batch = BatchStage(paths, journal, key_id=key_id(bytes(keys.encryption.public_key)),
                           max_plaintext=max_plaintext, worker=settings.worker, metrics=metrics,
                           lease_s=settings.lease_s, notice_key=keys.encryption, quotas=settings.quotas)
        archive = Archiver(paths, keys, max_plaintext=max_plaintext, metrics=metrics, durability=durability,
                           quotas=settings.quotas, work_dir=paths.worker_tmp(settings.worker))
        return cls(paths, settings, journal, durability, batch, archive, metrics)

    def start_up(self, db: IngestStore) -> None:
        remove_stale_staging(db, self.paths)
        check_journals(db, self.paths.staging)
        tmp_leftovers(self.paths.tmp, self.archive.work_dir)

    def reconcile(self, db: IngestStore) -> list[str]:
        """Give complete transfers a job, take the jobs nobody holds, drop unused journal files."""
        for tid in db.complete_transfers_without_job():
            db.add_job(tid)
        worker, lease = self.settings.worker, self.settings.lease_s
        taken = [tid for tid in db.claimable_jobs(worker=worker)
                 if tid not in self.assembling and db.claim_job(tid, worker=worker, lease_s=lease)]
        # Before the sweep: only committed deletions may free a file (this transaction may yet fail).
        self.journal.collect(db.journal_in_use)
        now = time.time()
        if now >= self.next_sweep:
            self.next_sweep = now + self.settings.sweep_every_s
            sweep(db, self.batch, now=now, expire_after_s=self.settings.expire_after_s)
            compact(db, self.journal, now=now)   # its files are freed by the next collect
        return taken


class IngestPipeline:
    def __init__(self, core: IngestCore, writer: GroupWriter, client: MqttClient) -> None:
        self.core = core
        self.writer = writer
        self.client = client
        settings = core.settings
        self._answers: asyncio.Queue[tuple[list[Inbound], list[tuple[Inbound, float]],
                                           asyncio.Task[BatchOutcome]]] = asyncio.Queue()
        self._parked: list[tuple[float, Inbound]] = []   # (first seen, message) of unannounced transfers
        self._wake = asyncio.Event()
        self._in_flight = asyncio.Semaphore(settings.batches_in_flight)
        self._ready: asyncio.Queue[AssemblyJob | str] = asyncio.Queue()
        self._publishes: set[asyncio.Future[None]] = set()   # QoS 1 replies without a PUBACK yet
        # Devices whose latest init, as this worker saw it, said a receipt is their STORED ack
        # (protocol.messages.RECEIPT_IS_STORED). A hint, not state: a device this worker has not
        # heard say so (another worker got its init, a restart) gets STORED as well, as before.
        self._receipt_is_stored: dict[str, bool] = {}
        self._pacer: Pacer[Inbound] = Pacer(RateLimiter(settings.message_rate),
                                            lambda message: topic_device(message.topic),
                                            size_of=lambda message: len(message.payload))
        self._room = asyncio.Event()
        self._pool: Executor
        if settings.assembler_processes > 0:
            # spawn, not fork: this process has threads (paho's, the writer) whose locks a fork copies.
            self._pool = ProcessPoolExecutor(
                max_workers=settings.assembler_processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=init_process,
                initargs=(core.paths.home, core.archive.max_plaintext, core.archive.sync_objects,
                          core.archive.work_dir))
        else:
            self._pool = ThreadPoolExecutor(max_workers=settings.assemblers, thread_name_prefix="assembler")
        self.batches = 0
        self.messages = 0

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._receive(), name="receive")
                group.create_task(self._answer(), name="answer")
                for number in range(self.core.settings.assemblers):
                    group.create_task(self._assemble(), name=f"assemble-{number}")
                group.create_task(self._reconcile(), name="reconcile")
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.log_stats()

    # -- receive and answer -----------------------------------------------------------------------
    async def _receive(self) -> None:
        inbox = self.client.inbox
        limit = self.core.settings.batch_max
        stage = self.core.batch
        archive = self.core.archive
        loop = asyncio.get_running_loop()
        while True:
            fresh: list[Inbound] = []
            if self._parked or self._wake.is_set() or self._pacer.waiting:
                # Parked messages are tried again with whatever comes next, or alone after a pause.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PARK_RETRY_S):
                        fresh.append(await inbox.get())
            else:
                message = await self._next_or_wake()
                if message is not None:
                    fresh.append(message)
            while len(fresh) < limit and not inbox.empty():
                fresh.append(inbox.get_nowait())
            now = loop.time()
            released, fresh = self._pace(fresh, now)
            for message in (*released, *fresh):
                if message.topic.endswith("/init"):
                    self._note_capabilities(message)
            parked, self._parked = self._parked, []
            # Only ``fresh`` gets its PUBACK after the batch: parked and released messages have theirs.
            held = [*((m, since) for since, m in parked), *((m, now) for m in released)]
            pending = [*held, *((m, now) for m in fresh)]
            if not pending:
                continue
            # A sender may make up transfer ids: what waits here for an init is bounded in bytes.
            room = PARK_MAX_BYTES - sum(len(m.payload) for m, _ in pending[:len(held)])
            await self._in_flight.acquire()
            self.batches += 1
            self.messages += len(fresh)
            items = [(m.topic, m.payload) for m, _ in pending]
            park = [room > 0 and now - since < PARK_S for _, since in pending]
            call = functools.partial(_apply, stage, archive, items, park)
            task = asyncio.create_task(self.writer.call(call))
            await self._answers.put((fresh, pending, task))

    def _note_capabilities(self, init: Inbound) -> None:
        device = topic_device(init.topic)
        if device is None:
            return   # not a device topic: the batch stage answers it
        # Each init says it again: an edge rolled back to a release that does not gets STORED again.
        self._receipt_is_stored[device] = RECEIPT_IS_STORED in init.user_properties

    def _pace(self, fresh: list[Inbound], now: float) -> tuple[list[Inbound], list[Inbound]]:
        """Per-device message rate (``central.ingest.rate``): (released, now). ``released`` waited for
        their device's bucket and have their PUBACK already; ``now`` are within their rate and get it
        with the batch. Over its rate a message waits (PUBACK at once: it is held here, in memory, and
        the device resends what it does not get answered), beyond its device's queue it is dropped."""
        released = self._pacer.release(now)
        now_ok: list[Inbound] = []
        for message in fresh:
            verdict = self._pacer.offer(message, now)
            if verdict is Verdict.NOW:
                now_ok.append(message)
                continue
            self.client.ack(message)
            if verdict is Verdict.DROPPED:
                self.core.metrics.error("MessageRateExceeded")
            else:
                self.core.metrics.messages_paced += 1
        return released, now_ok

    async def _next_or_wake(self) -> Inbound | None:
        """The next message, or None as soon as ``_answer`` parks something (nothing may arrive)."""
        inbox = self.client.inbox
        if not inbox.empty():
            return inbox.get_nowait()
        getting = asyncio.ensure_future(inbox.get())
        waking = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({getting, waking}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waking.cancel()
            if not getting.done():
                getting.cancel()
        return getting.result() if getting.done() and not getting.cancelled() else None

    async def _answer(self) -> None:
        metrics = self.core.metrics
        while True:
            batch, pending, task = await self._answers.get()
            try:
                outcome: BatchOutcome | None = await task
            except OUR_TROUBLE as exc:
                # Devices resend what is not acked; a failing batch must not stop the service.
                metrics.error(type(exc).__name__)
                log.error("batch of %d messages not made durable, nothing acknowledged: %s", len(batch), exc)  # noqa: TRY400
                outcome = None
            except Exception:
                log.exception("ingest batch of %d messages failed", len(batch))
                outcome = None
            finally:
                self._in_flight.release()
            # PUBACK to the broker only: the device's own ack comes from central, after durability,
            # so a parked message (held here, in memory) is safe to acknowledge too.
            for message in batch:
                self.client.ack(message)
            if outcome is None:
                continue
            for index in outcome.parked:
                message, since = pending[index]
                self._parked.append((since, message))
            if outcome.parked:
                self._wake.set()
            metrics.segments_received += outcome.segments
            metrics.bytes_received += outcome.bytes
            await self._wait_for_room()
            self._publish(outcome.replies)
            for job in outcome.jobs:
                self._schedule(job)

    def _schedule(self, job: AssemblyJob | str) -> None:
        """Queue a claimed job (a snapshot taken in the batch's transaction) or a tid to claim."""
        tid = job if isinstance(job, str) else job.tid
        if tid not in self.core.assembling:
            self.core.assembling.add(tid)
            self._ready.put_nowait(job)

    # -- assemble ---------------------------------------------------------------------------------
    async def _assemble(self) -> None:
        loop = asyncio.get_running_loop()
        archive = self.core.archive
        revoke = self.core.batch.revoke_transfer
        while True:
            queued = await self._ready.get()
            tid = queued if isinstance(queued, str) else queued.tid
            try:
                if isinstance(queued, str):
                    job, replies = await self.writer.call(functools.partial(_claim, archive, tid, revoke))
                    self._publish(replies)
                    if job is None:
                        continue
                else:
                    job = queued
                if isinstance(self._pool, ProcessPoolExecutor):
                    result = archive.stored_elsewhere(
                        await loop.run_in_executor(self._pool, assemble_in_process, job))
                else:
                    result = await loop.run_in_executor(self._pool, archive.assemble, job)
                replies = await self.writer.call(functools.partial(_record, archive, result, revoke))
                self.core.metrics.documents_ingested += sum(isinstance(r, Receipt) for r in replies)
                self._publish(replies)
            except OUR_TROUBLE as exc:
                # The job stays in the catalog; the reconciler gives it to someone once its lease ends.
                self.core.metrics.error(type(exc).__name__)
                log.error("assembly of %s not recorded: %s", tid, exc)  # noqa: TRY400 - the cause is enough
            finally:
                self.core.assembling.discard(tid)

    def log_stats(self) -> None:
        log.info("ingest: %d batches of %.1f messages on average; writer: %d commits of %.1f calls;"
                 " %d journal syncs, %d %s barriers; %d documents", self.batches,
                 self.messages / max(self.batches, 1), self.writer.commits,
                 self.writer.calls / max(self.writer.commits, 1), self.core.journal.syncs,
                 self.core.durability.barriers, self.core.durability.mode,
                 self.core.metrics.documents_ingested)
        log.info("cpu seconds by thread: %s", json.dumps(thread_cpu()))

    async def _reconcile(self) -> None:
        seen = (0, 0)
        while True:
            if (self.batches, self.messages) != seen:
                self.log_stats()
                seen = (self.batches, self.messages)
            try:
                for tid in await self.writer.call(self.core.reconcile):
                    self._schedule(tid)
            except OUR_TROUBLE as exc:
                log.error("reconcile failed: %s", exc)  # noqa: TRY400 - the cause is enough
            await asyncio.sleep(self.core.settings.reconcile_every_s)

    # -- publish ----------------------------------------------------------------------------------
    def _publish(self, replies: Sequence[Reply]) -> None:
        receipted = {r.tid for r in replies if isinstance(r, Receipt)}
        for reply in replies:
            if isinstance(reply, Ack) and reply.state is AckState.RECEIVING:
                # Progress acks go at QoS 0: one lost costs the device a resend of what it covered
                # (it resends whatever no ack covers), while QoS 1 cost a PUBACK round trip, a
                # future and paho's in-flight bookkeeping for most replies central sends. Outcomes
                # (STORED, REJECTED, UNKNOWN) and receipts stay QoS 1.
                self._publish_now(reply)
                continue
            if (isinstance(reply, Ack) and reply.state is AckState.STORED
                    and self._receipt_is_stored.get(reply.device, False)
                    and reply.tid in receipted):
                continue   # the receipt right behind it says stored, to an edge that reads it so
            self._publish_one(reply)

    def _publish_now(self, reply: Ack) -> None:
        try:
            self.client.publish_nowait(*encode(reply), qos=0)
        except PublishError as exc:
            log.debug("progress ack not sent (the device will ask again): %s", exc)

    def _publish_one(self, reply: Reply) -> None:
        """Hand a QoS 1 reply to paho; its PUBACK is only looked at (in a callback), never awaited.
        A reply the broker refuses or loses with the connection is asked for again by the device."""
        try:
            answer = self.client.start_publish(*encode(reply))
        except PublishError as exc:
            log.warning("reply not delivered (the device will ask again): %s", exc)
            return
        if answer is not None:
            self._publishes.add(answer)
            answer.add_done_callback(self._published)

    def _published(self, answer: asyncio.Future[None]) -> None:
        self._publishes.discard(answer)
        if len(self._publishes) < MAX_UNANSWERED_PUBLISHES:
            self._room.set()
        if answer.cancelled():
            return
        exc = answer.exception()
        if exc is not None:
            log.warning("reply not delivered (the device will ask again): %s", exc)

    async def _wait_for_room(self) -> None:
        """Backpressure: stop taking batches while the broker owes too many PUBACKs."""
        while len(self._publishes) >= MAX_UNANSWERED_PUBLISHES:
            self._room.clear()
            await self._room.wait()

    async def drain(self) -> None:
        """Wait for the replies being published (tests, clean shutdown)."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._publishes, return_exceptions=True)


# The writer calls, as partials (a lambda in a loop would capture the loop variable).
def _apply(stage: BatchStage, archive: Archiver, items: list[tuple[str, bytes]], park: list[bool],
           db: IngestStore) -> BatchOutcome:
    """The batch, and a snapshot of each transfer it completed for the assemblers (one writer call)."""
    outcome = stage.apply(db, items, park)
    for tid in outcome.ready:
        job, replies = archive.claim(db, tid, stage.revoke_transfer)
        outcome.replies += replies
        if job is not None:
            outcome.jobs.append(job)
    return outcome


def _claim(archive: Archiver, tid: str, revoke: RevokeFn,
           db: IngestStore) -> tuple[AssemblyJob | None, list[Reply]]:
    return archive.claim(db, tid, revoke)


def _record(archive: Archiver, result: Assembly, revoke: RevokeFn, db: IngestStore) -> list[Reply]:
    return archive.record(db, result, revoke)


def thread_cpu() -> dict[str, float]:
    """CPU seconds each kind of thread of this process has used, and of that in the kernel ("<kind>
    sys": a thread that spends its time in syscalls needs fewer syscalls, not faster Python).
    Linux; empty elsewhere."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    spent: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        kind = thread.name.split("_")[0].rstrip("0123456789-")
        spent[kind] = round(spent.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / ticks, 2)
        spent[f"{kind} sys"] = round(spent.get(f"{kind} sys", 0.0) + int(fields[12]) / ticks, 2)
    return spent
