"""The archival PDF/A-2b of a multi-page JPEG document: size against the original, structure checks,
the text layer read back by an independent tool (poppler's pdftotext), and the archive's signature
verified by an independent tool (poppler's pdfsig).

    python -m bench.archival_pdfa [--pages 3] [--keep DIR]

No PDF/A validator is installable here (veraPDF is not packaged for Debian or PyPI, and nothing can
be downloaded): the PDF/A-2b requirements the builder relies on are checked one by one instead.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pikepdf
from PIL import Image
from reportlab.pdfgen import canvas

from bench.textmetrics import cer
from central.records.archival import build_pdfa
from central.records.archive_sign import make_signing_identity, sign_pdf
from edge.media import probe
from edge.ocr import OcrResult, TesseractEngine
from edge.testset import Degradation, degrade, make_document, render, truth_text


def scanner_pdf(path: Path, pages: int, *, seed: int = 0, dpi: int = 200) -> list[str]:
    """A colour scanner's PDF: one full-page JPEG per page (reportlab embeds JPEG data as is)."""
    rng = random.Random(seed)
    pdf = canvas.Canvas(str(path), pagesize=(595.28, 841.89), invariant=1)
    truths = []
    for index in range(pages):
        doc = make_document(rng, index)
        gray = degrade(render(doc, dpi), Degradation(dpi=dpi, skew=rng.uniform(-1, 1)), rng)
        # Paper is never white: a warm tint makes it a colour scan (Decree 30 asks for colour).
        colour = Image.merge("RGB", (gray, gray.point(lambda v: v * 245 // 255),
                                     gray.point(lambda v: v * 225 // 255)))
        buffer = io.BytesIO()
        colour.save(buffer, format="JPEG", quality=85, dpi=(dpi, dpi))
        jpeg = path.with_suffix(f".{index}.jpg")
        jpeg.write_bytes(buffer.getvalue())
        pdf.drawImage(str(jpeg), 0, 0, width=595.28, height=841.89)
        pdf.showPage()
        truths.append(truth_text(doc))
    pdf.save()
    return truths


def pdfa_checks(path: Path) -> dict[str, bool]:
    """The PDF/A-2b properties the builder is responsible for, each checked on the file."""
    with pikepdf.open(path) as pdf:
        meta = pdf.open_metadata()
        fonts = [font for page in pdf.pages for font in page.Resources.get("/Font", {}).values()]
        descendants = [d for f in fonts for d in f.get("/DescendantFonts", [])]
        intents = pdf.Root.get("/OutputIntents", [])
        return {
            "pdfaid part 2, conformance B in XMP": meta.get("pdfaid:part") == "2"
            and meta.get("pdfaid:conformance") == "B",
            "sRGB output intent (GTS_PDFA1, ICC N=3)": len(intents) == 1 and intents[0].S == "/GTS_PDFA1"
            and int(intents[0].DestOutputProfile.N) == 3,
            "every font embedded": all("/FontFile2" in d.FontDescriptor for d in descendants) and bool(fonts),
            "ToUnicode on every font": all("/ToUnicode" in f for f in fonts),
            "not encrypted": not pdf.is_encrypted,
            "trailer ID present": "/ID" in pdf.trailer,
            "no transparency (no SMask, no /Group)": all(
                "/SMask" not in image and "/Group" not in page.obj
                for page in pdf.pages for image in page.get_images().values()),
            "no JavaScript, no embedded files": "/Names" not in pdf.Root and "/OpenAction" not in pdf.Root,
        }


def _jpeg(page: pikepdf.Page) -> bytes:
    return bytes(next(iter(page.get_images().values())).read_raw_bytes())


def word_recall(expected: str, found: str) -> float:
    """Share of ``expected``'s words (as a multiset) present in ``found``: order-free, since
    pdftotext orders blocks its own way."""
    want, have = Counter(expected.split()), Counter(found.split())
    return sum((want & have).values()) / max(1, sum(want.values()))


def _indent(text: str, only: str = "") -> str:
    return "\n".join("    " + line for line in text.strip().splitlines() if only in line)


async def ocr(path: Path) -> OcrResult:
    engine = TesseractEngine(workers=2)
    try:
        return await engine.recognize(path, probe(path))
    finally:
        await engine.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="copy the files here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        original = root / "original.pdf"
        truths = scanner_pdf(original, args.pages)
        result = asyncio.run(ocr(original))
        pdfa, signed = root / "archival.pdf", root / "archival-signed.pdf"
        build_pdfa(original, "application/pdf", result.hocr, pdfa, title="Văn bản lưu trữ",
                   page_info=result.page_info)
        key, cert = make_signing_identity(root / "keys", archive_name="Lưu trữ lịch sử tỉnh Tuyên Quang")
        sign_pdf(pdfa, signed, key=key, cert=cert, reason="Bản số hóa lưu trữ (Nghị định 30/2020)")
        with pikepdf.open(pdfa) as built:
            same_jpeg = all(_jpeg(page) == original.with_suffix(f".{index}.jpg").read_bytes()
                            for index, page in enumerate(built.pages))
        text = subprocess.run(["pdftotext", str(signed), "-"], capture_output=True, text=True,
                              check=True).stdout
        pages_text = text.split("\f")
        qpdf = subprocess.run(["qpdf", "--check", str(signed)], capture_output=True, text=True, check=False)
        pdfsig = subprocess.run(["pdfsig", str(signed)], capture_output=True, text=True, check=False)
        tampered = root / "tampered.pdf"
        data = bytearray(signed.read_bytes())
        data[len(data) // 3] ^= 0x01
        tampered.write_bytes(bytes(data))
        pdfsig_bad = subprocess.run(["pdfsig", str(tampered)], capture_output=True, text=True, check=False)
        sizes = {name: path.stat().st_size for name, path in
                 (("original", original), ("pdfa", pdfa), ("signed", signed))}
        print(f"## Archival PDF/A-2b of a {args.pages}-page JPEG scanner PDF\n")
        print(f"original {sizes['original']:,} B; PDF/A {sizes['pdfa']:,} B "
              f"({sizes['pdfa'] / sizes['original']:.3f}×); signed {sizes['signed']:,} B "
              f"({sizes['signed'] / sizes['original']:.3f}×)")
        payload = sum(original.with_suffix(f".{n}.jpg").stat().st_size for n in range(args.pages))
        print(f"the JPEG images themselves: {payload:,} B (the original PDF holds them ASCII85-encoded); "
              f"PDF/A overhead over them: {sizes['pdfa'] - payload:,} B "
              f"({(sizes['pdfa'] - payload) / args.pages / 1024:.1f} KiB a page: text layer, font, ICC)")
        print(f"JPEG streams byte-identical to the original's: {same_jpeg}")
        for check, ok in pdfa_checks(signed).items():
            print(f"- {check}: {'yes' if ok else 'NO'}")
        verdict = [line for line in qpdf.stdout.splitlines() if "errors" in line]
        print(f"qpdf --check (exit {qpdf.returncode}): {verdict[-1] if verdict else qpdf.stderr.strip()}")
        recall = [word_recall(ocr_page, pdf_page)
                  for ocr_page, pdf_page in zip(result.text.split("\f"), pages_text, strict=False)]
        ocr_cers = [cer(truth, page) for truth, page in zip(truths, result.text.split("\f"), strict=False)]
        print(f"text layer read back by pdftotext: share of the OCR's words found, per page "
              f"{[round(r, 3) for r in recall]} (the OCR's own CER: {[round(c, 3) for c in ocr_cers]})")
        print("pdfsig (poppler):\n" + _indent(pdfsig.stdout))
        print("pdfsig after flipping one bit:\n" + _indent(pdfsig_bad.stdout, "Signature Validation"))
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in (original, pdfa, signed, cert):
                shutil.copy(path, args.keep / path.name)


if __name__ == "__main__":
    main()
