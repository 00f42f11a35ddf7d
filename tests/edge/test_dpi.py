"""Never assume DPI (DESIGN §9): a file without a plausible resolution is estimated by tesseract,
and the resolution used, and whether it was estimated, is part of the OCR result."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from bench.textmetrics import cer
from edge.media import probe
from edge.ocr import TesseractEngine, plausible_dpi
from edge.testset import Degradation, generate

pytestmark = pytest.mark.timeout(120)


def test_plausible_dpi() -> None:
    assert plausible_dpi(300, (2480, 3508)) == 300
    assert plausible_dpi(199.9996, (1654, 2338)) == 200
    assert plausible_dpi(None, (2480, 3508)) is None
    assert plausible_dpi(0, (2480, 3508)) is None
    assert plausible_dpi(72, (3000, 4000)) is None      # a phone's default: a 1.4 m "page"
    assert plausible_dpi(96, (1240, 1754)) is None      # a screenshot's
    assert plausible_dpi(100, (9000, 9000)) is None     # 90 inches wide: not a paper document


async def test_photo_without_dpi_is_estimated_and_read_no_worse_than_forced_300(tmp_path: Path) -> None:
    # A phone-photo-like page (perspective, uneven light, blur, JPEG) at ~150 dpi with no
    # resolution in the file: seed 5, page 1 is one where forcing 300 dpi loses characters.
    mix = [Degradation(dpi=120, photo=True, exif_72=True), Degradation(dpi=150, photo=True)]
    [_, (photo, page)] = generate(tmp_path, 2, seed=5, mix=mix)
    with Image.open(photo) as image:
        assert "dpi" not in image.info
    scan = tmp_path / "scan.png"
    with Image.open(photo) as image:
        image.convert("L").save(scan, dpi=(200, 200))
    engine = TesseractEngine(workers=1)
    try:
        estimated = await engine.recognize(photo, probe(photo))
        declared = await engine.recognize(scan, probe(scan))
    finally:
        await engine.aclose()
    assert estimated.dpi_estimated and 150 <= estimated.dpi <= 600
    assert not declared.dpi_estimated and declared.dpi == 200
    forced = subprocess.run(["tesseract", str(photo), "-", "-l", "vie", "--psm", "3", "--dpi", "300"],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_THREAD_LIMIT": "1"}).stdout
    ours, theirs = cer(page.truth, estimated.text), cer(page.truth, forced)
    assert ours < theirs, (ours, theirs)
