"""A cloned SD card (issue 7, situation 9): two live boxes, one identity, the real broker.

The copy's scans are refused by central (sequence numbers the original already used): they must not
be stranded in the box's private home but handed back to the clerk with a reason that says what
happened, the box must raise an alarm, central must flag the device, and once an admin enrolls the
copy under its own id, ``sohoa edge retry --all`` sends the refused scans under the new identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from central.admin import commands as central_commands
from edge import cli as edge_cli
from edge import config as edge_config
from edge.alarms import IDENTITY_CLASH
from edge.config import EdgeConfig
from edge.ocr import FakeOcrEngine
from edge.service import EdgeService
from tests.faults.cluster import make_documents
from tests.support.deployment import TEST_INTAKE, Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)


def _config(home: Path) -> EdgeConfig:
    cfg = edge_config.load(home)
    return dataclasses.replace(cfg, intake=dataclasses.replace(cfg.intake, **TEST_INTAKE),  # type: ignore[arg-type]
                               retention=dataclasses.replace(cfg.retention, release_after_seconds=0.0))


@contextlib.asynccontextmanager
async def _edge(cfg: EdgeConfig) -> AsyncIterator[EdgeService]:
    service = EdgeService(cfg, ocr_engine=FakeOcrEngine())
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), 30)
    try:
        yield service
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_cloned_box_hands_its_scans_back_and_they_go_out_after_re_enrollment(
        deployment: Deployment, tmp_path: Path) -> None:
    docs = make_documents(tmp_path / "docs", 2, seed=17)
    first, second = sorted(docs)
    clone_home = tmp_path / "clone-edge"
    async with running(deployment, ocr_engine=FakeOcrEngine()):
        pass                                                  # the box in service: its outbox exists
    shutil.copytree(deployment.edge_home, clone_home)        # the SD card, copied: same key, same seq
    original_cfg = deployment.edge_config()
    clone_watch = tmp_path / "clone-scans"
    clone_watch.mkdir()
    clone_cfg = dataclasses.replace(_config(clone_home), watch_dir=clone_watch)

    async with running(deployment, ocr_engine=FakeOcrEngine()) as original, _edge(clone_cfg) as clone:
        shutil.copyfile(tmp_path / "docs" / first, original_cfg.watch_dir / first)

        async def original_delivered() -> bool:
            return (await original.outbox.stats()).counts["delivered"] == 1

        assert await wait_until(original_delivered, within=60)
        shutil.copyfile(tmp_path / "docs" / second, clone_watch / second)

        async def clone_refused() -> bool:
            return (await clone.outbox.stats()).failed == 1

        assert await wait_until(clone_refused, within=90), await clone.outbox.stats()
        status = await clone.status()
        devices = await deployment.get_json("/api/devices")
    assert IDENTITY_CLASH in status.alarms
    refused = clone_cfg.refused_dir
    assert (refused / second).exists()                      # handed back to the clerk, not stranded
    note = (refused / (second + ".lý-do.txt")).read_text("utf-8")
    assert "cùng danh tính" in note and "SequenceReusedError" in note and "sohoa edge retry --all" in note
    assert isinstance(devices, list) and devices[0]["possible_clone"] is not None

    # The admin enrolls the copy under its own id; the clerk (or the admin) retries its scans.
    bundle = tmp_path / "xa-tan-trao-2.toml"
    central_commands.enroll(deployment.central_home, "xa-tan-trao-2", bundle)
    new_home = tmp_path / "clone-edge-new"
    edge_cli.init(new_home, bundle, clone_watch)
    assert edge_cli.retry(new_home, [], every=True) == [clone_watch / second]
    async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=_config(new_home)) as renewed:
        async def delivered_under_new_id() -> bool:
            return (await renewed.outbox.stats()).counts["delivered"] == 1

        assert await wait_until(delivered_under_new_id, within=60)
        mine = await deployment.get_json("/api/documents", device="xa-tan-trao-2")
    assert isinstance(mine, list) and [(d["filename"], d["sha256"]) for d in mine] == [(second, docs[second])]
