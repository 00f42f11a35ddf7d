"""The archival copy through the wired path: a multi-page JPEG scanner PDF, OCR'd by real tesseract,
packaged as the edge packages it, ingested by central's real Ingestor, then built, signed and stored by
the archival worker (its child process). Reports size against the original, the PDF/A-2b property
checks, JPEG pages byte for byte, the text layer read back, poppler's pdfsig on the stored copy and on
a one-bit-flipped copy, and ``sohoa central verify`` on a one-bit flip in each kind of stored object.

    python -m bench.archival_job [--pages 4]

No PDF/A validator is installable here (see bench/archival_pdfa.py): the properties are checked one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

import pikepdf

from bench.archival_pdfa import ocr, pdfa_checks, scanner_pdf, word_recall
from central import catalog
from central.admin import commands
from central.catalog.db import Database
from central.config import load_config
from central.keys import load_keys
from central.records.archive_jobs import ArchiveWorker
from central.storage import ObjectStore
from tests.central.conftest import read_bundle
from tests.central.records_builders import ingest


async def build_one(home: Path) -> tuple[float, dict[str, object]]:
    config = load_config(home)
    db = Database(config.paths.catalog, readonly=False, name="bench-archive")
    try:
        worker = ArchiveWorker(config.paths, db)
        await worker.start()
        started = time.monotonic()
        job = await db.call(worker._next)
        assert job is not None
        await worker.process(job)
        seconds = time.monotonic() - started
    finally:
        await db.close()
    conn = catalog.connect(config.paths.catalog, readonly=True)
    row = dict(conn.execute("SELECT * FROM archive_jobs").fetchone())
    conn.close()
    return seconds, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        original = root / "scan.pdf"
        scanner_pdf(original, args.pages)
        result = asyncio.run(ocr(original))
        home = root / "central"
        commands.init(home, broker_url="mqtt://127.0.0.1:1", http="127.0.0.1:2",
                      device_url="mqtt://127.0.0.1:3", archive_name="Lưu trữ lịch sử tỉnh Tuyên Quang")
        commands.enroll(home, "xa-tan-trao", root / "bundle.toml")
        config = load_config(home)
        doc = ingest(config, load_keys(config.paths), read_bundle(root / "bundle.toml"), seq=1,
                     original=original.read_bytes(), pages=args.pages, text=result.text, ocr_hocr=result.hocr,
                     page_info=result.page_info)
        seconds, row = asyncio.run(build_one(home))
        store = ObjectStore(config.paths.objects)
        copy = store.path_for(str(row["archival_sha256"]))
        size_original, size_copy = original.stat().st_size, copy.stat().st_size
        print(f"## Archival copy of a {args.pages}-page JPEG scanner PDF, built by the archival worker\n")
        print(f"job: state {row['state']}, attempts {row['attempts']}, {seconds:.1f} s wall (child process: "
              f"spawn + build + sign + store)")
        print(f"original {size_original:,} B; archival copy (PDF/A-2b, signed) {size_copy:,} B "
              f"({size_copy / size_original:.3f}× the original)")
        with pikepdf.open(copy) as built:
            jpegs = [bytes(next(iter(p.get_images().values())).read_raw_bytes()) for p in built.pages]
        same = all(jpeg == original.with_suffix(f".{n}.jpg").read_bytes() for n, jpeg in enumerate(jpegs))
        print(f"JPEG page streams byte-identical to the scanner's: {same}")
        for check, ok in pdfa_checks(copy).items():
            print(f"- {check}: {'yes' if ok else 'NO'}")
        text = subprocess.run(["pdftotext", str(copy), "-"], capture_output=True, text=True,
                              check=True).stdout
        recall = [round(word_recall(o, p), 3) for o, p in
                  zip(result.text.split("\f"), text.split("\f"), strict=False)]
        print(f"text layer read back by pdftotext, share of the OCR's words found per page: {recall}")
        sig = subprocess.run(["pdfsig", str(copy)], capture_output=True, text=True, check=False)
        print(f"pdfsig on the stored copy (exit {sig.returncode}):")
        print("\n".join("    " + line for line in sig.stdout.strip().splitlines()))
        flipped = root / "flipped.pdf"
        data = bytearray(copy.read_bytes())
        data[len(data) // 3] ^= 0x01
        flipped.write_bytes(bytes(data))
        bad = subprocess.run(["pdfsig", str(flipped)], capture_output=True, text=True, check=False)
        print(f"pdfsig after one bit flipped (exit {bad.returncode}): "
              + "; ".join(line.strip() for line in bad.stdout.splitlines() if "Validation" in line))
        conn = catalog.connect(config.paths.catalog, readonly=True)
        package = conn.execute("SELECT package_sha256 FROM documents").fetchone()[0]
        conn.close()
        print(f"verify before any damage: {commands.verify(home) or 'all stored objects verify'}")
        archival = str(row["archival_sha256"])
        for kind, sha in (("original", doc.sha256), ("package", package), ("archival", archival)):
            path = store.path_for(sha)
            good = path.read_bytes()
            bits = bytearray(good)
            bits[len(bits) // 2] ^= 0x01
            path.chmod(0o600)
            path.write_bytes(bytes(bits))
            problems = commands.verify(home, actor="bench")
            print(f"verify after one bit flipped in the {kind}: {problems}")
            path.write_bytes(good)


if __name__ == "__main__":
    main()
