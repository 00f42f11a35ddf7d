"""Caps before work, end to end (issue 7 item 4): PDF page bombs and a page that exceeds the OCR
workers' address space are quarantined at once with a reason a clerk can read, never retried.
(Ordinary scans under the default limit are delivered by every other end-to-end test.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ocr_bombs import bomb_pdf
from edge.cli import status_report
from edge.ocr import TesseractEngine
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)


async def test_bombs_and_runaway_pages_are_quarantined_once(deployment: Deployment, tmp_path: Path) -> None:
    cfg = deployment.edge_config()
    (tmp_path / "src").mkdir()
    bomb_pdf(tmp_path / "src" / "bom 4000.pdf", 4000)
    bomb_pdf(tmp_path / "src" / "bom 14400.pdf", 14400)
    bomb_pdf(tmp_path / "src" / "bản đồ lớn.pdf", 2400)   # passes probe (read at 189 dpi)...
    # ...but not inside a worker allowed only 150 MiB: a deterministic refusal, not a retry.
    engine = TesseractEngine(workers=1, address_space=150 * 2**20)
    async with running(deployment, ocr_engine=engine) as service:
        for source in (tmp_path / "src").iterdir():
            (cfg.watch_dir / source.name).write_bytes(source.read_bytes())

        async def settled() -> bool:
            return (await service.outbox.stats()).failed == 3

        assert await wait_until(settled, within=120)
        assert (await service.outbox.stats()).counts.get("delivered", 0) == 0
        report = await status_report(deployment.edge_home)
    reasons = {item["name"]: item["detail"] for item in report["failed"]}
    assert {item["code"] for item in report["failed"]} == {"too_large"}
    assert set(reasons) == {"bom 4000.pdf", "bom 14400.pdf", "bản đồ lớn.pdf"}
    assert "1411 × 1411 mm" in reasons["bom 4000.pdf"] and "real paper size" in reasons["bom 4000.pdf"]
    assert "5080 × 5080 mm" in reasons["bom 14400.pdf"]
    assert "more memory than an OCR worker may use" in reasons["bản đồ lớn.pdf"]
    assert "attempt" not in reasons["bản đồ lớn.pdf"]      # quarantined at once, not after 3 tries
