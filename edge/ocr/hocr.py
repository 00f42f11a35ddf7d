"""Pure functions over tesseract's hOCR: merge per-page documents, mean confidence, line direction.
The reader into pages, lines and words is ``protocol.hocr`` (central reads the same layout)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

PAGE_SEPARATOR = "\f"

_BODY_RE = re.compile(r"<body[^>]*>(.*)</body>", re.DOTALL)
_HEAD_RE = re.compile(r"^(.*?<body[^>]*>)", re.DOTALL)
_ID_RE = re.compile(r"id='([a-z]+)_1((?:_\d+)*)'")
_IMAGE_RE = re.compile(r'image "[^"]*"')
_PAGENO_RE = re.compile(r"ppageno \d+")
_WCONF_RE = re.compile(r"x_wconf (\d+)")
EMPTY_HOCR_HEAD = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE html PUBLIC \"-//W3C//DTD "
                   "XHTML 1.0 Transitional//EN\" \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-"
                   "transitional.dtd\">\n<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" "
                   "lang=\"en\">\n <head>\n  <title></title>\n  <meta http-equiv=\"Content-Type\" "
                   "content=\"text/html;charset=utf-8\"/>\n  <meta name='ocr-system' content="
                   "'sohoa'/>\n  <meta name='ocr-capabilities' content='ocr_page ocr_carea ocr_par "
                   "ocr_line ocrx_word'/>\n </head>\n <body>\n")


def merge_hocr(pages: Sequence[str]) -> str:
    """One hOCR document from per-page documents: ids and page numbers renumbered, no temp paths."""
    if not pages:
        return EMPTY_HOCR_HEAD + " </body>\n</html>\n"
    head_match = _HEAD_RE.match(pages[0])
    head = head_match.group(1) + "\n" if head_match else EMPTY_HOCR_HEAD
    bodies = []
    for number, page in enumerate(pages, start=1):
        body_match = _BODY_RE.search(page)
        body = body_match.group(1).strip("\n") if body_match else ""
        body = _ID_RE.sub(lambda m, n=number: f"id='{m.group(1)}_{n}{m.group(2)}'", body)
        body = _IMAGE_RE.sub(f'image "page-{number}"', body)
        body = _PAGENO_RE.sub(f"ppageno {number - 1}", body)
        bodies.append(body)
    return head + "\n".join(bodies) + "\n </body>\n</html>\n"


def mean_confidence(hocr: str) -> float | None:
    """Mean word confidence (0-100) from hOCR ``x_wconf``, or None when no words were found."""
    values = [int(v) for v in _WCONF_RE.findall(hocr)]
    return round(sum(values) / len(values), 2) if values else None


def join_pages(texts: Sequence[str]) -> str:
    """Page texts in order, NFC, separated by a form feed (tesseract's own page break)."""
    cleaned = [unicodedata.normalize("NFC", t).rstrip("\f").rstrip() + "\n" for t in texts]
    return PAGE_SEPARATOR.join(cleaned)


_LINE_BOX_RE = re.compile(r"class='ocr(?:x_line|_line|_header|_caption|_textfloat)'[^>]*?"
                          r"title=[\"']bbox (\d+) (\d+) (\d+) (\d+)")


def vertical_share(hocr: str) -> float:
    """Share of text lines taller than wide: tesseract reads a sideways page, but its boxes then
    run down the page and the layout is lost (0 when there are no lines)."""
    boxes = [tuple(int(v) for v in m.groups()) for m in _LINE_BOX_RE.finditer(hocr)]
    long_lines = [b for b in boxes if max(b[2] - b[0], b[3] - b[1]) > 4 * min(b[2] - b[0], b[3] - b[1])]
    if not long_lines:
        return 0.0
    return sum(1 for b in long_lines if b[3] - b[1] > b[2] - b[0]) / len(long_lines)
