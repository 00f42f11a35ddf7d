"""OCR stage: Vietnamese text, hOCR and document metadata for every page of a scan.

The service builds one engine from config (``build_engine(cfg.ocr)``) and calls
``await engine.recognize(path, media) -> OcrResult`` and ``await engine.aclose()``. Inside, the
runner (``runner.py``) owns rasterising, the process pool and merging; a per-page engine
(``engines.py``: tesseract, or a fake) reads one page image; page filters (``filters.py``) prepare
it; the extractor (``extract.py``) reads the metadata from the merged hOCR.

Errors: a page we cannot decode, or one that exceeds the caps, is :class:`BadInputError`
(quarantine the file, never retried); tesseract missing or crashing is :class:`OcrEngineError`
(retry later).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from edge.ocr.engines import FakePageEngine, TesseractPageEngine, installed_languages, tesseract_version
from edge.ocr.fake import FakeOcrEngine
from edge.ocr.filters import DeskewFilter, OrientationFilter
from edge.ocr.hocr import PAGE_SEPARATOR, join_pages, mean_confidence, merge_hocr
from edge.ocr.model import OcrEngine, OcrResult, PageEngine, PageFilter, PageImage, PageText
from edge.ocr.rasterize import plausible_dpi, rasterize
from edge.ocr.runner import DEFAULT_ADDRESS_SPACE, OcrRunner, Orientation, TesseractEngine

if TYPE_CHECKING:
    from edge.config import OcrConfig

__all__ = [
    "DEFAULT_ADDRESS_SPACE", "PAGE_SEPARATOR", "DeskewFilter", "FakeOcrEngine", "FakePageEngine",
    "OcrEngine", "OcrResult", "OcrRunner", "OrientationFilter", "PageEngine", "PageFilter",
    "PageImage", "PageText", "TesseractEngine", "TesseractPageEngine", "build_engine",
    "installed_languages", "join_pages", "mean_confidence", "merge_hocr", "plausible_dpi",
    "rasterize", "tesseract_version",
]


def build_engine(cfg: OcrConfig) -> OcrRunner:
    """The OCR engine the config asks for, its workers already starting."""
    from edge.ocr.extract import extract_fields  # noqa: PLC0415 - keeps `import edge.ocr` light

    filters = (DeskewFilter(),) if cfg.deskew else ()
    address_space = cfg.address_space_mib * 2**20 if cfg.address_space_mib else None
    orientation = cast("Orientation", cfg.orientation)   # validated by OcrConfig
    engine: OcrRunner
    if cfg.engine == "fake":
        engine = OcrRunner(FakePageEngine(), workers=cfg.worker_count, dpi=cfg.dpi, filters=filters,
                           orientation=orientation, extractor=extract_fields,
                           address_space=address_space, languages=cfg.languages, version="fake")
    else:
        engine = TesseractEngine(cfg.languages, workers=cfg.worker_count, dpi=cfg.dpi, filters=filters,
                                 orientation=orientation, extractor=extract_fields,
                                 address_space=address_space)
    engine.warm()
    return engine
