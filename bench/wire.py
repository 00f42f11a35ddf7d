"""Bytes on the wire for real-world-like JPEG scans: MQTT bytes ÷ ciphertext, and ÷ the original JPEG.

    .venv/bin/python -m bench.wire [--pages 6] [--json]

Pages are rendered like the demo's samples (edge.samples), with paper grain and a slight tilt, and
saved the way office scanners save them (JPEG quality 85, 4:2:0, 200 dpi). Each is packaged and
sealed by the edge's own code (edge.package: the JPEG as its lossless JPEG XL transcode when
libjxl-tools restores it bit-exact, else as it is; zstd level 3; 64 KiB secretstream chunks), then
cut into 32 KiB segments. The same pages without the transcode are the second baseline. The wire is counted
from the MQTT v5 packets both ways: every PUBLISH (init, segments, fin) and its PUBACK, one progress
ack per segment at QoS 0 (the worst case; central coalesces them per batch), the STORED ack and the
receipt with their PUBACKs. TCP/IP headers are not counted (see bench/link_model.py for the link).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import secrets
import tempfile
import time
from pathlib import Path

import nacl.public
import nacl.signing
from PIL import Image, ImageFilter

from bench.mqttload import puback_packet, publish_packet
from edge.media import MediaInfo
from edge.ocr import OcrResult
from edge.package import build_package, seal_package
from edge.samples import _document_pages, render_page
from edge.transcode import JxlTranscoder
from protocol.messages import Ack, AckState, Receipt, ReceiptBody, encode
from tests.central.builders import Sealed

SEGMENT = 32 * 1024
CHUNK = 64 * 1024
OCR_TEXT = "Quyết định về việc phê duyệt kế hoạch số hoá tài liệu lưu trữ xã. " * 40


def scanned_jpegs(count: int, seed: int = 0, dpi: int = 200) -> list[bytes]:
    """JPEG pages like an office scanner makes them: grain, a slight tilt, q85, 4:2:0."""
    rng = random.Random(seed)
    pages = _document_pages(0, count, rng)
    out: list[bytes] = []
    for page in pages:
        image = render_page(page, dpi=dpi).convert("RGB")
        grain = Image.effect_noise(image.size, 12).convert("RGB")
        image = Image.blend(image, grain, 0.06).rotate(rng.uniform(-0.8, 0.8), fillcolor=(250, 248, 240))
        image = image.filter(ImageFilter.GaussianBlur(0.4))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85, subsampling=2, dpi=(dpi, dpi))
        out.append(buffer.getvalue())
    return out


def mqtt_bytes(original: Path, work: Path, *, transcoder: JxlTranscoder | None) -> tuple[int, int, float]:
    """(ciphertext bytes, MQTT bytes both ways, transcode seconds) for one JPEG sent as the edge
    sends it: edge.package.build_package (with or without the JPEG XL transcode) and seal_package."""
    device = "xa-tan-trao"
    tid = secrets.token_hex(16)
    signing = nacl.signing.SigningKey.generate()
    central = nacl.public.PrivateKey.generate()
    sha = hashlib.sha256(original.read_bytes()).hexdigest()
    ocr = OcrResult(text=OCR_TEXT, hocr="<html/>", pages=1, seconds=0.0, engine="tesseract",
                    languages=("vie",), dpi=200, mean_confidence=90.0)
    package, envelope = work / f"{tid}.tar", work / f"{tid}.env"
    started = time.perf_counter()
    jxl = transcoder.transcode(original, sha, work) if transcoder is not None else None
    seconds = time.perf_counter() - started if jxl is not None else 0.0
    if jxl is not None:
        jxl.path.unlink()
    build_package(original, package, media=MediaInfo("image/jpeg", 1, original.stat().st_size), ocr=ocr,
                  tid=tid, device_id=device, seq=1, original_name=original.name, original_sha256=sha,
                  captured_at="2026-12-01T08:00:00Z", transcoder=transcoder)
    signed = seal_package(package, envelope, device_id=device, tid=tid, seq=1, signing_key=signing,
                          central_public_key=central.public_key, created_at=int(time.time()),
                          chunk_size=CHUNK)
    sealed = Sealed(device, tid, 1, signed, envelope.read_bytes())
    package.unlink()
    envelope.unlink()
    wire = 0
    for message in sealed.messages(SEGMENT):
        topic, payload = encode(message)
        wire += len(publish_packet(topic, payload, 1)) + len(puback_packet(1))
    segments = len(sealed.segments(SEGMENT))
    covered = Ack(device, sealed.tid, AckState.RECEIVING, ((0, len(sealed.ciphertext)),))
    topic, payload = encode(covered)
    wire += segments * (len(publish_packet(topic, payload, 1)) - 2)   # QoS 0: no packet id
    for reply in (Ack(device, sealed.tid, AckState.STORED),
                  Receipt.sign(ReceiptBody(device=device, tid=sealed.tid, sha256="0" * 64,
                                           stored_at="2026-12-01T00:00:00.000Z", document_id=1,
                                           duplicate=False), nacl.signing.SigningKey.generate())):
        topic, payload = encode(reply)
        wire += len(publish_packet(topic, payload, 1)) + len(puback_packet(1))
    return len(sealed.ciphertext), wire, seconds


def measure(pages: int = 6, originals: list[bytes] | None = None) -> dict[str, float | int | None]:
    jpegs = originals if originals is not None else scanned_jpegs(pages)
    transcoder = JxlTranscoder.find()
    totals = {"original": 0, "ciphertext": 0, "wire": 0, "ciphertext_plain": 0, "wire_plain": 0}
    transcode_s = 0.0
    with tempfile.TemporaryDirectory(prefix="sohoa-wire-") as tmp:
        work = Path(tmp)
        for number, jpeg in enumerate(jpegs):
            path = work / f"trang-{number}.jpg"
            path.write_bytes(jpeg)
            totals["original"] += len(jpeg)
            size, sent, _ = mqtt_bytes(path, work, transcoder=None)
            totals["ciphertext_plain"] += size
            totals["wire_plain"] += sent
            size, sent, seconds = mqtt_bytes(path, work, transcoder=transcoder)
            totals["ciphertext"] += size
            totals["wire"] += sent
            transcode_s += seconds
    return {"pages": len(jpegs), "original_bytes": totals["original"],
            "ciphertext_bytes": totals["ciphertext"],
            "wire_bytes": totals["wire"], "wire_overhead": round(totals["wire"] / totals["ciphertext"], 4),
            "wire_vs_original_jpeg": round(totals["wire"] / totals["original"], 4),
            "wire_vs_original_jpeg_without_jxl": round(totals["wire_plain"] / totals["original"], 4),
            "jxl": transcoder is not None,
            # cjxl + the verifying djxl, wall seconds per page (compare: OCR seconds per page).
            "transcode_s_per_page": round(transcode_s / len(jpegs), 3) if transcoder else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=6)
    parser.add_argument("--save", type=Path, help="also write the JPEG pages into this directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    jpegs = scanned_jpegs(args.pages)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for number, jpeg in enumerate(jpegs):
            (args.save / f"trang-{number}-{secrets.token_hex(2)}.jpg").write_bytes(jpeg)
    figures = measure(originals=jpegs)
    print(json.dumps(figures, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
