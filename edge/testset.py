"""The OCR quality test set: Vietnamese administrative pages in the layout of Decree 30/2020/NĐ-CP
(and the Party's own), rendered in a Times-compatible font, then degraded like real scans and photos.

Every page comes with its ground truth: the text in reading order (header blocks, then the body) and
the fields an archivist types by hand. Generated locally and reproducibly from a seed (no downloads).

Layout (Decree 30/2020 annex I, ô 1-9): issuing body and ``Số: …`` top left; national motto (or
``ĐẢNG CỘNG SẢN VIỆT NAM``) and ``place, ngày … tháng … năm …`` top right; type and ``Về việc …``
centred (a công văn has ``V/v …`` under its number instead); body; ``Nơi nhận:`` bottom left;
signer's capacity and name bottom right.
"""

from __future__ import annotations

import io
import random
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from edge.samples import A4_INCHES

TIMES_CANDIDATES = (   # metric-compatible with Times New Roman, the font Decree 30 prescribes
    Path("/usr/share/fonts/truetype/liberation2/LiberationSerif-{style}.ttf"),
    Path("/usr/share/fonts/truetype/liberation/LiberationSerif-{style}.ttf"),
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSerif-{style}.ttf"),
)
_DEJAVU_STYLE = {"Regular": "", "Bold": "-Bold", "Italic": "Condensed-Italic", "BoldItalic": "-BoldItalic"}

COMMUNES = (("Tân Trào", "Sơn Dương", "Tuyên Quang"), ("Minh Quang", "Ba Vì", "Hà Nội"),
            ("Nà Nưa", "Chiêm Hóa", "Tuyên Quang"), ("Đồng Tâm", "Mỹ Đức", "Hà Nội"),
            ("Hòa Bình", "Kim Bôi", "Hòa Bình"), ("Thạch Đà", "Mê Linh", "Hà Nội"))
SIGNERS = ("Nguyễn Văn Hùng", "Trần Thị Lan", "Hoàng Văn Sơn", "Lê Thị Mai", "Phạm Đức Thắng",
           "Vũ Quang Khải", "Đặng Thị Hồng", "Bùi Xuân Trường")
# (type printed, field value, symbol, subjects)
KINDS = (
    ("QUYẾT ĐỊNH", "Quyết định", "QĐ-UBND", (
        "công nhận danh hiệu Gia đình văn hóa năm {year}",
        "thành lập Tổ công tác rà soát hộ nghèo, hộ cận nghèo",
        "phê duyệt kế hoạch sử dụng đất năm {year}")),
    ("CÔNG VĂN", "Công văn", "UBND-VP", (
        "kiểm tra hồ sơ địa chính các thôn",
        "đôn đốc thu nộp thuế sử dụng đất phi nông nghiệp",
        "chuẩn bị số liệu phục vụ kỳ họp Hội đồng nhân dân")),
    ("TỜ TRÌNH", "Tờ trình", "TTr-UBND", (
        "đề nghị sửa chữa đường giao thông nông thôn",
        "đề nghị hỗ trợ kinh phí khắc phục hậu quả thiên tai")),
    ("BÁO CÁO", "Báo cáo", "BC-UBND", (
        "kết quả thực hiện nhiệm vụ phát triển kinh tế - xã hội quý {quarter} năm {year}",
        "tình hình tiếp công dân và giải quyết khiếu nại, tố cáo")),
    ("KẾ HOẠCH", "Kế hoạch", "KH-UBND", (
        "tổ chức Tết trồng cây đời đời nhớ ơn Bác Hồ năm {year}",
        "phòng, chống dịch bệnh trên đàn gia súc, gia cầm")),
    ("THÔNG BÁO", "Thông báo", "TB-UBND", (
        "lịch tiếp công dân của Chủ tịch Ủy ban nhân dân xã",
        "kết luận của Chủ tịch tại cuộc họp giao ban tháng {month}")),
    ("NGHỊ QUYẾT", "Nghị quyết", "NQ/ĐU", (
        "lãnh đạo thực hiện nhiệm vụ chính trị năm {year}",
        "tăng cường công tác kiểm tra, giám sát của Đảng")),
    ("CÔNG VĂN", "Công văn", "CV/ĐU", (
        "tổ chức sinh hoạt chi bộ thường kỳ",
        "kiểm điểm, đánh giá, xếp loại đảng viên")),
)
BODY = (
    "Căn cứ Luật Tổ chức chính quyền địa phương ngày 19 tháng 6 năm 2015; Luật sửa đổi, bổ sung "
    "một số điều của Luật Tổ chức Chính phủ và Luật Tổ chức chính quyền địa phương;",
    "Xét đề nghị của ông {person}, trưởng thôn {village}, về việc thực hiện kế hoạch năm {year} "
    "của xã; sau khi thống nhất với các ban, ngành, đoàn thể.",
    "Giao Văn phòng Ủy ban nhân dân xã chủ trì, phối hợp với các thôn tổ chức thực hiện, tổng hợp "
    "khó khăn, vướng mắc và báo cáo kết quả trước ngày {deadline} tháng 12 năm {year}.",
    "Các ông, bà Trưởng các ban, ngành, đoàn thể xã, Trưởng các thôn và các cá nhân có liên quan "
    "chịu trách nhiệm thi hành. Văn bản này có hiệu lực kể từ ngày ký.",
    "Đề nghị các đơn vị nghiêm túc triển khai, bảo đảm đúng tiến độ, chất lượng, tiết kiệm và hiệu "
    "quả; phản ánh kịp thời những vấn đề phát sinh về Thường trực để xem xét, giải quyết.",
)
VILLAGES = ("Nà Nưa", "Tân Lập", "Cây Thông", "Mỏ Ché", "Đồng Đa", "Khuôn Thống", "Lũng Búng")
FIELD_NAMES = ("so_ky_hieu", "ngay", "loai", "co_quan", "trich_yeu", "nguoi_ky")


@dataclass(frozen=True, slots=True)
class Document:
    """One generated document: what is printed, and what an archivist would type."""

    party: bool
    kind: str                 # printed type, e.g. "QUYẾT ĐỊNH"
    parent: str               # superior body line, e.g. "UBND HUYỆN SƠN DƯƠNG"
    body_lines: tuple[str, ...]   # issuing body, possibly on two lines
    number: str               # "125/QĐ-UBND"
    place: str
    day: int
    month: int
    year: int
    subject: str              # "Về việc …" / "V/v …" text after the prefix
    paragraphs: tuple[str, ...]
    capacity: tuple[str, ...]   # "TM. ỦY BAN NHÂN DÂN", "CHỦ TỊCH"
    signer: str
    recipients: tuple[str, ...]
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Degradation:
    """How a page is spoiled after rendering; the defaults are a clean 300 dpi scan."""

    dpi: int = 300
    skew: float = 0.0          # degrees, counter-clockwise
    rotate: int = 0            # 0, 90, 180, 270: a page fed the wrong way
    noise: float = 0.0         # standard deviation of added grey noise
    jpeg_quality: int | None = None
    blur: float = 0.0
    photo: bool = False        # perspective, uneven light, no DPI in the file
    exif_72: bool = False      # a phone's "72 dpi" written into the file


@dataclass(frozen=True, slots=True)
class TestPage:
    name: str
    document: Document
    degradation: Degradation
    truth: str                 # text in reading order, lines separated by "\n"


def _font_path(style: str) -> Path:
    for template in TIMES_CANDIDATES:
        if "dejavu" in str(template):
            path = Path(str(template).replace("-{style}", _DEJAVU_STYLE[style]))
        else:
            path = Path(str(template).format(style=style))
        if path.exists():
            return path
    raise FileNotFoundError("no Times-compatible font: install fonts-liberation2")


def make_document(rng: random.Random, index: int) -> Document:
    kind, loai, symbol, subjects = KINDS[index % len(KINDS)]
    party = symbol.endswith("ĐU")
    commune, district, _province = rng.choice(COMMUNES)
    year = rng.choice((2023, 2024, 2025))
    day, month = rng.randint(1, 28), rng.randint(1, 12)
    number = rng.randint(1, 350)
    person, signer = rng.sample(SIGNERS, 2)
    quarter = rng.choice(("I", "II", "III", "IV"))
    subject = rng.choice(subjects).format(year=year, month=month, quarter=quarter)
    values = {"person": person, "village": rng.choice(VILLAGES), "year": year,
              "deadline": rng.randint(10, 30)}
    paragraphs = tuple(p.format(**values) for p in rng.sample(BODY, 3))
    lines: tuple[str, ...]
    if party:
        parent, lines = f"ĐẢNG BỘ HUYỆN {district.upper()}", ("ĐẢNG ỦY XÃ " + commune.upper(),)
        number_text = f"{number}-{symbol}"
        capacity = ("T/M ĐẢNG ỦY", "BÍ THƯ")
        recipients = ("- Ban Thường vụ Huyện ủy,", "- Các chi bộ trực thuộc,", "- Lưu Văn phòng Đảng ủy.")
        co_quan = f"Đảng ủy xã {commune}"
    else:
        parent, lines = f"UBND HUYỆN {district.upper()}", ("ỦY BAN NHÂN DÂN", "XÃ " + commune.upper())
        number_text = f"{number}/{symbol}"
        capacity = ("TM. ỦY BAN NHÂN DÂN", "CHỦ TỊCH") if rng.random() < 0.6 else (
            "KT. CHỦ TỊCH", "PHÓ CHỦ TỊCH")
        recipients = ("- Như Điều 3;", f"- UBND huyện {district};", "- Lưu: VT.")
        co_quan = f"Ủy ban nhân dân xã {commune}"
    prefix = "V/v" if kind == "CÔNG VĂN" else "Về việc"
    fields = {"so_ky_hieu": number_text, "ngay": f"{year:04d}-{month:02d}-{day:02d}", "loai": loai,
              "co_quan": co_quan, "trich_yeu": f"{prefix} {subject}", "nguoi_ky": signer}
    return Document(party, kind, parent, lines, number_text, commune, day, month, year, subject,
                    paragraphs, capacity, signer, recipients, fields)


def truth_text(doc: Document) -> str:
    """The page's text in reading order: rows from top to bottom, and on one row left before right
    (how tesseract reads the two header columns and the signature block: line-interleaved)."""
    placed: list[tuple[int, int, int, str]] = []
    render(doc, dpi=100, placed=placed)
    rows: list[list[tuple[int, int, int, str]]] = []
    for item in sorted(placed):
        y, _, height, _ = item
        if rows and abs(rows[-1][0][0] - y) < height / 2:
            rows[-1].append(item)
        else:
            rows.append([item])
    return "\n".join(" ".join(text for _, _, _, text in sorted(row, key=lambda i: i[1])) for row in rows)


def _date_line(doc: Document) -> str:
    # Decree 30 annex I: days below 10 and months below 3 are written with a leading zero.
    day = f"{doc.day:02d}" if doc.day < 10 else str(doc.day)
    month = f"{doc.month:02d}" if doc.month < 3 else str(doc.month)
    return f"{doc.place}, ngày {day} tháng {month} năm {doc.year}"


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width)


def render(doc: Document, dpi: int = 300,
           placed: list[tuple[int, int, int, str]] | None = None) -> Image.Image:
    """Draw the document on white A4 at ``dpi`` (grayscale), in Decree 30's positions and sizes.
    Each line of text drawn is appended to ``placed`` as (y, x, height, text)."""
    width, height = (round(side * dpi) for side in A4_INCHES)
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)

    def put(xy: tuple[float, float], text: str, f: ImageFont.FreeTypeFont) -> None:
        draw.text(xy, text, font=f, fill=0)
        if placed is not None and text != "*":   # the Party's star is decoration, not text
            placed.append((round(xy[1]), round(xy[0]), round(f.size), text))

    def font(style: str, points: float) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(str(_font_path(style)), round(points / 72 * dpi))

    def px(mm: float) -> int:
        return round(mm / 25.4 * dpi)

    left_x0, left_x1 = px(25), px(25 + 70)      # left margin 30-35 mm; header columns
    right_x0, right_x1 = px(85), px(205)
    body_x0, body_x1 = px(30), px(190)
    regular, bold, italic = font("Regular", 13), font("Bold", 13), font("Italic", 14)
    step = round(13 / 72 * dpi * 1.45)

    def centred(text: str, x0: int, x1: int, y: int, f: ImageFont.FreeTypeFont) -> int:
        w = draw.textlength(text, font=f)
        put(((x0 + x1 - w) / 2, y), text, f)
        return round(w)

    def rule(x0: int, x1: int, y: int, w: int) -> None:
        mid = (x0 + x1) / 2
        draw.line([(mid - w / 2, y), (mid + w / 2, y)], fill=0, width=max(1, dpi // 150))

    y0 = px(20)
    y = y0
    centred(doc.parent, left_x0, left_x1, y, font("Regular", 12))
    y += step
    for line in doc.body_lines:
        w = centred(line, left_x0, left_x1, y, font("Bold", 12.5))
        y += step
    if doc.party:
        centred("*", left_x0, left_x1, y - step // 4, bold)
    else:
        rule(left_x0, left_x1, y + step // 8, w // 3)
    y += step // 2
    centred(f"Số {doc.number}" if doc.party else f"Số: {doc.number}", left_x0, left_x1, y, regular)
    y += step
    if doc.kind == "CÔNG VĂN":
        for line in _wrap(f"V/v {doc.subject}", 34):
            centred(line, left_x0, left_x1, y, font("Regular", 12))
            y += step
    left_end = y
    y = y0
    if doc.party:
        w = centred("ĐẢNG CỘNG SẢN VIỆT NAM", right_x0, right_x1, y, font("Bold", 14))
        rule(right_x0, right_x1, y + step, w)
        y += step
    else:
        centred("CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM", right_x0, right_x1, y, font("Bold", 12.5))
        y += step
        w = centred("Độc lập - Tự do - Hạnh phúc", right_x0, right_x1, y, font("Bold", 13.5))
        y += step
        rule(right_x0, right_x1, y + step // 8 - step // 3, w)
    y += step // 2
    centred(_date_line(doc), right_x0, right_x1, y, italic)
    y = max(left_end, y + step) + step
    if doc.kind != "CÔNG VĂN":
        centred(doc.kind, body_x0, body_x1, y, font("Bold", 14))
        y += step
        for line in _wrap(f"Về việc {doc.subject}", 52):
            centred(line, body_x0, body_x1, y, font("Bold", 14))
            y += step
        y += step
    for paragraph in doc.paragraphs:
        for number, line in enumerate(_wrap(paragraph, 78)):
            put((body_x0 + (px(10) if number == 0 else 0), y), line, font("Regular", 13.5))
            y += step
        y += step // 3
    y += step
    sign_y = y
    put((body_x0, y), "Nơi nhận:", font("BoldItalic", 12))
    y += step
    for line in doc.recipients:
        put((body_x0, y), line, font("Regular", 11))
        y += round(step * 0.85)
    y = sign_y
    sign_x0, sign_x1 = px(110), px(190)
    for line in doc.capacity:
        centred(line, sign_x0, sign_x1, y, font("Bold", 13.5))
        y += step
    y += step * 3
    centred(doc.signer, sign_x0, sign_x1, y, font("Bold", 13.5))
    return image


def degrade(image: Image.Image, spec: Degradation, rng: random.Random) -> Image.Image:
    """A clean render → what a scanner or a phone would deliver (pixels only; the file comes later)."""
    if spec.photo:
        image = _photo(image, rng)
    if spec.blur:
        image = image.filter(ImageFilter.GaussianBlur(spec.blur))
    if spec.skew:
        image = image.rotate(spec.skew, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=255)
    if spec.noise:
        image = _add_noise(image, spec.noise)
    if spec.rotate:
        image = image.rotate(spec.rotate, expand=True)
    return image


def _add_noise(image: Image.Image, sigma: float) -> Image.Image:
    noise = Image.effect_noise(image.size, sigma)   # Gaussian around 128: split into +/- parts
    positive = noise.point([max(0, v - 128) for v in range(256)])
    negative = noise.point([max(0, 128 - v) for v in range(256)])
    return ImageChops.subtract(ImageChops.add(image, positive), negative)


def _photo(image: Image.Image, rng: random.Random) -> Image.Image:
    """Perspective, uneven light and a soft focus, as a clerk's phone photo on a desk."""
    w, h = image.size
    margin = 0.04
    # Destination quad corners jittered inwards: the page is seen slightly from one side.
    jitter = [(rng.uniform(0, margin) * w, rng.uniform(0, margin) * h) for _ in range(4)]
    quad = (jitter[0][0], jitter[0][1], jitter[1][0], h - jitter[1][1],
            w - jitter[2][0], h - jitter[2][1], w - jitter[3][0], jitter[3][1])
    canvas = Image.new("L", (round(w * 1.08), round(h * 1.06)), 90)   # a dark desk around the page
    page = image.transform((w, h), Image.Transform.QUAD, quad, resample=Image.Resampling.BICUBIC,
                           fillcolor=90)
    canvas.paste(page, (round(w * 0.04), round(h * 0.03)))
    light = Image.linear_gradient("L").resize(canvas.size).rotate(rng.uniform(0, 360))
    light = light.point(lambda v: 170 + v * 85 // 255)
    canvas = ImageChops.multiply(canvas, light)
    return canvas.filter(ImageFilter.GaussianBlur(0.7))


def encode(image: Image.Image, spec: Degradation) -> tuple[bytes, str]:
    """The file a device would write: (bytes, extension). Photos carry no DPI (or a phone's 72)."""
    buffer = io.BytesIO()
    if spec.photo or spec.jpeg_quality:
        quality = spec.jpeg_quality or 80
        rgb = image.convert("RGB")
        if spec.exif_72:
            exif = Image.Exif()
            exif[0x011A], exif[0x011B], exif[0x0128] = 72.0, 72.0, 2   # X/YResolution, inches
            rgb.save(buffer, format="JPEG", quality=quality, exif=exif.tobytes())
        elif spec.photo:
            rgb.save(buffer, format="JPEG", quality=quality)        # JFIF density 1:1, no unit
        else:
            rgb.save(buffer, format="JPEG", quality=quality, dpi=(spec.dpi, spec.dpi))
        return buffer.getvalue(), "jpg"
    image.save(buffer, format="PNG", dpi=(spec.dpi, spec.dpi))
    return buffer.getvalue(), "png"


def plan(count: int, seed: int = 0) -> list[Degradation]:
    """A mix of conditions: clean, skewed, noisy, JPEG, 150-300 dpi, rotated, phone photos."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not security
    mix = []
    for index in range(count):
        slot = index % 10
        dpi = rng.choice((150, 200, 300))
        if slot in (0, 1):
            spec = Degradation(dpi=dpi)
        elif slot == 2:
            spec = Degradation(dpi=dpi, skew=rng.choice((-1, 1)) * rng.uniform(1.5, 4.0))
        elif slot == 3:
            spec = Degradation(dpi=dpi, noise=rng.uniform(20, 40), jpeg_quality=rng.randint(40, 70))
        elif slot == 4:
            spec = Degradation(dpi=dpi, rotate=180)
        elif slot == 5:
            spec = Degradation(dpi=dpi, rotate=rng.choice((90, 270)), skew=rng.uniform(-1.5, 1.5))
        elif slot == 6:
            spec = Degradation(dpi=rng.choice((150, 200)), photo=True, exif_72=rng.random() < 0.5)
        elif slot == 7:
            spec = Degradation(dpi=dpi, skew=rng.uniform(-2.5, 2.5), noise=15, blur=0.6)
        elif slot == 8:
            spec = Degradation(dpi=rng.choice((150, 200)), photo=True, rotate=180)
        else:
            spec = Degradation(dpi=150, jpeg_quality=55)
        mix.append(spec)
    return mix


def generate(out_dir: Path, count: int = 30, *, seed: int = 0,
             mix: list[Degradation] | None = None) -> list[tuple[Path, TestPage]]:
    """Write ``count`` test pages into ``out_dir``; return each file with its ground truth."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not security
    specs = mix if mix is not None else plan(count, seed)
    written = []
    for index, spec in enumerate(specs[:count]):
        doc = make_document(rng, index)
        image = degrade(render(doc, spec.dpi), spec, rng)
        data, ext = encode(image, spec)
        name = f"{index:03d}-{_slug(spec)}.{ext}"
        path = out_dir / name
        path.write_bytes(data)
        written.append((path, TestPage(name, doc, spec, truth_text(doc))))
    return written


def _slug(spec: Degradation) -> str:
    parts = [f"{spec.dpi}dpi"]
    if spec.photo:
        parts.append("photo")
    if spec.rotate:
        parts.append(f"rot{spec.rotate}")
    if spec.skew:
        parts.append(f"skew{spec.skew:+.1f}")
    if spec.noise:
        parts.append("noise")
    if spec.jpeg_quality:
        parts.append(f"q{spec.jpeg_quality}")
    return "-".join(parts)
