"""Does a scan end the way its format must: finished files pass, files still being written wait."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from edge.complete import check_complete
from edge.errors import IncompleteFileError


@pytest.fixture
def png(tmp_path: Path) -> bytes:
    path = tmp_path / "trang.png"
    Image.new("L", (300, 200), 255).save(path)
    return path.read_bytes()


def test_a_png_with_padding_after_iend_is_finished(tmp_path: Path, png: bytes) -> None:
    """Some writers pad after IEND (as cameras do after a JPEG's EOI); Pillow opens the file, and it
    was refused as "scanner stopped midway" after five minutes of waiting."""
    path = tmp_path / "Quyết định số 12.png"
    path.write_bytes(png + b"\0" * 100)
    check_complete(path)


def test_a_png_cut_before_iend_waits(tmp_path: Path, png: bytes) -> None:
    path = tmp_path / "Quyết định số 12.png"
    for cut in (len(png) - 1, len(png) - 12, len(png) // 2):
        path.write_bytes(png[:cut])
        with pytest.raises(IncompleteFileError, match="IEND"):
            check_complete(path)
