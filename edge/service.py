"""The edge service: the stages of one document, wired in order, in one TaskGroup.

    intake (watch + settle) → take (probe, hash, outbox row, move to processed/)
        → ocr → package → seal → outbox 'packaged' → uplink → receipt → forget

Where a document is at every moment:
- in the watch folder until it is *taken*; an outbox row is written before the file leaves it;
- in ``processed/`` (named by its sha256) from then until central's signed receipt arrives;
- its envelope in ``envelopes/<tid>.env`` from packaging until the receipt;
- in ``failed/`` (with ``<name>.reason.txt``) if it is refused, never deleted by us.
After a crash, ``recover()`` re-queues rows left half-way and sweeps files of receipted rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import logging
import os
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge import config as edge_config
from edge.config import EdgeConfig
from edge.errors import BadInputError, EdgeError
from edge.fsutil import atomic_write_bytes, disk_free, move_durably, sha256_file
from edge.media import probe
from edge.ocr import OcrEngine, TesseractEngine
from edge.outbox import Doc, DocState, Outbox
from edge.package import build_package, seal_package
from edge.quarantine import quarantine
from edge.uplink import Uplink
from edge.watch import Intake
from protocol.bag import MEDIA_EXTENSIONS
from protocol.messages import Status, encode
from protocol.names import display_name

log = logging.getLogger("sohoa.edge")
VERSION = "0.1.0"
MAX_ATTEMPTS = 3
OUTBOX_FULL = "outbox full: new scans wait in the watch folder"
DISK_FULL = "disk full: no space left in the edge home; scans wait and are retried, nothing is quarantined"
# How long a document waits before it is tried again on a full disk (no attempt is counted).
DISK_FULL_RETRY_S = 5.0
_SQLITE_FULL = 13


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from the kernel or SQLITE_FULL from the outbox: wait for space, do not give up."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(exc)
    return False


@dataclass
class EdgeCounters:
    """Live figures for the demo and the status message."""

    taken: int = 0
    failed: int = 0
    duplicates: int = 0
    pages: int = 0
    original_bytes: int = 0
    ciphertext_bytes: int = 0
    ocr_seconds: float = 0.0
    alarms: set[str] = field(default_factory=set)
    last_error: str | None = None


class EdgeService:
    """One edge box: owns the outbox, the OCR engine, the intake and the uplink."""

    def __init__(self, config: EdgeConfig, *, ocr_engine: OcrEngine | None = None) -> None:
        self.config = config
        self.counters = EdgeCounters()
        self._engine = ocr_engine
        self._outbox: Outbox | None = None
        self._uplink: Uplink | None = None
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._status_changed = asyncio.Event()
        # Scans left in the watch folder for lack of outbox room: path → (size, mtime_ns) then.
        self._waiting: dict[Path, tuple[int, int]] = {}
        self._signing_key = config.signing_key()
        self.ready = asyncio.Event()

    @property
    def outbox(self) -> Outbox:
        assert self._outbox is not None, "service not started"
        return self._outbox

    @property
    def uplink(self) -> Uplink:
        assert self._uplink is not None, "service not started"
        return self._uplink

    async def run(self) -> None:
        cfg = self.config
        for directory in (cfg.envelopes_dir, cfg.work_dir, cfg.processed_dir, cfg.failed_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cfg.watch_dir.mkdir(parents=True, exist_ok=True)
        self._outbox = await Outbox.open(cfg.outbox_path, cap_bytes=cfg.outbox.cap_bytes)
        engine = self._engine or TesseractEngine(cfg.ocr.languages, workers=cfg.ocr.worker_count,
                                                 dpi=cfg.ocr.dpi)
        up = cfg.uplink
        self._uplink = Uplink(
            device_id=cfg.device_id, broker_url=cfg.broker.url, username=cfg.broker.username,
            password=cfg.broker.password, outbox=self._outbox, receipt_key=cfg.central.receipt_key,
            segment_size=up.segment_size, window=up.window, rate_kbit=up.rate_kbit or None,
            max_active=up.max_active, resend_after=up.resend_after, on_delivered=self._forget,
            on_rejected=self._rejected, status=self.status, status_interval=up.status_interval,
            ca_file=Path(cfg.broker.ca_file) if cfg.broker.ca_file else None)
        try:
            await self.recover()
            async with Intake(cfg.watch_dir, quiet_seconds=cfg.intake.quiet_seconds,
                              rescan_seconds=cfg.intake.rescan_seconds,
                              check_interval=cfg.intake.check_interval) as intake:
                self.ready.set()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._intake_loop(intake), name="intake")
                    for index in range(cfg.ocr.worker_count):
                        group.create_task(self._process_loop(engine), name=f"process-{index}")
                    group.create_task(self._uplink.run(), name="uplink")
                    group.create_task(self._status_loop(), name="status")
        finally:
            with contextlib.suppress(Exception):
                await engine.aclose()
            await self._outbox.close()

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
        self._status_changed.set()
        pending = [name for name in ("watch_dir", "broker", "central", "intake", "ocr", "uplink",
                                     "outbox", "retention")
                   if getattr(applied, name) != getattr(config, name)]
        summary = (f"uplink.rate_kbit={config.uplink.rate_kbit:g}, "
                   f"outbox.alarm_after_hours={config.outbox.alarm_after_hours:g}, "
                   f"log.level={config.log.level}")
        return summary + (f"; needs a restart to change: {', '.join(pending)}" if pending else "")

    # -- recovery ---------------------------------------------------------------------------
    async def recover(self) -> None:
        """Continue after a crash: re-queue half-done rows, sweep files of receipted rows.

        A row is always committed before its file leaves the watch folder, so after a power cut the
        original is either still at the row's ``src_path`` or already at its place in processed/.
        """
        outbox = self.outbox
        # Work files are rebuilt from the original on demand; temp files are half-written copies
        # that a kill -9 left before their rename. Neither holds anything that is not elsewhere.
        for leftover in self.config.work_dir.iterdir():
            if not leftover.is_dir():
                leftover.unlink(missing_ok=True)
        for leftover in self.config.envelopes_dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        for doc in await outbox.unfinished():
            src = Path(doc.src_path)
            held = self._held_path(doc)
            if src != held and src.exists() and not src.is_relative_to(self.config.processed_dir):
                move_durably(src, held)
            if held.exists():
                if src != held:
                    await outbox.update_src(doc.tid, str(held))
                self._queue.put_nowait(doc.tid)
            elif src.exists():
                self._queue.put_nowait(doc.tid)
            else:
                await outbox.mark_failed(doc.tid, "the original vanished before it was packaged "
                                                  "(deleted from the scan folder?)")
        while swept := await outbox.delivered_with_files():
            for doc in swept:
                await self._forget(doc)
        # Files in processed/ whose row ended without them being moved on (a crash, or a full
        # disk, between the row's last commit and the move): finish the job now.
        for path in self.config.processed_dir.iterdir():
            if path.name.startswith("."):
                continue
            owner = await outbox.get(path.stem)
            if owner is None:
                # Cannot happen (the row commits durably before the move); never delete it.
                log.warning("returning unknown file %s to the watch folder", path.name)
                move_durably(path, self.config.watch_dir / f"recovered-{path.name}")
            elif owner.state is DocState.FAILED:
                await self._quarantine_held(owner, path, owner.reason or "failed")

    def _held_path(self, doc: Doc) -> Path:
        """Where a taken scan waits for its receipt: one file per outbox row, named by its tid
        (never by the clerk's name, and never shared by two rows holding the same bytes)."""
        return self.config.processed_dir / f"{doc.tid}.{MEDIA_EXTENSIONS[doc.media_type]}"

    # -- stages -----------------------------------------------------------------------------
    async def _intake_loop(self, intake: Intake) -> None:
        async for path in intake.stable():
            try:
                await self._take(path)
            except BadInputError as exc:
                await self._quarantine_new(path, exc.reason)
            except FileNotFoundError:
                self._waiting.pop(path, None)
                continue  # gone between settling and taking: nothing to do, nothing lost
            except (OSError, sqlite3.Error) as exc:
                # Leave the file where it is; the next rescan retries it.
                if is_disk_full(exc):
                    self._disk_full(exc)
                elif isinstance(exc, OSError):
                    self._alarm(f"cannot take scans: {exc.strerror or exc}")
                else:
                    raise
            else:
                self._clear_alarms_starting("cannot take scans")

    async def _take(self, path: Path) -> None:
        cfg = self.config
        info = path.lstat()
        if self._waiting.get(path) == (info.st_size, info.st_mtime_ns) and not await self.outbox.room_for(
                info.st_size * 2):
            # Refused for room at an earlier rescan and unchanged since: while the box is offline
            # for hours, do not decode and hash every waiting scan again at every rescan.
            return
        # probe decodes every frame: off the event loop, so a large TIFF does not stall the uplink.
        media = await asyncio.to_thread(probe, path, max_bytes=cfg.intake.max_file_bytes)
        name = display_name(path.name)
        relative = str(path.relative_to(cfg.watch_dir)) if path.is_relative_to(cfg.watch_dir) else path.name
        sha = await asyncio.to_thread(sha256_file, path)
        earlier = await self.outbox.find_active_by_sha256(sha)
        if earlier is not None and earlier.state is DocState.STABLE and Path(earlier.src_path) == path:
            # This very file was taken before but its move failed (disk full): finish that take
            # instead of writing a second row for the same scan.
            await self._hold(earlier, path)
            return
        if earlier is not None and earlier.state in (DocState.DELIVERED, DocState.DUPLICATE):
            # The same bytes are already receipted by central: this copy adds nothing.
            await self.outbox.add_duplicate(name=name, sha256=sha, size=media.size, of_tid=earlier.tid)
            path.unlink()
            self.counters.duplicates += 1
            log.info("duplicate of %s already delivered: %s", earlier.tid, name)
            return
        if not await self.outbox.room_for(media.size * 2):
            # Never drop, never evict: the scan waits, untouched, where the clerk put it.
            self._waiting[path] = (info.st_size, info.st_mtime_ns)
            self._alarm(OUTBOX_FULL)
            return
        self._waiting.pop(path, None)
        self._clear_alarm(OUTBOX_FULL)
        # Identical bytes already in flight under another row are sent again under this one;
        # central stores the content once and receipts both.
        # The row first (durably), then the move: a crash in between leaves a row whose file is
        # still in the watch folder, which recover() moves; never a moved file without a row.
        doc = await self.outbox.add(name=name, src_path=str(path), size=media.size, sha256=sha,
                                    media_type=media.media_type, pages=media.pages,
                                    priority=cfg.intake.priority_of(relative))
        await self._hold(doc, path)

    async def _hold(self, doc: Doc, path: Path) -> None:
        """Move a taken scan out of the watch folder into processed/ and queue it."""
        held = self._held_path(doc)
        move_durably(path, held)
        held.chmod(0o600)   # a plaintext archive record: private to the service from now on
        try:
            await self.outbox.update_src(doc.tid, str(held))
        finally:
            # Queued even if the row could not be re-pointed (disk full): the file has left the
            # watch folder, so nothing else would pick this row up; _process re-points it.
            self._queue.put_nowait(doc.tid)
        self.counters.taken += 1
        self.counters.original_bytes += doc.size
        self._clear_alarm(DISK_FULL)
        log.info("took %s as %s (%d page(s))", doc.name, doc.tid, doc.pages)

    async def _process_loop(self, engine: OcrEngine) -> None:
        while True:
            tid = await self._queue.get()
            doc = await self.outbox.get(tid)
            if doc is None or doc.state not in (DocState.STABLE, DocState.OCR_DONE):
                continue
            try:
                await self._process(doc, engine)
            except BadInputError as exc:
                await self._fail_or_wait(doc, exc.reason)
            except (EdgeError, OSError, sqlite3.Error) as exc:
                if is_disk_full(exc):
                    # Not the scan's fault: no attempt is counted (three would quarantine a good
                    # scan), and writing the attempt would need the space that is missing anyway.
                    self._disk_full(exc)
                    asyncio.get_running_loop().call_later(DISK_FULL_RETRY_S, self._queue.put_nowait, tid)
                    continue
                if isinstance(exc, sqlite3.Error):
                    raise
                attempts = await self.outbox.bump_attempts(tid, str(exc))
                self.counters.last_error = f"{doc.name}: {exc}"
                if attempts >= MAX_ATTEMPTS:
                    await self._fail_or_wait(doc, f"gave up after {attempts} attempts: {exc}")
                else:
                    log.warning("processing %s failed (attempt %d): %s", doc.name, attempts, exc)
                    asyncio.get_running_loop().call_later(
                        10.0 * attempts, self._queue.put_nowait, tid)
            else:
                self._clear_alarm(DISK_FULL)

    async def _process(self, doc: Doc, engine: OcrEngine) -> None:
        cfg = self.config
        original = Path(doc.src_path)
        held = self._held_path(doc)
        if original != held and not original.exists() and held.exists():
            # Moved into processed/ but the row was not updated (the disk was full then).
            await self.outbox.update_src(doc.tid, str(held))
            original = held
        media = await asyncio.to_thread(probe, original, max_bytes=cfg.intake.max_file_bytes)
        started = time.monotonic()
        result = await engine.recognize(original, media)
        self.counters.ocr_seconds += time.monotonic() - started
        await self.outbox.mark_ocr_done(doc.tid, result.pages)
        package = cfg.work_dir / f"{doc.tid}.tar"
        envelope = cfg.envelopes_dir / f"{doc.tid}.env"
        captured = dt.datetime.fromtimestamp(doc.created_at, dt.UTC).isoformat(timespec="seconds")
        await asyncio.to_thread(
            build_package, original, package, media=media, ocr=result, tid=doc.tid,
            device_id=cfg.device_id, seq=doc.seq, original_name=doc.name,
            original_sha256=doc.sha256, captured_at=captured)
        try:
            signed = await asyncio.to_thread(
                seal_package, package, envelope, device_id=cfg.device_id, tid=doc.tid, seq=doc.seq,
                signing_key=self._signing_key, central_public_key=cfg.central.encryption_key,
                created_at=int(time.time()))
        finally:
            package.unlink(missing_ok=True)
        await self.outbox.mark_packaged(
            doc.tid, envelope_path=str(envelope), signed_header=signed.encode(),
            ciphertext_size=signed.header.ciphertext_size, segment_size=cfg.uplink.segment_size)
        self.counters.pages += result.pages
        self.counters.ciphertext_bytes += signed.header.ciphertext_size
        log.info("packaged %s: %d page(s), %d → %d bytes", doc.name, result.pages, doc.size,
                 signed.header.ciphertext_size)
        self.uplink.wake()

    # -- endings ----------------------------------------------------------------------------
    async def _forget(self, doc: Doc) -> None:
        """Central's signed receipt is durably recorded: the plaintext may go now."""
        if doc.envelope_path:
            Path(doc.envelope_path).unlink(missing_ok=True)
        (self.config.work_dir / f"{doc.tid}.tar").unlink(missing_ok=True)
        if not self.config.retention.keep_originals:
            Path(doc.src_path).unlink(missing_ok=True)
        await self.outbox.clear_envelope(doc.tid)

    async def _rejected(self, doc: Doc, reason: str) -> None:
        """The uplink gave up on a document (central refused it, or its envelope is unreadable)."""
        await self._fail_or_wait(doc, reason)

    async def _fail(self, doc: Doc, reason: str) -> None:
        # The reason is recorded durably first: whatever happens to the moves below, the row says
        # why, and recover() finishes a quarantine that a crash or a full disk interrupted.
        await self.outbox.mark_failed(doc.tid, reason)
        self.counters.failed += 1
        self.counters.last_error = f"{doc.name}: {reason}"
        if doc.envelope_path:
            Path(doc.envelope_path).unlink(missing_ok=True)
        original = Path(doc.src_path)
        if original.exists():
            await self._quarantine_held(doc, original, reason)

    async def _fail_or_wait(self, doc: Doc, reason: str) -> None:
        """``_fail``, unless the disk is full: then alarm and try again later (nothing is lost:
        the original stays where the row says)."""
        try:
            await self._fail(doc, reason)
        except (OSError, sqlite3.Error) as exc:
            if not is_disk_full(exc):
                raise
            self._disk_full(exc)
            asyncio.get_running_loop().call_later(DISK_FULL_RETRY_S, self._queue.put_nowait, doc.tid)

    async def _quarantine_held(self, doc: Doc, path: Path, reason: str) -> None:
        """Give the clerk back the file under its own (sanitised) name, beside the reason."""
        try:
            quarantine(path, self.config.failed_dir, reason, name=doc.name)
        except OSError as exc:
            # It stays in processed/ with its row marked failed; recover() retries at the next start.
            if is_disk_full(exc):
                self._disk_full(exc)
            else:
                self._alarm(f"cannot quarantine {doc.name}: {exc.strerror or exc}")
            return
        log.warning("quarantined %s: %s", doc.name, reason)

    async def _quarantine_new(self, path: Path, reason: str) -> None:
        try:
            quarantine(path, self.config.failed_dir, reason)
        except FileNotFoundError:
            return
        except OSError as exc:
            # Left in the watch folder (or in failed/ without its note): the rescan retries it.
            if is_disk_full(exc):
                self._disk_full(exc)
            else:
                self._alarm(f"cannot quarantine {display_name(path.name)}: {exc.strerror or exc}")
            return
        self.counters.failed += 1
        self.counters.last_error = f"{display_name(path.name)}: {reason}"
        log.warning("quarantined %s: %s", display_name(path.name), reason)

    def _alarm(self, text: str) -> None:
        if text not in self.counters.alarms:
            log.warning("alarm: %s", text)
            self.counters.alarms.add(text)
            self._status_changed.set()

    def _disk_full(self, exc: BaseException) -> None:
        self.counters.last_error = f"{DISK_FULL} ({exc})"
        self._alarm(DISK_FULL)

    def _clear_alarms_starting(self, prefix: str) -> None:
        for text in [a for a in self.counters.alarms if a.startswith(prefix)]:
            self._clear_alarm(text)

    def _clear_alarm(self, text: str) -> None:
        if text in self.counters.alarms:
            log.info("alarm cleared: %s", text)
            self.counters.alarms.discard(text)
            self._status_changed.set()

    async def _status_loop(self) -> None:
        """Keep ``HOME/status.json`` current (what `sohoa edge status` shows, even offline) and
        ask the uplink to publish the retained status when something noteworthy changed."""
        written: tuple[Status, float] | None = None
        while True:
            status = await self.status()
            unchanged = written is not None and dataclasses.replace(status, updated_at=None) == \
                written[0] and time.monotonic() - written[1] < 60
            if not unchanged:  # spare the SD card: write on change, and once a minute
                payload = encode(status)[1]
                try:
                    await asyncio.to_thread(_write_status, self.config.status_path, payload)
                except OSError as exc:
                    # Never stop the service over its status file; the next round tries again.
                    log.warning("cannot write %s: %s", self.config.status_path, exc)
                else:
                    written = (dataclasses.replace(status, updated_at=None), time.monotonic())
            if self._status_changed.is_set():
                self._status_changed.clear()
                self.uplink.request_status()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._status_changed.wait()

    async def status(self) -> Status:
        stats = await self.outbox.stats()
        limit_s = self.config.outbox.alarm_after_hours * 3600
        self._clear_alarms_starting("oldest document waiting")
        if stats.queued_docs and stats.oldest_age_s > limit_s:
            self.counters.alarms.add(f"oldest document waiting {stats.oldest_age_s / 3600:.0f} h "
                                     f"(alarm after {self.config.outbox.alarm_after_hours:g} h)")
        last = (dt.datetime.fromtimestamp(stats.last_receipt_at, dt.UTC).isoformat(timespec="seconds")
                if stats.last_receipt_at else None)
        return Status(
            device=self.config.device_id, online=True, queue_docs=stats.queued_docs,
            queue_bytes=stats.queued_bytes, oldest_age_s=round(stats.oldest_age_s, 1),
            failed_docs=stats.failed, last_receipt_at=last,
            disk_free_bytes=disk_free(self.config.home), version=VERSION,
            last_error=self.counters.last_error, alarms=tuple(sorted(self.counters.alarms)),
            updated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def _write_status(path: Path, payload: bytes) -> None:
    """Replace the status file atomically; on a full disk, overwrite it in place instead.

    A full disk is exactly when the operator must see the alarm, and an atomic replace needs a new
    block. Rewriting the existing file reuses its block (a status is far below one block); a power
    cut in that instant could tear it, and the next atomic write repairs it.
    """
    try:
        atomic_write_bytes(path, payload, 0o600)
    except OSError as exc:
        if not is_disk_full(exc) or not path.exists():
            raise
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            written = os.pwrite(fd, payload, 0)
            if written != len(payload):
                raise OSError(errno.ENOSPC, f"short write of {path}") from exc
            os.ftruncate(fd, len(payload))
            os.fsync(fd)
        finally:
            os.close(fd)


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


