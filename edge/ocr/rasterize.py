"""Rasterise one page of a scan for OCR, within the pixel cap (DESIGN §9: caps before work).

PDF pages are rendered by PDFium at the wanted resolution, lowered to fit the cap (never below the
floor: then the page is refused); image frames are decoded by Pillow and shrunk to the cap. Only the
requested page is decoded. A resolution in an image file is believed only if it is plausible for a
paper document; otherwise the page's ``dpi`` is None and the engine estimates it (never assumed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import pypdfium2 as pdfium
from PIL import Image, ImageOps

from edge.errors import BadInputError
from edge.media import MAX_PAGE_PIXELS, MAX_PIXELS, open_regular, plan_pdf_dpi
from edge.ocr.model import PageImage

# Phone cameras write 72 dpi (a 4000 px photo would then be a 1.4 m page), screenshots 96.
MIN_PLAUSIBLE_DPI = 100
MAX_PLAUSIBLE_DPI = 1200
MAX_PLAUSIBLE_SIDE_INCHES = 47.0   # A0's long side


def plausible_dpi(declared: float | None, size_px: tuple[int, int]) -> int | None:
    """The file's resolution if it describes a real paper page, else None (estimate it instead)."""
    if not declared or not math.isfinite(declared):   # absent, zero, NaN or infinite
        return None
    dpi = round(declared)   # PNG stores pixels per metre: 100 dpi reads back as 99.9998
    if not MIN_PLAUSIBLE_DPI <= dpi <= MAX_PLAUSIBLE_DPI or max(size_px) / dpi > MAX_PLAUSIBLE_SIDE_INCHES:
        return None
    return dpi


def rasterize(path: Path, media_type: str, index: int, dpi: int,
              max_pixels: int = MAX_PAGE_PIXELS) -> PageImage:
    """Page ``index`` of ``path``, within ``max_pixels``, and the resolution known for it."""
    try:
        return _rasterize(path, media_type, index, dpi, max_pixels)
    except BadInputError:
        raise
    except MemoryError:
        raise BadInputError(f"page {index + 1} needs more memory than an OCR worker may use") from None
    except Exception as exc:  # any decoder failure on a page means the page is unusable
        raise BadInputError(f"page {index + 1} cannot be decoded for OCR ({exc!r})") from None


def _rasterize(path: Path, media_type: str, index: int, dpi: int, max_pixels: int) -> PageImage:
    # Re-checked here: the worker must not follow a symlink swapped in after probe().
    with open_regular(path, max_bytes=1 << 62) as (handle, _size):
        if media_type == "application/pdf":
            document = pdfium.PdfDocument(handle)
            try:
                page = document[index]
                try:
                    # The page's size decides the resolution before a single pixel is rendered.
                    width, height = page.get_size()
                    used = plan_pdf_dpi(width, height, wanted=dpi, index=index, max_pixels=max_pixels)
                    image = page.render(scale=used / 72, grayscale=True).to_pil().convert("L")
                finally:
                    page.close()
            finally:
                document.close()
            return PageImage(index, image, used)
        return _image_frame(handle, index, max_pixels)


def _image_frame(handle: BinaryIO, index: int, max_pixels: int) -> PageImage:
    with Image.open(handle) as source:
        source.seek(index)
        width, height = source.size
        if width * height > MAX_PIXELS:
            raise BadInputError(f"page {index + 1} is {width}×{height} pixels, above the limit of "
                                f"{MAX_PIXELS} (a decompression bomb?)")
        source.load()
        native = source.info.get("dpi", (0, 0))[0]
        image = ImageOps.exif_transpose(source.convert("RGB") if source.mode in ("P", "CMYK")
                                        else source.copy())
    if image.mode not in ("L", "1", "RGB"):
        image = image.convert("RGB")
    try:
        declared: float | None = float(native)
    except (TypeError, ValueError):
        declared = None
    resolution = plausible_dpi(declared, image.size)
    pixels = image.width * image.height
    if pixels > max_pixels:
        # A legitimately large scan (A3 at 600 dpi): read it at the largest size the cap allows.
        scale = math.sqrt(max_pixels / pixels)
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                             Image.Resampling.LANCZOS)
        resolution = max(1, int(resolution * scale)) if resolution else None
    return PageImage(index, image, resolution)
