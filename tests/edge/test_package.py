"""Package and envelope: BagIt tar layout, manifest, original byte-exact, reproducible, round-trip."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import nacl.public
import nacl.signing
import pytest

from edge.errors import EdgeError
from edge.fsutil import sha256_file
from edge.media import MediaInfo, probe
from edge.ocr import OcrResult
from edge.package import build_package, seal_package
from protocol.bag import BAGIT_TXT, PackageMetadata, parse_manifest
from protocol.envelope import EnvelopeOpener, SignedHeader, verify_ciphertext

pytestmark = pytest.mark.timeout(60)

TID = "0123456789abcdef0123456789abcdef"
DEVICE = "xa-tan-trao"
NAME = "Quyết định số 12 – UBND.pdf"
OCR = OcrResult(text="CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM\nĐộc lập – Tự do – Hạnh phúc\n",
                hocr="<html><body><div class='ocr_page' id='page_1'>Xã</div></body></html>\n",
                pages=1, seconds=0.5, engine="tesseract 5.3.0", languages=("vie",), dpi=300,
                mean_confidence=95.5)


@pytest.fixture
def original(tmp_path: Path) -> Path:
    path = tmp_path / NAME
    # Not a valid PDF on purpose: the packager must copy bytes, never interpret them.
    path.write_bytes(b"%PDF-1.4\n" + os.urandom(300_000) + b"\r\n\x00\xff%%EOF")
    return path


def build(original: Path, out: Path, **overrides: object) -> int:
    kwargs: dict[str, object] = {
        "media": MediaInfo("application/pdf", 1, original.stat().st_size), "ocr": OCR, "tid": TID,
        "device_id": DEVICE, "seq": 7, "original_name": NAME, "original_sha256": sha256_file(original),
        "captured_at": "2024-03-05T08:30:00+07:00"}
    kwargs.update(overrides)
    return build_package(original, out, **kwargs)  # type: ignore[arg-type]


def test_layout_manifest_and_original_bytes(original: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg.tar"
    size = build(original, out)
    assert size == out.stat().st_size and out.stat().st_mode & 0o777 == 0o600
    with tarfile.open(out) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "bagit.txt", "bag-info.txt", "manifest-sha256.txt", "data/metadata.json",
            "data/text.txt", "data/ocr.hocr", "data/original.pdf"]
        assert all(m.isreg() and m.mtime == 0 and m.uid == 0 and m.uname == "sohoa" for m in members)
        read = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    assert read["bagit.txt"] == BAGIT_TXT
    assert read["data/original.pdf"] == original.read_bytes()
    assert read["data/text.txt"].decode() == OCR.text
    hashes = parse_manifest(read["manifest-sha256.txt"], "application/pdf")
    assert set(hashes) == {n for n in read if n.startswith("data/")}
    for name, digest in hashes.items():
        assert hashlib.sha256(read[name]).hexdigest() == digest
    meta = PackageMetadata.from_json(read["data/metadata.json"])
    assert (meta.tid, meta.device_id, meta.seq, meta.original_name) == (TID, DEVICE, 7, NAME)
    assert meta.original_size == original.stat().st_size and meta.ocr.languages == ("vie",)
    info = read["bag-info.txt"].decode()
    payload = sum(len(read[n]) for n in hashes)
    assert f"Payload-Oxum: {payload}.4" in info and "Bagging-Date: 2024-03-05" in info


def test_reproducible(original: Path, tmp_path: Path) -> None:
    build(original, tmp_path / "a.tar")
    build(original, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_real_sample_types(tmp_path: Path) -> None:
    from PIL import Image  # noqa: PLC0415

    scan = tmp_path / "Công văn số 5 – Tuyên Quang.png"
    Image.new("L", (50, 50), 200).save(scan)
    build(scan, tmp_path / "p.tar", media=probe(scan), original_name=scan.name,
          original_sha256=sha256_file(scan))
    with tarfile.open(tmp_path / "p.tar") as tar:
        assert tar.getnames()[-1] == "data/original.png"


def test_changed_original_is_refused_and_leaves_nothing(original: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg.tar"
    with pytest.raises(EdgeError, match="changed"):
        build(original, out, original_sha256="0" * 64)
    taken_in = sha256_file(original)
    original.write_bytes(b"%PDF rewritten after it was hashed")
    with pytest.raises(EdgeError, match="changed"):
        build(original, out, original_sha256=taken_in)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_name_is_metadata_only(original: Path, tmp_path: Path) -> None:
    build(original, tmp_path / "p.tar", original_name="../../etc/passwd\x00.pdf")
    with tarfile.open(tmp_path / "p.tar") as tar:
        assert all(not n.startswith(("/", "..")) and "passwd" not in n for n in tar.getnames())
        meta = PackageMetadata.from_json(tar.extractfile("data/metadata.json").read())  # type: ignore[union-attr]
    assert "/" not in meta.original_name


def test_seal_round_trip_with_the_protocol_opener(original: Path, tmp_path: Path) -> None:
    package, envelope = tmp_path / "pkg.tar", tmp_path / "pkg.env"
    build(original, package)
    device_key = nacl.signing.SigningKey.generate()
    central_key = nacl.public.PrivateKey.generate()
    signed = seal_package(package, envelope, device_id=DEVICE, tid=TID, seq=7, signing_key=device_key,
                          central_public_key=central_key.public_key, created_at=1_700_000_000,
                          chunk_size=16384)
    assert isinstance(signed, SignedHeader)
    ciphertext = envelope.read_bytes()
    assert envelope.stat().st_mode & 0o777 == 0o600
    assert b"bagit.txt" not in ciphertext and NAME.encode() not in ciphertext
    header = SignedHeader.decode(signed.encode()).header
    assert (header.tid, header.seq, header.device_id) == (TID, 7, DEVICE)
    assert header.plaintext_size == package.stat().st_size
    verified = verify_ciphertext(signed, device_key.verify_key, size=len(ciphertext),
                                 sha256=hashlib.sha256(ciphertext).digest())
    out = bytearray()
    opener = EnvelopeOpener(verified, central_key, max_plaintext=10 << 20, sink=out.extend)
    for start in range(0, len(ciphertext), 5000):
        opener.update(ciphertext[start: start + 5000])
    opener.finish()
    assert bytes(out) == package.read_bytes()
