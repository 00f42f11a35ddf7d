"""Hostile things in the scan share: odd names are carried as data (never as paths), non-files and
oversize files are quarantined with a reason, and nothing is written outside the two homes.

The OCR engine is the fake one (through the OcrEngine interface): this is about names and files,
and the real engine has its own end-to-end test.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path

import pytest

from edge.cli import status_report
from edge.ocr import FakeOcrEngine
from protocol.names import display_name
from tests.faults.cluster import make_documents
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)


def _longest_name(words: str, suffix: str) -> str:
    """The longest name this file system takes (255 bytes), in Vietnamese."""
    name = ""
    while len(os.fsencode(name + words[len(name) % len(words)] + suffix)) <= 255:
        name += words[len(name) % len(words)]
    return name + suffix


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


async def test_hostile_names_and_files(deployment: Deployment, tmp_path: Path) -> None:
    cfg = deployment.edge_config()
    watch = cfg.watch_dir
    sources = make_documents(tmp_path / "src", 6, seed=11)
    images = [tmp_path / "src" / name for name in sorted(sources)]
    deep = watch
    for level in range(15):   # a path of ~3.5 KB: folders inside folders, as a careless share may have
        deep = deep / (f"{level:02d} " + "Thư mục lưu trữ hồ sơ " * 7).strip()
    assert 3000 < len(os.fsencode(deep)) < 4000
    deep.mkdir(parents=True)
    nfd = unicodedata.normalize("NFD", "Quyết định số 12.png")
    names = {
        watch / nfd: "Quyết định số 12.png",
        watch / "📄 Biên bản họp 🇻🇳.png": "📄 Biên bản họp 🇻🇳.png",
        watch / "Báo cáo ..\\..\\etc\\passwd.png": "Báo cáo ..∖..∖etc∖passwd.png",
        watch / "Tờ trình\nsố 3\x1b[31m.png": "Tờ trình\ufffdsố 3\ufffd[31m.png",
        watch / _longest_name("Công văn số 7 về việc lưu trữ hồ sơ ", ".png"): None,
        deep / "Nghị quyết.png": "Nghị quyết.png",
    }
    before = _tree(tmp_path) - _tree(deployment.central_home) - _tree(deployment.edge_home)
    (watch / "mat-khau.png").symlink_to("/etc/passwd")
    os.mkfifo(watch / "máy quét.pdf")
    with (watch / "Lớn quá.pdf").open("wb") as huge:
        huge.truncate(10 * 1024**3)   # sparse: 10 GB claimed, nothing written
    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()

    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        for (target, _), source in zip(names.items(), images, strict=True):
            target.write_bytes(source.read_bytes())

        async def settled() -> bool:
            stats = await service.outbox.stats()
            return stats.counts.get("delivered", 0) == len(names) and stats.failed == 3

        assert await wait_until(settled, within=120), (await service.outbox.stats(),
                                                      sorted(p.name for p in cfg.refused_dir.iterdir()))
        docs = await deployment.get_json("/api/documents")
        assert isinstance(docs, list)

    shown = {str(d["filename"]) for d in docs}
    for target, expected in names.items():
        assert (expected or display_name(target.name)) in shown
    assert all(unicodedata.is_normalized("NFC", name) for name in shown)
    # The three refusals are kept for a human, each with its reason; the link was not followed.
    report = await status_report(deployment.edge_home)
    codes = {item["name"]: item["code"] for item in report["failed"]}
    assert codes == {"mat-khau.png": "not_a_file", "máy quét.pdf": "not_a_file", "Lớn quá.pdf": "too_large"}
    assert (cfg.refused_dir / "mat-khau.png").is_symlink()
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd
    # Nothing new anywhere but inside the two homes and the clerk's refused folder (the watch
    # folder otherwise only lost files).
    after = _tree(tmp_path) - _tree(deployment.central_home) - _tree(deployment.edge_home)
    after -= {cfg.refused_dir} | _tree(cfg.refused_dir)
    assert after <= before | {deep.parent, deep} | set(deep.parents)
    # Central stores by content address only: no sender name appears under its storage root.
    stored = [p.name for p in (deployment.central_home / "storage").rglob("*") if p.is_file()]
    assert stored and all(len(name) == 64 and all(c in "0123456789abcdef" for c in name)
                          for name in stored)
