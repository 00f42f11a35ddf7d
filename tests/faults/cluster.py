"""A deployment in separate processes (broker, central, edge) that tests can kill -9 and restart.

The edge runs with the fake OCR engine (``tests.faults.edge_proc``) so hundreds of documents and
kills fit in minutes; everything else is the real thing: generated broker config with ACLs,
``sohoa central run``, SQLite on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from central.admin import commands as central_commands
from edge import cli as edge_cli
from tests.faults.jepsen import CatalogView
from tests.faults.scenario import catalog, catalog_postgres, query
from tests.support.broker import Broker, free_port

DEVICE = "xa-tan-trao"
ROOT = Path(__file__).resolve().parents[2]


def make_documents(directory: Path, count: int, *, seed: int = 0, side: int = 48) -> dict[str, str]:
    """``count`` distinct PNG scans (noise, incompressible) with Vietnamese names: name → sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    made: dict[str, str] = {}
    for index in range(count):
        image = Image.new("L", (side, side))
        image.frombytes(rng.randbytes(side * side))
        path = directory / f"Công văn số {index} – Tuyên Quang.png"
        image.save(path)
        made[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return made


def drop(sources: Path, watch: Path) -> None:
    """Like a scanner: temporary name, then rename."""
    for source in sorted(sources.iterdir()):
        temp = watch / f".{source.name}.part"
        temp.write_bytes(source.read_bytes())
        temp.rename(watch / source.name)


@dataclass
class Process:
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0
    code: Path = ROOT   # the source tree it runs (a bench compares against another tree)

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(self.code))
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.code)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.kills += 1

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    root: Path
    broker: Broker
    central: Process
    edge: Process
    http_port: int
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def central_home(self) -> Path:
        return self.root / "central"

    @property
    def edge_home(self) -> Path:
        return self.root / "edge"

    @property
    def watch(self) -> Path:
        return self.root / "scans"

    def wait_central_http(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/healthz", timeout=1):
                return
            time.sleep(0.1)
        raise TimeoutError("central did not answer /healthz")

    def restart_central(self) -> None:
        self.central.start()
        self.wait_central_http()

    catalog_url: str = ""   # set when central's ingest catalog is PostgreSQL

    def catalog(self) -> CatalogView:
        """Central's arrivals and stored objects (see ``tests.faults.scenario.catalog``)."""
        if self.catalog_url:
            return catalog_postgres(self.catalog_url, self.central_home)
        return catalog(self.central_home)

    def edge_counts(self) -> dict[str, int]:
        rows = query(self.edge_home / "outbox.db", "SELECT state, COUNT(*) FROM docs GROUP BY state")
        return {str(state): int(str(count)) for state, count in rows}

    def synced(self) -> bool:
        counts = self.edge_counts()
        return counts.get("delivered", 0) >= len(self.dropped) and len(
            self.catalog().arrivals) >= len(self.dropped)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in (self.central, self.edge):
                if not process.alive:
                    raise AssertionError(f"{process.argv[2:5]} died: see {process.log}")
            with contextlib.suppress(sqlite3.Error):
                if self.synced():
                    return True
            time.sleep(0.5)
        return False


@contextlib.contextmanager
def cluster(root: Path, *, broker_port: int | None = None, rate_kbit: float = 0.0) -> Iterator[Cluster]:
    """Init central, start broker and central, enroll and init one edge (not yet started)."""
    broker_port = broker_port or free_port()
    http_port = free_port()
    central_home = root / "central"
    central_commands.init(central_home, broker_url=f"mqtt://127.0.0.1:{broker_port}",
                          http=f"127.0.0.1:{http_port}", device_url=f"mqtt://127.0.0.1:{free_port()}")
    broker = Broker(config=central_home / "mosquitto.conf", port=broker_port, log=root / "broker.log")
    broker.start()
    central = Process([sys.executable, "-m", "sohoa.cli", "central", "run", "--home", str(central_home)],
                      root / "central.log")
    edge = Process([sys.executable, "-m", "tests.faults.edge_proc", "--home", str(root / "edge"),
                    "--rate-kbit", str(rate_kbit)],
                   root / "edge.log")
    try:
        bundle = root / "bundle.toml"
        central_commands.enroll(central_home, DEVICE, bundle)
        edge_cli.init(root / "edge", bundle, root / "scans")
        c = Cluster(root, broker, central, edge, http_port)
        c.restart_central()
        yield c
    finally:
        edge.stop()
        central.stop()
        broker.stop()
