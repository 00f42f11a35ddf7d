"""OCR stage: Vietnamese text and hOCR for every page of a scan.

tesseract runs with ``OMP_THREAD_LIMIT=1`` (its OpenMP threads made a 2-core box 5x slower, DESIGN
§2); parallelism comes from a process pool, one task per page, results joined in page order.
``-l vie`` comes first: ``eng+vie`` strips diacritics. Each page is rasterized (PDF pages with
PDFium at ``dpi``, lowered to fit the pixel cap; image frames with Pillow) to a PNG in a private
temp dir, and tesseract writes the text and the hOCR in a single run. A page whose file declares no
plausible resolution is handed to tesseract without one, so it estimates it from the text; the
resolution used, and whether it was estimated, is part of the result. Workers run under an
address-space limit that their tesseract child inherits.

Errors: a page we cannot decode is :class:`BadInputError` (quarantine the file); tesseract missing
or crashing is :class:`OcrEngineError` (an :class:`EdgeError`, retry later).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import multiprocessing
import os
import re
import resource
import subprocess
import tempfile
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import pypdfium2 as pdfium
from PIL import Image, ImageOps

from edge.errors import BadInputError, OcrEngineError
from edge.media import MAX_PAGE_PIXELS, MAX_PIXELS, MediaInfo, open_regular, plan_pdf_dpi

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
    dpi_estimated: bool = False


class OcrEngine(Protocol):
    async def recognize(self, path: Path, media: MediaInfo) -> OcrResult: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PageText:
    """What one tesseract run produced for one page (picklable across the process pool)."""

    index: int
    text: str
    hocr: str
    dpi: int = 0              # the resolution tesseract worked at (0: unknown)
    estimated: bool = False   # True when the file had none and tesseract estimated it


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

# An OCR worker and its tesseract child may map this much address space. A 40 Mpx page (the pixel
# cap) needs ~700 MiB in tesseract; the worker's own interpreter, PDFium and Pillow ~400 MiB of
# mappings. A runaway page then fails with MemoryError / std::bad_alloc in that worker instead of
# taking the whole box (and every scan in progress) down with the kernel's OOM killer.
DEFAULT_ADDRESS_SPACE = 2 * 2**30


def _worker_init(address_space: int | None = DEFAULT_ADDRESS_SPACE) -> None:
    # Inherited by every tesseract subprocess: one core each, the pool provides the parallelism.
    os.environ["OMP_THREAD_LIMIT"] = "1"
    if address_space:
        # RLIMIT_AS survives fork+exec, so the tesseract child is bounded by the same figure.
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))


# A resolution in a file header is believed only if it is plausible for a paper document: phone
# cameras write 72 dpi (a 4000 px photo would then be a 1.4 m page), screenshots 96.
MIN_PLAUSIBLE_DPI = 100
MAX_PLAUSIBLE_DPI = 1200
MAX_PLAUSIBLE_SIDE_INCHES = 47.0   # A0's long side


def plausible_dpi(declared: float | None, size_px: tuple[int, int]) -> int | None:
    """The file's resolution if it describes a real paper page, else None (estimate it instead)."""
    if not declared or not MIN_PLAUSIBLE_DPI <= declared <= MAX_PLAUSIBLE_DPI:
        return None
    if max(size_px) / declared > MAX_PLAUSIBLE_SIDE_INCHES:
        return None
    return round(declared)


@dataclass(frozen=True, slots=True)
class Raster:
    """One decoded page. ``dpi`` is None when the file carries no plausible resolution."""

    image: Image.Image
    dpi: int | None


def rasterize(path: Path, media_type: str, index: int, dpi: int,
              max_pixels: int = MAX_PAGE_PIXELS) -> Raster:
    """Page ``index`` of ``path``, within ``max_pixels``, and the resolution known for it."""
    try:
        return _rasterize(path, media_type, index, dpi, max_pixels)
    except BadInputError:
        raise
    except MemoryError:
        raise BadInputError(f"page {index + 1} needs more memory than an OCR worker may use") from None
    except Exception as exc:  # any decoder failure on a page means the page is unusable
        raise BadInputError(f"page {index + 1} cannot be decoded for OCR ({exc!r})") from None


def _rasterize(path: Path, media_type: str, index: int, dpi: int, max_pixels: int) -> Raster:
    # Re-checked here: the worker must not follow a symlink swapped in after probe().
    with open_regular(path, max_bytes=1 << 62) as (handle, _size):
        if media_type == "application/pdf":
            document = pdfium.PdfDocument(handle)
            try:
                page = document[index]
                try:
                    # The page's size decides the resolution before a single pixel is rendered.
                    width, height = page.get_size()
                    used = plan_pdf_dpi(width, height, wanted=dpi, index=index, max_pixels=max_pixels)
                    bitmap = page.render(scale=used / 72, grayscale=True)
                    image = bitmap.to_pil().convert("L")
                finally:
                    page.close()
            finally:
                document.close()
            return Raster(image, used)
        return _image_frame(handle, index, max_pixels)


def _image_frame(handle: BinaryIO, index: int, max_pixels: int) -> Raster:
    with Image.open(handle) as source:
        source.seek(index)
        width, height = source.size
        if width * height > MAX_PIXELS:
            raise BadInputError(f"page {index + 1} is {width}×{height} pixels, above the limit of "
                                f"{MAX_PIXELS} (a decompression bomb?)")
        source.load()
        native = source.info.get("dpi", (0, 0))[0]
        image = ImageOps.exif_transpose(source.convert("RGB") if source.mode in ("P", "CMYK")
                                        else source.copy())
    if image.mode not in ("L", "1", "RGB"):
        image = image.convert("RGB")
    try:
        declared: float | None = float(native)
    except (TypeError, ValueError):
        declared = None
    resolution = plausible_dpi(declared, image.size)
    pixels = image.width * image.height
    if pixels > max_pixels:
        # A legitimately large scan (A3 at 600 dpi): read it at the largest size the cap allows.
        scale = math.sqrt(max_pixels / pixels)
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                             Image.Resampling.LANCZOS)
        resolution = max(1, int(resolution * scale)) if resolution else None
    return Raster(image, resolution)


@dataclass(frozen=True, slots=True)
class PageJob:
    path: str
    media_type: str
    index: int
    dpi: int
    languages: str
    timeout: float
    tesseract_cmd: str = "tesseract"
    max_pixels: int = MAX_PAGE_PIXELS


_ESTIMATE_RE = re.compile(r"Estimating resolution as (\d+)")


def ocr_page(job: PageJob) -> PageText:
    """Rasterize one page and run tesseract once for both text and hOCR."""
    index, timeout = job.index, job.timeout
    raster = rasterize(Path(job.path), job.media_type, index, job.dpi, job.max_pixels)
    with tempfile.TemporaryDirectory(prefix="sohoa-ocr-") as tmp:
        png = Path(tmp) / "page.png"
        # Saved without a resolution when the file had none: tesseract then estimates it from the
        # text itself (DESIGN §9: never assume a DPI).
        raster.image.save(png, format="PNG", compress_level=1)
        base = str(Path(tmp) / "out")
        argv = [job.tesseract_cmd, str(png), base, "-l", job.languages, "--psm", "3"]
        if raster.dpi is not None:
            argv += ["--dpi", str(raster.dpi)]
        argv += ["txt", "hocr"]
        stderr = _run_tesseract(argv, index, timeout)
        text = Path(base + ".txt").read_text("utf-8", errors="replace")
        hocr = Path(base + ".hocr").read_text("utf-8", errors="replace")
    if raster.dpi is not None:
        return PageText(index, text, hocr, raster.dpi, estimated=False)
    estimate = _ESTIMATE_RE.search(stderr)
    return PageText(index, text, hocr, int(estimate.group(1)) if estimate else 0, estimated=True)


# How tesseract (C++) and leptonica (C) report an allocation refused under RLIMIT_AS.
_OUT_OF_MEMORY = ("bad_alloc", "malloc fail", "Cannot allocate memory", "Out of memory")


def _run_tesseract(argv: list[str], index: int, timeout: float) -> str:
    try:
        # argv holds the operator's tesseract command and our own temp paths, never scan data.
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)  # noqa: S603
    except FileNotFoundError:
        raise OcrEngineError("tesseract is not installed or not on PATH") from None
    except subprocess.TimeoutExpired:
        raise BadInputError(f"page {index + 1} took longer than {timeout:.0f} s to OCR") from None
    except OSError as exc:
        raise OcrEngineError(f"cannot run tesseract: {exc}") from None
    stderr = done.stderr.decode("utf-8", errors="replace")
    if done.returncode != 0:
        if any(sign in stderr for sign in _OUT_OF_MEMORY):
            # Deterministic for this page under the worker's address-space limit: not worth a retry.
            raise BadInputError(f"page {index + 1} needs more memory than an OCR worker may use")
        raise OcrEngineError(f"tesseract failed on page {index + 1} (exit {done.returncode}): "
                             f"{stderr.strip()[-300:]}")
    return stderr


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
    """The real engine: the tesseract CLI, one process per core, one task per page."""

    name = "tesseract"

    def __init__(self, languages: Sequence[str] = ("vie",), workers: int | None = None, dpi: int = 300,
                 page_timeout: float = 300.0, *, allow_non_vie_first: bool = False,
                 tesseract_cmd: str = "tesseract", max_page_pixels: int = MAX_PAGE_PIXELS,
                 address_space: int | None = DEFAULT_ADDRESS_SPACE) -> None:
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
        self.max_page_pixels = max_page_pixels
        self.address_space = address_space
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._version: str | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # forkserver: the service has watchdog and MQTT threads; forking them is unsafe.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("forkserver"),
                initializer=_worker_init, initargs=(self.address_space,))
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
                        self.page_timeout, self.tesseract_cmd, self.max_page_pixels)
                for index in range(media.pages)]
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
                         languages=self.languages, dpi=ordered[0].dpi if ordered else self.dpi,
                         mean_confidence=mean_confidence(hocr),
                         dpi_estimated=any(p.estimated for p in ordered))

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
