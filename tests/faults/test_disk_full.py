"""The disk fills up — on the edge box (outbox, envelopes, processed/) or on central (catalog,
staging, storage) — while documents are flowing.

Expected of both sides: a real ENOSPC never corrupts SQLite, never turns a good scan into a
quarantined one, never makes central acknowledge what it could not store, is shown plainly to the
operator, and once space is freed the backlog completes exactly once without restarting anything.
The filesystem is a real size-capped tmpfs (skipped where mounting is not allowed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import aiohttp
import pytest

from edge.clerk import SERVICE_LOCK, VIEW_NAME
from edge.cli import status_report
from edge.fsutil import hold_lock
from edge.outbox import DocState
from edge.service import EdgeService
from edge.statuspage import write_view
from tests.faults.cluster import drop, make_documents
from tests.faults.disk import fill, free, free_bytes, tmpfs
from tests.faults.jepsen import assert_databases_intact, assert_exactly_once, resent_arrivals
from tests.faults.scenario import catalog, deployment_at, query, running_edge
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)

DISK_WORDS = ("disk full", "no space", "disk is full")


def _documents(directory: Path, count: int, seed: int, place: str) -> dict[str, str]:
    """Distinct scans whose names do not collide with another batch's (make_documents numbers from 0)."""
    made = make_documents(directory, count, seed=seed, side=144)   # ~21 KiB each, incompressible
    renamed = {}
    for name, sha in made.items():
        new = name.replace("Tuyên Quang", place)
        (directory / name).rename(directory / new)
        renamed[new] = sha
    return renamed


async def _good_scans_failed(service: EdgeService) -> list[str]:
    """Refused rows other than the one scan that is really bad."""
    return [d.name for d in await service.outbox.recent(1000)
            if d.state is DocState.FAILED and d.name != "Hỏng – không phải ảnh.pdf"]


def _mentions_disk_full(texts: list[str] | tuple[str, ...]) -> bool:
    return any(word in text.lower() for text in texts for word in DISK_WORDS)


# 40 kB: the next take already fails (row written, move into processed/ refused). 150 kB: a few
# scans are taken, then their packages or envelopes no longer fit.
@pytest.mark.parametrize("leave_bytes", [40_000, 150_000])
async def test_edge_disk_full_while_taking_and_packaging(tmp_path: Path, leave_bytes: int) -> None:
    first = _documents(tmp_path / "first", 3, 21, "Tuyên Quang")
    later = _documents(tmp_path / "later", 8, 22, "Hà Giang")
    with tmpfs(16) as disk, deployment_at(tmp_path, edge_home=disk / "edge") as deployment:
        cfg = deployment.edge_config()
        async with running_edge(deployment, cfg) as (service, edge_task):
            async def delivered(n: int) -> bool:
                return (await service.outbox.stats()).counts.get("delivered", 0) == n

            drop(tmp_path / "first", cfg.watch_dir)
            assert await wait_until(lambda: delivered(3), within=60)

            filler = fill(disk, leave_bytes=leave_bytes)
            drop(tmp_path / "later", cfg.watch_dir)
            # A bad scan too: quarantining it needs space as well, and must wait, not crash.
            (cfg.watch_dir / "Hỏng – không phải ảnh.pdf").write_text("văn bản, không phải PDF\n" * 50)

            async def alarmed() -> bool:
                report = await status_report(deployment.edge_home)
                return _mentions_disk_full([*report["alarms"], report["last_error"] or ""])

            assert await wait_until(alarmed, within=60), await status_report(deployment.edge_home)
            # Give the retries time to go wrong: several retry periods with the disk still full.
            await asyncio.sleep(15)
            assert not edge_task.done(), "the edge service stopped on a full disk"
            report = await status_report(deployment.edge_home)
            assert await _good_scans_failed(service) == [], report   # a full disk fails no good scan
            assert free_bytes(disk) <= leave_bytes + 4096
            counts = report["counts"]
            waiting = len(list(cfg.watch_dir.iterdir()))
            stuck = 11 - counts["delivered"]
            assert stuck > 0, "the disk filled up too late to matter"

            freed_at = time.monotonic()
            free(filler)
            assert await wait_until(lambda: delivered(11), within=90), await service.outbox.stats()
            drain_s = time.monotonic() - freed_at

            async def cleared() -> bool:
                report = await status_report(deployment.edge_home)
                return not _mentions_disk_full(report["alarms"])

            assert await wait_until(cleared, within=30), await status_report(deployment.edge_home)
            assert not edge_task.done()
            assert await _good_scans_failed(service) == []
        print(f"\nedge disk full: 11 documents, {stuck} held back while full ({waiting} still in the "
              f"watch folder, counts {counts}), drained {drain_s:.1f} s after freeing space")
        verdict = assert_exactly_once({**first, **later}, catalog(deployment.central_home))
        assert verdict.summary.ok == 11
        assert resent_arrivals(catalog(deployment.central_home)) == []
        assert list(cfg.watch_dir.iterdir()) == [cfg.refused_dir]
        # Only the bad scan is handed back, with its reason, once there was room to do so.
        report = await status_report(deployment.edge_home)
        assert [item["name"] for item in report["failed"]] == ["Hỏng – không phải ảnh.pdf"]
        assert report["failed"][0]["reason"]
        assert_databases_intact(deployment.edge_home)
        assert_databases_intact(deployment.central_home)


async def test_central_disk_full_during_sync(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = _documents(tmp_path / "first", 3, 31, "Tuyên Quang")
    later = _documents(tmp_path / "later", 8, 32, "Hà Giang")
    with tmpfs(24) as disk, deployment_at(tmp_path, central_home=disk / "central") as deployment:
        cfg = deployment.edge_config()
        async with running_edge(deployment, cfg) as (service, edge_task):
            async def delivered(n: int) -> bool:
                return (await service.outbox.stats()).counts.get("delivered", 0) == n

            drop(tmp_path / "first", cfg.watch_dir)
            assert await wait_until(lambda: delivered(3), within=60)

            filler = fill(disk, leave_bytes=30_000)
            drop(tmp_path / "later", cfg.watch_dir)

            async def packaged() -> bool:
                counts = (await service.outbox.stats()).counts
                return counts.get("packaged", 0) + counts.get("sending", 0) + counts["delivered"] == 11

            assert await wait_until(packaged, within=60)
            await asyncio.sleep(15)     # sync runs into the full disk
            stats = await service.outbox.stats()
            stuck = 11 - stats.counts.get("delivered", 0)
            assert stuck > 0, "central stored everything: the disk was not full enough to matter"
            # Whatever central stored, it stored whole; nothing is receipted that is not in the catalog.
            stored = catalog(deployment.central_home).arrivals
            assert len(stored) == stats.counts.get("delivered", 0), (stored, stats)
            metrics = await _metrics(deployment.api)
            errors = [r.getMessage() for r in caplog.records if r.name.startswith("sohoa.central")
                      and r.levelno >= logging.WARNING]
            assert _mentions_disk_full(errors), errors
            assert not edge_task.done()

            freed_at = time.monotonic()
            free(filler)
            assert await wait_until(lambda: delivered(11), within=120), await service.outbox.stats()
            drain_s = time.monotonic() - freed_at
        print(f"\ncentral metrics while full: {[m for m in metrics.splitlines() if 'error' in m.lower()]}")
        print(f"\ncentral disk full: 11 documents, {stuck} held back while full, drained {drain_s:.1f} s "
              f"after freeing space")
        verdict = assert_exactly_once({**first, **later}, catalog(deployment.central_home))
        assert verdict.summary.ok == 11
        rows = query(deployment.central_home / "catalog.db", "SELECT COUNT(*) FROM documents")
        assert rows[0][0] == 11
        assert_databases_intact(deployment.edge_home)
        assert_databases_intact(deployment.central_home)


async def _metrics(api: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(api + "/metrics") as response:
        return await response.text()


async def test_on_a_full_disk_edge_status_still_says_the_service_runs_and_how_full(tmp_path: Path) -> None:
    """Found in the field: with the disk full the clerk's status files stopped being rewritten, so
    `sohoa edge status` called a running service stopped and offline, showed the free space of an
    hour ago, and (as root) would have opened the running service's outbox itself. The view is now
    rewritten in place when no new block is to be had, and whether the service runs comes from the
    lock it holds, not from how fresh its files are."""
    with tmpfs(4) as disk:
        home = disk / "edge"
        home.mkdir()
        view = {"device": "xa-tan-trao", "online": True, "disk_free_bytes": 3_000_000, "alarms": []}
        write_view(home / VIEW_NAME, {**view, "written_at": time.time() - 3600})
        filler = fill(disk)
        try:
            full = {**view, "written_at": time.time(), "alarms": ["disk full: no space left on device"] * 8}
            write_view(home / VIEW_NAME, full)   # in place: there is no block for a new file
            assert json.loads((home / VIEW_NAME).read_text())["alarms"] == full["alarms"]
            write_view(home / VIEW_NAME, {**view, "written_at": time.time() - 3600})   # stale again
            with hold_lock(home / SERVICE_LOCK):
                report = await status_report(home)
                assert report["service_running"] and report["online"]
                assert report["disk_free_bytes"] < 64 * 1024   # measured now, not the view's 3 MB
            assert not (await status_report(home))["service_running"]   # the lock is free: stopped
        finally:
            free(filler)
