"""Bytes on the wire for real-world-like JPEG scans: MQTT bytes ÷ ciphertext, and ÷ the original JPEG.

    .venv/bin/python -m bench.wire [--pages 6] [--json]

Pages are rendered like the demo's samples (edge.samples), with paper grain and a slight tilt, and
saved the way office scanners save them (JPEG quality 85, 4:2:0, 200 dpi). Each is packaged
(protocol/bag.py: original untouched + text + hOCR + metadata), compressed and sealed as the edge
does (zstd level 3, 64 KiB secretstream chunks), then cut into 32 KiB segments. The wire is counted
from the MQTT v5 packets both ways: every PUBLISH (init, segments, fin) and its PUBACK, one progress
ack per segment at QoS 0 (the worst case; central coalesces them per batch), the STORED ack and the
receipt with their PUBACKs. TCP/IP headers are not counted (see bench/link_model.py for the link).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import secrets
from pathlib import Path

import nacl.public
import nacl.signing
from PIL import Image, ImageFilter

from bench.mqttload import puback_packet, publish_packet
from edge.samples import _document_pages, render_page
from protocol.messages import Ack, AckState, Receipt, ReceiptBody, encode
from tests.central.builders import seal_document

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


def mqtt_bytes(original: bytes, *, media_type: str = "image/jpeg") -> tuple[int, int]:
    """(ciphertext bytes, MQTT bytes both ways) for one document sent as the edge sends it."""
    device = "xa-tan-trao"
    signing = nacl.signing.SigningKey.generate()
    central = nacl.public.PrivateKey.generate()
    sealed = seal_document(device=device, seq=1, signing_key=signing, central_key=central.public_key,
                           original=original, media_type=media_type, name="Trang 1.jpg", text=OCR_TEXT,
                           chunk_size=CHUNK)
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
    return len(sealed.ciphertext), wire


def measure(pages: int = 6, originals: list[bytes] | None = None) -> dict[str, float | int]:
    jpegs = originals if originals is not None else scanned_jpegs(pages)
    original = ciphertext = wire = 0
    for jpeg in jpegs:
        size, sent = mqtt_bytes(jpeg)
        original += len(jpeg)
        ciphertext += size
        wire += sent
    return {"pages": len(jpegs), "original_bytes": original, "ciphertext_bytes": ciphertext,
            "wire_bytes": wire, "wire_overhead": round(wire / ciphertext, 4),
            "wire_vs_original_jpeg": round(wire / original, 4)}


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
