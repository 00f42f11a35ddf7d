"""Fixtures for central: an initialised home on disk, its own broker, enrolled devices."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
import pytest

from central.admin import commands
from central.config import CentralConfig, load_config
from central.keys import CentralKeys, load_keys, unb64
from central.paths import CentralPaths
from tests.support.broker import Broker, free_port, running_broker


@dataclass(frozen=True, slots=True)
class Bundle:
    device_id: str
    username: str
    password: str
    signing_key: nacl.signing.SigningKey
    raw: dict[str, object]


def read_bundle(path: Path) -> Bundle:
    data = tomllib.loads(path.read_text())
    broker = data["broker"]
    return Bundle(data["device_id"], broker["username"], broker["password"],
                  nacl.signing.SigningKey(unb64(data["device"]["signing_key"], what="seed")), data)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    directory = tmp_path / "central-home"
    commands.init(directory, broker_url=f"mqtt://127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}",
                  device_url=f"mqtt://127.0.0.1:{free_port()}")
    return directory


@pytest.fixture
def config(home: Path) -> CentralConfig:
    return load_config(home)


@pytest.fixture
def central_broker(config: CentralConfig) -> Iterator[Broker]:
    paths = config.paths
    with running_broker(paths.mosquitto_conf, config.broker.address.port,
                        paths.broker_dir / "mosquitto.stdout") as broker:
        yield broker


Enroll = Callable[[str], "Bundle"]


@pytest.fixture
def enroll(home: Path, tmp_path: Path) -> Enroll:
    def _enroll(device_id: str) -> Bundle:
        out = tmp_path / f"{device_id}.bundle.toml"
        commands.enroll(home, device_id, out)
        return read_bundle(out)
    return _enroll


@pytest.fixture
def central_keys(home: Path) -> CentralKeys:
    return load_keys(CentralPaths(home))
