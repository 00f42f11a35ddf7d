"""Packages as the OCR'd edge makes them (hOCR words in place, page geometry, extracted fields), a
scanner-like multi-page JPEG PDF, and a one-call ingest through the real Ingestor."""

from __future__ import annotations

import hashlib
import io
import secrets
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from reportlab.pdfgen import canvas

from central import catalog
from central.config import CentralConfig
from central.ingest import Ingestor
from central.keys import CentralKeys
from protocol.bag import (
    BAGIT_TXT,
    HOCR,
    METADATA,
    TEXT,
    DocumentField,
    OcrInfo,
    OcrPage,
    PackageMetadata,
    bag_info,
    manifest,
    original_member,
)
from tests.central.builders import CAPTURED_AT, seal_stream, tar_of, wire
from tests.central.conftest import Bundle

DPI = 100
PAGE_W, PAGE_H = 827, 1169    # A4 at 100 dpi
FIELDS = {"so_ky_hieu": ("125/QĐ-UBND", 0.91), "ngay": ("2025-03-14", 0.96), "loai": ("Quyết định", 0.72),
          "co_quan": ("Ủy ban nhân dân xã Tân Trào", 0.9),
          "trich_yeu": ("Về việc phê duyệt kế hoạch số hóa tài liệu lưu trữ năm 2025", 0.88)}
# nguoi_ky is left out on purpose: "not found" must show as nulls.


def page_words(index: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    return [("QUYẾT", (300, 200, 420, 240)), ("ĐỊNH", (430, 200, 530, 240)),
            (f"trang-{index + 1}", (330, 300, 500, 340)), ("lưu", (100, 500, 160, 530)),
            ("trữ", (170, 500, 230, 530))]


def hocr(pages: int) -> str:
    parts = ["<html><body>"]
    for index in range(pages):
        parts.append(f"<div class='ocr_page' id='page_{index + 1}' title='bbox 0 0 {PAGE_W} {PAGE_H}'>")
        parts.append(f"<span class='ocr_line' id='line_{index + 1}' title='bbox 100 200 530 530'>")
        for n, (text, (x0, y0, x1, y1)) in enumerate(page_words(index)):
            parts.append(f"<span class='ocrx_word' id='w_{index}_{n}' title='bbox {x0} {y0} {x1} {y1}; "
                         f"x_wconf 93'>{text}</span>")
        parts.append("</span></div>")
    parts.append("</body></html>")
    return "".join(parts)


def scanner_pdf(path: Path, pages: int, *, seed: int = 0) -> list[bytes]:
    """A colour scanner's PDF: one full-page JPEG per page (reportlab embeds JPEG bytes as they are).
    Returns the JPEGs."""
    pdf = canvas.Canvas(str(path), pagesize=(595.28, 841.89), invariant=1)
    jpegs = []
    for index in range(pages):
        image = Image.new("RGB", (PAGE_W, PAGE_H), (250, 245, 228))
        draw = ImageDraw.Draw(image)
        for text, box in page_words(index):
            draw.rectangle(box, outline=(40, 40, 40))
            draw.text((box[0] + 4, box[1] + 8), text.encode("ascii", "replace").decode(), fill=(0, 0, 0))
        draw.point([(seed + index * 7 + i, 50) for i in range(20)], fill=(0, 0, 0))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80, dpi=(DPI, DPI))
        jpeg = path.with_suffix(f".{index}.jpg")
        jpeg.write_bytes(buffer.getvalue())
        pdf.drawImage(str(jpeg), 0, 0, width=595.28, height=841.89)
        pdf.showPage()
        jpegs.append(buffer.getvalue())
    pdf.save()
    return jpegs


def rich_package(*, device: str, tid: str, seq: int, original: bytes, name: str, media_type: str,
                 pages: int, fields: dict[str, tuple[str, float]] | None = None,
                 captured_at: str = CAPTURED_AT, text: str | None = None, ocr_hocr: str | None = None,
                 page_info: tuple[OcrPage, ...] | None = None) -> bytes:
    """A package as the edge makes it; ``ocr_hocr``/``page_info``/``text`` from a real OCR run if given."""
    document = {k: DocumentField(v, c) for k, (v, c) in (FIELDS if fields is None else fields).items()}
    if page_info is None:
        page_info = tuple(OcrPage(dpi=DPI, width=PAGE_W, height=PAGE_H) for _ in range(pages))
    metadata = PackageMetadata(
        tid=tid, device_id=device, seq=seq, original_name=name,
        original_sha256=hashlib.sha256(original).hexdigest(), original_size=len(original),
        media_type=media_type, pages=pages, captured_at=captured_at,
        ocr=OcrInfo(engine="tesseract 5.3", languages=("vie",), dpi=DPI, seconds=1.2, page_info=page_info),
        document=document)
    words = ("\f".join(" ".join(w for w, _ in page_words(i)) for i in range(pages)))
    body = text if text is not None else words
    payload = {METADATA: metadata.to_json(), TEXT: body.encode(), HOCR: (ocr_hocr or hocr(pages)).encode(),
               original_member(media_type): original}
    hashes = {n: hashlib.sha256(d).hexdigest() for n, d in payload.items()}
    tags = {"bagit.txt": BAGIT_TXT,
            "bag-info.txt": bag_info(device_id=device, tid=tid, bagging_date="2025-03-14",
                                     payload_bytes=sum(map(len, payload.values())),
                                     payload_files=len(payload)),
            "manifest-sha256.txt": manifest(hashes)}
    return tar_of([(n, d, tarfile.REGTYPE, "") for n, d in [*tags.items(), *payload.items()]])


@dataclass(frozen=True, slots=True)
class Ingested:
    document_id: int
    sha256: str


def ingest(config: CentralConfig, keys: CentralKeys, bundle: Bundle, *, seq: int, original: bytes,
           name: str = "Quyết định 125 – Tân Trào.pdf", media_type: str = "application/pdf", pages: int = 2,
           fields: dict[str, tuple[str, float]] | None = None, text: str | None = None,
           captured_at: str = CAPTURED_AT, ocr_hocr: str | None = None,
           page_info: tuple[OcrPage, ...] | None = None) -> Ingested:
    """One document through the real Ingestor (verify, decrypt, store, catalogue); its arrival id."""
    doc_id = secrets.token_bytes(16)
    package = rich_package(device=bundle.device_id, tid=doc_id.hex(), seq=seq, original=original, name=name,
                           media_type=media_type, pages=pages, fields=fields, text=text,
                           captured_at=captured_at, ocr_hocr=ocr_hocr, page_info=page_info)
    sealed = seal_stream(device=bundle.device_id, seq=seq, signing_key=bundle.signing_key,
                         central_key=keys.encryption.public_key, pieces=[package], size=len(package),
                         doc_id=doc_id)
    conn = catalog.connect(config.paths.catalog)
    try:
        ingestor = Ingestor(conn, config.paths, keys, max_plaintext=config.ingest.max_plaintext_bytes)
        ingestor.handle_batch(wire(sealed.messages()))
        row = conn.execute("SELECT document_id FROM transfers WHERE tid = ?", (sealed.tid,)).fetchone()
    finally:
        conn.close()
    assert row is not None and row[0] is not None, "the document was not stored"
    return Ingested(int(row[0]), hashlib.sha256(original).hexdigest())
