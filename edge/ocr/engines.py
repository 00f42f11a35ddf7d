"""Per-page OCR engines: tesseract (the CLI, one process per page) and a fake for unit tests.

Both obey one contract (tests/edge/test_ocr_contract.py): NFC text, one hOCR ``ocr_page`` whose
boxes are in the page image's pixels, the resolution worked at, and None confidence on a blank page.
tesseract runs with ``OMP_THREAD_LIMIT=1`` (set by the pool's initializer; DESIGN §2) and ``-l vie``
first (``eng+vie`` strips diacritics). A page without a plausible resolution is given none, so
tesseract estimates it; the estimate is read from its stderr (pytesseract discards stderr).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.errors import BadInputError, OcrEngineError
from edge.ocr.hocr import EMPTY_HOCR_HEAD, mean_confidence
from edge.ocr.model import PageImage, PageText

_ESTIMATE_RE = re.compile(r"Estimating resolution as (\d+)")
_ROTATE_RE = re.compile(r"Rotate: (\d+)")
_ORIENT_CONF_RE = re.compile(r"Orientation confidence: ([\d.]+)")
# How tesseract (C++) and leptonica (C) report an allocation refused under RLIMIT_AS.
_OUT_OF_MEMORY = ("bad_alloc", "malloc fail", "Cannot allocate memory", "Out of memory")


def run_tesseract(argv: list[str], index: int, timeout: float) -> str:
    """Run tesseract; return its stderr. Errors are classified for the service's retry policy."""
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


def parse_osd(stdout: str) -> tuple[int, float] | None:
    """(clockwise degrees to turn upright, confidence) from ``tesseract --psm 0`` output."""
    rotate, confidence = _ROTATE_RE.search(stdout), _ORIENT_CONF_RE.search(stdout)
    if not rotate or not confidence or int(rotate.group(1)) not in (0, 90, 180, 270):
        return None
    return int(rotate.group(1)), float(confidence.group(1))


@dataclass(frozen=True, slots=True)
class TesseractPageEngine:
    languages: tuple[str, ...] = ("vie",)
    tesseract_cmd: str = "tesseract"
    psm: int = 3
    name: str = "tesseract"

    def __post_init__(self) -> None:
        check_languages(self.languages, allow_non_vie_first=True)

    def recognize_page(self, page: PageImage, timeout: float) -> PageText:
        with tempfile.TemporaryDirectory(prefix="sohoa-ocr-") as tmp:
            png = _save_for_tesseract(page, Path(tmp))
            base = str(Path(tmp) / "out")
            argv = [self.tesseract_cmd, str(png), base, "-l", "+".join(self.languages), "--psm",
                    str(self.psm)]
            if page.dpi is not None:
                argv += ["--dpi", str(page.dpi)]
            stderr = run_tesseract([*argv, "txt", "hocr"], page.index, timeout)
            text = unicodedata.normalize("NFC", Path(base + ".txt").read_text("utf-8", errors="replace"))
            hocr = unicodedata.normalize("NFC", Path(base + ".hocr").read_text("utf-8", errors="replace"))
        if page.dpi is not None:
            dpi, estimated = page.dpi, False
        else:
            estimate = _ESTIMATE_RE.search(stderr)
            dpi, estimated = (int(estimate.group(1)) if estimate else 0), True
        return PageText(page.index, text, hocr, dpi, estimated, mean_confidence(hocr))

    def orientation(self, page: PageImage, timeout: float) -> tuple[int, float] | None:
        with tempfile.TemporaryDirectory(prefix="sohoa-osd-") as tmp:
            png = _save_for_tesseract(page, Path(tmp))
            argv = [self.tesseract_cmd, str(png), "-", "--psm", "0", "-l", "osd"]
            if page.dpi is not None:
                argv += ["--dpi", str(page.dpi)]
            try:
                done = subprocess.run(argv, capture_output=True, timeout=timeout,  # noqa: S603
                                      check=False, text=True)
            except (OSError, subprocess.SubprocessError):
                return None
        # Too few characters to decide makes tesseract exit non-zero: that is "unknown", not an error.
        return parse_osd(done.stdout) if done.returncode == 0 else None


@dataclass(frozen=True, slots=True)
class FakePageEngine:
    """Instant and deterministic: reads nothing, reports ``text`` on any page that is not blank.

    Rotation is judged by where the ink is (this fake's notion of "up"): pages whose ink lies in
    the bottom half are said to be upside down, with ``osd_confidence``."""

    text: str = "Ủy ban nhân dân xã Tân Trào"
    osd_confidence: float = 20.0
    name: str = "fake"

    def recognize_page(self, page: PageImage, timeout: float) -> PageText:
        del timeout
        bbox = page.image.convert("L").point(lambda v: 255 if v < 128 else 0).getbbox()
        width, height = page.image.size
        if bbox is None:
            body = f"  <div class='ocr_page' id='page_1' title='bbox 0 0 {width} {height}'></div>\n"
            return PageText(page.index, "", _hocr(body), page.dpi or 0, page.dpi is None, None)
        text = unicodedata.normalize("NFC", self.text)
        words = "".join(
            f"<span class='ocrx_word' id='word_1_{n}' title='bbox {bbox[0]} {bbox[1]} {bbox[2]} "
            f"{bbox[3]}; x_wconf 99'>{word}</span> " for n, word in enumerate(text.split(), start=1))
        body = (f"  <div class='ocr_page' id='page_1' title='bbox 0 0 {width} {height}'>"
                f"<span class='ocr_line' id='line_1_1' title='bbox {bbox[0]} {bbox[1]} {bbox[2]} "
                f"{bbox[3]}'>{words.strip()}</span></div>\n")
        return PageText(page.index, text + "\n", _hocr(body), page.dpi or 300, page.dpi is None, 99.0)

    def orientation(self, page: PageImage, timeout: float) -> tuple[int, float] | None:
        del timeout
        bbox = page.image.convert("L").point(lambda v: 255 if v < 128 else 0).getbbox()
        if bbox is None:
            return None
        upside_down = (bbox[1] + bbox[3]) / 2 > page.image.height / 2
        return (180 if upside_down else 0), self.osd_confidence


def _save_for_tesseract(page: PageImage, directory: Path) -> Path:
    """The page as a PNM file: no compression to spend CPU on (a PNG cost ~0.2 s a page) and no
    resolution field, so tesseract gets ``--dpi`` from us or, without it, estimates the resolution
    from the text itself (DESIGN §9: never assume a DPI)."""
    image = page.image if page.image.mode in ("1", "L", "RGB") else page.image.convert("RGB")
    path = directory / "page.pnm"
    image.save(path, format="PPM")
    return path


def _hocr(body: str) -> str:
    return EMPTY_HOCR_HEAD + body + " </body>\n</html>\n"


# ---- tesseract's installation ----------------------------------------------------------------------

def check_languages(languages: Sequence[str], *, allow_non_vie_first: bool = False) -> tuple[str, ...]:
    languages = tuple(languages)
    if not languages:
        raise ValueError("languages must not be empty; use ('vie',)")
    if languages[0] != "vie" and not allow_non_vie_first:
        raise ValueError(f"languages {languages!r}: 'vie' must come first (eng+vie strips "
                         "Vietnamese diacritics)")
    if not all(re.fullmatch(r"[A-Za-z_]+", lang) for lang in languages):
        raise ValueError(f"invalid tesseract language codes {languages!r}")
    return languages


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
