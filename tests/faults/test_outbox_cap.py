"""Outbox cap while offline for a long time: nothing dropped, nothing evicted.

New scans stay untouched in the watch folder, the alarm shows in ``sohoa edge status``, and
everything is delivered, exactly once, once the link is back.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from edge.cli import status_report
from edge.ocr import FakeOcrEngine
from edge.service import OUTBOX_FULL
from tests.faults.cluster import drop, make_documents
from tests.faults.jepsen import assert_exactly_once
from tests.faults.scenario import catalog
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)


async def test_outbox_cap_keeps_scans_in_the_watch_folder_until_the_link_returns(
        deployment: Deployment, tmp_path: Path) -> None:
    dropped = make_documents(tmp_path / "docs", 10, seed=7, side=144)   # ~21 KiB each
    cfg = deployment.edge_config()
    # Room for about three documents (original + envelope) and no more.
    cfg = dataclasses.replace(cfg, outbox=dataclasses.replace(cfg.outbox, cap_bytes=140_000))
    deployment.broker.stop()          # the commune's link is down

    async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=cfg) as service:
        drop(tmp_path / "docs", cfg.watch_dir)

        async def full() -> bool:
            stats = await service.outbox.stats()
            return OUTBOX_FULL in service.counters.alarms and stats.queued_docs >= 1

        assert await wait_until(full, within=60)
        stats = await service.outbox.stats()
        assert stats.queued_bytes <= 140_000
        waiting = sorted(cfg.watch_dir.iterdir())
        assert len(waiting) + stats.queued_docs == 10
        # The scans left behind are byte-for-byte what the scanner wrote.
        for path in waiting:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == dropped[path.name]

        async def reported() -> bool:
            report = await status_report(deployment.edge_home)
            return OUTBOX_FULL in report["alarms"]

        assert await wait_until(reported, within=30)

        deployment.broker.start()     # the link is back

        async def drained() -> bool:
            stats = await service.outbox.stats()
            return stats.counts.get("delivered", 0) == 10

        assert await wait_until(drained, within=150), await service.outbox.stats()
        assert list(cfg.watch_dir.iterdir()) == []

        async def cleared() -> bool:
            return OUTBOX_FULL not in (await status_report(deployment.edge_home))["alarms"]

        assert await wait_until(cleared, within=30)

        docs = await deployment.get_json("/api/documents")
        assert isinstance(docs, list) and len(docs) == 10
        assert_exactly_once(dropped, catalog(deployment.central_home))
