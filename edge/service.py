"""The edge service: the stages of one document, wired in order, in one TaskGroup.

    intake (watch + settle) → take → custody holds it → process (OCR, package, seal)
        → uplink → receipt recorded → custody releases it (re-hashed against the receipt)

Each stage is its own module and records facts in the outbox; :mod:`edge.custody` is the only
thing that moves or deletes originals, from those facts, and start-up recovery is that reconciler
run once (README, "Where a document is, at every moment").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from edge import config as edge_config
from edge import statuspage
from edge.alarms import ACCESS_REFUSED, IDENTITY_CLASH, OUTBOX_FULL, QUOTA_DEFERRED, Alarms, is_disk_full
from edge.clerk import ACK_NAME, SERVICE_LOCK
from edge.config import EdgeConfig
from edge.custody import Custody
from edge.errors import EdgeAlreadyRunning
from edge.fsutil import LockHeld, disk_free, hold_lock, write_status_file
from edge.job import Layout
from edge.ocr import OcrEngine, build_engine
from edge.outbox import Outbox
from edge.process import Processor
from edge.settle import Quiet
from edge.take import Taker
from edge.uplink import Uplink
from edge.watch import Intake
from protocol.messages import MAX_STATUS_COUNT, Status, encode
from protocol.version import version

log = logging.getLogger("sohoa.edge")
__all__ = ["OUTBOX_FULL", "EdgeService", "is_disk_full", "run"]


@dataclass(frozen=True, slots=True)
class EdgeCounters:
    """Live figures for the demo and tests (a snapshot; the outbox holds the truth)."""

    taken: int
    failed: int
    pages: int
    original_bytes: int
    ciphertext_bytes: int
    ocr_seconds: float
    alarms: frozenset[str]
    last_error: str | None


class EdgeService:
    """One edge box: owns the outbox, the stages and the uplink."""

    def __init__(self, config: EdgeConfig, *, ocr_engine: OcrEngine | None = None) -> None:
        self.config = config
        self.alarms = Alarms()
        self._engine = ocr_engine
        self._outbox: Outbox | None = None
        self._uplink: Uplink | None = None
        self._custody: Custody | None = None
        self._processor: Processor | None = None
        self._taker: Taker | None = None
        self._signing_key = config.signing_key()
        self.layout = Layout(processed=config.processed_dir, envelopes=config.envelopes_dir,
                             work=config.work_dir, watch=config.watch_dir, refused=config.refused_dir)
        self.ready = asyncio.Event()
        self.status_page_port: int | None = None   # set once the clerk's page listens

    @property
    def outbox(self) -> Outbox:
        assert self._outbox is not None, "service not started"
        return self._outbox

    @property
    def uplink(self) -> Uplink:
        assert self._uplink is not None, "service not started"
        return self._uplink

    @property
    def custody(self) -> Custody:
        assert self._custody is not None, "service not started"
        return self._custody

    @property
    def counters(self) -> EdgeCounters:
        processed = self._processor.counters if self._processor else None
        return EdgeCounters(
            taken=self._taker.taken if self._taker else 0,
            failed=self._taker.refused if self._taker else 0,
            pages=processed.pages if processed else 0,
            original_bytes=self._taker.original_bytes if self._taker else 0,
            ciphertext_bytes=processed.ciphertext_bytes if processed else 0,
            ocr_seconds=processed.ocr_seconds if processed else 0.0,
            alarms=frozenset(self.alarms.active), last_error=self.alarms.last_error)

    async def run(self) -> None:
        """Serve until cancelled, holding the home's service lock: `sohoa edge status` asks it whether
        the service runs (its status files can go stale on a full disk), and a second service on
        one home, which would take the same scans under the same client id, is refused."""
        try:
            with hold_lock(self.config.home / SERVICE_LOCK, mode=0o640):
                await self._serve()
        except LockHeld as exc:
            raise EdgeAlreadyRunning(f"another `sohoa edge run` (pid {exc.holder or '?'}) serves "
                                     f"{self.config.home}") from None

    async def _serve(self) -> None:
        cfg = self.config
        for directory in self.layout.private_dirs():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cfg.watch_dir.mkdir(parents=True, exist_ok=True)
        self._outbox = outbox = await Outbox.open(cfg.outbox_path, cap_bytes=cfg.outbox.cap_bytes)
        engine = self._engine or build_engine(cfg.ocr)
        self._custody = custody = Custody(
            outbox, self.layout, self.alarms, keep_originals=cfg.retention.keep_originals,
            release_after=cfg.retention.release_after_seconds, on_held=self._held)
        up = cfg.uplink
        self._uplink = uplink = Uplink(
            device_id=cfg.device_id, broker_url=cfg.broker.url, username=cfg.broker.username,
            password=cfg.broker.password, outbox=outbox, receipt_key=cfg.central.receipt_key,
            segment_size=up.segment_size, window=up.window, rate_kbit=up.rate_kbit or None,
            max_active=up.max_active, resend_after=up.resend_after, on_settled=custody.wake,
            status=self.status, status_interval=up.status_interval,
            ca_file=Path(cfg.broker.ca_file) if cfg.broker.ca_file else None)
        self._processor = processor = Processor(
            outbox, engine, cfg, layout=self.layout, signing_key=self._signing_key, alarms=self.alarms,
            on_packaged=uplink.wake, on_refused=custody.wake)
        self._taker = taker = Taker(outbox, custody, cfg, self.alarms)
        intake_cfg = cfg.intake
        quiet = Quiet(closed=intake_cfg.quiet_seconds, unknown_mtime_age=intake_cfg.unknown_quiet_seconds,
                      open=intake_cfg.open_quiet_seconds)
        try:
            await self.recover()
            async with Intake(cfg.watch_dir, quiet=quiet, rescan_seconds=intake_cfg.rescan_seconds,
                              check_interval=intake_cfg.check_interval,
                              ignore_dirs=(intake_cfg.refused_folder,)) as intake:
                self.ready.set()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._intake_loop(intake, taker), name="intake")
                    for index in range(cfg.ocr.worker_count):
                        group.create_task(processor.worker(), name=f"process-{index}")
                    group.create_task(custody.run(), name="custody")
                    group.create_task(uplink.run(), name="uplink")
                    group.create_task(self._status_loop(), name="status")
                    group.create_task(statuspage.run(self), name="status-page")
        finally:
            with contextlib.suppress(Exception):
                await engine.aclose()
            await outbox.close()

    def reload(self, config: EdgeConfig) -> str:
        """Apply what can change without a restart (SIGHUP): the uplink rate cap and the alarm
        threshold (the log level is the caller's). Returns what changed, and what needs a restart."""
        old = self.config
        if config.device_id != old.device_id or config.home != old.home:
            raise ValueError(f"device_id/home changed ({old.device_id} → {config.device_id}): "
                             "that is another box, restart the service")
        applied = dataclasses.replace(
            old, log=config.log,
            uplink=dataclasses.replace(old.uplink, rate_kbit=config.uplink.rate_kbit),
            outbox=dataclasses.replace(old.outbox, alarm_after_hours=config.outbox.alarm_after_hours))
        self.config = applied
        if self._uplink is not None:
            self._uplink.set_rate(config.uplink.rate_kbit or None)
        self.alarms.changed.set()
        pending = [name for name in ("watch_dir", "broker", "central", "intake", "ocr", "uplink",
                                     "status_page", "outbox", "retention")
                   if getattr(applied, name) != getattr(config, name)]
        summary = (f"uplink.rate_kbit={config.uplink.rate_kbit:g}, "
                   f"outbox.alarm_after_hours={config.outbox.alarm_after_hours:g}, "
                   f"log.level={config.log.level}")
        return summary + (f"; needs a restart to change: {', '.join(pending)}" if pending else "")

    async def recover(self) -> None:
        """Continue after a crash: the custody reconciler run once over everything, then every
        taken-but-unpackaged row back into the processing queue."""
        self.custody.sweep_leftovers(self.config.legacy_failed_dir)
        await self.custody.reconcile()
        assert self._processor is not None
        for doc in await self.outbox.unfinished():
            self._processor.submit(doc.tid)

    def _held(self, tid: str) -> None:
        if self._processor is not None:
            self._processor.submit(tid)

    async def _intake_loop(self, intake: Intake, taker: Taker) -> None:
        async for path in intake.stable():
            try:
                await taker.take(path)
            except FileNotFoundError:
                taker.forget(path)   # gone between settling and taking: nothing to do, nothing lost
            except OSError as exc:
                # Left where it is; the next rescan retries it.
                if is_disk_full(exc):
                    self.alarms.disk_full(exc)
                else:
                    self.alarms.raise_(f"cannot take scans: {exc.strerror or exc}")
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self.alarms.disk_full(exc)
            else:
                self.alarms.clear_prefix("cannot take scans")

    async def _status_loop(self) -> None:
        """Keep ``HOME/status.json`` current (what `sohoa edge status` shows, even offline) and
        ask the uplink to publish the status when something noteworthy changed."""
        written: tuple[Status, float] | None = None
        loop = asyncio.get_running_loop()
        while True:
            status = await self.status()
            unchanged = written is not None and dataclasses.replace(status, updated_at=None) == \
                written[0] and loop.time() - written[1] < 60
            if not unchanged:  # spare the SD card: write on change, and once a minute
                payload = encode(status)[1]
                try:
                    # 0640: the home's group (set by the installer) may read the box's status, never
                    # the outbox.
                    await asyncio.to_thread(write_status_file, self.config.status_path, payload, 0o640)
                except OSError as exc:
                    # Never stop the service over its status file; the next round tries again.
                    log.warning("cannot write %s: %s", self.config.status_path, exc)
                else:
                    written = (dataclasses.replace(status, updated_at=None), loop.time())
            if self.alarms.changed.is_set():
                self.alarms.changed.clear()
                self.uplink.request_status()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.alarms.changed.wait()

    async def status(self) -> Status:
        stats = await self.outbox.stats()
        limit_s = self.config.outbox.alarm_after_hours * 3600
        self.alarms.clear_prefix("oldest document waiting")
        if stats.queued_docs and stats.oldest_age_s > limit_s:
            self.alarms.raise_(f"oldest document waiting {stats.oldest_age_s / 3600:.0f} h "
                               f"(alarm after {self.config.outbox.alarm_after_hours:g} h)")
        uplink = self._uplink
        if uplink is not None and uplink.identity_clash:
            self.alarms.raise_(IDENTITY_CLASH)
        if uplink is not None and uplink.access_refused:
            self.alarms.raise_(ACCESS_REFUSED)
        else:
            self.alarms.clear(ACCESS_REFUSED)
        if uplink is not None and uplink.deferred:
            self.alarms.raise_(QUOTA_DEFERRED)
        else:
            self.alarms.clear(QUOTA_DEFERRED)
        last = (dt.datetime.fromtimestamp(stats.last_receipt_at, dt.UTC).isoformat(timespec="seconds")
                if stats.last_receipt_at else None)
        with contextlib.suppress(OSError):
            self.alarms.acknowledge(self.config.home.joinpath(ACK_NAME).stat().st_mtime)
        # The link's last error is the reason it is down: once connected again it is history.
        link_error = uplink.last_error if uplink is not None and not uplink.connected else None
        return Status(
            device=self.config.device_id, online=bool(uplink and uplink.connected),
            queue_docs=stats.queued_docs, queue_bytes=stats.queued_bytes,
            oldest_age_s=round(stats.oldest_age_s, 1), failed_docs=stats.failed, last_receipt_at=last,
            disk_free_bytes=min(disk_free(self.config.home), MAX_STATUS_COUNT), version=version(),
            last_error=self.alarms.current_error() or link_error,
            alarms=tuple(sorted(self.alarms.active)),
            updated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def run(home: Path) -> int:
    """``sohoa edge run``: serve until SIGTERM/SIGINT, then stop cleanly."""
    config = edge_config.load(home)

    async def main() -> None:
        service = EdgeService(config)
        task = asyncio.create_task(service.run(), name="edge")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return 0
