"""The archival PDF/A-2b: original images kept byte for byte (JPEG) or pixel for pixel (PNG), an
invisible text layer where the words are, turned pages shown upright, and the archive's PAdES
signature checked by an independent tool (poppler's pdfsig)."""

from __future__ import annotations

import asyncio
import io
import random
import re
import subprocess
from pathlib import Path

import pikepdf
import pytest
from PIL import Image

from bench.archival_pdfa import pdfa_checks, scanner_pdf, word_recall
from central.records.archival import build_pdfa
from central.records.archive_sign import make_signing_identity, sign_pdf
from edge.media import probe
from edge.ocr import OcrResult, TesseractEngine
from edge.testset import Degradation, degrade, make_document, render

pytestmark = pytest.mark.timeout(180)


def _ocr(path: Path) -> OcrResult:
    async def run() -> OcrResult:
        engine = TesseractEngine(workers=2)
        try:
            return await engine.recognize(path, probe(path))
        finally:
            await engine.aclose()

    return asyncio.run(run())


def _text(path: Path, *extra: str) -> str:
    return subprocess.run(["pdftotext", *extra, str(path), "-"], capture_output=True, text=True,
                          check=True).stdout


def test_upside_down_jpeg_kept_as_is_shown_upright_with_words_in_place(tmp_path: Path) -> None:
    rng = random.Random(8)
    page = degrade(render(make_document(rng, 0), 150), Degradation(dpi=150, rotate=180), rng)
    original = tmp_path / "quyết định.jpg"
    page.convert("RGB").save(original, format="JPEG", quality=85, dpi=(150, 150))
    result = _ocr(original)
    assert result.page_info[0].rotation == 180
    out = tmp_path / "archival.pdf"
    build_pdfa(original, "image/jpeg", result.hocr, out, title="Quyết định", page_info=result.page_info)
    assert all(pdfa_checks(out).values()), pdfa_checks(out)
    with pikepdf.open(out) as pdf:
        [pdf_page] = pdf.pages
        assert int(pdf_page.obj.Rotate) == 180
        assert next(iter(pdf_page.get_images().values())).read_raw_bytes() == original.read_bytes()
        width = float(pdf_page.mediabox[2])
    assert abs(width - 8.27 * 72) < 2                  # sized from the file's 150 dpi: A4
    assert word_recall(result.text, _text(out)) > 0.97
    # Where the words are: pdftotext -bbox reports them on the page as displayed (turned upright);
    # where they were drawn (as fractions of the page: header row 0.07, title 0.20, recipients 0.48).
    boxes = re.findall(r'xMin="([\d.]+)" yMin="([\d.]+)" xMax="[\d.]+" yMax="[\d.]+">([^<]+)<',
                       _text(out, "-bbox"))
    where = {word: (float(x) / (8.27 * 72), float(y) / (11.69 * 72)) for x, y, word in boxes}
    assert where["CỘNG"][0] > 0.4 and where["CỘNG"][1] < 0.1 and where["UBND"][0] < 0.3
    assert 0.15 < where["QUYẾT"][1] < 0.25 and 0.4 < where["Nơi"][1] < 0.55


def test_png_page_is_lossless(tmp_path: Path) -> None:
    image = render(make_document(random.Random(2), 3), 100)
    original = tmp_path / "báo cáo.png"
    image.save(original, dpi=(100, 100))
    build_pdfa(original, "image/png", "<html><body></body></html>", tmp_path / "a.pdf", title="Báo cáo")
    with pikepdf.open(tmp_path / "a.pdf") as pdf:
        stream = next(iter(pdf.pages[0].get_images().values()))
        kept = pikepdf.PdfImage(stream).as_pil_image()
    assert kept.tobytes() == image.tobytes() and kept.size == image.size


def test_multipage_scanner_pdf_signed_and_verified_independently(tmp_path: Path) -> None:
    original = tmp_path / "original.pdf"
    scanner_pdf(original, 2, dpi=150)
    result = _ocr(original)
    unsigned, signed = tmp_path / "archival.pdf", tmp_path / "signed.pdf"
    build_pdfa(original, "application/pdf", result.hocr, unsigned, title="Văn bản",
               page_info=result.page_info)
    with pikepdf.open(unsigned) as pdf:
        jpegs = [next(iter(p.get_images().values())).read_raw_bytes() for p in pdf.pages]
    assert jpegs == [original.with_suffix(f".{n}.jpg").read_bytes() for n in range(2)]
    key, cert = make_signing_identity(tmp_path / "keys", archive_name="Lưu trữ tỉnh Tuyên Quang")
    assert (key.stat().st_mode & 0o777) == 0o600
    sign_pdf(unsigned, signed, key=key, cert=cert, reason="Bản số hóa")
    assert signed.read_bytes().startswith(unsigned.read_bytes())   # an incremental update
    assert all(pdfa_checks(signed).values())
    checked = subprocess.run(["pdfsig", str(signed)], capture_output=True, text=True, check=False).stdout
    assert "Signature is Valid" in checked and "Total document signed" in checked
    data = bytearray(signed.read_bytes())
    data[len(data) // 3] ^= 0x01
    (tmp_path / "tampered.pdf").write_bytes(bytes(data))
    tampered = subprocess.run(["pdfsig", str(tmp_path / "tampered.pdf")], capture_output=True, text=True,
                              check=False).stdout
    assert "Signature is Valid" not in tampered
    assert word_recall(result.text, _text(signed)) > 0.97


def test_jpeg_without_resolution_is_sized_from_the_edges_estimate(tmp_path: Path) -> None:
    original = tmp_path / "ảnh.jpg"
    buffer = io.BytesIO()
    render(make_document(random.Random(5), 1), 150).convert("RGB").save(buffer, format="JPEG")
    original.write_bytes(buffer.getvalue())
    with Image.open(original) as image:
        assert "dpi" not in image.info
    result = _ocr(original)
    assert result.page_info[0].dpi_estimated
    build_pdfa(original, "image/jpeg", result.hocr, tmp_path / "a.pdf", title="Ảnh",
               page_info=result.page_info)
    with pikepdf.open(tmp_path / "a.pdf") as pdf:
        width_in = float(pdf.pages[0].mediabox[2]) / 72
    assert 3 < width_in < 12   # a page, not a 23-inch poster (72 dpi) nor a stamp
