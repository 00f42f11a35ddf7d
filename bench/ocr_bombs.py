"""Peak memory of the edge's OCR path on PDF "bombs": a few hundred bytes of PDF with a huge page.

Runs probe() + the engine exactly as the service does, in a fresh child process, and samples the
resident memory of that child and all its descendants (the process pool, tesseract) every 20 ms.
The baseline is the same measurement on an A4 scan in the same run.

    python -m bench.ocr_bombs [--sizes 4000 14400] [--json]
    PYTHONPATH=/path/to/older/checkout python -m bench.ocr_bombs   # the same figures for old code

Caution: the unpatched code rasterises a 14400 pt page to 60,000² px (the issue measured 14 GiB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

_CHILD = r"""
import asyncio, sys, time
from pathlib import Path
from edge.errors import EdgeError
from edge.media import probe
from edge.ocr import TesseractEngine
async def main(path):
    engine = TesseractEngine(("vie",), workers=1)
    started = time.monotonic()
    try:
        result = await engine.recognize(path, probe(path))
        print("ok", result.pages, "pages", repr(result.text[:40]))
    except EdgeError as exc:
        print("refused:", type(exc).__name__, exc)
    finally:
        await engine.aclose()
    print(f"seconds {time.monotonic() - started:.1f}")
asyncio.run(main(Path(sys.argv[1])))
"""


def bomb_pdf(path: Path, side_pt: int) -> None:
    """A one-page PDF whose page is ``side_pt`` points square, with one line of text (hand-written)."""
    content = b"BT /F1 24 Tf 72 72 Td (Trang) Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>" % (side_pt, side_pt),
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))


def peak_tree_rss(argv: list[str], interval: float = 0.02) -> tuple[int, str]:
    """Run ``argv``; return (peak summed RSS of it and its descendants, its stdout)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in family:
            try:
                total += member.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        peak = max(peak, total)
        time.sleep(interval)
    out = proc.stdout.read().decode() if proc.stdout else ""
    return peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 14400])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[str, Path]] = []
        a4 = Path(tmp) / "a4.pdf"
        from edge.samples import generate_samples  # noqa: PLC0415 - only the A4 baseline needs it
        sample = generate_samples(Path(tmp) / "s", 1)[0].path
        a4.write_bytes(sample.read_bytes())
        cases.append(("A4 scan (595×842 pt)", a4))
        for side in args.sizes:
            path = Path(tmp) / f"bomb-{side}.pdf"
            bomb_pdf(path, side)
            cases.append((f"bomb {side}×{side} pt ({path.stat().st_size} bytes)", path))
        for name, path in cases:
            started = time.monotonic()
            peak, out = peak_tree_rss([sys.executable, "-c", _CHILD, str(path)])
            rows.append({"case": name, "peak_tree_rss_mib": round(peak / 2**20),
                         "wall_s": round(time.monotonic() - started, 1),
                         "outcome": " ".join(out.split())[:160]})
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    print("| case | peak RSS (tree) | wall | outcome |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['peak_tree_rss_mib']} MiB | {row['wall_s']} s | {row['outcome']} |")


if __name__ == "__main__":
    main()
