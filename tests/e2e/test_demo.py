"""`sohoa demo` (what `make demo` runs) works as a whole command: broker, central, edge, sample pages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_demo_receipts_every_sample_page_and_summarises(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sohoa.cli", "demo", "--exit-when-synced", "--json", "--home", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["receipted"] == summary["documents"] == 6 and summary["failed"] == 0
    assert summary["pages"] == 10
    # Encrypted envelopes are smaller than the scans (zstd), and segments add a little framing.
    assert 0 < summary["bytes_compressed_encrypted"] < summary["bytes_original"]
    assert summary["bytes_on_wire"] >= summary["bytes_compressed_encrypted"]
    assert (tmp_path / "dashboard-password").stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "bundle.toml").exists()   # the device secret does not linger
