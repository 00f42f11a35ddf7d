"""The "văn bản" metadata sheet of a selection of documents (by device, arrival date range, full-text
search), as CSV or XLSX, with the columns of a versioned archival template (``protocol.schemas``).

Rows are read in pages by document id (keyset), so a selection of any size is never held in memory:
CSV is streamed to the client page by page; XLSX is written by XlsxWriter in constant-memory mode
(each row goes to a temporary file as it is written) and sent when the workbook is closed, since an
XLSX is a zip whose directory comes last.

Cells that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, CR first) are
defused: CSV gets a leading apostrophe (OWASP's advice), XLSX is written with formulas, numbers and
URLs all taken as plain strings. OCR'd text comes from scanned paper, i.e. from anyone.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from central import catalog
from central.records import corrections
from protocol.schemas import TEMPLATES, Template

PAGE_ROWS = 500
XLSX_MAX_ROWS = 1_048_576 - 2          # Excel's limit, less the header and a truncation note
# Vietnam keeps UTC+7 all year: a date range means the archivist's days, not UTC's.
VIETNAM = dt.timezone(dt.timedelta(hours=7))
LOW_CONFIDENCE = 0.8
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class Selection:
    device: str | None = None
    q: str | None = None
    since: str | None = None    # received_at >= since (catalog's UTC ISO form)
    until: str | None = None    # received_at < until

    def describe(self) -> dict[str, str]:
        return {k: v for k, v in (("device", self.device), ("q", self.q), ("received_since", self.since),
                                  ("received_before", self.until)) if v}


def day_bounds(first: str | None, last: str | None) -> tuple[str | None, str | None]:
    """Inclusive local (UTC+7) days ``first``..``last`` → the catalog's UTC [since, until) strings."""
    def start_of(day: dt.date) -> str:
        at = dt.datetime.combine(day, dt.time(), tzinfo=VIETNAM).astimezone(dt.UTC)
        return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    since = start_of(parse_day(first, "from")) if first is not None else None
    until = start_of(parse_day(last, "to") + dt.timedelta(days=1)) if last is not None else None
    if since and until and since >= until:
        raise ValueError("from must not be after to")
    return since, until


def parse_day(raw: str, name: str) -> dt.date:
    try:
        if _DATE.fullmatch(raw):
            return dt.date.fromisoformat(raw)
    except ValueError:
        pass
    raise ValueError(f"{name} must be a date written YYYY-MM-DD")


# -- columns and rows -------------------------------------------------------------------------------------

# After the template's own columns: what identifies the record in this archive and how sure we are.
TECHNICAL_COLUMNS = (
    ("sohoa_id", "Mã văn bản (sohoa)"),
    ("thiet_bi", "Thiết bị (xã gửi)"),
    ("ten_tep", "Tên tệp gốc"),
    ("sha256_goc", "SHA-256 bản gốc"),
    ("ngay_nhan", "Thời điểm nhận (UTC)"),
    ("sha256_luu_tru", "SHA-256 bản lưu trữ (PDF/A-2b, đã ký)"),
    ("nguoi_sua", "Trường đã được hiệu đính"),
    ("can_kiem_tra", "Trường cần kiểm tra (độ tin cậy < 0,8)"),
    ("mau", "Mẫu dữ liệu (phiên bản)"),
)


def headers(template: Template) -> list[str]:
    return [f.label for f in template.fields] + [label for _, label in TECHNICAL_COLUMNS]


def keys(template: Template) -> list[str]:
    return [f.key for f in template.fields] + [key for key, _ in TECHNICAL_COLUMNS]


def template_tag(template: Template) -> str:
    return f"{template.id} v{template.version}"


def fetch_page(conn: sqlite3.Connection, selection: Selection, *, after_id: int,
               limit: int = PAGE_ROWS) -> list[dict[str, Any]]:
    """The next page of selected documents (ascending id), each with its current metadata and the
    sha256 of its archival copy (if built)."""
    clauses = ["d.id > ?", "d.state = 'stored'"]   # archived arrivals (not those awaiting their original)
    params: list[Any] = [after_id]
    source = "documents d"
    if selection.q:
        match = catalog.fts_query(selection.q)
        if match is None:
            return []
        source = "documents_fts f JOIN documents d ON d.id = f.rowid"
        clauses.append("documents_fts MATCH ?")
        params.append(match)
    for clause, value in (("d.device = ?", selection.device), ("d.received_at >= ?", selection.since),
                          ("d.received_at < ?", selection.until)):
        if value:
            clauses.append(clause)
            params.append(value)
    sql = ("SELECT d.id, d.device, d.filename, d.sha256, d.pages, d.received_at, d.metadata,"  # noqa: S608
           " j.archival_sha256 FROM " + source + " LEFT JOIN archive_jobs j ON j.sha256 = d.sha256"
           f" AND j.state = 'done' WHERE {' AND '.join(clauses)} ORDER BY d.id LIMIT ?")
    rows = [dict(r) for r in conn.execute(sql, [*params, limit])]
    fixes = corrections.latest_corrections(conn, [r["id"] for r in rows])
    for row in rows:
        row["current"] = corrections.current(row.pop("metadata"), fixes.get(row["id"], {}))
    return rows


def values(row: dict[str, Any], template: Template) -> list[Any]:
    """One sheet row: the template's columns (extracted or corrected values; pages for so_trang),
    then the technical ones. A date stays ISO text here; XLSX turns it into a date cell."""
    current = row["current"]
    out: list[Any] = []
    for field in template.fields:
        if field.extracted is not None:
            out.append(current[field.extracted]["value"])
        elif field.key == "so_trang":
            out.append(row["pages"])
        else:
            out.append(None)
    corrected = [name for name, v in current.items() if v["source"] == corrections.CORRECTED]
    doubtful = [name for name, v in current.items() if v["source"] == corrections.EXTRACTED
                and v["confidence"] is not None and v["confidence"] < LOW_CONFIDENCE]
    out += [row["id"], row["device"], row["filename"], row["sha256"], row["received_at"],
            row["archival_sha256"], ", ".join(corrected), ", ".join(doubtful), template_tag(template)]
    return out


# -- CSV --------------------------------------------------------------------------------------------------

BOM = "\ufeff"   # Excel reads a CSV as UTF-8 only when it starts with the byte-order mark
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def defuse(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_lines(rows: Sequence[Sequence[Any]]) -> str:
    """CSV text (RFC 4180, CRLF) for these rows, with formula-looking cells defused."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for row in rows:
        writer.writerow(["" if v is None else defuse(v) for v in row])
    return buffer.getvalue()


# -- XLSX -------------------------------------------------------------------------------------------------

class XlsxSheet:
    """A "văn bản" sheet written row by row in constant memory, plus a sheet describing the export."""

    def __init__(self, path: Path, template: Template, *, tmpdir: Path) -> None:
        import xlsxwriter  # noqa: PLC0415 - only the export needs it

        self.template = template
        self.workbook = xlsxwriter.Workbook(str(path), {
            "constant_memory": True, "tmpdir": str(tmpdir), "strings_to_formulas": False,
            "strings_to_numbers": False, "strings_to_urls": False, "use_zip64": True})
        self.workbook.set_properties({"title": f"Văn bản — {template.title}",
                                      "comments": template_tag(template), "author": "sohoa central"})
        self.workbook.set_custom_property("sohoa_template", template.id)
        self.workbook.set_custom_property("sohoa_template_version", template.version)
        self.sheet = self.workbook.add_worksheet("Văn bản")
        self.bold = self.workbook.add_format({"bold": True, "text_wrap": True, "valign": "top"})
        self.date = self.workbook.add_format({"num_format": "dd/mm/yyyy"})
        self.sheet.freeze_panes(1, 0)
        self.sheet.write_row(0, 0, headers(template), self.bold)
        self.date_column = next((i for i, f in enumerate(template.fields) if f.extracted == "ngay"), None)
        self.rows = 0
        self.truncated = False

    def add(self, row: Sequence[Any]) -> bool:
        """Write one row; False once Excel's row limit is reached (the sheet then says so)."""
        if self.rows >= XLSX_MAX_ROWS:
            if not self.truncated:
                self.sheet.write_string(self.rows + 1, 0, f"… dừng ở {XLSX_MAX_ROWS:,} dòng (giới hạn của "
                                        "Excel); hãy xuất CSV hoặc chọn ít hơn")
                self.truncated = True
            return False
        self.rows += 1
        for column, value in enumerate(row):
            if value is None:
                continue
            if column == self.date_column and isinstance(value, str) and _DATE.fullmatch(value):
                self.sheet.write_datetime(self.rows, column, dt.datetime.fromisoformat(value), self.date)
            elif isinstance(value, int):
                self.sheet.write_number(self.rows, column, value)
            else:
                self.sheet.write_string(self.rows, column, str(value))
        return True

    def add_all(self, rows: Sequence[Sequence[Any]]) -> bool:
        return all(self.add(row) for row in rows)

    def close(self, *, selection: Selection, generated_at: str) -> None:
        about = self.workbook.add_worksheet("Thông tin")
        info = [("Mẫu dữ liệu", self.template.title), ("Mã mẫu", self.template.id),
                ("Phiên bản mẫu", str(self.template.version)),
                ("Nguồn danh mục trường", self.template.source),
                ("Đã đối chiếu văn bản chính thức", "có" if self.template.verified else "chưa"),
                ("Thời điểm xuất (UTC)", generated_at), ("Số văn bản", str(self.rows)),
                *((f"Lọc: {k}", v) for k, v in selection.describe().items())]
        for index, (label, text) in enumerate(info):
            about.write_string(index, 0, label, self.bold)
            about.write_string(index, 1, text)
        self.workbook.close()


def template_or_error(template_id: str | None, default: str) -> Template:
    chosen = default if template_id is None else template_id
    if chosen not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[chosen]
