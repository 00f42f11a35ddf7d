"""Process stage: OCR → package → seal one held scan, and record ``packaged`` (or why not).

Retry policy, in one place:
  - the scan itself is refused (:class:`BadInputError` on unchanged content) → ``failed`` with its
    code, at once: a deterministic refusal is never retried;
  - the file changed since it was taken (a scanner still writing) → the row takes the new content
    and waits ``settle_seconds``; not a failure, no attempt counted; a file that stays incomplete
    and unchanged for ``incomplete_grace`` is refused;
  - a full disk → wait and retry, no attempt counted (three would quarantine a good scan);
  - anything else (tesseract crashed, an I/O error) → counted attempts with growing delays, then
    ``failed`` (code ``gave_up``) after ``MAX_ATTEMPTS``.
The stage never moves or deletes the original: it only records facts; custody acts on them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

from edge.alarms import DISK_FULL, Alarms, is_disk_full
from edge.complete import check_complete
from edge.config import EdgeConfig
from edge.errors import BadInputError, ContentChangedError, EdgeError, IncompleteFileError
from edge.fsutil import sha256_file
from edge.job import Layout
from edge.media import probe
from edge.ocr import OcrEngine
from edge.outbox import Doc, DocState, Outbox, OutboxError, Place
from edge.package import build_notice, build_package, seal_package
from edge.reasons import classify
from edge.transcode import JxlTranscoder

log = logging.getLogger("sohoa.edge.process")

# JPEG originals travel as lossless JPEG XL when Debian's libjxl-tools are installed (edge.transcode).
TRANSCODER = JxlTranscoder.find()

MAX_ATTEMPTS = 3
DISK_FULL_RETRY_S = 5.0


@dataclass(slots=True)
class ProcessCounters:
    pages: int = 0
    ciphertext_bytes: int = 0
    ocr_seconds: float = 0.0


class Processor:
    """A queue of held rows to package, worked by ``workers`` tasks (one OCR page job each at a time)."""

    def __init__(self, outbox: Outbox, engine: OcrEngine, config: EdgeConfig, *, layout: Layout,
                 signing_key: nacl.signing.SigningKey, alarms: Alarms,
                 on_packaged: Callable[[], None] | None = None,
                 on_refused: Callable[[], None] | None = None) -> None:
        self._outbox = outbox
        self._engine = engine
        self._config = config
        self._layout = layout
        self._key = signing_key
        self._alarms = alarms
        self._on_packaged = on_packaged
        self._on_refused = on_refused
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        # A tid is queued or worked on at most once at a time, however often it is submitted.
        self._queued: set[str] = set()
        self._busy: set[str] = set()
        self._incomplete_since: dict[str, tuple[str, float]] = {}
        self.counters = ProcessCounters()

    def submit(self, tid: str) -> None:
        if tid not in self._queued and tid not in self._busy:
            self._queued.add(tid)
            self._queue.put_nowait(tid)

    def _later(self, delay: float, tid: str) -> None:
        asyncio.get_running_loop().call_later(delay, self.submit, tid)

    async def worker(self) -> None:
        while True:
            tid = await self._queue.get()
            self._queued.discard(tid)
            self._busy.add(tid)
            try:
                doc = await self._outbox.get(tid)
                if doc is None or doc.state is not DocState.STABLE or doc.place is not Place.HELD:
                    continue   # not ours (yet, or any more): custody or the uplink has it
                await self._guarded(doc)
            finally:
                self._busy.discard(tid)

    async def _guarded(self, doc: Doc) -> None:
        try:
            await self._process(doc)
        except ContentChangedError as exc:
            await self._changed(doc, str(exc))
        except IncompleteFileError as exc:
            await self._incomplete(doc, exc)
        except BadInputError as exc:
            await self._refuse(doc, exc.reason, exc.code or classify(exc.reason))
        except FileNotFoundError:
            await self._refuse(doc, "the held original vanished before it was packaged", "vanished")
        except OutboxError as exc:
            log.info("%s changed under the processor: %s", doc.tid, exc)
        except (EdgeError, OSError, sqlite3.Error) as exc:
            if is_disk_full(exc):
                self._alarms.disk_full(exc)
                self._later(DISK_FULL_RETRY_S, doc.tid)
                return
            if isinstance(exc, sqlite3.Error):
                raise
            attempts = await self._outbox.bump_attempts(doc.tid, str(exc))
            self._alarms.error(f"{doc.name}: {exc}")
            if attempts >= MAX_ATTEMPTS:
                await self._refuse(doc, f"gave up after {attempts} attempts: {exc}", "gave_up")
            else:
                log.warning("processing %s failed (attempt %d): %s", doc.name, attempts, exc)
                self._later(10.0 * attempts, doc.tid)
        else:
            self._alarms.clear(DISK_FULL)
            self._incomplete_since.pop(doc.tid, None)

    async def _process(self, doc: Doc) -> None:
        cfg = self._config
        job = self._layout.job(doc.tid, doc.media_type)
        held = Path(doc.src_path)
        info = held.stat()
        if info.st_size != doc.size or abs(info.st_mtime - doc.captured_at) > 1e-3:
            raise ContentChangedError(f"{doc.name} changed since it was taken")
        # Cheap (the file's tail): a file a writer is still filling waits instead of being refused.
        await asyncio.to_thread(check_complete, held, doc.media_type)
        # probe decodes every frame: off the event loop, so a large TIFF does not stall the uplink.
        media = await asyncio.to_thread(probe, held, max_bytes=cfg.intake.max_file_bytes)
        started = time.monotonic()
        result = await self._engine.recognize(held, media)
        self.counters.ocr_seconds += time.monotonic() - started
        captured = dt.datetime.fromtimestamp(doc.captured_at, dt.UTC).isoformat(timespec="seconds")
        try:
            await asyncio.to_thread(
                build_package, held, job.package, media=media, ocr=result, tid=doc.tid,
                device_id=cfg.device_id, seq=doc.seq, original_name=doc.name, original_sha256=doc.sha256,
                captured_at=captured, transcoder=TRANSCODER)
            signed = await asyncio.to_thread(
                seal_package, job.package, job.envelope, device_id=cfg.device_id, tid=doc.tid, seq=doc.seq,
                signing_key=self._key, central_public_key=cfg.central.encryption_key,
                created_at=int(time.time()))
            # After build_package: the original's bytes were just hashed against doc.sha256, so the
            # notice never names content the envelope does not carry.
            notice = await asyncio.to_thread(
                build_notice, media=media, ocr=result, tid=doc.tid, device_id=cfg.device_id, seq=doc.seq,
                original_name=doc.name, original_sha256=doc.sha256, size=doc.size, captured_at=captured,
                signing_key=self._key, central_public_key=cfg.central.encryption_key,
                created_at=int(time.time()))
        finally:
            job.package.unlink(missing_ok=True)
        await self._outbox.mark_packaged(
            doc.tid, envelope_path=str(job.envelope), signed_header=signed.encode(),
            ciphertext_size=signed.header.ciphertext_size, segment_size=cfg.uplink.segment_size,
            pages=result.pages, notice=notice)
        self.counters.pages += result.pages
        self.counters.ciphertext_bytes += signed.header.ciphertext_size
        log.info("packaged %s: %d page(s), %d → %d bytes", doc.name, result.pages, doc.size,
                 signed.header.ciphertext_size)
        if self._on_packaged is not None:
            self._on_packaged()

    async def _changed(self, doc: Doc, why: str) -> None:
        """The held file is not what the row says: take its new content and look again later."""
        held = Path(doc.src_path)
        try:
            info = held.stat()
            sha = await asyncio.to_thread(sha256_file, held)
        except FileNotFoundError:
            await self._refuse(doc, "the held original vanished before it was packaged", "vanished")
            return
        try:
            await self._outbox.content_changed(doc.tid, sha256=sha, size=info.st_size,
                                               captured_at=info.st_mtime)
        except OutboxError:
            return
        log.info("%s (waiting for the writer to finish)", why)
        self._later(self._config.intake.quiet_seconds or 1.0, doc.tid)

    async def _incomplete(self, doc: Doc, exc: IncompleteFileError) -> None:
        first = self._incomplete_since.get(doc.tid)
        now = time.monotonic()
        if first is None or first[0] != doc.sha256:
            self._incomplete_since[doc.tid] = (doc.sha256, now)
        elif now - first[1] >= self._config.intake.incomplete_grace_seconds:
            self._incomplete_since.pop(doc.tid, None)
            await self._refuse(doc, f"{exc.reason}, unchanged for "
                                    f"{self._config.intake.incomplete_grace_seconds:.0f} s", "incomplete")
            return
        self._later(max(1.0, self._config.intake.quiet_seconds), doc.tid)

    async def _refuse(self, doc: Doc, reason: str, code: str) -> None:
        try:
            await self._outbox.mark_failed(doc.tid, reason, code)
        except OutboxError as exc:
            log.warning("not refusing %s: %s", doc.tid, exc)
            return
        except (OSError, sqlite3.Error) as exc:
            if not is_disk_full(exc):
                raise
            self._alarms.disk_full(exc)
            self._later(DISK_FULL_RETRY_S, doc.tid)
            return
        self._alarms.error(f"{doc.name}: {reason}")
        if self._on_refused is not None:
            self._on_refused()

