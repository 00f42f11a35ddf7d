"""A restart in the middle of work: every taken scan keeps its own plaintext until its own receipt.

Regression: two identical scans held in processed/ used to be re-pointed at one shared file by
the recovery after a restart, and the first receipt deleted the other's only copy.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from edge import cli as edge_cli
from edge.clerk import SERVICE_LOCK
from edge.config import ConfigError
from edge.fsutil import hold_lock
from edge.ocr import FakeOcrEngine, TesseractEngine
from edge.outbox import Outbox
from sohoa import cli as sohoa_cli
from tests.faults.cluster import make_documents
from tests.support.deployment import Deployment, running
from tests.support.stalled_tesseract import StalledTesseract, assert_gone
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


async def test_identical_scans_each_keep_their_plaintext_across_a_restart(
        deployment: Deployment, tmp_path: Path) -> None:
    cfg = deployment.edge_config()
    (name, _sha), = make_documents(tmp_path / "docs", 1, seed=9).items()
    source = tmp_path / "docs" / name
    copies = ["Công văn số 5 – Tuyên Quang.png", "Công văn số 5 – Tuyên Quang (bản sao).png"]

    # OCR that never finishes in time: both scans are taken and then the box goes down.
    async with running(deployment, ocr_engine=FakeOcrEngine(delay=600)) as service:
        for copy in copies:
            shutil.copyfile(source, cfg.watch_dir / copy)

        async def both_taken() -> bool:
            return (await service.outbox.stats()).counts.get("stable", 0) == 2

        assert await wait_until(both_taken, within=30)
    held = sorted(cfg.processed_dir.iterdir())
    assert len(held) == 2   # one file per row, even for identical bytes

    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        async def both_delivered() -> bool:
            return ((await service.outbox.stats()).counts.get("delivered", 0) == 2
                    and not await service.outbox.custody_pending())

        assert await wait_until(both_delivered, within=60), await service.outbox.stats()
        docs = await deployment.get_json("/api/documents")
    # Central stores the content once, with one arrival (document) per scan; the edge lost nothing
    # and keeps nothing.
    assert isinstance(docs, list) and sorted(d["filename"] for d in docs) == sorted(copies)
    assert len({d["sha256"] for d in docs}) == 1
    assert len(list((deployment.central_home / "storage" / "objects").rglob(docs[0]["sha256"]))) == 1
    assert list(cfg.processed_dir.iterdir()) == [] and not cfg.refused_dir.exists()


async def test_stops_mid_page_kill_tesseract_count_no_attempt_and_read_the_page_again(
        deployment: Deployment, tmp_path: Path) -> None:
    """SIGTERM while tesseract reads a page (a real pool, a tesseract that never finishes), twice in a
    row, as an upgrade and its rollback do: no stop waits for the page, the scan is charged no
    attempt (three upgrades must not quarantine a good scan), and the next start reads it again and
    delivers it."""
    cfg = deployment.edge_config()
    stalled = StalledTesseract.make(tmp_path)
    (name, _sha), = make_documents(tmp_path / "docs", 1, seed=11).items()
    engine = TesseractEngine(workers=1, tesseract_cmd=str(stalled.command), page_timeout=600, filters=(),
                             orientation="off")
    shutil.copyfile(tmp_path / "docs" / name, cfg.watch_dir / name)
    for stop in ("upgrade", "rollback"):
        async with running(deployment, ocr_engine=engine):
            pid = await stalled.started()
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 30, stop
        assert_gone(pid)
        outbox = await Outbox.open(cfg.outbox_path)
        try:
            (doc,) = await outbox.unfinished()
        finally:
            await outbox.close()
        assert (doc.name, doc.attempts, doc.reason) == (name, 0, None), stop

    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        async def delivered() -> bool:
            return (await service.outbox.stats()).counts.get("delivered", 0) == 1

        assert await wait_until(delivered, within=60), await service.outbox.stats()


def test_one_service_per_home_and_no_re_init_under_a_running_one(deployment: Deployment,
                                                                 tmp_path: Path) -> None:
    """A second `sohoa edge run` on a home that is served exits 75 (both would take the same scans
    and publish under one client id), and `edge init --force` refuses to move a running queue away."""
    home = deployment.edge_home
    with hold_lock(home / SERVICE_LOCK):
        assert sohoa_cli.main(["edge", "run", "--home", str(home)]) == 75
        with pytest.raises(ConfigError, match="stop it first"):
            edge_cli.init(home, tmp_path / "bundle.toml", tmp_path / "scans", force=True)
