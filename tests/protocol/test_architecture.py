"""protocol/ stays sans-I/O: the import-linter contracts hold, and no I/O module is imported directly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"asyncio", "paho", "aiosqlite", "aiohttp", "watchdog", "pytesseract", "sqlite3", "socket",
             "edge", "central", "sohoa"}


def test_import_linter_contracts_hold() -> None:
    missing = [p for p in ("protocol", "edge", "central", "sohoa") if not (ROOT / p / "__init__.py").exists()]
    if missing:
        pytest.skip(f"import-linter needs every root package to exist; missing: {missing}")
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "protocol").glob("*.py")), ids=lambda p: p.name)
def test_protocol_module_imports_no_io(path: Path) -> None:
    assert not _imported_modules(path) & FORBIDDEN


def test_the_ast_check_would_notice() -> None:
    sample = ROOT / "protocol" / "__init__.py"
    assert "asyncio" not in _imported_modules(sample)
    assert _imported_modules(Path(ast.__file__)) - FORBIDDEN   # sanity: the walker finds imports
