"""Shared fixtures: a real Mosquitto on a free loopback port."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker, anonymous_config, free_port, running_broker
from tests.support.postgres import Postgres, running_postgres

# The whole-deployment fixture (generated broker config, central, one enrolled edge).
pytest_plugins = ["tests.support.deployment"]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """An anonymous broker for tests that are not about authentication."""
    port = free_port()
    directory = tmp_path / "broker"
    directory.mkdir()
    with running_broker(anonymous_config(directory, port), port, directory / "mosquitto.log") as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session (each test creates its own database in it).

    Not under pytest's basetemp: another pytest run on the machine may prune old basetemps while
    this session still runs, and PostgreSQL shuts down when its data directory disappears.
    """
    directory = Path(tempfile.mkdtemp(prefix="sohoa-postgres-"))
    try:
        with running_postgres(directory) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)
