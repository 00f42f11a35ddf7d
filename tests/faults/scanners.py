"""Scanner simulators: the ways real office scanners and clerks put files into a scan folder.

- :class:`StreamingPdf` writes a multi-page PDF page by page into an *open* file, the way a
  scanner's PDF encoder does: page objects as the sheets come through the feeder, the page tree,
  catalog, cross-reference table and trailer only when the last page is done. Between pages the
  file is a valid prefix that PDFium will still open (it rebuilds a missing xref) as fewer pages.
  With ``incremental=True`` every page ends in a complete incremental update instead, so the file
  is a *finished-looking* PDF after each page (some scanners and "scan to PDF" drivers do this).
- :func:`write_in_bursts` writes any file in place in several bursts with pauses, descriptor open.
- :func:`write_then_rename` writes a hidden temp name and renames it into place.
All writers are async so a test's event loop keeps running the real edge service meanwhile; each
pause is an ``asyncio.sleep`` standing in for the clerk turning a page, not a synchronisation.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from edge.samples import _document_pages, render_page

PDF_HEADER = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"


def page_jpegs(count: int, *, seed: int = 0, dpi: int = 150, kind: int = 0) -> list[tuple[bytes, int, int]]:
    """``count`` Vietnamese pages as grayscale JPEGs: (bytes, width px, height px)."""
    pages = _document_pages(kind, count, random.Random(seed))
    out = []
    for page in pages:
        image: Image.Image = render_page(page, dpi=dpi)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80, dpi=(dpi, dpi))
        out.append((buffer.getvalue(), image.width, image.height))
    return out


@dataclass
class StreamingPdf:
    """A PDF written into ``fd`` page by page. Object 1 is the catalog, 2 the page tree."""

    fd: int
    dpi: int = 150
    incremental: bool = False
    offset: int = 0
    kids: list[int] = field(default_factory=list)
    xref: dict[int, int] = field(default_factory=dict)
    next_obj: int = 3
    last_xref: int | None = None

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.offset += len(data)

    def _obj(self, number: int, body: bytes) -> None:
        self.xref[number] = self.offset
        self._write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")

    def start(self) -> None:
        self._write(PDF_HEADER)

    def add_page(self, jpeg: bytes, width: int, height: int) -> None:
        image, content, page = self.next_obj, self.next_obj + 1, self.next_obj + 2
        self.next_obj += 3
        w_pt, h_pt = width * 72 / self.dpi, height * 72 / self.dpi
        self._obj(image, (f"<< /Type /XObject /Subtype /Image /Width {width} /Height {height} "
                          f"/ColorSpace /DeviceGray /BitsPerComponent 8 /Filter /DCTDecode "
                          f"/Length {len(jpeg)} >>\nstream\n").encode() + jpeg + b"\nendstream")
        draw = f"q {w_pt:.2f} 0 0 {h_pt:.2f} 0 0 cm /Im0 Do Q".encode()
        self._obj(content, f"<< /Length {len(draw)} >>\nstream\n".encode() + draw + b"\nendstream")
        self._obj(page, (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w_pt:.2f} {h_pt:.2f}] "
                         f"/Resources << /XObject << /Im0 {image} 0 R >> >> /Contents {content} 0 R >>")
                  .encode())
        self.kids.append(page)
        if self.incremental:
            self._close_section(list(range(image, page + 1)))

    def _tree(self) -> list[int]:
        kids = " ".join(f"{k} 0 R" for k in self.kids)
        self._obj(2, f"<< /Type /Pages /Kids [{kids}] /Count {len(self.kids)} >>".encode())
        if 1 not in self.xref:
            self._obj(1, b"<< /Type /Catalog /Pages 2 0 R >>")
            return [1, 2]
        return [2]

    def _close_section(self, written: list[int]) -> None:
        """The page tree, an xref section for what this update wrote, the trailer, %%EOF."""
        numbers = sorted({*written, *self._tree()})
        xref_at = self.offset
        lines = [b"xref\n"]
        if self.last_xref is None:
            lines.append(b"0 1\n0000000000 65535 f \n")
        for number in numbers:
            lines.append(f"{number} 1\n{self.xref[number]:010d} 00000 n \n".encode())
        prev = f" /Prev {self.last_xref}" if self.last_xref is not None else ""
        lines.append(f"trailer\n<< /Size {self.next_obj} /Root 1 0 R{prev} >>\nstartxref\n{xref_at}\n%%EOF\n"
                     .encode())
        self._write(b"".join(lines))
        self.last_xref = xref_at

    def finish(self) -> None:
        if self.incremental:
            return   # every page already ended in a complete update
        numbers = sorted({*self.xref, *self._tree()})
        xref_at = self.offset
        body = [f"xref\n0 {max(numbers) + 1}\n0000000000 65535 f \n".encode()]
        for number in range(1, max(numbers) + 1):
            body.append(f"{self.xref[number]:010d} 00000 n \n".encode())
        body.append(f"trailer\n<< /Size {max(numbers) + 1} /Root 1 0 R >>\nstartxref\n{xref_at}\n%%EOF\n"
                    .encode())
        self._write(b"".join(body))


async def scan_pdf_page_by_page(path: Path, pages: list[tuple[bytes, int, int]], pauses: list[float], *,
                                incremental: bool = False, dpi: int = 150,
                                after_last_page: float = 0.0) -> bytes:
    """Write ``pages`` into ``path`` with ``pauses[i]`` after page i (descriptor open throughout);
    close after ``after_last_page`` seconds. Returns the final file's bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pdf = StreamingPdf(fd, dpi=dpi, incremental=incremental)
        pdf.start()
        for index, (jpeg, width, height) in enumerate(pages):
            pdf.add_page(jpeg, width, height)
            if index < len(pages) - 1:
                await asyncio.sleep(pauses[min(index, len(pauses) - 1)])
        pdf.finish()
        await asyncio.sleep(after_last_page)
    finally:
        os.close(fd)
    return path.read_bytes()


async def write_in_bursts(path: Path, data: bytes, *, bursts: int, pause: float) -> None:
    """Write ``data`` into ``path`` in ``bursts`` parts, ``pause`` seconds apart, descriptor open."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        step = -(-len(data) // bursts)
        for start in range(0, len(data), step):
            os.write(fd, data[start:start + step])
            if start + step < len(data):
                await asyncio.sleep(pause)
    finally:
        os.close(fd)


def write_then_rename(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.part")
    temp.write_bytes(data)
    temp.rename(path)
