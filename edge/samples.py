"""Sample Vietnamese administrative pages for the demo and the tests, generated locally (no downloads).

Each sample lists ``phrases``: words and short phrases that real tesseract ``vie`` recovers from
that file with diacritics intact (verified by tests/edge/test_samples.py). Phrases avoid the known
``vie`` weakness — a hook above on a circumflex (khẩn→khân, phổ→phô) is often dropped.
"""

from __future__ import annotations

import random
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from edge.fsutil import atomic_writer

# 150 dpi keeps the default 10-page set's OCR well under 15 s on two cores while every phrase
# below is still recovered (tesseract's sweet spot is a capital height of ~20-30 px).
SAMPLE_DPI = 150
A4_INCHES = (8.27, 11.69)
FONT_CANDIDATES = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"),
    Path("/usr/share/fonts/truetype/noto/NotoSerif-Regular.ttf"),
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf"),
)
BOLD_CANDIDATES = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf"),
    Path("/usr/share/fonts/truetype/noto/NotoSerif-Bold.ttf"),
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
)

HEADER = ("CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM", "Độc lập – Tự do – Hạnh phúc")
HEADER_PHRASES = ("CỘNG HÒA", "VIỆT NAM", "Độc lập", "Hạnh phúc")
VILLAGES = ("Nà Nưa", "Tân Lập", "Cây Thông", "Mỏ Ché", "Đồng Đa", "Thia")
PEOPLE = ("Nguyễn Văn Hùng", "Trần Thị Lan", "Hoàng Văn Sơn", "Lê Thị Mai", "Phạm Đức Thắng")


@dataclass(frozen=True, slots=True)
class Sample:
    path: Path
    media_type: str
    pages: int
    phrases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Page:
    title: str
    lines: tuple[str, ...]
    phrases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    media_type: str
    pages: int
    crooked: bool = False


def _find_font(candidates: tuple[Path, ...]) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError("no font with Vietnamese glyphs found; install fonts-dejavu-core")


def _document_pages(kind: int, count: int, rng: random.Random) -> list[_Page]:
    """Text for one document: header block, a title, then body paragraphs per page."""
    number = rng.randint(2, 99)
    village = rng.choice(VILLAGES)
    person = rng.choice(PEOPLE)
    day, month = rng.randint(1, 28), rng.randint(1, 12)
    titles = (
        ("QUYẾT ĐỊNH", f"Số: {number}/QĐ-UBND", "Về việc công nhận danh hiệu Gia đình văn hóa",
         ("QUYẾT ĐỊNH", "Gia đình văn hóa")),
        ("CÔNG VĂN", f"Số: {number}/UBND-VP", "Về việc kiểm tra hồ sơ địa chính",
         ("hồ sơ địa chính",)),
        ("TỜ TRÌNH", f"Số: {number}/TTr-UBND", "Về việc sửa chữa đường giao thông nông thôn",
         ("đường giao thông", "nông thôn")),
        ("BIÊN BẢN", f"Số: {number}/BB-UBND", "Họp thôn về kế hoạch trồng rừng",
         ("trồng rừng",)),
        ("GIẤY XÁC NHẬN", f"Số: {number}/XN-UBND", "Xác nhận nơi cư trú của công dân",
         ("cư trú", "công dân")),
    )
    title, ref, subject, title_phrases = titles[kind % len(titles)]
    body = (
        f"Ủy ban nhân dân xã Tân Trào, huyện Sơn Dương, tỉnh Tuyên Quang ngày {day} tháng {month} "
        "năm 2024 đã họp và thống nhất các nội dung sau đây.",
        f"Căn cứ Luật Tổ chức chính quyền địa phương; xét đề nghị của ông {person}, trưởng thôn "
        f"{village}, về việc thực hiện kế hoạch năm 2024 của xã.",
        "Giao Văn phòng Ủy ban nhân dân xã phối hợp với các thôn tổ chức thực hiện, báo cáo kết "
        "quả trước ngày 30 tháng 12 năm 2024.",
        "Quyết định này có hiệu lực kể từ ngày ký. Các ông, bà có tên trên chịu trách nhiệm thi hành.",
    )
    body_phrases = ("Tân Trào", "Tuyên Quang", "Ủy ban nhân dân", "trưởng thôn", "thực hiện")
    pages = []
    for index in range(count):
        lines = [*HEADER, "", ref, f"Tân Trào, ngày {day} tháng {month} năm 2024", "", subject,
                 f"Trang {index + 1}/{count}", ""]
        for paragraph in body[index % 2:] + body[: index % 2]:
            lines += [*textwrap.wrap(paragraph, 58), ""]
        pages.append(_Page(title, tuple(lines), HEADER_PHRASES + title_phrases + body_phrases))
    return pages


def render_page(page: _Page, *, dpi: int = SAMPLE_DPI, crooked: bool = False) -> Image.Image:
    """Draw a page as a grayscale scan at ``dpi`` (A4)."""
    width, height = (round(side * dpi) for side in A4_INCHES)
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    size = round(13 / 72 * dpi)
    regular = ImageFont.truetype(str(_find_font(FONT_CANDIDATES)), size)
    bold = ImageFont.truetype(str(_find_font(BOLD_CANDIDATES)), round(size * 1.15))
    margin, y = round(0.9 * dpi), round(0.8 * dpi)
    line_height = round(size * 1.55)
    for index, line in enumerate(page.lines):
        font = bold if index < 2 else regular
        x = (width - draw.textlength(line, font=font)) / 2 if index < 2 else margin
        draw.text((x, y), line, font=font, fill=0)
        y += line_height
        if index == 2:  # the document type, large and centred, like a real decision
            title_width = draw.textlength(page.title, font=bold)
            draw.text(((width - title_width) / 2, y), page.title, font=bold, fill=0)
            y += line_height * 2
    if crooked:
        # A page fed slightly askew, as happens on a sheet feeder.
        image = image.rotate(1.5, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=255)
    return image


def _plan(pages: int) -> list[_Spec]:
    base = [
        _Spec("Quyết định số 12 – UBND.pdf", "application/pdf", 2),
        _Spec("Công văn số 5 – Tuyên Quang.png", "image/png", 1),
        _Spec("Tờ trình sửa đường thôn Nà Nưa.jpg", "image/jpeg", 1),
        _Spec("Biên bản họp thôn – Tân Trào.tif", "image/tiff", 3),
        _Spec("Giấy xác nhận cư trú (lệch).png", "image/png", 1, crooked=True),
        _Spec("Quyết định số 13 – Gia đình văn hóa.pdf", "application/pdf", 2),
    ]
    plan: list[_Spec] = []
    left = pages
    for spec in base:
        take = min(spec.pages, left)
        if take:
            plan.append(_Spec(spec.name, spec.media_type, take, spec.crooked))
        left -= take
    if left:
        last = plan[-1]
        plan[-1] = _Spec(last.name, last.media_type, last.pages + left, last.crooked)
    return plan


def generate_samples(out_dir: Path, pages: int = 10, *, seed: int = 0,
                     dpi: int = SAMPLE_DPI) -> list[Sample]:
    """Write sample scans into ``out_dir`` (total ``pages`` pages) and describe them."""
    if pages < 1:
        raise ValueError("pages must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # noqa: S311 - reproducible sample text, not security
    samples = []
    for kind, spec in enumerate(_plan(pages)):
        doc = _document_pages(kind, spec.pages, rng)
        path = out_dir / spec.name
        if spec.media_type == "application/pdf":
            _write_pdf(path, doc)
        else:
            _write_image(path, spec, [render_page(p, dpi=dpi, crooked=spec.crooked) for p in doc], dpi)
        phrases = tuple(dict.fromkeys(phrase for p in doc for phrase in p.phrases))
        samples.append(Sample(path, spec.media_type, spec.pages, phrases))
    return samples


def _write_image(path: Path, spec: _Spec, images: list[Image.Image], dpi: int) -> None:
    with atomic_writer(path, 0o644) as handle:
        if spec.media_type == "image/png":
            images[0].save(handle, format="PNG", dpi=(dpi, dpi), optimize=False)
        elif spec.media_type == "image/jpeg":
            images[0].save(handle, format="JPEG", dpi=(dpi, dpi), quality=85)
        else:
            images[0].save(handle, format="TIFF", dpi=(dpi, dpi), compression="tiff_deflate",
                           save_all=True, append_images=images[1:])


def _write_pdf(path: Path, doc: list[_Page]) -> None:
    # Imported here: reportlab is only needed to make samples, never on the document path.
    from reportlab.lib.pagesizes import A4  # noqa: PLC0415
    from reportlab.pdfbase import pdfmetrics  # noqa: PLC0415
    from reportlab.pdfbase.ttfonts import TTFont  # noqa: PLC0415
    from reportlab.pdfgen import canvas  # noqa: PLC0415

    pdfmetrics.registerFont(TTFont("SohoaSerif", str(_find_font(FONT_CANDIDATES))))
    pdfmetrics.registerFont(TTFont("SohoaSerifBold", str(_find_font(BOLD_CANDIDATES))))
    width, height = A4
    with atomic_writer(path, 0o644) as handle:
        pdf = canvas.Canvas(handle, pagesize=A4, invariant=1)
        pdf.setTitle(doc[0].title)
        for page in doc:
            y = height - 0.8 * 72
            for index, line in enumerate(page.lines):
                font, size = ("SohoaSerifBold", 15) if index < 2 else ("SohoaSerif", 13)
                pdf.setFont(font, size)
                if index < 2:
                    pdf.drawCentredString(width / 2, y, line)
                else:
                    pdf.drawString(0.9 * 72, y, line)
                y -= 13 * 1.55
                if index == 2:
                    pdf.setFont("SohoaSerifBold", 15)
                    pdf.drawCentredString(width / 2, y, page.title)
                    y -= 13 * 1.55 * 2
            pdf.showPage()
        pdf.save()
