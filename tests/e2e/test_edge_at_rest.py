"""Data at rest on the edge box: plaintext goes once receipted, work files and keys are private,
and no secret reaches a log line or the status output."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import stat
from pathlib import Path

import pytest

from edge.cli import status_report
from edge.ocr import FakeOcrEngine
from tests.faults.cluster import drop, make_documents
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def _modes(root: Path) -> dict[Path, int]:
    # Taken while the edge works: a temp file listed a moment ago may already be renamed into place.
    modes: dict[Path, int] = {}
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(FileNotFoundError):
            modes[path] = stat.S_IMODE(path.lstat().st_mode)
    return modes


async def test_private_files_no_plaintext_left_no_secrets_in_logs(
        deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = deployment.edge_config()
    make_documents(tmp_path / "docs", 3, seed=5)
    seen_modes: dict[Path, int] = {}

    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        drop(tmp_path / "docs", cfg.watch_dir)

        async def packaged_or_done() -> bool:
            # Record modes while documents are held (originals in processed/, envelopes queued).
            seen_modes.update(_modes(cfg.home))
            return ((await service.outbox.stats()).counts.get("delivered", 0) == 3
                    and not await service.outbox.custody_pending())

        assert await wait_until(packaged_or_done, within=60, interval=0.05)
        report = await status_report(deployment.edge_home)

    # Everything the edge keeps is private to its user, except the two status files and the
    # service's lock (whether it runs; a pid at most), which the home's group may read (0640; the
    # home itself is 0700 unless `edge init --status-group`).
    status_files = {"status.json", "status-view.json", "service.lock"}

    def status_file(path: Path) -> bool:   # the file, or its atomic write's temporary twin
        return path.parent == cfg.home and any(
            path.name == name or (path.name.startswith(f".{name}.") and path.name.endswith(".tmp"))
            for name in status_files)

    loose = {str(p.relative_to(cfg.home)): oct(m) for p, m in seen_modes.items()
             if m & (0o037 if status_file(p) else 0o077)}
    assert loose == {}
    assert stat.S_IMODE(cfg.home.stat().st_mode) == 0o700
    # Receipted: no plaintext original, no envelope, no OCR/package temporaries remain.
    assert list(cfg.processed_dir.iterdir()) == []
    assert list(cfg.envelopes_dir.iterdir()) == []
    assert list(cfg.work_dir.iterdir()) == []

    secrets = {
        "broker password": cfg.broker.password,
        "device signing key": cfg.key_path.read_text().strip(),
        "device signing key (raw b64 of seed)": base64.b64encode(bytes(cfg.signing_key())).decode(),
        "central api token": deployment.token,
    }
    outputs = {
        "log": "\n".join(r.getMessage() for r in caplog.records),
        "status --json": json.dumps(report, ensure_ascii=False),
        "status.json": cfg.status_path.read_text(),
        "broker log": (deployment.root / "broker.log").read_text(errors="replace"),
    }
    hits = [(what, where) for what, secret in secrets.items() for where, text in outputs.items()
            if secret and secret in text]
    assert hits == []
