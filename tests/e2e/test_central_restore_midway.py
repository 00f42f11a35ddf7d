"""Central restored from last night's backup while a transfer was half-received and its document
existed only as a notice (``awaiting_original``).

Last night's backup holds the catalog (and objects) as they were mid-transfer; the segment journal
under ``staging/`` died with the disk. After the restore the box, which holds no receipt yet, must
still deliver the scan exactly once, and the awaiting document must be completed by its original,
not left "awaiting" behind a transfer central can never assemble.

Real Mosquitto, central and edge; the edge's link through the fault proxy so the transfer is slow
enough to be caught half-way. Fake OCR (one text per file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from bench.searchable_behind_big import noise_jpeg, place
from tests.faults.proxy import FaultProxy
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

LINK_KBIT = 2048
NAME = "Hồ sơ địa chính thửa 12.jpg"


def _held(home: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True) as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute("SELECT tid, state, held_bytes FROM transfers")]


def _backup(home: Path, to: Path) -> None:
    """Last night's copy: the catalog and the object store (the journal is not backed up)."""
    to.mkdir()
    for path in home.glob("catalog.db*"):
        shutil.copy2(path, to / path.name)
    shutil.copytree(home / "storage", to / "storage")


def _restore_after_disk_failure(home: Path, backup: Path) -> None:
    for path in home.glob("catalog.db*"):
        path.unlink()
    for lost in ("storage", "staging"):
        shutil.rmtree(home / lost, ignore_errors=True)
    for path in backup.glob("catalog.db*"):
        shutil.copy2(path, home / path.name)
    shutil.copytree(backup / "storage", home / "storage")


async def test_a_half_received_transfer_and_its_notice_survive_a_restore_without_the_journal(
        deployment: Deployment, tmp_path: Path) -> None:
    big = noise_jpeg(1_500_000, seed=7)
    sha = hashlib.sha256(big).hexdigest()
    async with FaultProxy("127.0.0.1", deployment.broker.device_port) as proxy:
        proxy.throttle(LINK_KBIT, 0.02)
        cfg = deployment.edge_config()
        cfg = dataclasses.replace(
            cfg, broker=dataclasses.replace(cfg.broker, url=f"mqtt://127.0.0.1:{proxy.port}"))
        async with running(deployment, edge_config=cfg):
            place(big, cfg.watch_dir, NAME)

            async def half_way() -> bool:
                docs = await deployment.get_json("/api/documents")
                rows = _held(deployment.central_home)
                return (isinstance(docs, list) and [d["state"] for d in docs] == ["awaiting_original"]
                        and any(state == "receiving" and 200_000 < held < 900_000 for _, state, held in rows))

            assert await wait_until(half_way, within=30, interval=0.2)
            (awaiting,) = await deployment.get_json("/api/documents")  # type: ignore[misc]
        # Central stopped between two group commits: last night's backup is taken now.
        _backup(deployment.central_home, tmp_path / "last-night")

        async with running(deployment, edge_config=cfg):              # the day goes on a little
            async def more() -> bool:
                return any(held > 1_000_000 for _, _, held in _held(deployment.central_home))
            assert await wait_until(more, within=30, interval=0.2)

        _restore_after_disk_failure(deployment.central_home, tmp_path / "last-night")

        proxy.throttle(None)
        async with running(deployment, edge_config=cfg) as service:
            async def receipted() -> bool:
                stats = await service.outbox.stats()
                return stats.counts.get("delivered", 0) == 1 and not await service.outbox.custody_pending()

            assert await wait_until(receipted, within=40), (await service.outbox.stats(),
                                                            _held(deployment.central_home))
            docs = await deployment.get_json("/api/documents")
            assert isinstance(docs, list)
            assert [(d["id"], d["state"], d["sha256"]) for d in docs] == [(awaiting["id"], "stored", sha)]
            assert await deployment.get_bytes(f"/api/documents/{awaiting['id']}/original") == big
            assert not [p for p in cfg.watch_dir.iterdir() if not p.name.startswith(".")]
        with sqlite3.connect(deployment.central_home / "catalog.db") as conn:
            events = [json.loads(r[0] or "{}") for r in conn.execute(
                "SELECT detail FROM fixity WHERE event IN ('ingest', 'duplicate')")]
        assert len(events) == 1, events
