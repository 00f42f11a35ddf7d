"""What flows through the OCR stage: a page image between filters, one page's reading, the
document's result, and the interfaces of the document-level and per-page engines."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from edge.media import MediaInfo
from protocol.bag import DocumentField, OcrPage


@dataclass(frozen=True, slots=True)
class PageImage:
    """One rasterised page on its way to the engine. Filters return a new one (never mutate)."""

    index: int
    image: Image.Image
    dpi: int | None               # None: the file declared no plausible resolution
    rotation: int = 0             # clockwise degrees applied so far
    skew: float = 0.0             # degrees of deskew applied so far
    orientation_confidence: float | None = None

    def replace(self, **changes: object) -> PageImage:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PageText:
    """What the engine read on one page (picklable across the process pool)."""

    index: int
    text: str
    hocr: str
    dpi: int = 0                  # the resolution the engine worked at (0: unknown)
    estimated: bool = False       # True when the engine estimated it
    mean_confidence: float | None = None


@dataclass(frozen=True, slots=True)
class PageResult:
    """One page through the whole pipeline: the reading plus how the page was prepared."""

    text: PageText
    info: OcrPage


@dataclass(frozen=True, slots=True)
class OcrResult:
    text: str                     # corrected text when a correction step ran, else the engine's
    hocr: str
    pages: int
    seconds: float
    engine: str
    languages: tuple[str, ...]
    dpi: int                      # page 1's
    mean_confidence: float | None
    dpi_estimated: bool = False
    page_info: tuple[OcrPage, ...] = ()
    raw_text: str | None = None   # the engine's text, kept when a correction changed it
    fields: dict[str, DocumentField] = field(default_factory=dict)


class OcrEngine(Protocol):
    """What the service calls: one whole document in, its text, hOCR and metadata out."""

    async def recognize(self, path: Path, media: MediaInfo) -> OcrResult: ...

    async def aclose(self) -> None: ...


class PageEngine(Protocol):
    """One page image in, its text and hOCR out (OCRmyPDF's ``generate_hocr``). Runs inside a pool
    worker: implementations are small picklable values."""

    @property
    def name(self) -> str: ...

    def recognize_page(self, page: PageImage, timeout: float) -> PageText: ...

    def orientation(self, page: PageImage, timeout: float) -> tuple[int, float] | None:
        """(clockwise degrees to turn the page upright, confidence), or None if unknown."""
        ...


class PageFilter(Protocol):
    """A step between rasterise and recognise (OCRmyPDF's ``filter_ocr_image``): page → page."""

    @property
    def name(self) -> str: ...

    def __call__(self, page: PageImage, engine: PageEngine, timeout: float) -> PageImage: ...
