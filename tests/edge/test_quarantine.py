"""Quarantine: refused scans go back to the clerk's refused folder with a reason note (Vietnamese
first), never lost, never followed; ``restore`` takes them back in (``sohoa edge retry``)."""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

import pytest

from edge.quarantine import REASON_SUFFIX, list_failed, quarantine, restore

NAME = "Công văn số 5 – Tuyên Quang.pdf"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    scans = tmp_path / "scans"
    scans.mkdir()
    return scans, scans / "_Lỗi"


def test_moves_file_and_writes_reason(dirs: tuple[Path, Path]) -> None:
    scans, failed = dirs
    src = scans / NAME
    src.write_bytes(b"not really a pdf")
    moved = quarantine(src, failed, "the file is not a PNG, JPEG, TIFF or PDF", code="not_a_scan",
                       tid="ab" * 16)
    assert moved == failed / NAME and moved.read_bytes() == b"not really a pdf" and not src.exists()
    assert stat.S_IMODE(moved.stat().st_mode) == 0o644     # the clerk's own scan, readable on the share
    note = (failed / (NAME + REASON_SUFFIX)).read_text("utf-8")
    assert note.startswith(f"Tệp: {NAME}\nLý do: Tệp không phải là bản quét PDF, JPEG, PNG hoặc TIFF.")
    assert "Cách xử lý:" in note and "sohoa edge retry" in note and "Reason: The file is not a PDF" in note
    assert "reason: the file is not a PNG, JPEG, TIFF or PDF" in note and "tid: " + "ab" * 16 in note
    [item] = list_failed(failed)
    assert item.name == NAME and item.reason.startswith("Tệp không phải") and item.code == "not_a_scan"
    assert item.detail.startswith("the file is not") and item.since.tzinfo


def test_collisions_get_numbered(dirs: tuple[Path, Path]) -> None:
    scans, failed = dirs
    moved = []
    for n in range(3):
        (scans / NAME).write_bytes(bytes([n]))
        moved.append(quarantine(scans / NAME, failed, f"lần {n}"))
    assert [p.name for p in moved] == [NAME, "Công văn số 5 – Tuyên Quang (2).pdf",
                                       "Công văn số 5 – Tuyên Quang (3).pdf"]
    assert [p.read_bytes() for p in moved] == [b"\x00", b"\x01", b"\x02"]
    assert sorted(i.detail for i in list_failed(failed)) == ["lần 0", "lần 1", "lần 2"]


def test_nfd_name_becomes_nfc_and_multiline_reason_is_one_line(dirs: tuple[Path, Path]) -> None:
    scans, failed = dirs
    src = scans / unicodedata.normalize("NFD", NAME)
    src.write_bytes(b"x")
    moved = quarantine(src, failed, "dòng 1\ndòng 2")
    assert moved.name == NAME
    assert list_failed(failed)[0].detail == "dòng 1 dòng 2"


def test_symlink_is_moved_not_followed(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    scans, failed = dirs
    secret = tmp_path / "secret.txt"
    secret.write_text("do not touch")
    (scans / "link.pdf").symlink_to(secret)
    moved = quarantine(scans / "link.pdf", failed, "the file is a symbolic link, not a scan")
    assert moved.is_symlink() and os.readlink(moved) == str(secret)
    assert secret.read_text() == "do not touch" and not (scans / "link.pdf").is_symlink()


def test_fifo_is_moved_without_opening_it(dirs: tuple[Path, Path]) -> None:
    scans, failed = dirs
    os.mkfifo(scans / "pipe.pdf")
    moved = quarantine(scans / "pipe.pdf", failed, "the file is a FIFO (named pipe), not a scan")
    assert stat.S_ISFIFO(moved.lstat().st_mode)
    assert [i.name for i in list_failed(failed)] == ["pipe.pdf"]


def test_basename_only_and_odd_names(dirs: tuple[Path, Path]) -> None:
    scans, failed = dirs
    (scans / "sub").mkdir()
    src = scans / "sub" / "bad\tname.reason.txt"
    src.write_bytes(b"y")
    moved = quarantine(src, failed, "odd")
    assert moved.parent == failed and moved.name == "bad_name.reason.txt"
    names = {i.name: i.detail for i in list_failed(failed)}
    assert names == {"bad_name.reason.txt": "odd"}
    src = scans / f"x.pdf{REASON_SUFFIX}"     # a scan named like a note still shows as a scan
    src.write_bytes(b"z")
    quarantine(src, failed, "odd too")
    assert {i.name for i in list_failed(failed)} == {"bad_name.reason.txt", f"x.pdf{REASON_SUFFIX}"}


def test_missing_reason_file_and_empty_dir(dirs: tuple[Path, Path]) -> None:
    _, failed = dirs
    assert list_failed(failed) == []
    failed.mkdir(parents=True)
    (failed / "orphan.pdf").write_bytes(b"z")
    [item] = list_failed(failed)
    assert item.name == "orphan.pdf" and "missing" in item.reason


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system (tmpfs)")
def test_across_file_systems_regular_fifo_and_symlink(tmp_path: Path) -> None:
    import tempfile  # noqa: PLC0415

    failed = tmp_path / "failed"
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        scans = Path(other)
        if scans.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm is on the same file system here")
        (scans / NAME).write_bytes(b"scan bytes")
        os.mkfifo(scans / "pipe.pdf")
        (scans / "link.pdf").symlink_to("/etc/hostname")
        regular = quarantine(scans / NAME, failed, "corrupt")
        fifo = quarantine(scans / "pipe.pdf", failed, "FIFO")
        link = quarantine(scans / "link.pdf", failed, "symlink")
        assert list(scans.iterdir()) == []
    assert regular.read_bytes() == b"scan bytes"
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert link.is_symlink() and os.readlink(link) == "/etc/hostname"
    assert len(list_failed(failed)) == 3


def test_caller_supplied_name_is_reduced_to_a_basename(dirs: tuple[Path, Path]) -> None:
    scans, failed = dirs
    (scans / "0123abcd.pdf").write_bytes(b"q")
    moved = quarantine(scans / "0123abcd.pdf", failed, "x", name="../../Quyết định/số 12.pdf")
    assert moved.parent == failed and moved.name == "..∕..∕Quyết định∕số 12.pdf"
    (scans / "dots").write_bytes(b"q")
    assert quarantine(scans / "dots", failed, "x", name="..").name == "unnamed"


def test_restore_puts_it_back_under_a_free_name_and_drops_the_note(dirs: tuple[Path, Path]) -> None:
    scans, failed = dirs
    (scans / NAME).write_bytes(b"first")
    quarantine(scans / NAME, failed, "hỏng", code="damaged")
    (scans / NAME).write_bytes(b"a new scan with the same name")
    back = restore(failed, NAME, scans)
    assert back == scans / "Công văn số 5 – Tuyên Quang (2).pdf" and back.read_bytes() == b"first"
    assert list(failed.iterdir()) == [] and list_failed(failed) == []
    with pytest.raises(FileNotFoundError):
        restore(failed, NAME, scans)
    with pytest.raises(FileNotFoundError):
        restore(failed, "../" + NAME, scans)


def test_an_orphaned_note_is_not_listed(dirs: tuple[Path, Path]) -> None:
    scans, failed = dirs
    (scans / NAME).write_bytes(b"x")
    moved = quarantine(scans / NAME, failed, "hỏng")
    moved.unlink()   # the clerk took the scan away and left the note
    assert list_failed(failed) == []
