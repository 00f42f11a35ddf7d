"""kill -9 of a running central while it builds an archival copy: its build child dies with it, and the
next central takes the job up at once (the dead process's job is released at start-up, no lease to
wait out) and ends with exactly one signed archival copy. Real `sohoa central run` processes, real
Mosquitto, real SQLite."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from central import catalog
from central.config import CentralConfig
from central.keys import CentralKeys
from central.records.archive_jobs import archive_tmp
from central.storage import ObjectStore
from tests.central.conftest import Enroll
from tests.central.records_builders import ingest, scanner_pdf
from tests.faults.cluster import Process
from tests.support.broker import Broker
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)


def job(config: CentralConfig) -> dict[str, object]:
    conn = catalog.connect(config.paths.catalog, readonly=True)
    try:
        row = conn.execute("SELECT state, attempts, owner, archival_sha256 FROM archive_jobs").fetchone()
        return dict(row) if row else {}
    finally:
        conn.close()


async def test_kill_9_mid_build_is_retried_once_and_leaves_one_copy(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, central_broker: Broker,
        tmp_path: Path) -> None:
    scanner_pdf(tmp_path / "scan.pdf", 12)   # a dozen pages: the build takes a few seconds
    doc = ingest(config, central_keys, enroll("xa-tan-trao"), seq=1,
                 original=(tmp_path / "scan.pdf").read_bytes(), pages=12)
    argv = [sys.executable, "-m", "sohoa.cli", "central", "run", "--home", str(config.home)]
    first = Process(argv, tmp_path / "central-1.log")
    first.start()
    try:
        assert first.proc is not None
        central = psutil.Process(first.proc.pid)

        async def building() -> bool:   # the job claimed and its child at work
            try:
                child = any("central.records.archive_build" in " ".join(c.cmdline())
                            for c in central.children())
            except psutil.Error:
                return False
            return child and job(config).get("state") == "running"

        assert await wait_until(building, within=60, interval=0.02), (tmp_path / "central-1.log").read_text()
        children = central.children(recursive=True)
        first.kill()
    finally:
        first.stop()
    assert job(config)["state"] == "running"   # what kill -9 leaves behind
    # The build child died with central (PR_SET_PDEATHSIG): nothing finishes behind the restart.
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive

    second = Process(argv, tmp_path / "central-2.log")
    second.start()
    try:
        async def done() -> bool:
            return job(config).get("state") == "done"

        assert await wait_until(done, within=90, interval=0.1), (tmp_path / "central-2.log").read_text()
    finally:
        second.stop()
    row = job(config)
    assert row["attempts"] == 2
    assert "taken up again" in (tmp_path / "central-2.log").read_text()
    store = ObjectStore(config.paths.objects)
    copy = store.path_for(str(row["archival_sha256"]))
    conn = catalog.connect(config.paths.catalog, readonly=True)
    package = conn.execute("SELECT package_sha256 FROM documents").fetchone()[0]
    conn.close()
    stored = {p.name for p in config.paths.objects.rglob("*") if p.is_file()}
    assert stored == {doc.sha256, package, row["archival_sha256"]}   # one archival copy, no orphan
    assert list(archive_tmp(config.paths).iterdir()) == []
    sig = await asyncio.to_thread(subprocess.run, ["pdfsig", str(copy)], capture_output=True, text=True,
                                  check=False)
    assert "Signature is Valid" in sig.stdout, sig.stdout
