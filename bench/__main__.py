"""``make bench``: every figure a ratio against a baseline measured in the same run.

    .venv/bin/python -m bench [--quick] [--only NAME,...] [--out bench/results.json]

Writes ``bench/results.json`` (figures, their baselines, the machine: cores, load average before and
after) and prints a Markdown table (the README's "Performance" section shows one). Figures:

  ocr_ratio               our OCR stage ÷ raw ``tesseract -l vie`` (OMP_THREAD_LIMIT=1, one per core)
  wire_overhead           MQTT bytes both ways ÷ ciphertext bytes (bench.wire)
  wire_vs_original_jpeg   MQTT bytes ÷ the original JPEG scans' bytes (bench.wire)
  drain_ratio_256k        MQTT QoS 1 goodput at 256 kbit/s, 0.5 s RTT ÷ a plain TCP sender through
                          the same throttle (and ÷ the link rate) (bench.link_model)
  central_ingest_ratio    central's ingest bytes/s ÷ raw Mosquitto's, same devices (bench.central_ingest)
  workers_3_vs_1          three central workers' bytes/s ÷ one worker's (bench.central_ingest --workers)
  edge_peak_rss_mb_500mb  the edge process's peak RSS while it takes, packages and sends a 500 MB scan
                          (ratio: ÷ the scan's size)
  edge_idle_cpu           the edge process's CPU seconds per wall second while idle and connected
  broker_10k              (optional, ~5 min: ``--only broker_10k``) received msg/s with 10,000 devices
                          connected to the generated Mosquitto config ÷ the same load from 100 devices;
                          details: connect rate, broker RSS per device, idle CPU, restart
                          (bench.broker_devices)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results.json")
MB = 1_000_000


def ocr_ratio(quick: bool) -> dict[str, Any]:
    from bench import ocr_throughput  # noqa: PLC0415 - each figure imports what it needs

    rows = ocr_throughput.measure(pages=4 if quick else 10)
    return {"value": rows["sohoa_vs_raw_omp1_throughput"], "baseline": "raw tesseract, OMP_THREAD_LIMIT=1, "
            "one process per core, same pages", "details": rows}


def wire(quick: bool) -> dict[str, dict[str, Any]]:
    from bench import wire as wire_bench  # noqa: PLC0415

    rows = wire_bench.measure(pages=3 if quick else 8)
    return {"wire_overhead": {"value": rows["wire_overhead"], "baseline": "ciphertext bytes",
                              "details": rows},
            "wire_vs_original_jpeg": {"value": rows["wire_vs_original_jpeg"],
                                      "baseline": "original JPEG bytes", "details": rows}}


def drain_ratio_256k(quick: bool) -> dict[str, Any]:
    from bench import link_model  # noqa: PLC0415
    from tests.support.broker import free_port, running_broker  # noqa: PLC0415

    link = link_model.Link(kbit=256.0, latency_s=0.25)
    seconds = 4.0 if quick else 8.0
    raw = link_model.measure_raw(link, seconds)
    with tempfile.TemporaryDirectory(prefix="sohoa-bench-") as tmp:
        port = free_port()
        directory = Path(tmp)
        with running_broker(link_model.broker_config(directory, port), port, directory / "mosquitto.log"):
            run = link_model.measure_mqtt(port, link, 32 * 1024, 8, seconds)
    return {"value": round(run.goodput / raw, 3), "baseline": "a plain TCP sender through the same "
            "256 kbit/s, 0.25 s one-way throttle", "vs_link_rate": round(run.goodput / link.rate, 3),
            "details": {"mqtt_goodput_B_s": round(run.goodput), "tcp_B_s": round(raw),
                        "segment": 32 * 1024, "window": 8}}


def central_ingest_ratio(quick: bool) -> dict[str, Any]:
    from bench import central_ingest  # noqa: PLC0415

    args = argparse.Namespace(devices=200 if quick else 1000, docs=1, size=110_000, before=None,
                              strace=False, big_mib=0, profile=None, gil=False, keep=None, ingest=[],
                              workers=1)
    figures = central_ingest.measure(args)
    return {"value": figures["central_ingest_ratio"], "baseline": "raw Mosquitto: the same devices and "
            "messages to a counting subscriber", "details": figures}


def workers_3_vs_1(quick: bool) -> dict[str, Any]:
    from bench import central_ingest  # noqa: PLC0415

    return central_ingest.workers_ratio(devices=200 if quick else 600, workers=3)


def edge_figures(quick: bool) -> dict[str, dict[str, Any]]:
    from bench import edge_process  # noqa: PLC0415

    idle, peak = edge_process.measure(scan_mb=100 if quick else 500, idle_seconds=10 if quick else 30)
    return {"edge_idle_cpu": idle, "edge_peak_rss_mb_500mb": peak}


def broker_10k(quick: bool) -> dict[str, Any]:
    from bench import broker_devices  # noqa: PLC0415

    return broker_devices.figure(10_000, quick=quick)


FIGURES: dict[str, Callable[[bool], dict[str, Any]]] = {
    "ocr_ratio": ocr_ratio,
    "wire": wire,
    "drain_ratio_256k": drain_ratio_256k,
    "central_ingest_ratio": central_ingest_ratio,
    "workers_3_vs_1": workers_3_vs_1,
    "edge": edge_figures,
    "broker_10k": broker_10k,
}
# Measured only when named in --only: minutes of setup (10,000 enrolments) for a figure that changes
# with Mosquitto's version and the product's broker config, not with most commits.
OPTIONAL = frozenset({"broker_10k"})


def table(results: dict[str, Any]) -> str:
    lines = [f"cores: {results['machine']['cores']}, load average before/after: "
             f"{results['machine']['load_before']} / {results['machine']['load_after']}", "",
             "| figure | value | baseline (same run) |", "|---|---|---|"]
    for name, figure in results["figures"].items():
        if "error" in figure:
            lines.append(f"| {name} | not measured: {figure['error']} | |")
        else:
            lines.append(f"| {name} | {figure['value']} | {figure['baseline']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a few minutes)")
    parser.add_argument("--only", default="", help=f"comma-separated among {', '.join(FIGURES)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    chosen = [n for n in args.only.split(",") if n] or [n for n in FIGURES if n not in OPTIONAL]
    unknown = set(chosen) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figures {sorted(unknown)}; choose among {', '.join(FIGURES)}")
    previous: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads(args.out.read_text())
    figures: dict[str, Any] = dict(previous.get("figures", {})) if args.only else {}
    machine = {"cores": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()],
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick}
    for name in chosen:
        print(f"measuring {name}…", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            measured = FIGURES[name](args.quick)
        except Exception as exc:  # a figure that cannot be measured here is reported, not fatal
            print(f"  {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            measured = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        group = measured if all(isinstance(v, dict) for v in measured.values()) and "value" not in measured \
            and "error" not in measured else {name: measured}
        for key, figure in group.items():
            figure["seconds"] = round(time.monotonic() - started, 1)
            figures[key] = figure
    machine["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results = {"machine": machine, "figures": figures}
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
