"""Does a scan *end* the way its format must? (DESIGN §9: finished means closed and complete.)

A scanner that writes a multi-page PDF page by page leaves, between pages, a file that PDFium will
happily open (it rebuilds a missing cross-reference table) and that decodes as one page. Quiet
periods alone cannot tell that apart from a finished scan, so before a file is taken we check the
structure that only a finished writer leaves behind:

- PDF: the last ``startxref`` points at a cross-reference table (``xref``) or a cross-reference
  stream object inside the file, and ``%%EOF`` follows it;
- PNG: a complete ``IEND`` chunk (length 0, correct CRC) near the end, padding after it allowed;
- JPEG: the image data ends with an EOI marker (``FF D9``), allowing the padding and trailers some
  cameras append after it;
- TIFF: every IFD in the chain lies inside the file (Pillow's full decode in ``edge.media`` then
  checks the strips).

These are pure functions of the file's bytes (head and tail); :func:`check_complete` reads them.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import zlib
from pathlib import Path

from edge.errors import IncompleteFileError
from edge.media import sniff

TAIL = 64 * 1024
_STARTXREF = re.compile(rb"startxref\s+(\d{1,15})\s+%%EOF", re.DOTALL)
_XREF_OBJ = re.compile(rb"\s*\d{1,10}\s+\d{1,5}\s+obj\b")
_PNG_IEND = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
_MAX_IFDS = 100_000


def pdf_complete(size: int, tail: bytes, at_offset: bytes) -> str | None:
    """None if complete, else why not. ``tail``: the file's last bytes; ``at_offset``: a few
    bytes read at the offset the last ``startxref`` names (empty when it is outside the file)."""
    matches = list(_STARTXREF.finditer(tail))
    if not matches:
        return "the PDF has no trailer (startxref … %%EOF) yet"
    offset = int(matches[-1].group(1))
    if not 0 < offset < size:
        return f"the PDF's startxref points outside the file ({offset} of {size} bytes)"
    if at_offset.lstrip().startswith(b"xref") or _XREF_OBJ.match(at_offset):
        return None
    return "the PDF's startxref does not point at a cross-reference table"


def png_complete(tail: bytes) -> str | None:
    # Some writers pad or append after IEND (as cameras do after a JPEG's EOI); decoders stop at IEND,
    # and a complete IEND with its CRC does not occur by chance in a file still being written.
    return None if _PNG_IEND in tail else "the PNG has no IEND chunk yet"


def jpeg_complete(tail: bytes) -> str | None:
    # Cameras and phones append trailers (MPF, maker data) after EOI; a truncated scan has no EOI
    # anywhere near its end. Zero/0xFF padding after EOI is common too.
    return None if b"\xff\xd9" in tail[-TAIL:] else "the JPEG has no end-of-image marker"


def tiff_complete(read_at: ReadAt, size: int) -> str | None:
    head = read_at(0, 8)
    if len(head) < 8:
        return "the TIFF header is incomplete"
    endian = "<" if head[:2] == b"II" else ">"
    if head[2:4] in (b"+\x00", b"\x00+"):   # BigTIFF: 8-byte offsets
        header = read_at(0, 16)
        if len(header) < 16:
            return "the BigTIFF header is incomplete"
        offset = struct.unpack(endian + "Q", header[8:16])[0]
        count_fmt, count_size, entry_size, next_fmt, next_size = "Q", 8, 20, "Q", 8
    else:
        offset = struct.unpack(endian + "I", head[4:8])[0]
        count_fmt, count_size, entry_size, next_fmt, next_size = "H", 2, 12, "I", 4
    seen: set[int] = set()
    while offset:
        if offset in seen or len(seen) > _MAX_IFDS:
            return "the TIFF's IFD chain loops"
        seen.add(offset)
        raw = read_at(offset, count_size)
        if len(raw) < count_size:
            return f"the TIFF's IFD at {offset} lies beyond the end of the file"
        entries = struct.unpack(endian + count_fmt, raw)[0]
        end = offset + count_size + entries * entry_size
        nxt = read_at(end, next_size)
        if end + next_size > size or len(nxt) < next_size:
            return f"the TIFF's IFD at {offset} is cut off"
        offset = struct.unpack(endian + next_fmt, nxt)[0]
    return None


class ReadAt:
    """``read_at(offset, length)`` over a file descriptor (pread: no shared position)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __call__(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset) if offset >= 0 else b""


def check_complete(path: Path, media_type: str | None = None) -> None:
    """Raise :class:`IncompleteFileError` if ``path`` does not end the way its format must.

    Run before the full decode: a file a scanner is still filling must wait, not be refused as
    truncated. Without ``media_type`` the type is sniffed from the first bytes; anything that is
    not a regular file of a known type passes (``edge.media.probe`` refuses it with a reason).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise
        return
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return
        size = info.st_size
        read_at = ReadAt(fd)
        media_type = media_type or sniff(read_at(0, 1024))
        tail = read_at(max(0, size - TAIL), min(size, TAIL))
        if media_type == "application/pdf":
            matches = list(_STARTXREF.finditer(tail))
            at = read_at(int(matches[-1].group(1)), 64) if matches else b""
            problem = pdf_complete(size, tail, at)
        elif media_type == "image/png":
            problem = png_complete(tail)
        elif media_type == "image/jpeg":
            problem = jpeg_complete(tail)
        elif media_type == "image/tiff":
            problem = tiff_complete(read_at, size)
        else:
            problem = None
    finally:
        os.close(fd)
    if problem is not None:
        raise IncompleteFileError(problem)
