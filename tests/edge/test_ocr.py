"""OCR engines: real tesseract ``vie`` per page in a process pool, and the fake for unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import psutil
import pytest
from PIL import Image

from edge.errors import BadInputError, EdgeError, OcrEngineError
from edge.media import MediaInfo, probe
from edge.ocr import FakeOcrEngine, TesseractEngine, join_pages, mean_confidence, merge_hocr
from edge.samples import generate_samples
from tests.support.stalled_tesseract import StalledTesseract, assert_gone

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {s.media_type: s.path for s in generate_samples(tmp_path_factory.mktemp("ocr"), 7)}


async def test_multipage_tiff_and_pdf_in_page_order_nfc_with_diacritics(samples: dict[str, Path]) -> None:
    engine = TesseractEngine(workers=2)
    try:
        tiff = await engine.recognize(samples["image/tiff"], probe(samples["image/tiff"]))
        pdf = await engine.recognize(samples["application/pdf"], probe(samples["application/pdf"]))
    finally:
        await engine.aclose()
    # The TIFF says 150 dpi; the PDF is rendered at the engine's 300.
    for result, pages, dpi in ((tiff, 3, 150), (pdf, 2, 300)):
        assert result.pages == pages and result.languages == ("vie",) and result.dpi == dpi
        assert not result.dpi_estimated
        assert result.engine.startswith("tesseract 5")
        assert unicodedata.is_normalized("NFC", result.text)
        assert "CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM" in result.text
        assert "Độc lập" in result.text and "Hạnh phúc" in result.text
        parts = result.text.split("\f")
        assert [re.search(r"Trang (\d)/\d", p).group(1) for p in parts] == [  # type: ignore[union-attr]
            str(n) for n in range(1, pages + 1)]
        assert result.mean_confidence is not None and result.mean_confidence > 80
        # One hOCR document, one ocr_page per page, renumbered, no temp paths leaked.
        assert result.hocr.count("<body>") == 1 and result.hocr.count("class='ocr_page'") == pages
        assert f"id='page_{pages}'" in result.hocr and "/tmp" not in result.hocr
        assert ">Trào" in result.hocr  # hOCR holds one word per span


async def test_unreadable_page_is_bad_input_and_missing_tesseract_is_retryable(tmp_path: Path) -> None:
    frames = [Image.new("L", (300, 300), 255) for _ in range(2)]
    tif = tmp_path / "hai trang.tif"
    frames[0].save(tif, save_all=True, append_images=frames[1:])
    engine = TesseractEngine(workers=1)
    try:
        with pytest.raises(BadInputError, match="page 3"):  # claims a page the file does not have
            await engine.recognize(tif, MediaInfo("image/tiff", 3, tif.stat().st_size))
        blank = await engine.recognize(tif, probe(tif))
        assert blank.pages == 2 and blank.mean_confidence is None
    finally:
        await engine.aclose()
    broken = TesseractEngine(workers=1, tesseract_cmd=str(tmp_path / "no-tesseract"))
    try:
        with pytest.raises(OcrEngineError) as info:
            await broken.recognize(tif, probe(tif))
        assert not isinstance(info.value, BadInputError) and isinstance(info.value, EdgeError)
        assert "tesseract" in info.value.hint
    finally:
        await broken.aclose()


def test_language_validation() -> None:
    with pytest.raises(ValueError, match="empty"):
        TesseractEngine(())
    with pytest.raises(ValueError, match="'vie' must come first"):
        TesseractEngine(("eng", "vie"))
    assert TesseractEngine(("eng",), allow_non_vie_first=True).languages == ("eng",)
    with pytest.raises(ValueError, match="invalid"):
        TesseractEngine(("vie", "eng; rm -rf /"))
    assert TesseractEngine().workers >= 1


def test_pure_helpers() -> None:
    decomposed = unicodedata.normalize("NFD", "Quyết định")
    assert join_pages([decomposed + "\n\f", "Trang 2\n\f"]) == "Quyết định\n\fTrang 2\n"
    page = ("<html><head><title></title></head>\n <body>\n  <div class='ocr_page' id='page_1' "
            "title='image \"/tmp/x/page.png\"; bbox 0 0 10 10; ppageno 0'>"
            "<span class='ocrx_word' id='word_1_1' title='bbox 0 0 1 1; x_wconf 90'>Xã</span>"
            "</div>\n </body>\n</html>\n")
    merged = merge_hocr([page, page.replace("x_wconf 90", "x_wconf 70")])
    assert "id='page_2'" in merged and "id='word_2_1'" in merged and "ppageno 1" in merged
    assert "/tmp" not in merged and merged.count("<body>") == 1
    assert mean_confidence(merged) == 80.0 and mean_confidence("<p/>") is None


async def test_fake_engine_is_deterministic(tmp_path: Path) -> None:
    engine = FakeOcrEngine("Ủy ban nhân dân xã Tân Trào")
    media = MediaInfo("application/pdf", 2, 100)
    first = await engine.recognize(tmp_path / "a.pdf", media)
    assert first == await engine.recognize(tmp_path / "a.pdf", media)
    assert first.pages == 2 and "Tân Trào" in first.text and first.hocr.count("class='ocr_page'") == 2
    failing = FakeOcrEngine(error=OcrEngineError("tesseract crashed"))
    with pytest.raises(OcrEngineError):
        await asyncio.wait_for(failing.recognize(tmp_path / "a.pdf", media), 5)
    await engine.aclose()


async def test_a_stop_does_not_wait_for_the_page_being_read(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """aclose() mid-page ends the worker and its tesseract at once, and removes the page images.

    The stand-in tesseract sleeps ten minutes: a stop that waited for the page would time out."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # the pool's scratch goes here
    stalled = StalledTesseract.make(tmp_path)
    page = tmp_path / "Công văn số 5 – Tuyên Quang.png"
    Image.new("L", (400, 300), 255).save(page)
    engine = TesseractEngine(workers=1, tesseract_cmd=str(stalled.command), page_timeout=600, filters=(),
                             orientation="off")
    reading = asyncio.create_task(engine.recognize(page, probe(page)))
    pid = await stalled.started()
    # While the page is read, its image is in the pool's scratch folder, not loose in TMPDIR.
    assert list(tmp_path.glob("sohoa-ocr-pool-*/sohoa-ocr-*/page.*"))
    reading.cancel()
    started = time.monotonic()
    await engine.aclose()
    assert time.monotonic() - started < 30
    assert_gone(pid)
    assert list(tmp_path.glob("sohoa-ocr-pool-*")) == []
    with pytest.raises(asyncio.CancelledError):
        await reading


_READ_ONE_PAGE = """
import asyncio, sys, tempfile
from pathlib import Path
from edge.media import probe
from edge.ocr import TesseractEngine
tempfile.tempdir = sys.argv[3]
page = Path(sys.argv[2])
engine = TesseractEngine(workers=1, tesseract_cmd=sys.argv[1], page_timeout=600, filters=(),
                         orientation="off")
asyncio.run(engine.recognize(page, probe(page)))
"""


async def test_a_service_killed_mid_page_takes_its_worker_and_tesseract_with_it(tmp_path: Path) -> None:
    """SIGKILL of the service (kill -9, the OOM killer): its OCR worker, in a process group of its
    own, and the tesseract reading a page end too, and the next start removes the page images the
    dead pool left. Regression: each kill -9 left a ~40 MB worker running for ever."""
    stalled = StalledTesseract.make(tmp_path)
    page = tmp_path / "Công văn số 5 – Tuyên Quang.png"
    Image.new("L", (400, 300), 255).save(page)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _READ_ONE_PAGE, str(stalled.command), str(page), str(scratch),
        cwd=Path(__file__).resolve().parents[2])
    worker: psutil.Process | None = None
    try:
        tesseract = await stalled.started()
        worker = psutil.Process(tesseract).parent()
        assert worker is not None and worker.pid != service.pid
        service.kill()
        await service.wait()
        assert_gone(tesseract)
        assert_gone(worker.pid)
    finally:
        if service.returncode is None:
            service.kill()
            await service.wait()
        if worker is not None:   # a failing run must not leave them behind either
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
    (left,) = scratch.glob("sohoa-ocr-pool-*")   # a kill -9 cleans nothing up itself
    engine = TesseractEngine(workers=1, tesseract_cmd=str(stalled.command), filters=(), orientation="off")
    old = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        engine.warm()   # a new pool, as the next start makes
        assert not left.exists()
    finally:
        tempfile.tempdir = old
        await engine.aclose()


async def test_a_worker_killed_mid_page_fails_that_document_retryably_and_the_next_gets_a_fresh_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OOM killer (here SIGKILL) takes a worker mid-page: that document gets a retryable engine
    error, the broken pool's page images are removed, and the next document is read by new workers."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stalled = StalledTesseract.make(tmp_path)
    page = tmp_path / "Quyết định số 12.png"
    Image.new("L", (400, 300), 255).save(page)
    engine = TesseractEngine(workers=1, tesseract_cmd=str(stalled.command), page_timeout=600, filters=(),
                             orientation="off")
    try:
        first = asyncio.create_task(engine.recognize(page, probe(page)))
        worker = psutil.Process(await stalled.started()).parent()
        assert worker is not None
        (broken_scratch,) = tmp_path.glob("sohoa-ocr-pool-*")
        worker.kill()
        with pytest.raises(OcrEngineError, match="worker process died") as info:
            await first
        assert not isinstance(info.value, BadInputError)
        assert not broken_scratch.exists()
        second = asyncio.create_task(engine.recognize(page, probe(page)))
        again = psutil.Process(await stalled.started()).parent()
        assert again is not None and again.pid != worker.pid
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
    finally:
        await engine.aclose()
    assert list(tmp_path.glob("sohoa-ocr-pool-*")) == []
