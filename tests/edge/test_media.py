"""probe(): what a scan is, and every way we refuse one (with a reason a clerk can read)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image
from reportlab.pdfgen import canvas

from edge.errors import BadInputError
from edge.media import MediaInfo, probe, sniff

pytestmark = pytest.mark.timeout(60)


def png_bytes(size: tuple[int, int] = (200, 300)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 255).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((400, 400), 60).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pdf_bytes(pages: int = 2, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    c = canvas.Canvas(buf, invariant=1, **kwargs)
    for n in range(pages):
        c.drawString(72, 720, f"Trang {n + 1}")
        c.showPage()
    c.save()
    return buf.getvalue()


def test_png_jpeg_tiff_pdf(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes())
    frames = [Image.new("L", (100, 100), v) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "c.tif", save_all=True, append_images=frames[1:])
    (tmp_path / "Quyết định số 12 – UBND.pdf").write_bytes(pdf_bytes(2))
    assert probe(tmp_path / "a.png") == MediaInfo("image/png", 1, len(png_bytes()))
    assert probe(tmp_path / "b.jpg").media_type == "image/jpeg"
    assert probe(tmp_path / "c.tif").pages == 3
    pdf = probe(tmp_path / "Quyết định số 12 – UBND.pdf")
    assert (pdf.media_type, pdf.pages) == ("application/pdf", 2)


def test_type_comes_from_content_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "scan.pdf"
    path.write_bytes(png_bytes())
    assert probe(path).media_type == "image/png"


def refuse(path: Path, match: str, **kwargs: int) -> BadInputError:
    with pytest.raises(BadInputError, match=match) as info:
        probe(path, **kwargs)
    assert info.value.reason
    return info.value


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pdf").touch()
    refuse(tmp_path / "empty.pdf", "empty")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    (tmp_path / "ảnh.jpg").write_text("không phải ảnh", encoding="utf-8")
    refuse(tmp_path / "ảnh.jpg", "not a PNG, JPEG, TIFF or PDF")


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    refuse(tmp_path / "cut.jpg", "truncated or corrupt")


def test_truncated_png_and_tiff(tmp_path: Path) -> None:
    data = png_bytes((800, 800))
    (tmp_path / "cut.png").write_bytes(data[:-40])
    refuse(tmp_path / "cut.png", "truncated or corrupt|cannot be read")
    frames = [Image.effect_noise((300, 300), 50) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    (tmp_path / "cut.tif").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    refuse(tmp_path / "cut.tif", "truncated or corrupt|cannot be read")


def test_encrypted_pdf(tmp_path: Path) -> None:
    (tmp_path / "mật.pdf").write_bytes(pdf_bytes(1, encrypt="mat-khau"))
    refuse(tmp_path / "mật.pdf", "password")


def test_broken_pdf(tmp_path: Path) -> None:
    (tmp_path / "hỏng.pdf").write_bytes(b"%PDF-1.4\n" + os.urandom(2000))
    refuse(tmp_path / "hỏng.pdf", "PDF")


def test_sparse_10_gb_file_is_refused_instantly(tmp_path: Path) -> None:
    big = tmp_path / "huge.tif"
    with big.open("wb") as handle:
        handle.write(b"II*\x00")
        handle.truncate(10 * 2**30)
    started = time.monotonic()
    refuse(big, "above the limit")
    assert time.monotonic() - started < 1.0


def test_pixel_bomb(tmp_path: Path) -> None:
    # A tiny PNG that claims to be 20000 x 20000 pixels.
    (tmp_path / "bomb.png").write_bytes(png_bytes((20000, 20000)))
    refuse(tmp_path / "bomb.png", "bomb")


def test_too_many_pages(tmp_path: Path) -> None:
    (tmp_path / "dài.pdf").write_bytes(pdf_bytes(5))
    refuse(tmp_path / "dài.pdf", "5 pages", max_pages=3)


def test_symlink_fifo_directory(tmp_path: Path) -> None:
    target = tmp_path / "real.png"
    target.write_bytes(png_bytes())
    (tmp_path / "link.png").symlink_to(target)
    refuse(tmp_path / "link.png", "symbolic link")
    os.mkfifo(tmp_path / "pipe.png")
    started = time.monotonic()
    refuse(tmp_path / "pipe.png", "FIFO")  # must not block waiting for a writer
    assert time.monotonic() - started < 1.0
    (tmp_path / "folder.pdf").mkdir()
    refuse(tmp_path / "folder.pdf", "folder")
    refuse(tmp_path / "gone.pdf", "disappeared")


@pytest.mark.parametrize(("head", "expected"), [
    (b"\x89PNG\r\n\x1a\nrest", "image/png"), (b"\xff\xd8\xff\xe0", "image/jpeg"),
    (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"), (b"%PDF-1.7", "application/pdf"),
    (b"junk\n%PDF-1.4", "application/pdf"), (b"GIF89a", None), (b"PK\x03\x04", None), (b"", None),
])
def test_sniff(head: bytes, expected: str | None) -> None:
    assert sniff(head) == expected
