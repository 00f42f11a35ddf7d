"""Sample pages: the files the demo feeds the edge, and the phrases real tesseract ``vie`` recovers."""

from __future__ import annotations

import asyncio
import time
import unicodedata
from pathlib import Path

import pytest

from edge.media import probe
from edge.ocr import OcrResult, TesseractEngine
from edge.samples import Sample, generate_samples

pytestmark = pytest.mark.timeout(120)


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def ocr_of_samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sample], list[OcrResult], float]:
    samples = generate_samples(tmp_path_factory.mktemp("samples"))

    async def run() -> list[OcrResult]:
        engine = TesseractEngine(workers=2)
        try:
            return [await engine.recognize(s.path, probe(s.path)) for s in samples]
        finally:
            await engine.aclose()

    started = time.monotonic()
    results = asyncio.run(run())
    return samples, results, time.monotonic() - started


def test_default_set_has_ten_pages_in_every_format(tmp_path: Path) -> None:
    samples = generate_samples(tmp_path)
    assert sum(s.pages for s in samples) == 10
    assert {s.media_type for s in samples} == {"image/png", "image/jpeg", "image/tiff", "application/pdf"}
    names = {s.path.name for s in samples}
    assert "Quyết định số 12 – UBND.pdf" in names and "Công văn số 5 – Tuyên Quang.png" in names
    for sample in samples:
        assert unicodedata.is_normalized("NFC", sample.path.name)
        info = probe(sample.path)
        assert (info.media_type, info.pages) == (sample.media_type, sample.pages)
        assert sample.phrases and all(unicodedata.is_normalized("NFC", p) for p in sample.phrases)


@pytest.mark.parametrize("pages", [1, 3, 10, 17])
def test_page_count_is_respected(tmp_path: Path, pages: int) -> None:
    assert sum(s.pages for s in generate_samples(tmp_path, pages)) == pages


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    first = generate_samples(tmp_path / "a", seed=7)
    second = generate_samples(tmp_path / "b", seed=7)
    assert [s.path.read_bytes() for s in first] == [s.path.read_bytes() for s in second]


def test_real_tesseract_recovers_every_phrase_with_diacritics(
        ocr_of_samples: tuple[list[Sample], list[OcrResult], float]) -> None:
    samples, results, seconds = ocr_of_samples
    for sample, result in zip(samples, results, strict=True):
        text = squash(result.text)
        missing = [p for p in sample.phrases if p not in text]
        assert not missing, f"{sample.path.name}: {missing} not in {text[:400]!r}"
        assert result.pages == sample.pages
    # The design budget: the default set OCRs in well under 15 s on two cores.
    assert seconds < 30, f"default samples took {seconds:.1f} s"
