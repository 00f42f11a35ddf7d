"""The OCR runner: the stage the service calls, in OCRmyPDF's shape (``_pipelines/ocr.py``).

    for each page, in a warm process pool (one worker per core):
        rasterise (only that page, within the pixel cap) → filters → engine
        → if the reading is doubtful: orientation (tesseract OSD) → filters → engine, keep the better
    merge the pages in order (text, hOCR) → correct diacritics (optional) → extract the metadata

The runner owns rasterising, the pool, concurrency and merging; the per-page engine sees one page
image; filters are an ordered list of small values; the extractor reads the merged hOCR. Workers
run under an address-space limit (RLIMIT_AS, inherited by tesseract) so one runaway page fails
alone instead of taking the box into the OOM killer.

Orientation is asked only when a first reading is doubtful (mean word confidence below
``DOUBT_BELOW``, almost no words, or text lines running down the page): OSD costs as much as
reading the page (measured on this box), and an upright page reads with high confidence.
``orientation="always"`` runs OSD first on every page (OCRmyPDF's ``--rotate-pages``). The bench
measures both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import resource
import select
import shutil
import signal
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge.errors import OcrEngineError
from edge.media import MAX_PAGE_PIXELS, MediaInfo
from edge.ocr.engines import TesseractPageEngine, check_languages, installed_languages, tesseract_version
from edge.ocr.filters import DeskewFilter, OrientationFilter
from edge.ocr.hocr import join_pages, mean_confidence, merge_hocr, vertical_share
from edge.ocr.model import OcrResult, PageEngine, PageFilter, PageImage, PageResult, PageText
from edge.ocr.rasterize import rasterize
from protocol.bag import DocumentField, OcrPage

# A 40 Mpx page (the pixel cap) peaked at ~350 MiB RSS for worker + tesseract; the interpreter,
# PDFium and Pillow map ~400 MiB more. 2 GiB leaves headroom for text-dense pages and still keeps
# two workers inside a 4 GB box.
DEFAULT_ADDRESS_SPACE = 2 * 2**30
# A first reading below this mean word confidence (0-100), or with fewer words, asks OSD whether
# the page is turned. Measured by bench/ocr_quality.py (upright pages read at 85-96).
DOUBT_BELOW = 70.0
DOUBT_WORDS = 8
SIDEWAYS_MARGIN = 15.0

Orientation = Literal["off", "doubt", "always"]
Extractor = Callable[[str], dict[str, DocumentField]]
Corrector = Callable[[str], str]


def worker_init(address_space: int | None = DEFAULT_ADDRESS_SPACE, scratch: str | None = None,
                service: int | None = None) -> None:
    """Pool initializer: one OpenMP thread per tesseract (DESIGN §2), a bounded address space, the
    pool's own scratch folder, and a process group of its own (so a stop can end the worker and
    the tesseract it is running in one signal, and a terminal's Ctrl-C reaches only the service)."""
    os.environ["OMP_THREAD_LIMIT"] = "1"
    os.setpgid(0, 0)
    if service is not None:
        _die_with(service)
    if scratch is not None:
        tempfile.tempdir = scratch   # page images go where the runner removes them, even after a kill
    if address_space:
        # RLIMIT_AS survives fork+exec, so each tesseract child is bounded by the same figure.
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))


def _die_with(service: int) -> None:
    """A worker ends when the service does, however the service ends (SIGKILL, the OOM killer), and
    takes the page being read with it: a thread waits on a pidfd of the service and then kills this
    worker's process group (the worker and its tesseract). A group of its own keeps a terminal's
    Ctrl-C and the stop signal away from the worker, and the forkserver does not end while a worker
    lives (each holds its "alive" pipe), so without this a killed service left its workers running
    for ever (each ~40 MB, holding the log open)."""
    try:
        pidfd = os.pidfd_open(service)
    except ProcessLookupError:
        os.killpg(0, signal.SIGKILL)   # gone already
        return
    except OSError:   # a kernel before 5.3: no watcher, but OCR still works (the stop kills us)
        return

    def wait_then_end() -> None:
        select.select([pidfd], [], [])   # readable once the service has exited
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=wait_then_end, name="die-with-service", daemon=True).start()


def _forget_dead_pools() -> None:
    """Scratch folders of pools whose service was killed (``sohoa-ocr-pool-<pid>-…`` of a pid that
    is gone): page images of scans are not left in TMPDIR by a crash."""
    for folder in Path(tempfile.gettempdir()).glob("sohoa-ocr-pool-*-*"):
        pid = folder.name.removeprefix("sohoa-ocr-pool-").split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        with contextlib.suppress(OSError):
            if folder.stat().st_uid == os.getuid():
                shutil.rmtree(folder, ignore_errors=True)


def _warm() -> int:
    return os.getpid()


@dataclass(frozen=True, slots=True)
class PageJob:
    path: str
    media_type: str
    index: int
    dpi: int
    max_pixels: int
    timeout: float
    engine: PageEngine
    filters: tuple[PageFilter, ...]
    orientation: OrientationFilter | None
    orientation_mode: Orientation


def process_page(job: PageJob) -> PageResult:
    """Everything one page goes through, in the worker: rasterise → filters → engine."""
    raster = rasterize(Path(job.path), job.media_type, job.index, job.dpi, job.max_pixels)
    if job.orientation is not None and job.orientation_mode == "always":
        raster = job.orientation(raster, job.engine, job.timeout)
    prepared = _prepare(raster, job)
    reading = job.engine.recognize_page(prepared, job.timeout)
    doubt = _doubt(reading) if job.orientation is not None and job.orientation_mode == "doubt" else None
    if job.orientation is not None and doubt is not None:
        turned = job.orientation(raster, job.engine, job.timeout)
        if turned.rotation != raster.rotation:
            again = _prepare(turned, job)
            second = job.engine.recognize_page(again, job.timeout)
            # A sideways page often reads well but with its layout lost: there the turned reading
            # wins unless it is clearly worse; otherwise it must be better.
            margin = SIDEWAYS_MARGIN if doubt == "sideways" else 0.0
            if (second.mean_confidence or 0) + margin > (reading.mean_confidence or 0):
                prepared, reading = again, second
        else:
            prepared = prepared.replace(orientation_confidence=turned.orientation_confidence)
    info = OcrPage(dpi=reading.dpi, dpi_estimated=reading.estimated, rotation=prepared.rotation,
                   skew=prepared.skew, orientation_confidence=prepared.orientation_confidence,
                   width=prepared.image.width, height=prepared.image.height)
    return PageResult(reading, info)


def _prepare(page: PageImage, job: PageJob) -> PageImage:
    for page_filter in job.filters:
        page = page_filter(page, job.engine, job.timeout)
    return page


def _doubt(reading: PageText) -> str | None:
    """Why a first reading might come from a turned page, or None if it looks upright."""
    if vertical_share(reading.hocr) > 0.5:
        return "sideways"
    if (reading.mean_confidence or 0.0) < DOUBT_BELOW or len(reading.text.split()) < DOUBT_WORDS:
        return "low confidence"
    return None


class OcrRunner:
    """The document-level engine the service uses: ``await recognize(path, media)``, ``aclose()``."""

    def __init__(self, page_engine: PageEngine, *, workers: int | None = None, dpi: int = 300,
                 page_timeout: float = 300.0, filters: Sequence[PageFilter] = (DeskewFilter(),),
                 orientation: Orientation = "doubt",
                 orientation_filter: OrientationFilter | None = None,
                 extractor: Extractor | None = None, corrector: Corrector | None = None,
                 max_page_pixels: int = MAX_PAGE_PIXELS,
                 address_space: int | None = DEFAULT_ADDRESS_SPACE, version: str | None = None,
                 languages: tuple[str, ...] = ("vie",)) -> None:
        if not 50 <= dpi <= 1200:
            raise ValueError(f"dpi {dpi} out of range 50..1200")
        self.page_engine = page_engine
        self.workers = workers or os.cpu_count() or 1
        self.dpi = dpi
        self.page_timeout = page_timeout
        self.filters = tuple(filters)
        self.orientation: Orientation = orientation
        self.orientation_filter = orientation_filter or OrientationFilter()
        self.extractor = extractor
        self.corrector = corrector
        self.max_page_pixels = max_page_pixels
        self.address_space = address_space
        self.languages = languages
        self._version = version
        self._workers: _Workers | None = None

    def _current(self) -> _Workers:
        if self._workers is None:
            self._workers = _Workers.start(self.workers, self.address_space)
        return self._workers

    def warm(self) -> None:
        """Start every worker now (not on the first scan): imports and the forkserver cost ~1 s."""
        pool = self._current().executor
        for _ in range(self.workers):
            pool.submit(_warm)

    async def recognize(self, path: Path, media: MediaInfo) -> OcrResult:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        workers = self._current()
        pool = workers.executor
        orientation = self.orientation_filter if self.orientation != "off" else None
        jobs = [PageJob(str(path), media.media_type, index, self.dpi, self.max_page_pixels,
                        self.page_timeout, self.page_engine, self.filters, orientation,
                        self.orientation) for index in range(media.pages)]
        futures = [loop.run_in_executor(pool, process_page, job) for job in jobs]
        gathered = asyncio.gather(*futures)
        # Cancelled mid-document (SIGTERM): the pages' futures are cancelled below, which completes the
        # gather with a CancelledError nobody awaits any more; read it so asyncio does not log it.
        gathered.add_done_callback(_retrieve)
        try:
            # Orientation may read a page twice plus OSD: three engine runs at most.
            pages = await asyncio.wait_for(gathered,
                                           timeout=3 * self.page_timeout * media.pages + 60)
        except concurrent.futures.process.BrokenProcessPool as exc:
            # Only the pool that broke: another document may already run on a fresh one.
            if self._workers is workers:
                self._workers = None
            await workers.stop()
            raise OcrEngineError(f"an OCR worker process died: {exc}") from None
        except TimeoutError:
            raise OcrEngineError("OCR did not finish in time") from None
        finally:
            for future in futures:
                future.cancel()
        ordered = sorted(pages, key=lambda p: p.text.index)
        hocr = merge_hocr([p.text.hocr for p in ordered])
        raw = join_pages([p.text.text for p in ordered])
        text, raw_kept = raw, None
        if self.corrector is not None:
            text = unicodedata.normalize("NFC", await asyncio.to_thread(self.corrector, raw))
            raw_kept = raw if text != raw else None
        fields = await asyncio.to_thread(self.extractor, hocr) if self.extractor else {}
        info = tuple(p.info for p in ordered)
        return OcrResult(text=text, hocr=hocr, pages=media.pages,
                         seconds=round(time.monotonic() - started, 3), engine=await self.version(),
                         languages=self.languages, dpi=info[0].dpi if info else self.dpi,
                         mean_confidence=mean_confidence(hocr),
                         dpi_estimated=any(p.dpi_estimated for p in info), page_info=info,
                         raw_text=raw_kept, fields=fields)

    async def version(self) -> str:
        if self._version is None:
            self._version = self.page_engine.name
        return self._version

    async def aclose(self) -> None:
        """Stop now, pages being read included. A page can take minutes, and a stop (SIGTERM,
        Ctrl-C, an upgrade) must not wait for it: its document is still taken-but-unpackaged in
        the outbox, and the service's recovery reads it again at the next start."""
        workers, self._workers = self._workers, None
        if workers is not None:
            await workers.stop()


class TesseractEngine(OcrRunner):
    """The runner with tesseract as its page engine (the service's default)."""

    name = "tesseract"

    def __init__(self, languages: Sequence[str] = ("vie",), workers: int | None = None, dpi: int = 300,
                 page_timeout: float = 300.0, *, allow_non_vie_first: bool = False,
                 tesseract_cmd: str = "tesseract", max_page_pixels: int = MAX_PAGE_PIXELS,
                 address_space: int | None = DEFAULT_ADDRESS_SPACE,
                 filters: Sequence[PageFilter] = (DeskewFilter(),), orientation: Orientation = "doubt",
                 orientation_filter: OrientationFilter | None = None,
                 extractor: Extractor | None = None, corrector: Corrector | None = None) -> None:
        checked = check_languages(languages, allow_non_vie_first=allow_non_vie_first)
        super().__init__(TesseractPageEngine(checked, tesseract_cmd), workers=workers, dpi=dpi,
                         page_timeout=page_timeout, filters=filters, orientation=orientation,
                         orientation_filter=orientation_filter, extractor=extractor,
                         corrector=corrector, max_page_pixels=max_page_pixels,
                         address_space=address_space, languages=checked)
        self.tesseract_cmd = tesseract_cmd

    def check(self) -> None:
        """Fail early (at start-up) if tesseract or a language is missing."""
        missing = {*self.languages, "osd"} - set(installed_languages(self.tesseract_cmd))
        if missing:
            raise OcrEngineError(f"tesseract language data missing: {sorted(missing)}",
                                 hint="apt-get install tesseract-ocr-vie tesseract-ocr-osd")

    async def version(self) -> str:
        if self._version is None:
            self._version = await asyncio.to_thread(tesseract_version, self.tesseract_cmd)
        return self._version


@dataclass
class _Workers:
    """One process pool and its scratch folder, stopped together, once."""

    executor: concurrent.futures.ProcessPoolExecutor
    scratch: str
    _stopping: asyncio.Future[None] | None = field(default=None, init=False)

    @classmethod
    def start(cls, count: int, address_space: int | None) -> _Workers:
        # Page images (scan content) live here while a page is read: 0700, and removed whole when
        # the pool stops, including what a killed worker could not clean up.
        _forget_dead_pools()
        scratch = tempfile.mkdtemp(prefix=f"sohoa-ocr-pool-{os.getpid()}-")
        # forkserver: the service has watchdog and MQTT threads; forking them is unsafe.
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=count, mp_context=multiprocessing.get_context("forkserver"),
            initializer=worker_init, initargs=(address_space, scratch, os.getpid()))
        return cls(executor, scratch)

    async def stop(self) -> None:
        """Kill, shut down, clean up; every caller (the documents that saw it break, the service's
        stop) waits for the one stop, which a cancelled caller does not interrupt."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self._kill()
        await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(shutil.rmtree, self.scratch, ignore_errors=True)

    def _kill(self) -> None:
        """SIGKILL each worker's process group: the worker and the tesseract it runs.

        The pids come from the executor's ``_processes``, the dict Python 3.14's own
        ``ProcessPoolExecutor.kill_workers()`` reads (that method does not reach a worker's
        children). loky's ``shutdown(kill_workers=True)`` does the same, but is a large dependency
        for one loop.
        """
        processes: dict[int, Any] = getattr(self.executor, "_processes", None) or {}
        for pid in list(processes):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:   # not (yet) a group leader: a worker still starting
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
