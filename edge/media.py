"""Decide what a scanned file is before spending OCR time on it, and refuse what we cannot archive.

Everything is checked on the file descriptor we actually read (opened with O_NOFOLLOW|O_NONBLOCK,
then fstat), so a path swapped for a symlink or FIFO between checks cannot trick us. The type is
sniffed from magic bytes, not the extension: scanners and clerks name files freely.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pypdfium2 as pdfium
from PIL import Image, UnidentifiedImageError

from edge.errors import BadInputError
from protocol.bag import MEDIA_EXTENSIONS

# A0 at 300 dpi is ~140 Mpx; anything larger is a decompression bomb, not a commune scan.
MAX_PIXELS = 150_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# What one OCR page may cost, in pixels handed to tesseract. tesseract needs roughly 10-16 bytes per
# pixel (a 4000 pt PDF page at 300 dpi, 278 Mpx, took the edge to 4.5 GiB): 40 Mpx keeps one worker
# under ~700 MiB, two workers inside a 2 GB box. A2 at 300 dpi (35 Mpx) fits as is; larger pages are
# rendered at a lower resolution, never below MIN_OCR_DPI.
MAX_PAGE_PIXELS = 40_000_000
# Body text of an administrative document is 13-14 pt (Decree 30/2020 annex I): at 150 dpi its
# capitals are ~19 px high, the least tesseract reads well. Below that we refuse rather than archive
# garbage. With the cap above, the largest page accepted is about A0.
MIN_OCR_DPI = 150

_PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/tiff": "TIFF"}


@dataclass(frozen=True, slots=True)
class MediaInfo:
    media_type: str
    pages: int
    size: int

    def __post_init__(self) -> None:
        if self.media_type not in MEDIA_EXTENSIONS:
            raise ValueError(f"unsupported media type {self.media_type!r}")


def sniff(head: bytes) -> str | None:
    """Media type from the first bytes of a file, or None if it is not one we archive."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "image/tiff"
    # PDF readers accept the header anywhere in the first KiB (some scanners prepend junk).
    if b"%PDF-" in head[:1024]:
        return "application/pdf"
    return None


@contextlib.contextmanager
def open_regular(path: Path, *, max_bytes: int) -> Iterator[tuple[BinaryIO, int]]:
    """Open ``path`` for reading only if it is a non-empty regular file within ``max_bytes``."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise BadInputError("the file disappeared before it could be read") from None
    _check_stat(info, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInputError("the file is a symbolic link, not a scan") from None
        raise BadInputError(f"the file cannot be opened: {exc.strerror}") from None
    handle = os.fdopen(fd, "rb")
    with handle:
        info = os.fstat(fd)
        _check_stat(info, max_bytes)  # what we opened, not what we lstat'ed a moment ago
        os.set_blocking(fd, True)
        yield handle, info.st_size


def _check_stat(info: os.stat_result, max_bytes: int) -> None:
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        raise BadInputError("the file is a symbolic link, not a scan")
    if stat.S_ISFIFO(mode):
        raise BadInputError("the file is a FIFO (named pipe), not a scan")
    if not stat.S_ISREG(mode):
        raise BadInputError("the file is a device, socket or folder, not a scan")
    if info.st_size == 0:
        raise BadInputError("the file is empty (0 bytes); the scan did not complete")
    if info.st_size > max_bytes:
        raise BadInputError(f"the file is {info.st_size / 2**20:.0f} MiB, above the limit of "
                            f"{max_bytes / 2**20:.0f} MiB")


def plan_pdf_dpi(width_pt: float, height_pt: float, *, wanted: int, index: int = 0,
                 max_pixels: int = MAX_PAGE_PIXELS, floor: int = MIN_OCR_DPI) -> int:
    """The resolution to render a PDF page at: ``wanted``, lowered to fit ``max_pixels``, never below
    ``floor`` (then the page is refused). Pure arithmetic on the page size: nothing is rendered."""
    if not (0 < width_pt < math.inf and 0 < height_pt < math.inf):
        raise BadInputError(f"page {index + 1} of the PDF has no size ({width_pt} × {height_pt} pt)")
    fit = int(72 * math.sqrt(max_pixels / (width_pt * height_pt)))
    dpi = min(wanted, fit)
    if dpi < floor:
        mm = (round(width_pt / 72 * 25.4), round(height_pt / 72 * 25.4))
        raise BadInputError(
            f"page {index + 1} of the PDF is {mm[0]} × {mm[1]} mm, larger than any paper a scanner "
            f"takes (A0 is 841 × 1189 mm): reading it even at {floor} dpi would need "
            f"{width_pt * height_pt * (floor / 72) ** 2 / 1e6:.0f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.0f}; scan the document at its real paper size")
    return dpi


def probe(path: Path, *, max_bytes: int = 512 * 1024 * 1024, max_pages: int = 1000,
          max_pixels: int = MAX_PIXELS) -> MediaInfo:
    """Identify and fully decode-check a scan; raise :class:`BadInputError` with a clear reason."""
    with open_regular(path, max_bytes=max_bytes) as (handle, size):
        head = handle.read(1024)
        media_type = sniff(head)
        if media_type is None:
            raise BadInputError("the file is not a PNG, JPEG, TIFF or PDF (checked its content, "
                                "not its name)")
        handle.seek(0)
        if media_type == "application/pdf":
            pages = _pdf_pages(handle, max_pages)
        else:
            pages = _image_pages(handle, media_type, max_pages, max_pixels)
    return MediaInfo(media_type, pages, size)


def _image_pages(handle: BinaryIO, media_type: str, max_pages: int, max_pixels: int) -> int:
    kind = media_type.removeprefix("image/").upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle, formats=[_PIL_FORMATS[media_type]]) as image:
                return _decode_frames(image, media_type, max_pages, max_pixels)
    except BadInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInputError(f"the {kind} image is too large in pixels (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise BadInputError(f"the file looks like {kind} but cannot be read as one") from None
    except Exception as exc:
        # Pillow's decoders raise whatever a malformed header trips over (TypeError, KeyError,
        # struct.error, ...): any failure to decode a scan means the scan is unusable.
        raise BadInputError(f"the {kind} image is truncated or corrupt ({exc!r})") from None


def _decode_frames(image: Image.Image, media_type: str, max_pages: int, max_pixels: int) -> int:
    # Decode every frame: a truncated scan only shows itself when the pixels are read.
    frames: int = getattr(image, "n_frames", 1) if media_type == "image/tiff" else 1
    if frames > max_pages:
        raise BadInputError(f"the TIFF has {frames} pages, above the limit of {max_pages}")
    for index in range(frames):
        image.seek(index)
        width, height = image.size
        if width * height > max_pixels or not width or not height:
            raise BadInputError(f"page {index + 1} is {width}×{height} pixels, above "
                                f"the limit of {max_pixels} (a decompression bomb?)")
        image.load()
    return frames


def _pdf_pages(handle: BinaryIO, max_pages: int) -> int:
    try:
        document = pdfium.PdfDocument(handle)
    except pdfium.PdfiumError as exc:
        message = str(exc)
        if "password" in message.lower():
            raise BadInputError("the PDF is password-protected (encrypted); scan it without a "
                                "password") from None
        raise BadInputError(f"the PDF is damaged and cannot be opened ({message})") from None
    try:
        pages = len(document)
        if pages == 0:
            raise BadInputError("the PDF has no pages")
        if pages > max_pages:
            raise BadInputError(f"the PDF has {pages} pages, above the limit of {max_pages}")
        for index in range(pages):
            try:
                page = document[index]
            except pdfium.PdfiumError as exc:
                raise BadInputError(f"page {index + 1} of the PDF is damaged ({exc})") from None
            try:
                width, height = page.get_size()
                # Caps before work: the page must be readable within the pixel cap at the lowest
                # resolution we accept, decided from its size alone (rendering is what costs).
                plan_pdf_dpi(width, height, wanted=MIN_OCR_DPI, index=index)
            finally:
                page.close()
    finally:
        document.close()
    return pages
