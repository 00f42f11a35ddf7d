"""The edge process itself: CPU while idle, and peak RSS while it takes a very large scan.

    .venv/bin/python -m bench.edge_process [--scan-mb 500] [--idle-seconds 30]

A real deployment on this machine (generated broker config, ``sohoa central run``) and the real
``sohoa edge run`` with its production settings and real tesseract. Idle: connected, nothing to do,
CPU seconds ÷ wall seconds over ``--idle-seconds``. Then a PDF of ``--scan-mb`` MB is dropped (one
A4 page, plus an unreferenced stream of incompressible bytes: what a scanner's big register costs the
packaging, encryption and upload path, without hours of OCR); the figure is the edge process's
peak RSS (VmHWM) from start to the receipt, beside the scan's size.

Where the memory goes: the process's RSS (anonymous and file-backed) is sampled every 50 ms beside
the document's outbox state, and the figure's details give the peak per state. ``--before DIR``
runs the same measurement with the code in DIR (e.g. a ``git archive`` of the previous commit)
in the same run, so the two peaks can be compared under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from tests.faults.cluster import ROOT, Process, cluster
from tests.faults.scenario import query

MB = 1_000_000


def big_pdf(path: Path, size: int) -> None:
    """A valid one-page PDF of ``size`` bytes: an unreferenced stream of random bytes fills it."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>",
               b"<< /Length 44 >>\nstream\nBT /F1 24 Tf 72 720 Td (So ho a) Tj ET\nendstream"]
    filler = max(0, size - 2048)
    with path.open("wb") as out:
        out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for number, body in enumerate(objects, start=1):
            offsets.append(out.tell())
            out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
        offsets.append(out.tell())
        out.write(f"5 0 obj\n<< /Length {filler} >>\nstream\n".encode())
        chunk = os.urandom(1 << 20)
        left = filler
        while left > 0:
            out.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)
        out.write(b"\nendstream\nendobj\n")
        xref = out.tell()
        out.write(f"xref\n0 {len(offsets) + 1}\n0000000000 65535 f \n".encode())
        for offset in offsets:
            out.write(f"{offset:010d} 00000 n \n".encode())
        out.write(f"trailer\n<< /Size {len(offsets) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())


def _hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _rss_kb(pid: int) -> tuple[int, int, int]:
    """(RSS, anonymous, file-backed) in KiB, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
            fields[line.split(":")[0]] = int(line.split()[1])
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0), fields.get("RssFile", 0)


class StageSampler(threading.Thread):
    """RSS every 50 ms, tagged with the document's outbox state (read every 250 ms)."""

    def __init__(self, pid: int, outbox: Path) -> None:
        super().__init__(daemon=True)
        self._pid = pid
        self._outbox = outbox
        self._stop_event = threading.Event()
        self.state = "idle"
        self.peaks: dict[str, list[int]] = {}   # state -> [rss, anon, file] peaks (KiB)

    def run(self) -> None:
        next_state = 0.0
        while not self._stop_event.wait(0.05):
            now = time.monotonic()
            if now >= next_state:
                next_state = now + 0.25
                try:
                    rows = query(self._outbox, "SELECT state, place FROM docs")
                except sqlite3.Error:
                    rows = []
                if rows:
                    self.state = f"{rows[0][0]}/{rows[0][1]}"
            try:
                sample = _rss_kb(self._pid)
            except OSError:
                return
            peak = self.peaks.setdefault(self.state, [0, 0, 0])
            for index, value in enumerate(sample):
                peak[index] = max(peak[index], value)

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop_event.set()
        self.join(timeout=5)
        return {state: {"rss_mb": round(rss / 1024, 1), "anon_mb": round(anon / 1024, 1),
                        "file_mb": round(file / 1024, 1)}
                for state, (rss, anon, file) in self.peaks.items()}


def measure(*, scan_mb: int = 500, idle_seconds: float = 30.0,
            code: Path = ROOT) -> tuple[dict[str, object], dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="sohoa-edge-bench-") as tmp:
        root = Path(tmp)
        with cluster(root) as deployment:
            edge = Process([sys.executable, "-m", "sohoa.cli", "edge", "run", "--home",
                            str(deployment.edge_home)], root / "edge-real.log", code=code)
            edge.start()
            sampler: StageSampler | None = None
            try:
                assert edge.proc is not None
                process = psutil.Process(edge.proc.pid)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not (deployment.edge_home / "status.json").exists():
                    time.sleep(0.2)
                time.sleep(3.0)   # past start-up (imports, recovery, the first status)
                cpu0, wall0 = sum(process.cpu_times()[:2]), time.monotonic()
                time.sleep(idle_seconds)
                cpu1, wall1 = sum(process.cpu_times()[:2]), time.monotonic()
                idle = {"value": round((cpu1 - cpu0) / (wall1 - wall0), 5),
                        "baseline": "wall-clock seconds (1.0 = one core busy)",
                        "details": {"cpu_s": round(cpu1 - cpu0, 3), "wall_s": round(wall1 - wall0, 1)}}
                rss_idle_kb = int(process.memory_info().rss / 1024)
                hwm_idle_kb = _hwm_kb(edge.proc.pid)
                sampler = StageSampler(edge.proc.pid, deployment.edge_home / "outbox.db")
                sampler.start()
                scans = root / "big"
                scans.mkdir()
                size = scan_mb * MB
                big_pdf(scans / "So dang ky ho tich 1990-2000.pdf", size)
                started = time.monotonic()
                deployment.dropped = {"So dang ky ho tich 1990-2000.pdf": ""}
                temp = deployment.watch / ".big.part"
                (scans / "So dang ky ho tich 1990-2000.pdf").rename(temp)
                temp.rename(deployment.watch / "So dang ky ho tich 1990-2000.pdf")
                delivered = False
                deadline = time.monotonic() + 1800
                while time.monotonic() < deadline and edge.alive:
                    if deployment.edge_counts().get("delivered", 0) >= 1:
                        delivered = True
                        break
                    time.sleep(1.0)
                peak_kb = _hwm_kb(edge.proc.pid)
                stages = sampler.stop()
                peak = {"value": round(peak_kb / 1024, 1), "baseline": f"the scan's {scan_mb} MB",
                        "ratio_to_scan": round(peak_kb * 1024 / size, 4),
                        "details": {"delivered": delivered, "seconds": round(time.monotonic() - started, 1),
                                    "counts": deployment.edge_counts(),
                                    # What start-up alone costs (imports, the first status), to tell
                                    # the scan's share of the peak from the process's own.
                                    "rss_idle_mb": round(rss_idle_kb / 1024, 1),
                                    "peak_before_scan_mb": round(hwm_idle_kb / 1024, 1),
                                    "peak_per_stage": stages}}
            finally:
                if sampler is not None and sampler.is_alive():
                    sampler.stop()
                edge.stop()
    return idle, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan-mb", type=int, default=500)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--before", help="a source tree of the code to compare against (same run)")
    parser.add_argument("--runs", type=int, default=1, help="alternate after/before this many times")
    args = parser.parse_args(argv)
    out: dict[str, object] = {}
    for run in range(args.runs):
        idle, peak = measure(scan_mb=args.scan_mb, idle_seconds=args.idle_seconds)
        out[f"after_{run}"] = {"edge_idle_cpu": idle, "edge_peak_rss_mb": peak}
        print(json.dumps(out[f"after_{run}"], indent=1), flush=True)
        if args.before:
            idle, peak = measure(scan_mb=args.scan_mb, idle_seconds=args.idle_seconds,
                                 code=Path(args.before).resolve())
            out[f"before_{run}"] = {"edge_idle_cpu": idle, "edge_peak_rss_mb": peak}
            print(json.dumps(out[f"before_{run}"], indent=1), flush=True)
    if args.before:
        afters = [v["edge_peak_rss_mb"]["value"] for k, v in out.items() if k.startswith("after")]
        befores = [v["edge_peak_rss_mb"]["value"] for k, v in out.items() if k.startswith("before")]
        print(json.dumps({"peak_rss_mb_after": afters, "peak_rss_mb_before": befores}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
