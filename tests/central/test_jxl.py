"""JPEG originals that travel as lossless JPEG XL (edge.transcode) come back bit-exact at central.

Real tools (Debian's libjxl-tools): the edge's transcoder only hands over a JXL that ``djxl`` restored
to the JPEG's sha256; central restores it again and checks the sha256 in the signed metadata before
storing and receipting. A transcode that restores to other bytes, or an unknown encoding, is refused.
"""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from central.config import CentralConfig
from central.ingest import Ingestor
from central.keys import CentralKeys
from central.storage import ObjectStore
from edge.transcode import ENCODING, JxlTranscoder
from protocol.bag import BAGIT_TXT, HOCR, METADATA, TEXT, OcrInfo, PackageMetadata, bag_info, manifest
from protocol.messages import Ack, AckState, Receipt
from tests.central.builders import seal_stream, tar_of, wire
from tests.central.conftest import Enroll
from tests.central.test_ingest import make_ingestor
from tests.support.files import leftover_files

TRANSCODER = JxlTranscoder.find()
pytestmark = pytest.mark.skipif(TRANSCODER is None, reason="libjxl-tools (cjxl, djxl) not installed")


def scan(seed: int) -> bytes:
    """A page like an office scanner's JPEG: text lines on grainy paper, q85, 4:2:0."""
    rng = random.Random(seed)
    image = Image.new("RGB", (1240, 1754), (248, 246, 238))
    draw = ImageDraw.Draw(image)
    for line in range(40):
        y = 120 + line * 38
        draw.rectangle((100, y, 100 + rng.randint(400, 1000), y + 14), fill=(30, 30, 40))
    image = Image.blend(image, Image.effect_noise(image.size, 20).convert("RGB"), 0.05)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, subsampling=2, dpi=(150, 150))
    return out.getvalue()


def jxl_package(tmp_path: Path, *, device: str, tid: str, jpeg: bytes, member: bytes | None = None,
                encoding: str = ENCODING) -> bytes:
    """A package whose original member is the JXL of ``jpeg`` (or ``member``), as edge.package makes it."""
    source = tmp_path / f"{tid}.jpg"
    source.write_bytes(jpeg)
    sha = hashlib.sha256(jpeg).hexdigest()
    if member is None:
        assert TRANSCODER is not None
        transcoded = TRANSCODER.transcode(source, sha, tmp_path)
        assert transcoded is not None, "cjxl/djxl could not carry this JPEG bit-exact"
        member = transcoded.path.read_bytes()
        transcoded.path.unlink()
    metadata = PackageMetadata(
        tid=tid, device_id=device, seq=1, original_name="Trang 1.jpg", original_sha256=sha,
        original_size=len(jpeg), media_type="image/jpeg", pages=1, captured_at="2026-11-30T08:00:00Z",
        ocr=OcrInfo(engine="tesseract 5.3", languages=("vie",), dpi=150, seconds=0.6),
        extra={"original_encoding": encoding})
    payload = {METADATA: metadata.to_json(), TEXT: "Quyết định".encode(), HOCR: b"<html/>",
               "data/original.jpg": member}
    hashes = {n: hashlib.sha256(d).hexdigest() for n, d in payload.items()}
    tags = {"bagit.txt": BAGIT_TXT,
            "bag-info.txt": bag_info(device_id=device, tid=tid, bagging_date="2026-11-30",
                                     payload_bytes=sum(map(len, payload.values())), payload_files=4),
            "manifest-sha256.txt": manifest(hashes)}
    return tar_of([(n, d, tarfile.REGTYPE, "") for n, d in [*tags.items(), *payload.items()]])


def send(ingestor: Ingestor, keys: CentralKeys, enrolled: object, package: bytes, doc_id: bytes,
         seq: int = 1) -> list[Ack | Receipt]:
    sealed = seal_stream(device="xa-tan-trao", seq=seq, signing_key=enrolled.signing_key,  # type: ignore[attr-defined]
                         central_key=keys.encryption.public_key, pieces=[package], size=len(package),
                         doc_id=doc_id)
    return ingestor.handle_batch(wire(sealed.messages(32 * 1024)))


def test_a_jxl_original_is_restored_bit_exact_and_receipted_for_the_jpeg(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, tmp_path: Path) -> None:
    bundle = enroll("xa-tan-trao")
    jpeg = scan(1)
    doc_id = bytes(range(16))
    package = jxl_package(tmp_path, device="xa-tan-trao", tid=doc_id.hex(), jpeg=jpeg)
    assert len(package) < len(jpeg) * 0.9   # the transcode is what travels
    replies = send(make_ingestor(config, central_keys), central_keys, bundle, package, doc_id)
    (receipt,) = [r for r in replies if isinstance(r, Receipt)]
    body = receipt.verify(central_keys.receipt.verify_key)
    assert body.sha256 == hashlib.sha256(jpeg).hexdigest()
    assert ObjectStore(config.paths.objects).path_for(body.sha256).read_bytes() == jpeg
    assert leftover_files(config.paths.tmp) == []


@pytest.mark.parametrize("case", ["other-jpeg", "garbage", "unknown-encoding"])
def test_a_transcode_that_does_not_restore_the_signed_jpeg_is_refused(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, tmp_path: Path, case: str) -> None:
    bundle = enroll("xa-tan-trao")
    jpeg = scan(2)
    doc_id = bytes(range(1, 17))
    tid = doc_id.hex()
    if case == "other-jpeg":
        assert TRANSCODER is not None
        other = tmp_path / "other.jpg"
        other.write_bytes(scan(3))
        transcoded = TRANSCODER.transcode(other, hashlib.sha256(other.read_bytes()).hexdigest(), tmp_path)
        assert transcoded is not None
        package = jxl_package(tmp_path, device="xa-tan-trao", tid=tid, jpeg=jpeg,
                              member=transcoded.path.read_bytes())
    elif case == "garbage":
        package = jxl_package(tmp_path, device="xa-tan-trao", tid=tid, jpeg=jpeg,
                              member=b"\xff\x0a" + bytes(500))
    else:
        package = jxl_package(tmp_path, device="xa-tan-trao", tid=tid, jpeg=jpeg, encoding="webp-lossless")
    replies = send(make_ingestor(config, central_keys), central_keys, bundle, package, doc_id)
    final = [r for r in replies if isinstance(r, Ack)][-1]
    assert (final.state, final.error_class) == (AckState.REJECTED, "BagError")
    assert not [r for r in replies if isinstance(r, Receipt)]
    assert list(config.paths.objects.rglob("*.jpg")) == [] and leftover_files(config.paths.tmp) == []


def test_the_edge_packages_a_jpeg_as_jxl_only_when_it_restores_exactly(tmp_path: Path) -> None:
    from edge.media import MediaInfo  # noqa: PLC0415
    from edge.ocr import OcrResult  # noqa: PLC0415
    from edge.package import build_package  # noqa: PLC0415

    jpeg = tmp_path / "trang.jpg"
    jpeg.write_bytes(scan(4))
    sha = hashlib.sha256(jpeg.read_bytes()).hexdigest()
    ocr = OcrResult(text="Quyết định", hocr="<html/>", pages=1, seconds=0.5, engine="fake",
                    languages=("vie",), dpi=150, mean_confidence=90.0)
    common = {"media": MediaInfo("image/jpeg", 1, jpeg.stat().st_size), "ocr": ocr, "tid": "ab" * 16,
              "device_id": "xa-tan-trao", "seq": 1, "original_name": "trang.jpg", "original_sha256": sha,
              "captured_at": "2026-11-30T08:00:00Z"}
    with_jxl = build_package(jpeg, tmp_path / "a.tar", transcoder=TRANSCODER, **common)  # type: ignore[arg-type]
    plain = build_package(jpeg, tmp_path / "b.tar", transcoder=None, **common)  # type: ignore[arg-type]
    assert with_jxl < plain * 0.9
    with tarfile.open(tmp_path / "a.tar") as tar:
        meta = PackageMetadata.from_json(tar.extractfile("data/metadata.json").read())  # type: ignore[union-attr]
        member = tar.extractfile("data/original.jpg").read()  # type: ignore[union-attr]
    assert meta.extra == {"original_encoding": ENCODING} and meta.original_sha256 == sha
    assert member[:2] != b"\xff\xd8" and len(member) < jpeg.stat().st_size
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".jxl"] == []   # the transcode was cleaned up
    # A transcoder that cannot restore the exact bytes (here: a wrong expected hash) sends the JPEG.
    assert TRANSCODER is not None and TRANSCODER.transcode(jpeg, "0" * 64, tmp_path) is None
