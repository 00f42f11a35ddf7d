"""One contract for every per-page engine: the real tesseract and the fake run the same test."""

from __future__ import annotations

import random
import unicodedata

import pytest
from PIL import Image

from edge.ocr import FakePageEngine, PageEngine, PageImage, TesseractPageEngine
from edge.testset import make_document, render
from protocol.hocr import parse_hocr

pytestmark = pytest.mark.timeout(120)

ENGINES = [pytest.param(TesseractPageEngine(), id="tesseract"), pytest.param(FakePageEngine(), id="fake")]


@pytest.fixture(scope="module")
def page_image() -> Image.Image:
    return render(make_document(random.Random(3), 0), dpi=150)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_text_page(engine: PageEngine, page_image: Image.Image) -> None:
    result = engine.recognize_page(PageImage(4, page_image, 150), timeout=60)
    assert result.index == 4 and result.dpi == 150 and not result.estimated
    assert result.text.strip() and unicodedata.is_normalized("NFC", result.text)
    assert result.mean_confidence is not None and result.mean_confidence > 50
    assert result.hocr.count("class='ocr_page'") == 1
    [page] = parse_hocr(result.hocr)
    assert page.box == (0, 0, *page_image.size)
    words = [w for line in page.lines for w in line.words]
    assert words and all(0 <= w.box[0] <= w.box[2] <= page_image.width and
                         0 <= w.box[1] <= w.box[3] <= page_image.height for w in words)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_page_without_resolution_is_estimated(engine: PageEngine, page_image: Image.Image) -> None:
    result = engine.recognize_page(PageImage(0, page_image, None), timeout=60)
    assert result.estimated and result.dpi > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_blank_page(engine: PageEngine) -> None:
    result = engine.recognize_page(PageImage(0, Image.new("L", (600, 800), 255), 150), timeout=60)
    assert result.text.strip() == "" and result.mean_confidence is None
    assert "class='ocrx_word'" not in result.hocr


@pytest.mark.parametrize("engine", ENGINES)
def test_orientation(engine: PageEngine, page_image: Image.Image) -> None:
    upright = engine.orientation(PageImage(0, page_image, 150), timeout=60)
    upside_down = engine.orientation(PageImage(0, page_image.rotate(180), 150), timeout=60)
    assert upright is None or upright[0] == 0
    assert upside_down is not None and upside_down[0] == 180 and upside_down[1] > 0
