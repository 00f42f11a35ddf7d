"""OCR stage: Vietnamese text and hOCR for every page of a scan.

tesseract runs with ``OMP_THREAD_LIMIT=1`` (its OpenMP threads made a 2-core box 5x slower, DESIGN
§2); parallelism comes from a process pool, one task per page, results joined in page order.
``-l vie`` comes first: ``eng+vie`` strips diacritics. Each page is rasterized (PDF pages with
PDFium at ``dpi``, TIFF frames with Pillow) to a PNG in a private temp dir, and tesseract writes
the text and the hOCR in a single run.

Errors: a page we cannot decode is :class:`BadInputError` (quarantine the file); tesseract missing
or crashing is :class:`OcrEngineError` (an :class:`EdgeError`, retry later).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import pypdfium2 as pdfium
import pytesseract
from PIL import Image, ImageOps

from edge.errors import BadInputError, OcrEngineError
from edge.media import MediaInfo, open_regular

PAGE_SEPARATOR = "\f"


@dataclass(frozen=True, slots=True)
class OcrResult:
    text: str
    hocr: str
    pages: int
    seconds: float
    engine: str
    languages: tuple[str, ...]
    dpi: int
    mean_confidence: float | None


class OcrEngine(Protocol):
    async def recognize(self, path: Path, media: MediaInfo) -> OcrResult: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PageText:
    """What one tesseract run produced for one page (picklable across the process pool)."""

    index: int
    text: str
    hocr: str


# ---- pure helpers over tesseract output -------------------------------------------------------

_BODY_RE = re.compile(r"<body[^>]*>(.*)</body>", re.DOTALL)
_HEAD_RE = re.compile(r"^(.*?<body[^>]*>)", re.DOTALL)
_ID_RE = re.compile(r"id='([a-z]+)_1((?:_\d+)*)'")
_IMAGE_RE = re.compile(r'image "[^"]*"')
_PAGENO_RE = re.compile(r"ppageno \d+")
_WCONF_RE = re.compile(r"x_wconf (\d+)")
_EMPTY_HOCR_HEAD = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE html PUBLIC \"-//W3C//DTD "
                    "XHTML 1.0 Transitional//EN\" \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-"
                    "transitional.dtd\">\n<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" "
                    "lang=\"en\">\n <head>\n  <title></title>\n  <meta http-equiv=\"Content-Type\" "
                    "content=\"text/html;charset=utf-8\"/>\n  <meta name='ocr-system' content="
                    "'sohoa'/>\n  <meta name='ocr-capabilities' content='ocr_page ocr_carea ocr_par "
                    "ocr_line ocrx_word'/>\n </head>\n <body>\n")


def merge_hocr(pages: Sequence[str]) -> str:
    """One hOCR document from per-page documents: ids and page numbers renumbered, no temp paths."""
    if not pages:
        return _EMPTY_HOCR_HEAD + " </body>\n</html>\n"
    head_match = _HEAD_RE.match(pages[0])
    head = head_match.group(1) + "\n" if head_match else _EMPTY_HOCR_HEAD
    bodies = []
    for number, page in enumerate(pages, start=1):
        body_match = _BODY_RE.search(page)
        body = body_match.group(1).strip("\n") if body_match else ""
        body = _ID_RE.sub(lambda m, n=number: f"id='{m.group(1)}_{n}{m.group(2)}'", body)
        body = _IMAGE_RE.sub(f'image "page-{number}"', body)
        body = _PAGENO_RE.sub(f"ppageno {number - 1}", body)
        bodies.append(body)
    return head + "\n".join(bodies) + "\n </body>\n</html>\n"


def mean_confidence(hocr: str) -> float | None:
    """Mean word confidence (0–100) from hOCR ``x_wconf``, or None when no words were found."""
    values = [int(v) for v in _WCONF_RE.findall(hocr)]
    return round(sum(values) / len(values), 2) if values else None


def join_pages(texts: Sequence[str]) -> str:
    """Page texts in order, NFC, separated by a form feed (tesseract's own page break)."""
    cleaned = [unicodedata.normalize("NFC", t).rstrip("\f").rstrip() + "\n" for t in texts]
    return PAGE_SEPARATOR.join(cleaned)


# ---- worker side (runs in the process pool) ---------------------------------------------------

def _worker_init() -> None:
    # Inherited by every tesseract subprocess: one core each, the pool provides the parallelism.
    os.environ["OMP_THREAD_LIMIT"] = "1"


def rasterize(path: Path, media_type: str, index: int, dpi: int) -> tuple[Image.Image, int]:
    """Page ``index`` of ``path`` as a grayscale image plus the resolution to tell tesseract."""
    try:
        return _rasterize(path, media_type, index, dpi)
    except BadInputError:
        raise
    except Exception as exc:  # any decoder failure on a page means the page is unusable
        raise BadInputError(f"page {index + 1} cannot be decoded for OCR ({exc!r})") from None


def _rasterize(path: Path, media_type: str, index: int, dpi: int) -> tuple[Image.Image, int]:
    # Re-checked here: the worker must not follow a symlink swapped in after probe().
    with open_regular(path, max_bytes=1 << 62) as (handle, _size):
        if media_type == "application/pdf":
            document = pdfium.PdfDocument(handle)
            try:
                page = document[index]
                bitmap = page.render(scale=dpi / 72, grayscale=True)
                image = bitmap.to_pil().convert("L")
                page.close()
            finally:
                document.close()
            return image, dpi
        return _image_frame(handle, index, dpi)


def _image_frame(handle: BinaryIO, index: int, dpi: int) -> tuple[Image.Image, int]:
    with Image.open(handle) as source:
        source.seek(index)
        source.load()
        native = source.info.get("dpi", (0, 0))[0]
        image = ImageOps.exif_transpose(source.convert("RGB") if source.mode in ("P", "CMYK")
                                        else source.copy())
    if image.mode not in ("L", "1", "RGB"):
        image = image.convert("RGB")
    resolution = round(float(native)) if native and 70 <= float(native) <= 1200 else dpi
    return image, resolution


@dataclass(frozen=True, slots=True)
class PageJob:
    path: str
    media_type: str
    index: int
    dpi: int
    languages: str
    timeout: float
    tesseract_cmd: str = "tesseract"


def ocr_page(job: PageJob) -> PageText:
    """Rasterize one page and run tesseract once for both text and hOCR."""
    index, timeout = job.index, job.timeout
    # This worker process runs only OCR pages, so setting pytesseract's module-level command is safe.
    pytesseract.pytesseract.tesseract_cmd = job.tesseract_cmd
    image, resolution = rasterize(Path(job.path), job.media_type, index, job.dpi)
    with tempfile.TemporaryDirectory(prefix="sohoa-ocr-") as tmp:
        png = Path(tmp) / "page.png"
        image.save(png, format="PNG", compress_level=1)
        base = str(Path(tmp) / "out")
        try:
            pytesseract.pytesseract.run_tesseract(
                str(png), base, extension="txt hocr", lang=job.languages,
                config=f"--dpi {resolution} --psm 3", timeout=timeout)
        except pytesseract.TesseractNotFoundError:
            raise OcrEngineError("tesseract is not installed or not on PATH") from None
        except pytesseract.TesseractError as exc:
            raise OcrEngineError(f"tesseract failed on page {index + 1}: {exc}") from None
        except RuntimeError as exc:  # pytesseract's timeout
            raise BadInputError(f"page {index + 1} took longer than {timeout:.0f} s to OCR") from exc
        text = Path(base + ".txt").read_text("utf-8", errors="replace")
        hocr = Path(base + ".hocr").read_text("utf-8", errors="replace")
    return PageText(index, text, hocr)


# ---- engines ----------------------------------------------------------------------------------

def _run_tesseract_info(tesseract_cmd: str, flag: str) -> str:
    try:
        # The command comes from the operator's config, never from a scan.
        return subprocess.run([tesseract_cmd, flag], capture_output=True, text=True, timeout=30,  # noqa: S603
                              check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise OcrEngineError(f"cannot run {tesseract_cmd} {flag}: {exc}") from None


def installed_languages(tesseract_cmd: str = "tesseract") -> tuple[str, ...]:
    output = _run_tesseract_info(tesseract_cmd, "--list-langs")
    return tuple(line.strip() for line in output.splitlines()[1:] if line.strip())


def tesseract_version(tesseract_cmd: str = "tesseract") -> str:
    """``tesseract 5.3.0`` (recorded in every package's metadata)."""
    first = _run_tesseract_info(tesseract_cmd, "--version").splitlines()
    return first[0].strip() if first else "tesseract"


class TesseractEngine:
    """The real engine: tesseract via pytesseract, one process per core, one task per page."""

    name = "tesseract"

    def __init__(self, languages: Sequence[str] = ("vie",), workers: int | None = None, dpi: int = 300,
                 page_timeout: float = 300.0, *, allow_non_vie_first: bool = False,
                 tesseract_cmd: str = "tesseract") -> None:
        languages = tuple(languages)
        if not languages:
            raise ValueError("languages must not be empty; use ('vie',)")
        if languages[0] != "vie" and not allow_non_vie_first:
            raise ValueError(f"languages {languages!r}: 'vie' must come first (eng+vie strips "
                             "Vietnamese diacritics)")
        if not all(re.fullmatch(r"[A-Za-z_]+", lang) for lang in languages):
            raise ValueError(f"invalid tesseract language codes {languages!r}")
        if not 50 <= dpi <= 1200:
            raise ValueError(f"dpi {dpi} out of range 50..1200")
        self.languages = languages
        self.workers = workers or os.cpu_count() or 1
        self.dpi = dpi
        self.page_timeout = page_timeout
        self.tesseract_cmd = tesseract_cmd
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._version: str | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # forkserver: the service has watchdog and MQTT threads; forking them is unsafe.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("forkserver"),
                initializer=_worker_init)
        return self._pool

    def check(self) -> None:
        """Fail early (at start-up) if tesseract or a language is missing."""
        missing = set(self.languages) - set(installed_languages(self.tesseract_cmd))
        if missing:
            raise OcrEngineError(f"tesseract language data missing: {sorted(missing)}",
                                 hint="apt-get install tesseract-ocr-vie")

    async def recognize(self, path: Path, media: MediaInfo) -> OcrResult:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        pool = self._executor()
        jobs = [PageJob(str(path), media.media_type, index, self.dpi, "+".join(self.languages),
                        self.page_timeout, self.tesseract_cmd) for index in range(media.pages)]
        futures = [loop.run_in_executor(pool, ocr_page, job) for job in jobs]
        try:
            pages = await asyncio.wait_for(asyncio.gather(*futures),
                                           timeout=self.page_timeout * media.pages + 60)
        except concurrent.futures.process.BrokenProcessPool as exc:
            self._pool = None
            raise OcrEngineError(f"an OCR worker process died: {exc}") from None
        except TimeoutError:
            raise OcrEngineError("OCR did not finish in time") from None
        finally:
            for future in futures:
                future.cancel()
        ordered = sorted(pages, key=lambda p: p.index)
        hocr = merge_hocr([p.hocr for p in ordered])
        return OcrResult(text=join_pages([p.text for p in ordered]), hocr=hocr, pages=media.pages,
                         seconds=round(time.monotonic() - started, 3), engine=await self.version(),
                         languages=self.languages, dpi=self.dpi, mean_confidence=mean_confidence(hocr))

    async def version(self) -> str:
        if self._version is None:
            self._version = await asyncio.to_thread(tesseract_version, self.tesseract_cmd)
        return self._version

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


class FakeOcrEngine:
    """Deterministic, instant OCR for unit tests (chosen through the interface, not by patching)."""

    name = "fake"

    def __init__(self, text: str = "Ủy ban nhân dân xã Tân Trào", *, delay: float = 0.0,
                 error: Exception | None = None) -> None:
        self.text = unicodedata.normalize("NFC", text)
        self.delay = delay
        self.error = error
        self.calls: list[Path] = []

    async def recognize(self, path: Path, media: MediaInfo) -> OcrResult:
        self.calls.append(path)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        texts = [f"{self.text}\nTrang {n}/{media.pages}\n" for n in range(1, media.pages + 1)]
        pages = [f"{_EMPTY_HOCR_HEAD}  <div class='ocr_page' id='page_1' title='bbox 0 0 100 100'>"
                 f"<span class='ocrx_word' id='word_1_1' title='bbox 0 0 10 10; x_wconf 99'>"
                 f"{n}</span></div>\n </body>\n</html>\n" for n in range(1, media.pages + 1)]
        return OcrResult(text=join_pages(texts), hocr=merge_hocr(pages), pages=media.pages,
                         seconds=self.delay, engine="fake", languages=("vie",), dpi=300,
                         mean_confidence=99.0)

    async def aclose(self) -> None:
        return None
