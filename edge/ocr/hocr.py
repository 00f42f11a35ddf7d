"""Pure functions over tesseract's hOCR: merge per-page documents, mean confidence, and a small
parser into words and lines with boxes (what the metadata extractor reads the layout from)."""

from __future__ import annotations

import html
import itertools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

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


# ---- a small hOCR reader -------------------------------------------------------------------------

Box = tuple[int, int, int, int]   # x0, y0, x1, y1 in page pixels


@dataclass(frozen=True, slots=True)
class Word:
    text: str
    box: Box
    confidence: float   # 0-1

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True, slots=True)
class Line:
    words: tuple[Word, ...]

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    @property
    def box(self) -> Box:
        return (min(w.box[0] for w in self.words), min(w.box[1] for w in self.words),
                max(w.box[2] for w in self.words), max(w.box[3] for w in self.words))

    @property
    def confidence(self) -> float:
        return sum(w.confidence for w in self.words) / len(self.words)


@dataclass(frozen=True, slots=True)
class Page:
    box: Box
    lines: tuple[Line, ...]


_PAGE_RE = re.compile(r"<div class='ocr_page'[^>]*title='([^']*)'")
_LINE_RE = re.compile(r"<span class='ocr(?:x_line|_line|_header|_caption|_textfloat)'[^>]*>")
_WORD_RE = re.compile(r"<span class='ocrx_word'[^>]*title='([^']*)'[^>]*>(.*?)</span>", re.DOTALL)
_BBOX_RE = re.compile(r"bbox (\d+) (\d+) (\d+) (\d+)")
_TAG_RE = re.compile(r"<[^>]+>")


def parse_hocr(hocr: str) -> list[Page]:
    """Pages → lines → words, with boxes and confidences; empty words are dropped."""
    pages: list[Page] = []
    starts = [m.start() for m in _PAGE_RE.finditer(hocr)] + [len(hocr)]
    for start, end in itertools.pairwise(starts):
        chunk = hocr[start:end]
        page_match = _PAGE_RE.match(chunk)
        page_box = _bbox(page_match.group(1)) if page_match else (0, 0, 0, 0)
        line_starts = [m.start() for m in _LINE_RE.finditer(chunk)] + [len(chunk)]
        lines = []
        for line_start, line_end in itertools.pairwise(line_starts):
            words = []
            for title, inner in _WORD_RE.findall(chunk[line_start:line_end]):
                text = unicodedata.normalize("NFC", html.unescape(_TAG_RE.sub("", inner))).strip()
                if not text:
                    continue
                conf = _WCONF_RE.search(title)
                words.append(Word(text, _bbox(title), int(conf.group(1)) / 100 if conf else 0.0))
            if words:
                lines.append(Line(tuple(words)))
        pages.append(Page(page_box, tuple(lines)))
    return pages


def _bbox(title: str) -> Box:
    match = _BBOX_RE.search(title)
    if not match:
        return (0, 0, 0, 0)
    x0, y0, x1, y1 = (int(v) for v in match.groups())
    return (x0, y0, x1, y1)
