"""The archival copy: a PDF/A-2b per document, built from the original scan and the hOCR the edge
sent (the edge does not send a second copy). Not wired into ingest yet; the original is never
touched, this file is written beside it.

- Images are embedded without re-encoding where the format allows (img2pdf's approach): a JPEG
  original's bytes become the page's DCT stream as they are; so do the full-page JPEG images of a
  scanner's PDF. PNG and TIFF pages are embedded losslessly (Flate over the decoded pixels). Any other
  PDF page is rendered at 300 dpi (the Decree 30 annex I minimum is 200) and stored as JPEG.
- An invisible text layer (rendering mode 3) from the hOCR, one positioned run per word (OCRmyPDF's
  hOCR renderer approach), in a glyphless embedded font (tesseract's ``pdf.ttf``) with a ToUnicode
  map, so the text is searchable and copyable and nothing of it is drawn.
- The edge OCR'd a *prepared* page (turned upright, deskewed, maybe shrunk to the pixel cap): the
  page's ``OcrPage`` record maps hOCR boxes back onto the original image, and a page that needed
  turning gets ``/Rotate`` so it is shown upright.
- PDF/A-2b: XMP with pdfaid part 2 / conformance B, an sRGB output intent, fonts embedded, no
  encryption, no transparency; a document ID in the trailer.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pikepdf
from PIL import Image, ImageCms

from protocol.bag import OcrPage
from protocol.hocr import Page, parse_hocr

GLYPHLESS_FONT = Path(__file__).parent / "fonts" / "glyphless.ttf"
RENDER_DPI = 300
JPEG_QUALITY = 90
# The glyphless font's single glyph is half an em wide (tesseract's pdf renderer: /DW 500).
GLYPH_WIDTH = 0.5


@dataclass(frozen=True, slots=True)
class PageImage:
    """One page's picture as it goes into the PDF: an image XObject's stream and its geometry."""

    data: bytes
    filter: str | None          # "/DCTDecode", "/FlateDecode"
    width: int
    height: int
    colorspace: str             # "/DeviceGray", "/DeviceRGB"
    bits: int
    dpi: float


def build_pdfa(original: Path, media_type: str, hocr: str, out: Path, *, title: str,
               page_info: Sequence[OcrPage] = (), created: dt.datetime | None = None) -> None:
    """Write the PDF/A-2b archival copy of ``original`` to ``out`` (unsigned; see archive_sign)."""
    images = page_images(original, media_type, page_info)
    hocr_pages = parse_hocr(hocr)
    pdf = pikepdf.new()
    font = _glyphless_font(pdf)
    for index, image in enumerate(images):
        info = page_info[index] if index < len(page_info) else None
        words = hocr_pages[index] if index < len(hocr_pages) else None
        _add_page(pdf, image, words, info, font)
    _make_pdfa(pdf, title=title, created=created or dt.datetime.now(dt.UTC))
    pdf.save(out, linearize=False, object_stream_mode=pikepdf.ObjectStreamMode.generate,
             fix_metadata_version=True)


# ---- pages ------------------------------------------------------------------------------------------

def page_images(original: Path, media_type: str, page_info: Sequence[OcrPage] = ()) -> list[PageImage]:
    """The pictures of every page, passed through untouched where the format allows."""
    if media_type == "image/jpeg":
        data = original.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            if image.mode in ("L", "RGB"):
                dpi = _dpi(image, page_info[0] if page_info else None)
                space = "/DeviceGray" if image.mode == "L" else "/DeviceRGB"
                return [PageImage(data, "/DCTDecode", image.width, image.height, space, 8, dpi)]
            return [_flate(image.convert("RGB"), _dpi(image, page_info[0] if page_info else None))]
    if media_type == "application/pdf":
        return _pdf_pages(original, page_info)
    pages = []
    with Image.open(original) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            info = page_info[index] if index < len(page_info) else None
            pages.append(_flate(image, _dpi(image, info)))
    return pages


def _dpi(image: Image.Image, info: OcrPage | None) -> float:
    declared = image.info.get("dpi", (0, 0))[0]
    try:
        value = float(declared)
    except (TypeError, ValueError):
        value = 0.0
    if 100 <= value <= 1200:
        return value
    # No plausible resolution in the file: the edge's estimate (from the text) sizes the page,
    # scaled from the OCR'd image back to the original's pixels.
    if info is not None and info.dpi and info.width:
        turned = info.rotation in (90, 270)
        ocr_width = info.height if turned else info.width
        return max(50.0, info.dpi * image.width / max(1, ocr_width))
    return 200.0


def _flate(image: Image.Image, dpi: float) -> PageImage:
    if image.mode == "1":
        # 1-bit: PDF's DeviceGray with 1 bit per component reads 0 as black, as PIL packs it.
        return PageImage(zlib.compress(image.tobytes(), 9), "/FlateDecode", image.width, image.height,
                         "/DeviceGray", 1, dpi)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB" if image.mode in ("RGBA", "P", "CMYK", "LA", "I;16") else "L")
    space = "/DeviceGray" if image.mode == "L" else "/DeviceRGB"
    return PageImage(zlib.compress(image.tobytes(), 9), "/FlateDecode", image.width, image.height,
                     space, 8, dpi)


def _pdf_pages(original: Path, page_info: Sequence[OcrPage]) -> list[PageImage]:
    """A scanner's PDF usually holds one full-page JPEG per page: reuse its bytes as they are."""
    pages: list[PageImage] = []
    with pikepdf.open(original) as source:
        for index, page in enumerate(source.pages):
            reused = _single_jpeg(page)
            if reused is not None:
                pages.append(reused)
                continue
            pages.append(_render_pdf_page(original, index))
    del page_info
    return pages


def _single_jpeg(page: pikepdf.Page) -> PageImage | None:
    images = list(page.get_images().values())
    if len(images) != 1:
        return None
    stream = images[0]
    filters = stream.get("/Filter")
    chain = list(filters) if isinstance(filters, pikepdf.Array) else [filters]
    if not chain or chain[-1] != pikepdf.Name.DCTDecode or stream.get("/SMask") is not None:
        return None
    space = stream.get("/ColorSpace")
    if space not in (pikepdf.Name.DeviceGray, pikepdf.Name.DeviceRGB):
        return None
    width, height = int(stream.Width), int(stream.Height)
    box = page.mediabox
    page_width_in = float(box[2] - box[0]) / 72
    if page_width_in <= 0:
        return None
    # Outer filters (ASCII85, Flate) are undone; the JPEG bytes inside are kept as they are.
    jpeg = _undo_outer_filters(stream.read_raw_bytes(), chain[:-1]) if "/DecodeParms" not in stream else (
        stream.read_raw_bytes() if len(chain) == 1 else None)
    if jpeg is None or not jpeg.startswith(b"\xff\xd8"):
        return None
    return PageImage(jpeg, "/DCTDecode", width, height, str(space), 8, width / page_width_in)


def _undo_outer_filters(data: bytes, outer: Sequence[object]) -> bytes | None:
    for name in outer:
        if name == pikepdf.Name.ASCII85Decode:
            body = data.strip()
            data = base64.a85decode(body.removesuffix(b"~>"), adobe=False, ignorechars=b" \t\n\r\x0b")
        elif name == pikepdf.Name.ASCIIHexDecode:
            data = bytes.fromhex(data.strip().removesuffix(b">").decode("ascii"))
        elif name == pikepdf.Name.FlateDecode:
            data = zlib.decompress(data)
        else:
            return None
    return data


def _render_pdf_page(original: Path, index: int) -> PageImage:
    import pypdfium2 as pdfium  # noqa: PLC0415 - only for PDF pages that are not one JPEG

    document = pdfium.PdfDocument(str(original))
    try:
        image = document[index].render(scale=RENDER_DPI / 72).to_pil().convert("RGB")
    finally:
        document.close()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return PageImage(buffer.getvalue(), "/DCTDecode", image.width, image.height, "/DeviceRGB", 8,
                     RENDER_DPI)


def _add_page(pdf: pikepdf.Pdf, image: PageImage, words: Page | None, info: OcrPage | None,
              font: pikepdf.Object) -> None:
    width_pt, height_pt = image.width * 72 / image.dpi, image.height * 72 / image.dpi
    xobject = pikepdf.Stream(pdf, image.data)
    xobject.Type, xobject.Subtype = pikepdf.Name.XObject, pikepdf.Name.Image
    xobject.Width, xobject.Height, xobject.BitsPerComponent = image.width, image.height, image.bits
    xobject.ColorSpace = pikepdf.Name(image.colorspace)
    if image.filter:
        xobject.Filter = pikepdf.Name(image.filter)
    content = [f"q {width_pt:.3f} 0 0 {height_pt:.3f} 0 0 cm /Im0 Do Q"]
    if words is not None and words.lines:
        content.append(text_layer(words, info, image))
    page = pikepdf.Dictionary(
        Type=pikepdf.Name.Page, MediaBox=[0, 0, round(width_pt, 3), round(height_pt, 3)],
        Resources=pikepdf.Dictionary(XObject=pikepdf.Dictionary(Im0=xobject),
                                     Font=pikepdf.Dictionary(F0=font)),
        Contents=pikepdf.Stream(pdf, "\n".join(content).encode("ascii")))
    if info is not None and info.rotation:
        page.Rotate = info.rotation   # shown upright; the image itself stays as scanned
    pdf.pages.append(pikepdf.Page(page))


# ---- the text layer ---------------------------------------------------------------------------------

def text_layer(page: Page, info: OcrPage | None, image: PageImage) -> str:
    """Content-stream operators that put every hOCR word, invisible, over the original image."""
    to_original = _inverse_preparation(info, image.width, image.height)
    scale = 72 / image.dpi
    ops = ["BT", "3 Tr"]
    for line in page.lines:
        for word in line.words:
            text = "".join(c for c in word.text if ord(c) <= 0xFFFF)
            if not text:
                continue
            x0, y0, x1, y1 = word.box
            # Baseline approximated by the box's bottom edge, in the prepared image.
            left = to_original(x0, y1)
            right = to_original(x1, y1)
            top = to_original(x0, y0)
            dx, dy = (right[0] - left[0]) * scale, -(right[1] - left[1]) * scale
            length = math.hypot(dx, dy)
            size = math.hypot(top[0] - left[0], top[1] - left[1]) * scale
            if length <= 0 or size <= 0:
                continue
            cos, sin = dx / length, dy / length
            stretch = 100 * length / (GLYPH_WIDTH * size * len(text))
            x, y = left[0] * scale, (image.height - left[1]) * scale
            encoded = "".join(f"{ord(c):04X}" for c in text)
            ops.append(f"/F0 {size:.2f} Tf {stretch:.2f} Tz {cos:.5f} {sin:.5f} {-sin:.5f} {cos:.5f} "
                       f"{x:.2f} {y:.2f} Tm <{encoded}> Tj")
    ops.append("ET")
    return "\n".join(ops)


def _inverse_preparation(info: OcrPage | None, width: int,
                         height: int) -> Callable[[float, float], tuple[float, float]]:
    """A function from the OCR'd (prepared) image's pixels to the original image's pixels.

    The edge turned the page clockwise by ``rotation``, possibly shrank it, then deskewed it
    (PIL's counter-clockwise ``rotate(skew, expand=True)``); this undoes those steps in reverse."""
    rotation = info.rotation if info else 0
    skew = math.radians(info.skew) if info else 0.0
    turned_w, turned_h = (height, width) if rotation in (90, 270) else (width, height)
    if info is not None and info.width and info.height:
        cos_a, sin_a = abs(math.cos(skew)), abs(math.sin(skew))
        # The prepared width is the deskew-expanded width of the shrunk, turned page.
        shrink = info.width / max(1e-9, turned_w * cos_a + turned_h * sin_a)
        prepared_w, prepared_h = info.width, info.height
    else:
        shrink, prepared_w, prepared_h = 1.0, turned_w, turned_h
    small_w, small_h = turned_w * shrink, turned_h * shrink
    cos, sin = math.cos(skew), math.sin(skew)

    def undo(x: float, y: float) -> tuple[float, float]:
        # Deskew: out = c' + M (in - c) with M = [[cos, sin], [-sin, cos]] (y down); invert with Mᵀ.
        dx, dy = x - prepared_w / 2, y - prepared_h / 2
        sx, sy = small_w / 2 + cos * dx - sin * dy, small_h / 2 + sin * dx + cos * dy
        tx, ty = sx / shrink, sy / shrink
        # Clockwise turns, undone.
        if rotation == 90:
            return ty, height - tx
        if rotation == 180:
            return width - tx, height - ty
        if rotation == 270:
            return width - ty, tx
        return tx, ty

    return undo


def _glyphless_font(pdf: pikepdf.Pdf) -> pikepdf.Object:
    """Type0 font over tesseract's one-glyph font: every code (UTF-16 code unit) draws glyph 1."""
    font_file = pikepdf.Stream(pdf, GLYPHLESS_FONT.read_bytes())
    font_file.Length1 = len(GLYPHLESS_FONT.read_bytes())
    descriptor = pdf.make_indirect(pikepdf.Dictionary(
        Type=pikepdf.Name.FontDescriptor, FontName=pikepdf.Name.GlyphLessFont, Flags=5,
        FontBBox=[0, 0, 500, 1000], ItalicAngle=0, Ascent=1000, Descent=0, CapHeight=1000,
        StemV=80, FontFile2=font_file))
    cid_to_gid = pikepdf.Stream(pdf, zlib.compress(b"\x00\x01" * 65536, 9))
    cid_to_gid.Filter = pikepdf.Name.FlateDecode
    cid_font = pdf.make_indirect(pikepdf.Dictionary(
        Type=pikepdf.Name.Font, Subtype=pikepdf.Name.CIDFontType2,
        BaseFont=pikepdf.Name.GlyphLessFont,
        CIDSystemInfo=pikepdf.Dictionary(Registry="Adobe", Ordering="Identity", Supplement=0),
        FontDescriptor=descriptor, DW=int(GLYPH_WIDTH * 1000), CIDToGIDMap=cid_to_gid))
    to_unicode = pikepdf.Stream(pdf, _IDENTITY_CMAP)
    return pdf.make_indirect(pikepdf.Dictionary(
        Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type0, BaseFont=pikepdf.Name.GlyphLessFont,
        Encoding=pikepdf.Name("/Identity-H"), DescendantFonts=[cid_font], ToUnicode=to_unicode))


_IDENTITY_CMAP = b"""/CIDInit /ProcSet findresource begin
12 dict begin
begincmap
/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def
/CMapName /Adobe-Identity-UCS def
/CMapType 2 def
1 begincodespacerange
<0000> <FFFF>
endcodespacerange
1 beginbfrange
<0000> <FFFF> <0000>
endbfrange
endcmap
CMapName currentdict /CMap defineresource pop
end
end
"""


# ---- PDF/A ------------------------------------------------------------------------------------------

def _make_pdfa(pdf: pikepdf.Pdf, *, title: str, created: dt.datetime) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    profile = pikepdf.Stream(pdf, icc)
    profile.N = 3
    pdf.Root.OutputIntents = [pikepdf.Dictionary(
        Type=pikepdf.Name.OutputIntent, S=pikepdf.Name.GTS_PDFA1,
        OutputConditionIdentifier="sRGB IEC61966-2.1", Info="sRGB IEC61966-2.1",
        DestOutputProfile=profile)]
    stamp = created.astimezone(dt.UTC).replace(microsecond=0)
    with pdf.open_metadata(set_pikepdf_as_editor=False) as meta:
        meta["dc:title"] = title
        meta["xmp:CreateDate"] = stamp.isoformat()
        meta["xmp:ModifyDate"] = stamp.isoformat()
        meta["xmp:CreatorTool"] = "sohoa central"
        meta["pdf:Producer"] = "sohoa central (pikepdf)"
        meta["pdfaid:part"] = "2"
        meta["pdfaid:conformance"] = "B"
