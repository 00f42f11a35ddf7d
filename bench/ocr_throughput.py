"""OCR throughput: sohoa's TesseractEngine against raw `tesseract` on the same pages, same run.

Baselines, measured here on the same rasterised pages:
  raw-default   `tesseract page.png - -l vie`, sequential, tesseract's own OpenMP threads
  raw-omp1      the same with OMP_THREAD_LIMIT=1, one process per core (what DESIGN §2 prescribes)
The ratio that matters is sohoa pages/s ÷ raw-omp1 pages/s (1.0 = no overhead from our pipeline).

    python -m bench.ocr_throughput [--pages 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pypdfium2
from PIL import Image

from edge.media import probe
from edge.ocr import TesseractEngine
from edge.samples import generate_samples


def _rasterise(samples: list[Path], out: Path, dpi: int) -> list[Path]:
    """Every page as a PNG, so raw tesseract gets exactly the pixels our engine gets."""
    pages: list[Path] = []
    for index, path in enumerate(samples):
        if path.suffix.lower() == ".pdf":
            pdf = pypdfium2.PdfDocument(str(path))
            for number in range(len(pdf)):
                image = pdf[number].render(scale=dpi / 72).to_pil()
                target = out / f"{index}-{number}.png"
                image.save(target)
                pages.append(target)
        else:
            with Image.open(path) as image:
                for number in range(getattr(image, "n_frames", 1)):
                    image.seek(number)
                    target = out / f"{index}-{number}.png"
                    image.convert("RGB").save(target)
                    pages.append(target)
    return pages


def _raw(pages: list[Path], *, workers: int, omp: str | None) -> float:
    env = dict(os.environ)
    if omp is None:
        env.pop("OMP_THREAD_LIMIT", None)
    else:
        env["OMP_THREAD_LIMIT"] = omp

    def one(page: Path) -> None:
        subprocess.run(["tesseract", str(page), "-", "-l", "vie"], env=env, check=True,
                       capture_output=True)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, pages))
    return time.perf_counter() - started


async def _ours(samples: list[Path], workers: int, dpi: int) -> tuple[float, int]:
    engine = TesseractEngine(("vie",), workers=workers, dpi=dpi)
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(engine.recognize(p, probe(p)) for p in samples))
        return time.perf_counter() - started, sum(r.pages for r in results)
    finally:
        await engine.aclose()


def measure(pages: int = 10, dpi: int = 300) -> dict[str, float | int]:
    """Raw tesseract (default threads; OMP_THREAD_LIMIT=1 per core) and ours, on the same pages."""
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        samples = [s.path for s in generate_samples(root / "samples", pages=pages)]
        (root / "pages").mkdir()
        rasters = _rasterise(samples, root / "pages", dpi)
        # Warm the page cache and tesseract's model load once, outside the timings.
        _raw(rasters[:1], workers=1, omp="1")
        raw_default = _raw(rasters, workers=1, omp=None)
        raw_omp1 = _raw(rasters, workers=cores, omp="1")
        ours, our_pages = asyncio.run(_ours(samples, cores, dpi))
    n = len(rasters)
    return {
        "pages": n,
        "cores": cores,
        "raw_default_s_per_page": round(raw_default / n, 3),
        "raw_omp1_per_core_s_per_page": round(raw_omp1 / n, 3),
        "sohoa_s_per_page": round(ours / our_pages, 3),
        "sohoa_vs_raw_omp1_throughput": round((our_pages / ours) / (n / raw_omp1), 3),
        "sohoa_vs_raw_default_throughput": round((our_pages / ours) / (n / raw_default), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--dpi", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = measure(args.pages, args.dpi)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| measure | value |\n|---|---|")
    for key, value in rows.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
