"""A whole deployment on loopback: generated broker config, central, one enrolled edge."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from central import worker as central_worker
from central.admin import commands as central_commands
from edge import cli as edge_cli
from edge import config as edge_config
from edge.config import EdgeConfig
from edge.ocr import OcrEngine
from edge.service import EdgeService
from tests.support.broker import Broker, free_port, running_broker

DEVICE = "xa-tan-trao"
# Seconds, not minutes: the same rules as in the field (edge.settle), on a test's clock.
TEST_INTAKE = {"quiet_seconds": 0.5, "check_interval": 0.2, "rescan_seconds": 2.0,
               "unknown_quiet_seconds": 1.0, "open_quiet_seconds": 60.0, "incomplete_grace_seconds": 3.0}


@dataclass
class Deployment:
    root: Path
    central_home: Path
    edge_home: Path
    broker: Broker
    http_port: int
    token: str

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def edge_config(self, *, release_after_seconds: float = 0.0, **intake: float) -> EdgeConfig:
        """The box's config with test-speed intake periods (each one overridable by name)."""
        cfg = edge_config.load(self.edge_home)
        periods: dict[str, Any] = {**TEST_INTAKE, **intake}
        return dataclasses.replace(
            cfg, intake=dataclasses.replace(cfg.intake, **periods),
            retention=dataclasses.replace(cfg.retention, release_after_seconds=release_after_seconds),
            # Any free loopback port: several test runs share this machine.
            status_page=dataclasses.replace(cfg.status_page, listen="127.0.0.1:0"))

    async def get_json(self, path: str, **params: str) -> object:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"}) as session, \
                session.get(self.api + path, params=params) as response:
            response.raise_for_status()
            return await response.json()

    async def get_bytes(self, path: str) -> bytes:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"}) as session, \
                session.get(self.api + path) as response:
            response.raise_for_status()
            return await response.read()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    yield from _deployment(tmp_path, tls=False)


@pytest.fixture
def tls_deployment(tmp_path: Path) -> Iterator[Deployment]:
    """Devices reach the broker over mqtts:// with the CA from their bundle; central on loopback."""
    yield from _deployment(tmp_path, tls=True)


def _deployment(tmp_path: Path, *, tls: bool) -> Iterator[Deployment]:
    broker_port, http_port = free_port(), free_port()
    central_home = tmp_path / "central"
    central_commands.init(central_home, broker_url=f"mqtt://127.0.0.1:{broker_port}",
                          http=f"127.0.0.1:{http_port}",
                          device_url=f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{free_port()}")
    with running_broker(central_home / "mosquitto.conf", broker_port, tmp_path / "broker.log") as broker:
        bundle = tmp_path / "bundle.toml"
        central_commands.enroll(central_home, DEVICE, bundle)
        edge_cli.init(tmp_path / "edge", bundle, tmp_path / "scans")
        yield Deployment(tmp_path, central_home, tmp_path / "edge", broker, http_port,
                         (central_home / "api-token").read_text().strip())


@contextlib.asynccontextmanager
async def running(deployment: Deployment, *, ocr_engine: OcrEngine | None = None,
                  edge_config: EdgeConfig | None = None, **intake: float) -> AsyncIterator[EdgeService]:
    """Central and edge in this event loop; cancelled (like SIGTERM) on exit."""
    ready = asyncio.Event()
    central_task = asyncio.create_task(central_worker.serve(deployment.central_home, ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    service = EdgeService(edge_config or deployment.edge_config(**intake), ocr_engine=ocr_engine)
    edge_task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), 30)
    try:
        yield service
    finally:
        for task in (edge_task, central_task):
            task.cancel()
        for task in (edge_task, central_task):
            with contextlib.suppress(asyncio.CancelledError):
                await task
