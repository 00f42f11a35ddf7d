"""Caps before work (DESIGN §9): a PDF page's size × dpi is checked before anything is rendered, a
legitimately large page is read at a lower resolution, and OCR workers run under an address-space
limit; every such refusal is a BadInputError (quarantined at once, never retried)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.ocr_bombs import bomb_pdf
from edge.errors import BadInputError
from edge.media import MAX_PAGE_PIXELS, MIN_OCR_DPI, plan_pdf_dpi, probe
from edge.ocr import TesseractEngine

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("side", [4000, 14400])
def test_pdf_page_bombs_are_refused_before_rendering(tmp_path: Path, side: int) -> None:
    bomb = tmp_path / "Công văn.pdf"
    bomb_pdf(bomb, side)
    assert bomb.stat().st_size < 1000
    started = time.monotonic()
    with pytest.raises(BadInputError) as info:
        probe(bomb)
    assert time.monotonic() - started < 1.0   # decided from the page size, not by rendering it
    reason = info.value.reason
    assert f"{round(side / 72 * 25.4)} × {round(side / 72 * 25.4)} mm" in reason
    assert "real paper size" in reason and "megapixels" in reason


def test_dpi_plan_is_pure_arithmetic_on_the_page_size() -> None:
    assert plan_pdf_dpi(595, 842, wanted=300) == 300                    # A4: unaffected
    assert plan_pdf_dpi(1191, 1684, wanted=300) == 300                  # A2 still fits at 300
    a1 = plan_pdf_dpi(1684, 2384, wanted=300)                           # A1: lowered, not refused
    assert MIN_OCR_DPI <= a1 < 300 and (1684 * a1 / 72) * (2384 * a1 / 72) <= MAX_PAGE_PIXELS
    assert plan_pdf_dpi(2384, 3370, wanted=300) >= MIN_OCR_DPI          # A0: the largest accepted
    with pytest.raises(BadInputError, match="page 3"):
        plan_pdf_dpi(4000, 4000, wanted=300, index=2)
    for width, height in ((0, 842), (-1, 842), (float("nan"), 842), (float("inf"), 842)):
        with pytest.raises(BadInputError):
            plan_pdf_dpi(width, height, wanted=300)


async def test_large_page_is_read_at_a_lower_resolution_within_the_cap(tmp_path: Path) -> None:
    poster = tmp_path / "bản đồ.pdf"
    bomb_pdf(poster, 2400)                     # 847 mm square: at 300 dpi it would be 100 Mpx
    engine = TesseractEngine(workers=1)
    try:
        result = await engine.recognize(poster, probe(poster))
    finally:
        await engine.aclose()
    assert result.dpi == plan_pdf_dpi(2400, 2400, wanted=300) < 300
    assert not result.dpi_estimated and "Trang" in result.text


async def test_address_space_limit_turns_a_runaway_page_into_a_refusal(tmp_path: Path) -> None:
    poster = tmp_path / "lớn.pdf"
    bomb_pdf(poster, 2400)
    engine = TesseractEngine(workers=1, address_space=150 * 2**20)
    try:
        with pytest.raises(BadInputError, match="more memory than an OCR worker may use"):
            await engine.recognize(poster, probe(poster))
    finally:
        await engine.aclose()
