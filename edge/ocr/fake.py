"""A document-level fake engine: instant and deterministic, for service tests where hundreds of
documents and kills must fit in minutes (chosen through the interface, not by patching)."""

from __future__ import annotations

import asyncio
import unicodedata
from pathlib import Path

from edge.media import MediaInfo
from edge.ocr.hocr import EMPTY_HOCR_HEAD, join_pages, merge_hocr
from edge.ocr.model import OcrResult
from protocol.bag import OcrPage


class FakeOcrEngine:
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
        pages = [f"{EMPTY_HOCR_HEAD}  <div class='ocr_page' id='page_1' title='bbox 0 0 100 100'>"
                 f"<span class='ocrx_word' id='word_1_1' title='bbox 0 0 10 10; x_wconf 99'>"
                 f"{n}</span></div>\n </body>\n</html>\n" for n in range(1, media.pages + 1)]
        return OcrResult(text=join_pages(texts), hocr=merge_hocr(pages), pages=media.pages,
                         seconds=self.delay, engine="fake", languages=("vie",), dpi=300,
                         mean_confidence=99.0,
                         page_info=tuple(OcrPage(dpi=300, width=100, height=100)
                                         for _ in range(media.pages)))

    async def aclose(self) -> None:
        return None
