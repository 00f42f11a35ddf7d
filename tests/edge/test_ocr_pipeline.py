"""The runner's stages: filters in order, orientation only on doubt, pages merged in order; the real
engine turns upside-down and sideways pages and leaves upright ones alone."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from bench.textmetrics import cer
from edge.config import ConfigError, OcrConfig
from edge.media import probe
from edge.ocr import (
    DeskewFilter,
    FakePageEngine,
    OcrRunner,
    PageEngine,
    PageImage,
    TesseractEngine,
    build_engine,
)
from edge.ocr.filters import OrientationFilter, estimate_skew
from edge.ocr.hocr import vertical_share
from edge.testset import Degradation, generate, make_document, render

pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True, slots=True)
class Mark:
    """A test filter that leaves its name in the page's image info (picklable, like real filters)."""

    label: str
    name: str = "mark"

    def __call__(self, page: PageImage, engine: PageEngine, timeout: float) -> PageImage:
        image = page.image.copy()
        image.info["marks"] = [*page.image.info.get("marks", []), self.label]
        assert engine.name == "fake" and timeout > 0
        return page.replace(image=image, skew=page.skew + len(image.info["marks"]))


def test_deskew_finds_the_angle() -> None:
    page = render(make_document(random.Random(1), 0), dpi=100)
    for angle in (-3.2, -1.0, 0.0, 2.4, 4.5):
        turned = page.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=255)
        assert abs(estimate_skew(turned) + angle) <= 0.2, angle
    straight = DeskewFilter()(PageImage(0, page.rotate(3, expand=True, fillcolor=255), 100),
                              FakePageEngine(), 1.0)
    assert abs(straight.skew + 3) <= 0.2


def test_orientation_filter_respects_its_threshold() -> None:
    page = PageImage(0, render(make_document(random.Random(1), 0), dpi=100).rotate(180), 100)
    assert OrientationFilter(threshold=30)(page, FakePageEngine(osd_confidence=20), 1.0).rotation == 0
    turned = OrientationFilter(threshold=10)(page, FakePageEngine(osd_confidence=20), 1.0)
    assert turned.rotation == 180 and turned.orientation_confidence == 20


def test_vertical_share() -> None:
    line = "<span class='ocr_line' id='l' title=\"bbox {} {} {} {}; baseline 0 0\">"
    assert vertical_share(line.format(0, 0, 500, 30) * 3) == 0.0
    assert vertical_share(line.format(0, 0, 30, 500) * 3 + line.format(0, 0, 500, 30)) == 0.75
    assert vertical_share("") == 0.0


async def test_fake_runner_applies_filters_in_order_and_merges_pages(tmp_path: Path) -> None:
    frames = [render(make_document(random.Random(n), n), dpi=100) for n in range(3)]
    tif = tmp_path / "ba trang.tif"
    frames[0].save(tif, save_all=True, append_images=frames[1:], dpi=(100, 100))
    engine = OcrRunner(FakePageEngine("Xã Tân Trào"), workers=2, filters=(Mark("a"), Mark("b")),
                       orientation="off", version="fake")
    try:
        result = await engine.recognize(tif, probe(tif))
    finally:
        await engine.aclose()
    assert result.pages == 3 and result.text.count("Xã Tân Trào") == 3 and result.text.count("\f") == 2
    assert [p.skew for p in result.page_info] == [3.0, 3.0, 3.0]     # a (+1), then b (+2)
    assert result.hocr.count("class='ocr_page'") == 3 and "id='page_3'" in result.hocr
    assert all(p.dpi == 100 and not p.dpi_estimated for p in result.page_info)


async def test_real_engine_turns_upside_down_and_sideways_pages_only(tmp_path: Path) -> None:
    mix = [Degradation(dpi=150), Degradation(dpi=150, rotate=180), Degradation(dpi=150, rotate=90)]
    pages = generate(tmp_path, 3, seed=4, mix=mix)
    engine = TesseractEngine(workers=2)
    try:
        results = await asyncio.gather(*(engine.recognize(p, probe(p)) for p, _ in pages))
    finally:
        await engine.aclose()
    # testset turns pages counter-clockwise; the runner records the clockwise turn that undid it.
    assert [r.page_info[0].rotation for r in results] == [0, 180, 90]
    for (_, page), result in zip(pages, results, strict=True):
        assert cer(page.truth, result.text) < 0.05, result.text[:300]


async def test_engine_is_chosen_by_config(tmp_path: Path) -> None:
    page = tmp_path / "trang.png"
    render(make_document(random.Random(2), 0), dpi=100).save(page, dpi=(100, 100))
    engine = build_engine(OcrConfig(engine="fake", workers=1, orientation="off"))
    try:
        result = await engine.recognize(page, probe(page))
    finally:
        await engine.aclose()
    assert result.engine == "fake" and "Tân Trào" in result.text and result.page_info[0].dpi == 100
    real = build_engine(OcrConfig(workers=1))
    try:
        assert isinstance(real, TesseractEngine) and real.address_space == 2048 * 2**20
        assert real.orientation == "doubt" and [f.name for f in real.filters] == ["deskew"]
    finally:
        await real.aclose()
    for bad in ({"engine": "paddle"}, {"orientation": "sometimes"}, {"address_space_mib": 100}):
        with pytest.raises(ConfigError):
            OcrConfig(**bad)  # type: ignore[arg-type]
