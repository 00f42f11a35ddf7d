"""Metadata from the layout: a synthetic hOCR whose header columns are read across the page, and
real tesseract on generated Decree 30 pages (a decision, a công văn, a Party document)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge.media import probe
from edge.ocr import TesseractEngine
from edge.ocr.extract import extract_fields
from edge.testset import Degradation, generate
from protocol.names import fold

pytestmark = pytest.mark.timeout(180)


def _word(text: str, x0: int, y0: int, conf: int = 95) -> str:
    width = 14 * len(text)
    return (f"<span class='ocrx_word' id='w' title='bbox {x0} {y0} {x0 + width} {y0 + 30}; "
            f"x_wconf {conf}'>{text}</span> ")


def _line(*words: str) -> str:
    return f"<span class='ocr_line' id='l' title=\"bbox 0 0 1 1\">{''.join(words)}</span>\n"


def _row(y: int, left: str, right: str = "", *, left_x: int = 150, right_x: int = 900) -> str:
    words = []
    x = left_x
    for token in left.split():
        words.append(_word(token, x, y))
        x += 14 * len(token) + 12
    x = right_x
    for token in right.split():
        words.append(_word(token, x, y))
        x += 14 * len(token) + 12
    return _line(*words)


def test_interleaved_header_columns_are_split_by_word_boxes() -> None:
    body = "".join([
        _row(100, "UBND HUYỆN SƠN DƯƠNG", "CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM", right_x=760),
        _row(150, "ỦY BAN NHÂN DÂN", "Độc lập - Tự do - Hạnh phúc", right_x=820),
        _row(200, "XÃ TÂN TRÀO"),
        _row(260, "Số: 125/QĐ-UBND", "Tân Trào, ngày 14 tháng 3 năm 2025", right_x=780),
        _row(380, "QUYẾT ĐỊNH", left_x=640),
        _row(430, "Về việc công nhận danh hiệu Gia đình văn hóa", left_x=420),
        _row(520, "Căn cứ Luật Tổ chức chính quyền địa phương ngày 19 tháng 6 năm 2015; Luật sửa"),
        _row(570, "đổi một số điều của Luật Tổ chức Chính phủ và Luật Tổ chức chính quyền"),
        _row(800, "Nơi nhận:", "TM. ỦY BAN NHÂN DÂN", right_x=1000),
        _row(850, "- Lưu: VT.", "CHỦ TỊCH", right_x=1060),
        _row(1000, "", "Nguyễn Văn Hùng", right_x=1020),
    ])
    hocr = ("<html><body><div class='ocr_page' id='page_1' title='bbox 0 0 1654 2339'>"
            f"{body}</div></body></html>")
    fields = {name: field.value for name, field in extract_fields(hocr).items()}
    assert fields == {
        "so_ky_hieu": "125/QĐ-UBND", "ngay": "2025-03-14", "loai": "Quyết định",
        "co_quan": "ỦY BAN NHÂN DÂN XÃ TÂN TRÀO",
        "trich_yeu": "Về việc công nhận danh hiệu Gia đình văn hóa", "nguoi_ky": "Nguyễn Văn Hùng"}
    assert all(0.5 < f.confidence <= 1 for f in extract_fields(hocr).values())


def test_nothing_to_extract() -> None:
    assert extract_fields("<html><body></body></html>") == {}
    assert extract_fields("<div class='ocr_page' id='page_1' title='bbox 0 0 10 10'></div>") == {}


def test_fields_from_real_tesseract_on_three_layouts(tmp_path: Path) -> None:
    # Index 0: quyết định, 1: công văn (V/v under the number), 6: Party nghị quyết (Số 12-NQ/ĐU).
    mix = [Degradation(dpi=200)] * 7
    pages = [generate(tmp_path, 7, seed=2, mix=mix)[i] for i in (0, 1, 6)]

    async def run() -> list[dict[str, str]]:
        engine = TesseractEngine(workers=2, extractor=extract_fields, orientation="off")
        try:
            results = await asyncio.gather(*(engine.recognize(p, probe(p)) for p, _ in pages))
        finally:
            await engine.aclose()
        return [{k: v.value for k, v in r.fields.items()} for r in results]

    for (_, page), got in zip(pages, asyncio.run(run()), strict=True):
        want = page.document.fields
        assert got["so_ky_hieu"] == want["so_ky_hieu"] and got["ngay"] == want["ngay"]
        assert got["loai"] == want["loai"]
        for name in ("co_quan", "trich_yeu", "nguoi_ky"):
            assert fold(got[name]) == fold(want[name]), (name, got[name], want[name])
