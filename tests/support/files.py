"""What a test finds left on disk."""

from __future__ import annotations

from pathlib import Path


def leftover_files(directory: Path) -> list[Path]:
    """Files anywhere under ``directory`` (central's tmp/ holds one working folder per worker: an
    empty folder is not a leftover, a file in it is)."""
    return sorted(p for p in directory.rglob("*") if p.is_file())
