"""Shared pieces of the in-process fault scenarios (link faults, disk full): a deployment whose edge
or central home can live on a separate (small) filesystem, and read-only views of both databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from central import worker as central_worker
from central.admin import commands as central_commands
from central.storage import ObjectStore
from edge import cli as edge_cli
from edge.config import EdgeConfig
from edge.ocr import FakeOcrEngine
from edge.service import EdgeService
from tests.faults.jepsen import Arrival, CatalogView, view
from tests.support.broker import free_port, running_broker
from tests.support.deployment import DEVICE, Deployment


@contextlib.contextmanager
def deployment_at(root: Path, *, central_home: Path | None = None,
                  edge_home: Path | None = None) -> Iterator[Deployment]:
    """Like the ``deployment`` fixture, with each home wherever the test wants it (e.g. a tmpfs)."""
    central_home = central_home or root / "central"
    edge_home = edge_home or root / "edge"
    broker_port, http_port = free_port(), free_port()
    central_commands.init(central_home, broker_url=f"mqtt://127.0.0.1:{broker_port}",
                          http=f"127.0.0.1:{http_port}", device_url=f"mqtt://127.0.0.1:{free_port()}")
    with running_broker(central_home / "mosquitto.conf", broker_port, root / "broker.log") as broker:
        bundle = root / "bundle.toml"
        central_commands.enroll(central_home, DEVICE, bundle)
        edge_cli.init(edge_home, bundle, root / "scans")
        yield Deployment(root, central_home, edge_home, broker, http_port,
                         (central_home / "api-token").read_text().strip())


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    """One read-only query; the services keep writing meanwhile (WAL)."""
    if not path.exists():
        return []
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(sql).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []   # the service created the file and has not committed its schema yet
        raise
    finally:
        connection.close()


def catalog(central_home: Path) -> CatalogView:
    """Central's arrivals (with the transfers that carried each) and its stored objects.

    An object counts as stored only if its catalog row exists and its file is in the object store:
    a row without bytes is reported by the checker as content with no stored object.
    """
    db = central_home / "catalog.db"
    rows = query(db, "SELECT d.id, d.device, d.filename, d.sha256, group_concat(t.tid) FROM documents d"
                     " LEFT JOIN transfers t ON t.document_id = d.id AND t.state = 'stored' GROUP BY d.id")
    arrivals = [Arrival(int(str(doc_id)), str(device), str(name), str(sha),
                        tuple(sorted(str(tids).split(","))) if tids else ())
                for doc_id, device, name, sha, tids in rows]
    store = ObjectStore(central_home / "storage" / "objects")
    objects = [str(sha) for (sha,) in query(db, "SELECT sha256 FROM objects") if store.contains(str(sha))]
    return view(arrivals, objects)


def catalog_postgres(url: str, central_home: Path) -> CatalogView:
    """``catalog`` for a central whose ingest catalog is PostgreSQL (``[catalog] url``)."""
    import psycopg  # noqa: PLC0415 - only the PostgreSQL scenarios need it

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT d.id, d.device, d.filename, d.sha256, string_agg(t.tid, ',')"
                            " FROM documents d LEFT JOIN transfers t"
                            " ON t.document_id = d.id AND t.state = 'stored' GROUP BY d.id").fetchall()
        shas = [str(r[0]) for r in conn.execute("SELECT sha256 FROM objects").fetchall()]
    arrivals = [Arrival(int(doc_id), str(device), str(name), str(sha),
                        tuple(sorted(str(tids).split(","))) if tids else ())
                for doc_id, device, name, sha, tids in rows]
    store = ObjectStore(central_home / "storage" / "objects")
    return view(arrivals, [sha for sha in shas if store.contains(sha)])


def delivered_ciphertext_bytes(edge_home: Path) -> int:
    """Σ ciphertext size over delivered rows: what a cut-free uplink would have sent as segments."""
    rows = query(edge_home / "outbox.db",
                 "SELECT COALESCE(SUM(ciphertext_size), 0) FROM docs WHERE state = 'delivered'")
    return int(str(rows[0][0])) if rows else 0


@contextlib.asynccontextmanager
async def running_edge(deployment: Deployment, cfg: EdgeConfig) -> AsyncIterator[
        tuple[EdgeService, asyncio.Task[None]]]:
    """Like ``tests.support.deployment.running`` (fake OCR), but the edge's task is handed out too,
    so a scenario can assert that the service is still alive (no crash, no crash loop)."""
    ready = asyncio.Event()
    central_task = asyncio.create_task(central_worker.serve(deployment.central_home, ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    service = EdgeService(cfg, ocr_engine=FakeOcrEngine())
    edge_task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), 30)
    try:
        yield service, edge_task
    finally:
        for task in (edge_task, central_task):
            task.cancel()
        for task in (edge_task, central_task):
            with contextlib.suppress(asyncio.CancelledError):
                await task
