"""A small reader for hOCR (the ``data/ocr.hocr`` member of a package): pages → lines → words,
with boxes in page pixels and word confidences. Pure, so both the edge (metadata extraction) and
central (the archival copy's text layer) read the layout the same way."""

from __future__ import annotations

import html
import itertools
import re
import unicodedata
from dataclasses import dataclass

_WCONF_RE = re.compile(r"x_wconf (\d+)")

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
