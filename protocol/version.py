"""The installed sohoa version, read from package metadata: pyproject.toml is its only source."""

from __future__ import annotations

from functools import cache
from importlib import metadata


@cache
def version() -> str:
    """``0.1.0`` from the installed distribution; ``0+unknown`` when run from a bare checkout."""
    try:
        return metadata.version("sohoa")
    except metadata.PackageNotFoundError:
        return "0+unknown"
