"""Server time of the dashboard's fleet page and device API at 3,000 devices (aim: under 300 ms).

A real central app (aiohttp, SQLite catalog on disk, WAL) with the fleet of
``tests/central/test_dashboard.py`` (3,000 boxes in every state, 800 documents) plus a history of
60,000 stored transfers and a week of hourly device history; each request is made over loopback
``--runs`` times after one warm-up, and the median and worst are reported. The baseline is the
same requests against 30 devices, measured in the same run: the ratio says how the cost grows.

    .venv/bin/python -m bench.fleet_page [--runs 20] [--devices 3000]

What the fleet page costs a browser: the HTML shell, /api/session, /api/fleet, one page of
/api/devices (100, problems first) and the first page of /api/documents, fetched together.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from aiohttp import web

import tests.central.test_dashboard as fleet_data
from central import catalog
from central.admin import commands
from central.config import load_config
from central.http.app import create_app
from tests.support.broker import free_port

REQUESTS = {
    "page shell (/)": "/",
    "/api/fleet": "/api/fleet",
    "/api/devices?sort=problems&limit=100": "/api/devices?sort=problems&order=desc&limit=100&offset=0",
    "/api/devices?sort=last_receipt&limit=100": "/api/devices?sort=last_receipt&order=desc&limit=100",
    "/api/devices/{id} (device page)": "/api/devices/{device}",
    "/api/documents?limit=51": "/api/documents?limit=51&offset=0",
    "/api/documents?q=quyet dinh": "/api/documents?q=quyet%20dinh&limit=51",
    "/metrics": "/metrics",
}
FLEET_PAGE = ("/api/fleet", "/api/devices?sort=problems&limit=100", "/api/documents?limit=51")


def populate(home: Path, devices: int) -> str:
    config = load_config(home)
    fleet_data.FLEET = devices
    fleet_data.BOXES_WITH_DOCS = min(400, devices)
    boxes = fleet_data.make_fleet()
    fleet_data.populate(config, boxes)
    conn = catalog.connect(config.paths.catalog)
    try:
        at = catalog.utc_now()
        history = 20 * devices
        conn.executemany(
            "INSERT INTO transfers (tid, device, seq, header, state, created_at, updated_at, stored_at)"
            " VALUES (?, ?, ?, x'00', 'stored', ?, ?, ?)",
            [(f"{10**20 + k:032x}", boxes[k % devices].id, 100 + k, at, at, at) for k in range(history)])
        now = datetime.now(UTC)
        rows = []
        for hours_ago in range(24 * 7):
            hour = (now - timedelta(hours=hours_ago)).strftime("%Y-%m-%dT%H")
            rows += [(b.id, hour, b.backlog_docs, b.backlog_bytes, 60, 60 if b.online else 0)
                     for b in boxes if b.reported]
        conn.executemany("INSERT INTO device_history VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.commit()
    finally:
        conn.close()
    return boxes[1].id


async def measure(home: Path, device: str, runs: int) -> dict[str, tuple[float, float]]:
    config = load_config(home)
    runner = web.AppRunner(create_app(config, ingest=False))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    results: dict[str, tuple[float, float]] = {}
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {config.api_token}"}) as session:
            for name, path in {**REQUESTS, "fleet page (4 requests together)": ""}.items():
                timings = []
                for run in range(runs + 1):
                    start = time.perf_counter()
                    if path:
                        async with session.get(base + path.format(device=device)) as response:
                            assert response.status == 200, (path, response.status, await response.text())
                            await response.read()
                    else:
                        async def one(p: str) -> None:
                            async with session.get(base + p) as response:
                                assert response.status == 200
                                await response.read()
                        await asyncio.gather(*(one(p) for p in FLEET_PAGE), one("/"))
                    if run:   # the first is a warm-up
                        timings.append((time.perf_counter() - start) * 1000)
                results[name] = (statistics.median(timings), max(timings))
    finally:
        await runner.cleanup()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--devices", type=int, default=3000)
    args = parser.parse_args()
    figures = {}
    for devices in (30, args.devices):
        with tempfile.TemporaryDirectory(prefix="sohoa-bench-fleet-") as tmp:
            home = Path(tmp) / "central"
            commands.init(home, broker_url=f"mqtt://127.0.0.1:{free_port()}", http="127.0.0.1:1",
                          device_url=f"mqtt://127.0.0.1:{free_port()}")
            started = time.perf_counter()
            device = populate(home, devices)
            print(f"{devices} devices populated in {time.perf_counter() - started:.1f} s")
            figures[devices] = asyncio.run(measure(home, device, args.runs))
    many = f"{args.devices} dev median"
    header = f"{'request':<44} {'30 dev median':>14} {many:>16} {'worst':>8} {'ratio':>6}"
    print("\n" + header)
    for name in figures[args.devices]:
        small, (median, worst) = figures[30][name][0], figures[args.devices][name]
        print(f"{name:<44} {small:>11.1f} ms {median:>13.1f} ms {worst:>5.1f} ms {median / small:>6.1f}")
    slowest = max(m for m, _ in figures[args.devices].values())
    print(f"\nslowest median at {args.devices} devices: {slowest:.1f} ms (aim: under 300 ms)")


if __name__ == "__main__":
    main()
