"""Central restored from last night's backup (issue 7, situation 2), with the real broker and tesseract.

The clerk's scan was receipted and the box released it; then central's disk failed and it came back
from a backup taken before that scan. The clerk drops the scan again. The box must not trust its
memory of the old receipt: it sends the scan again, and central stores it, receipts it and makes it
searchable. On 39f124d the box deleted the re-drop at once as "a duplicate of a document already
delivered", and the scan existed nowhere.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from edge.samples import generate_samples
from protocol.names import fold
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(300)


def _backup(home: Path, to: Path) -> None:
    to.mkdir()
    for path in home.glob("catalog.db*"):
        shutil.copy2(path, to / path.name)
    shutil.copytree(home / "storage", to / "storage")


def _restore(home: Path, backup: Path) -> None:
    for path in home.glob("catalog.db*"):
        path.unlink()
    shutil.rmtree(home / "storage")
    for path in backup.glob("catalog.db*"):
        shutil.copy2(path, home / path.name)
    shutil.copytree(backup / "storage", home / "storage")


async def test_a_scan_lost_by_a_restored_central_is_sent_again_when_redropped(
        deployment: Deployment, tmp_path: Path) -> None:
    sample = next(s for s in generate_samples(tmp_path / "samples", pages=10) if s.media_type == "image/png")
    name = "Quyết định số 12 – UBND.png"
    sha = hashlib.sha256(sample.path.read_bytes()).hexdigest()
    watch = deployment.edge_config().watch_dir
    async with running(deployment):
        pass                                   # central initialised, nothing archived yet
    _backup(deployment.central_home, tmp_path / "last-night")

    async with running(deployment) as service:
        shutil.copyfile(sample.path, watch / name)

        async def released() -> bool:
            stats = await service.outbox.stats()
            return stats.counts.get("delivered", 0) == 1 and not await service.outbox.custody_pending()

        assert await wait_until(released, within=120)
        docs = await deployment.get_json("/api/documents")
        assert isinstance(docs, list) and [d["sha256"] for d in docs] == [sha]

    _restore(deployment.central_home, tmp_path / "last-night")   # the disk failed; last night's copy

    async with running(deployment) as service:
        assert await deployment.get_json("/api/documents") == []   # central lost the scan
        sent_before = service.uplink.segment_bytes
        shutil.copyfile(sample.path, watch / name)                 # the clerk drops it again

        async def receipted_again() -> bool:
            stats = await service.outbox.stats()
            return stats.counts.get("delivered", 0) == 2 and not await service.outbox.custody_pending()

        assert await wait_until(receipted_again, within=120), await service.outbox.stats()
        resent = service.uplink.segment_bytes - sent_before
        docs = await deployment.get_json("/api/documents")
        assert isinstance(docs, list) and [(d["filename"], d["sha256"]) for d in docs] == [(name, sha)]
        original = await deployment.get_bytes(f"/api/documents/{docs[0]['id']}/original")
        hits = await deployment.get_json("/api/documents", q=fold(sample.phrases[0]))
    assert hashlib.sha256(original).hexdigest() == sha
    assert isinstance(hits, list) and [h["sha256"] for h in hits] == [sha]
    rows = await _rows(deployment)
    assert [r for r in rows if r[0] == "delivered"] == [("delivered", sha)] * 2
    print(f"\nre-drop after the restore: {resent} ciphertext bytes sent again for a "
          f"{sample.path.stat().st_size}-byte scan")


async def _rows(deployment: Deployment) -> list[tuple[str, str]]:
    from edge.outbox import Outbox  # noqa: PLC0415

    outbox = await Outbox.open(deployment.edge_home / "outbox.db")
    try:
        return [(d.state.value, d.sha256) for d in await outbox.recent()]
    finally:
        await outbox.close()
