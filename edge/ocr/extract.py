"""Document metadata from the hOCR layout of a Vietnamese administrative document (Decree 30/2020/
NĐ-CP annex I; the Party's layout is the same in these positions).

    top left    superior body / ISSUING BODY / Số: 125/QĐ-UBND (/ V/v … for a công văn)
    top right   CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM (or ĐẢNG CỘNG SẢN VIỆT NAM) / place, ngày … tháng … năm …
    centre      TYPE / Về việc …
    bottom      Nơi nhận: … (left)            capacity, signer's name (right)

tesseract reads the two header columns line by line across the page ("UBND HUYỆN X CỘNG HÒA …" is
one line), so the flat text cannot be trusted for them: words are split into columns by their boxes
at the emptiest vertical band of the header. Each field gets a confidence in 0-1: the mean word
confidence of the words it came from, lowered when it was found by a fallback rule.
"""

from __future__ import annotations

import datetime as dt
import difflib
import itertools
import re
import unicodedata
from dataclasses import dataclass

from protocol.bag import DocumentField
from protocol.hocr import Line, Page, Word, parse_hocr
from protocol.names import fold

# Decree 30/2020 annex III (tên loại văn bản → chữ viết tắt), plus the Party's "CV" for công văn.
DOCUMENT_TYPES = {
    "Nghị quyết": "NQ", "Quyết định": "QĐ", "Chỉ thị": "CT", "Quy chế": "QC", "Quy định": "QyĐ",
    "Thông cáo": "TC", "Thông báo": "TB", "Hướng dẫn": "HD", "Chương trình": "CTr",
    "Kế hoạch": "KH", "Phương án": "PA", "Đề án": "ĐA", "Dự án": "DA", "Báo cáo": "BC",
    "Biên bản": "BB", "Tờ trình": "TTr", "Hợp đồng": "HĐ", "Công điện": "CĐ",
    "Bản ghi nhớ": "GN", "Bản thỏa thuận": "TTh", "Giấy ủy quyền": "GUQ", "Giấy mời": "GM",
    "Giấy giới thiệu": "GGT", "Giấy nghỉ phép": "GNP", "Phiếu gửi": "PG", "Phiếu chuyển": "PC",
    "Phiếu báo": "PB", "Công văn": "CV",
}
_BY_FOLDED = {fold(name): name for name in DOCUMENT_TYPES}
_BY_ABBREVIATION = {fold(abbr): name for name, abbr in DOCUMENT_TYPES.items()}
_NUMBER_RE = re.compile(r"^s[o0]\W{0,3}(\d.*)$")
_SYMBOL_RE = re.compile(r"^\d{1,5}\s*[/-]\s*\S")
_DATE_RE = re.compile(r"ngay\W{0,2}(\d{1,2})\W{0,2}thang\W{0,2}(\d{1,2})\W{0,2}n\w?m\W{0,2}(\d{4})")
_CAPACITY = ("tm.", "t/m", "kt.", "k/t", "tl.", "t/l", "tuq.", "chu tich", "bi thu", "truong",
             "giam doc", "pho ")
MIN_TYPE_MATCH = 0.8


@dataclass(frozen=True, slots=True)
class _Row:
    """A line, or the part of a line in one header column."""

    words: tuple[Word, ...]
    column: str    # "left", "right" or "full"

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    @property
    def folded(self) -> str:
        return fold(self.text)

    @property
    def confidence(self) -> float:
        return sum(w.confidence for w in self.words) / len(self.words)

    @property
    def box(self) -> tuple[int, int, int, int]:
        return Line(self.words).box


def extract_fields(hocr: str) -> dict[str, DocumentField]:
    """The archivist's fields found in ``hocr`` (absent when not found)."""
    pages = [page for page in parse_hocr(hocr) if page.lines]
    if not pages:
        return {}
    first = pages[0]
    x0, x1 = _content_span(first)
    header, rest, split = _header(first, x0, x1)
    left = [row for row in header if row.column == "left"]
    right = [row for row in header if row.column == "right"]
    found: dict[str, tuple[str, float]] = {}

    number_at = None
    for position, row in enumerate(left + right):
        match = _NUMBER_RE.match(row.folded)
        if match:
            value = _symbol(row.text)
            if value:
                sure = 1.0 if _SYMBOL_RE.match(value) and position < len(left) else 0.6
                found["so_ky_hieu"] = (value, row.confidence * sure)
                number_at = position if position < len(left) else None
                break

    for row in [*right, *left, *rest]:
        match = _DATE_RE.search(row.folded)
        if match:
            try:
                day = dt.date(int(match.group(3)), int(match.group(2)), int(match.group(1)))
            except ValueError:
                continue
            found["ngay"] = (day.isoformat(), row.confidence * (1.0 if row in right else 0.7))
            break

    if number_at is not None:
        # Rules and the Party's "*" under the body's name come out as stray low-confidence marks.
        above = [_Row(kept, row.column) for row in left[:number_at]
                 if (kept := tuple(w for w in row.words if w.confidence >= 0.3 and any(
                     c.isalpha() for c in w.text)))]
        body = above[1:] if len(above) >= 2 else above
        if body:
            found["co_quan"] = (" ".join(row.text for row in body),
                                min(row.confidence for row in body) * (1.0 if len(above) >= 2 else 0.7))

    subject_rows: list[_Row] = []
    if number_at is not None:
        below = left[number_at + 1:]
        if below and below[0].folded.startswith(("v/v", "v/ v", "vv ")):
            subject_rows = below
    title = None
    for position, row in enumerate(rest[:6]):
        name, score = _document_type(row.folded)
        if name and score >= MIN_TYPE_MATCH:
            title = (name, row.confidence * score)
            if not subject_rows:
                subject_rows = _centred_block(rest[position + 1:], x0, x1)
            break
    if not subject_rows:
        for position, row in enumerate(rest[:8]):
            if row.folded.startswith("ve viec"):
                subject_rows = _centred_block(rest[position:], x0, x1, first_is_subject=True)
                break
    if subject_rows:
        found["trich_yeu"] = (" ".join(row.text for row in subject_rows),
                              min(row.confidence for row in subject_rows))

    if title:
        found["loai"] = title
    elif subject_rows and subject_rows[0].folded.startswith("v/v"):
        found["loai"] = ("Công văn", subject_rows[0].confidence * 0.9)
    elif "so_ky_hieu" in found:
        guessed = _type_from_symbol(found["so_ky_hieu"][0])
        if guessed:
            found["loai"] = (guessed, found["so_ky_hieu"][1] * 0.7)

    signer = _signer(pages[-1], split if len(pages) == 1 else None)
    if signer:
        found["nguoi_ky"] = signer
    return {name: DocumentField(unicodedata.normalize("NFC", value), round(max(0.0, min(1.0, conf)), 3))
            for name, (value, conf) in found.items()}


def _content_span(page: Page) -> tuple[int, int]:
    boxes = [w.box for line in page.lines for w in line.words]
    return min(b[0] for b in boxes), max(b[2] for b in boxes)


def _header(page: Page, x0: int, x1: int) -> tuple[list[_Row], list[_Row], float]:
    """(header rows split into columns, the rows below the header, the column split's x)."""
    lines = sorted(page.lines, key=lambda line: line.box[1])
    width = max(1, x1 - x0)
    # The header ends at the first line that crosses the middle of the page as one block of text
    # (a title, a "Về việc" line or the body), after at least two lines.
    end = len(lines)
    for position, line in enumerate(lines):
        if position >= 2 and _is_full_width(line, x0, width):
            end = position
            break
        if position >= 12:
            end = position
            break
    header_lines = lines[:end]
    split = _column_split(header_lines, x0, width)
    rows: list[_Row] = []
    for line in header_lines:
        left = tuple(w for w in line.words if w.center_x < split)
        right = tuple(w for w in line.words if w.center_x >= split)
        rows += [_Row(part, side) for part, side in ((left, "left"), (right, "right")) if part]
    rows.sort(key=lambda row: (row.column, row.box[1]))
    rest = [_Row(line.words, "full") for line in lines[end:]]
    return rows, rest, split


def _is_full_width(line: Line, x0: int, width: int) -> bool:
    left, _, right, _ = line.box
    crosses = left < x0 + 0.42 * width < right and left < x0 + 0.58 * width < right
    if not crosses:
        return False
    # A header line read across both columns has a wide gap between its two parts.
    xs = sorted(line.words, key=lambda w: w.box[0])
    gaps = [b.box[0] - a.box[2] for a, b in itertools.pairwise(xs)]
    heights = [w.box[3] - w.box[1] for w in line.words]
    return not gaps or max(gaps) < 3 * (sorted(heights)[len(heights) // 2])


def _column_split(lines: list[Line], x0: int, width: int) -> float:
    """The x of the emptiest band between 25 % and 60 % of the text's width in the header."""
    bins = 100
    coverage = [0] * bins
    for line in lines:
        for word in line.words:
            first = int((word.box[0] - x0) / width * bins)
            last = int((word.box[2] - x0) / width * bins)
            for b in range(max(0, first), min(bins, last + 1)):
                coverage[b] += 1
    candidates = range(25, 60)
    least = min(coverage[b] for b in candidates)
    emptiest = [b for b in candidates if coverage[b] == least]
    # The middle of the longest run of equally empty bins.
    runs: list[list[int]] = []
    for b in emptiest:
        if runs and runs[-1][-1] == b - 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    best = max(runs, key=len)
    return x0 + (best[0] + best[-1] + 1) / 2 / bins * width


def _symbol(text: str) -> str | None:
    """``125/QĐ-UBND`` from ``Số: 125 / QĐ-UBND`` (spaces around separators dropped)."""
    match = re.search(r"(\d.*)$", text)
    if not match:
        return None
    value = re.sub(r"\s*([/-])\s*", r"\1", match.group(1)).strip(" .,:;")
    value = value.split(" ")[0]
    return value or None


def _document_type(folded: str) -> tuple[str | None, float]:
    cleaned = re.sub(r"[^a-z ]", "", folded).strip()
    if not cleaned:
        return None, 0.0
    if cleaned in _BY_FOLDED:
        return _BY_FOLDED[cleaned], 1.0
    best = max(_BY_FOLDED, key=lambda key: difflib.SequenceMatcher(None, cleaned, key).ratio())
    return _BY_FOLDED[best], difflib.SequenceMatcher(None, cleaned, best).ratio()


def _type_from_symbol(symbol: str) -> str | None:
    parts = re.split(r"[/-]", symbol)
    for part in parts[1:]:
        name = _BY_ABBREVIATION.get(fold(part))
        if name:
            return name
    return "Công văn" if len(parts) >= 2 else None


def _centred_block(rows: list[_Row], x0: int, x1: int, *, first_is_subject: bool = False) -> list[_Row]:
    """The subject lines under the title: centred, until the body starts."""
    middle, width = (x0 + x1) / 2, x1 - x0
    block: list[_Row] = []
    for row in rows:
        left, top, right, _ = row.box
        centred = abs((left + right) / 2 - middle) < 0.08 * width and (right - left) < 0.85 * width
        if not block and not (first_is_subject or row.folded.startswith("ve viec")):
            break
        if block and not centred:
            break
        if block:
            # The body starts after a blank line: a gap larger than the subject's own spacing.
            previous = block[-1].box
            if top - previous[3] > 1.2 * (previous[3] - previous[1]):
                break
        block.append(row)
        if len(block) >= 4:
            break
    return block


def _signer(page: Page, split: float | None) -> tuple[str, float] | None:
    """The signer's name: the lowest title-case line on the right, under a capacity line."""
    x0, x1 = _content_span(page)
    middle = split if split is not None else x0 + 0.45 * (x1 - x0)
    lines = sorted(page.lines, key=lambda line: line.box[1])
    right_rows = []
    for line in lines:
        words = tuple(w for w in line.words if w.center_x >= middle)
        if words:
            right_rows.append(_Row(words, "right"))
    capacity_seen = False
    best: tuple[str, float] | None = None
    for row in right_rows[len(right_rows) // 3:]:
        folded = row.folded
        if any(folded.startswith(c) or f" {c}" in folded for c in _CAPACITY) and row.text.isupper():
            capacity_seen = True
            best = None
            continue
        name = _name(row.text)
        if name:
            best = (name, row.confidence * (1.0 if capacity_seen else 0.6))
    return best


def _name(text: str) -> str | None:
    """``Trần Thị Lan`` if the line is a person's name (2-5 capitalised words), stray marks dropped."""
    words = [w.strip("\"'“”‘’.,:;-_|*") for w in text.split()]
    words = [w for w in words if w]
    if 2 <= len(words) <= 5 and all(w[0].isupper() and w[1:].islower() and w.isalpha() for w in words):
        return " ".join(words)
    return None
