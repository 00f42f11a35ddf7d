"""A small PNG of a stored original's first page for the document page (PDF, JPEG, PNG, TIFF).

Rendering is bounded before any work: a PDF page is rasterised at the scale that fits it in
``MAX_SIDE`` pixels (its size in points decides the scale, not a dpi), and an image is opened in
draft mode (JPEG) and refused above Pillow's decompression-bomb limit. Recent previews are kept in
memory, keyed by content hash: one stored object is one preview whichever arrival asks.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from threading import Lock

MAX_SIDE = 1000
_CACHE_ITEMS = 64


class PreviewError(Exception):
    """The original cannot be previewed (not an image or PDF we render, or damaged)."""


def _pdf_first_page(path: Path) -> bytes:
    import pypdfium2  # noqa: PLC0415 - heavy; only the document page needs it

    pdf = pypdfium2.PdfDocument(str(path))
    try:
        if len(pdf) == 0:
            raise PreviewError("the PDF has no pages")
        page = pdf[0]
        width, height = page.get_size()
        if width <= 0 or height <= 0:
            raise PreviewError("the PDF page has no size")
        scale = min(MAX_SIDE / width, MAX_SIDE / height, 4.0)
        image = page.render(scale=scale).to_pil()
        return _png(image)
    finally:
        pdf.close()


def _image_first_frame(path: Path) -> bytes:
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (MAX_SIDE, MAX_SIDE))
        image.seek(0)
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        return _png(image.convert("RGB") if image.mode not in ("RGB", "L") else image)


def _png(image: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)  # type: ignore[attr-defined]
    return out.getvalue()


def render(path: Path, media_type: str) -> bytes:
    """PNG bytes of the first page; PreviewError if this kind of file or this file cannot be shown."""
    try:
        if media_type == "application/pdf":
            return _pdf_first_page(path)
        if media_type in ("image/jpeg", "image/png", "image/tiff"):
            return _image_first_frame(path)
    except PreviewError:
        raise
    except Exception as exc:   # a damaged file, a bomb: no preview, the rest of the page still works
        raise PreviewError(f"{type(exc).__name__}: {exc}") from exc
    raise PreviewError(f"no preview for {media_type}")


class PreviewCache:
    """The last ``_CACHE_ITEMS`` previews by sha256 (thread-safe: renders run in worker threads)."""

    def __init__(self, items: int = _CACHE_ITEMS) -> None:
        self._items = items
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._lock = Lock()

    def get_or_render(self, sha256: str, path: Path, media_type: str) -> bytes:
        with self._lock:
            if sha256 in self._data:
                self._data.move_to_end(sha256)
                return self._data[sha256]
        png = render(path, media_type)
        with self._lock:
            self._data[sha256] = png
            while len(self._data) > self._items:
                self._data.popitem(last=False)
        return png
