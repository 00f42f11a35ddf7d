"""A box whose uplink central defers for hours by quota while the clerk keeps scanning.

Central paces the box (its new-transfer bucket is empty: a quota, not a fault): every scan after the
first waits on the box. The clerk's page and `sohoa edge status` must say why nothing goes out, in
Vietnamese, and nothing may be marked failed or handed back to the clerk. Real Mosquitto, central and
edge; fake OCR.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge import cli as edge_cli
from edge.ocr import FakeOcrEngine
from edge.statuspage import current_view, render_page
from tests.faults.cluster import make_documents
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

VI_DEFERRED = "tạm hoãn"


async def test_a_box_deferred_by_quota_tells_the_clerk_why_in_vietnamese_and_fails_nothing(
        deployment: Deployment, tmp_path: Path) -> None:
    with (deployment.central_home / "central.toml").open("a") as toml:   # [ingest] is the last table
        toml.write("new_transfers_per_hour = 1\nnew_transfers_burst = 1\n")
    sources = make_documents(tmp_path / "src", 3, seed=5, side=120)
    cfg = deployment.edge_config()
    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        for name in sorted(sources):
            (cfg.watch_dir / name).write_bytes((tmp_path / "src" / name).read_bytes())

        async def paced() -> bool:
            stats = await service.outbox.stats()
            status = await service.status()
            return stats.counts.get("delivered", 0) == 1 and stats.queued_docs == 2 and bool(status.alarms)

        assert await wait_until(paced, within=30), (await service.outbox.stats(), await service.status())
        stats = await service.outbox.stats()
        assert stats.failed == 0 and stats.counts.get("failed", 0) == 0
        assert not cfg.refused_dir.exists() or not list(cfg.refused_dir.iterdir())
        page = render_page(await current_view(service), "vi")
        assert VI_DEFERRED in page, page

        async def cli_says_why() -> bool:   # from the files the service writes (status view, status.json)
            report = await edge_cli.status_report(deployment.edge_home)
            return VI_DEFERRED in edge_cli.render_status(report, "vi")

        assert await wait_until(cli_says_why, within=15), edge_cli.render_status(
            await edge_cli.status_report(deployment.edge_home), "vi")
        report = await edge_cli.status_report(deployment.edge_home)
        assert "quota" in edge_cli.render_status(report, "en")
        assert report["failed"] == []
