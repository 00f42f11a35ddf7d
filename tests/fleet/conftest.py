"""Print the fleet test's measured figures in pytest's summary (before its closing line)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_STARTED = time.time()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    report = Path(os.environ.get("FLEET_REPORT", ROOT / ".fleet-report.txt"))
    # Only figures written by this run (a skipped fleet test writes none).
    if report.is_file() and report.stat().st_size and report.stat().st_mtime >= _STARTED:
        terminalreporter.section("fleet test figures")
        terminalreporter.write(report.read_text(encoding="utf-8"))
