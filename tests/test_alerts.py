"""The Prometheus alert rules (monitoring/): valid, unit-tested with promtool, and about real metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from central.metrics import METRICS as CENTRAL_METRICS
from edge.statuspage import METRICS as EDGE_METRICS

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
RULES = MONITORING / "sohoa-alerts.yml"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; install-packages.sh dev)")
    return promtool


def test_rules_check() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests() -> None:
    result = subprocess.run([_promtool(), "test", "rules", str(MONITORING / "sohoa-alerts.test.yml")],
                            capture_output=True, text=True, check=False, cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_only_documented_metrics() -> None:
    documented = set()
    for name, (kind, _) in {**CENTRAL_METRICS, **EDGE_METRICS}.items():
        documented.add(name + "_total" if kind == "counter" else name)
    used = set(re.findall(r"\b(sohoa_[a-z_]+)", RULES.read_text()))
    assert used <= documented, sorted(used - documented)
