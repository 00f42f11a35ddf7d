"""Refused scans are the clerk's to fix and take back: `sohoa edge retry NAME|--all`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from edge import cli as edge_cli
from edge.ocr import FakeOcrEngine
from edge.quarantine import REASON_SUFFIX
from tests.faults.cluster import make_documents
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)
NAME = "Công văn số 0 – Tuyên Quang.png"


async def test_a_fixed_scan_is_taken_back_in_with_retry(deployment: Deployment, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = deployment.edge_config()
    make_documents(tmp_path / "docs", 1, seed=3)
    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        (cfg.watch_dir / NAME).write_bytes(b"")                   # the scanner wrote nothing
        (cfg.watch_dir / "Ghi chú.png").write_text("không phải ảnh")

        async def refused(n: int) -> bool:
            return (await service.outbox.stats()).failed == n

        assert await wait_until(lambda: refused(2), within=60)
        assert (cfg.refused_dir / (NAME + REASON_SUFFIX)).exists()
        # The clerk re-scans into the refused folder under the same name, then asks to retry it.
        shutil.copyfile(tmp_path / "docs" / NAME, cfg.refused_dir / NAME)
        back = edge_cli.retry(deployment.edge_home, [NAME])
        assert back == [cfg.watch_dir / NAME]
        assert not (cfg.refused_dir / (NAME + REASON_SUFFIX)).exists()

        async def delivered() -> bool:
            stats = await service.outbox.stats()
            return stats.counts["delivered"] == 1 and stats.failed == 1

        assert await wait_until(delivered, within=60), await service.outbox.stats()
        # --all takes back what is left (still not a scan: refused again, with its note).
        assert edge_cli.retry(deployment.edge_home, [], every=True) == [cfg.watch_dir / "Ghi chú.png"]
        assert await wait_until(lambda: refused(1), within=60)
        assert await wait_until(lambda: _noted(cfg.refused_dir / "Ghi chú.png"), within=30)
    with pytest.raises(FileNotFoundError):
        edge_cli.retry(deployment.edge_home, ["không có.png"])
    # The clerk runs it (every refusal note says so): it answers in the clerk's language.
    monkeypatch.setenv("LANG", "vi_VN.UTF-8")
    capsys.readouterr()
    home = deployment.edge_home
    assert edge_cli._retry(argparse.Namespace(home=home, names=["không có.png"], all=False)) == 1
    assert edge_cli._retry(argparse.Namespace(home=home, names=[], all=True)) == 0   # Ghi chú.png again
    said = capsys.readouterr().out
    assert "Không có bản quét bị từ chối nào tên “không có.png”" in said
    assert "Đã đưa lại vào thư mục quét: Ghi chú.png" in said


async def _noted(path: Path) -> bool:
    return path.exists() and path.with_name(path.name + REASON_SUFFIX).exists()
