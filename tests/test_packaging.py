"""The wheel the fleet installs carries every package of the source tree (not only the top ones)."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
