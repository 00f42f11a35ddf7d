"""The wheel the fleet installs carries every package of the source tree (not only the top ones)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_in_the_distribution() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]
    packages = config["packages"]
    assert isinstance(packages, dict), "find packages (packages.find): a list leaves subpackages out"
    include = packages["find"]["include"]
    shipped = set(find_namespace_packages(where=str(ROOT), include=include))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("protocol", "edge", "central", "sohoa")
               for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk <= shipped, sorted(on_disk - shipped)
    assert "edge.ocr" in shipped


def _extra(name: str) -> set[str]:
    """The import names of an extra's distributions (each of ours imports under its own name)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["optional-dependencies"]
    return {re.split(r"[<>=\[ ;]", spec, maxsplit=1)[0].lower().replace("-", "_") for spec in extras[name]}


@pytest.mark.parametrize(("side", "other", "argv", "modules"), [
    ("central", "edge", ["central", "init", "--home", "{tmp}/c", "--broker", "mqtt://127.0.0.1:1883",
                         "--http", "127.0.0.1:8080"],
     ["central.http.app", "central.records.archive_jobs", "central.records.export",
      "central.ingest.pipeline"]),
    ("edge", "central", ["edge", "status", "--home", "{tmp}/nothing"], ["edge.service", "edge.ocr.runner"]),
])
def test_one_side_runs_without_the_other_sides_extra(tmp_path: Path, side: str, other: str,
                                                      argv: list[str], modules: list[str]) -> None:
    """A box installs sohoa[edge] and the archive server sohoa[central]: the `sohoa` command and the
    side's service must import without what only the other side installs (the fleet found
    `sohoa central init` failing on aiosqlite)."""
    missing = sorted(_extra(other) - _extra(side))
    assert missing, f"the {other} extra adds nothing over {side}'s: nothing to test"
    script = (
        "import sys, importlib\n"
        f"for name in {missing!r}: sys.modules[name] = None   # as if not installed\n"
        f"for module in {modules!r}: importlib.import_module(module)\n"
        "from sohoa.cli import main\n"
        f"sys.exit(main({[a.format(tmp=tmp_path) for a in argv]!r}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          check=False, cwd=tmp_path)
    assert "ModuleNotFoundError" not in done.stderr and "ImportError" not in done.stderr, done.stderr
    # init succeeds; edge status on an empty home is a configuration error (78), never a traceback.
    assert done.returncode == (0 if side == "central" else 78), (done.returncode, done.stderr)
