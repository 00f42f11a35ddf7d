"""Several central workers on one home and one shared subscription; one of them killed mid-run.

Three ``sohoa central run --worker NAME`` processes split the devices' messages (MQTT v5 shared
subscription, each with its own client id); transfer state and assembly jobs are in the catalog, so a
transfer whose segments landed on three workers is still assembled exactly once. One worker is
killed with SIGKILL while documents are in flight, and restarted (as systemd would): every drop must
be exactly one arrival, every content stored once, every SQLite file intact.
"""

from __future__ import annotations

import random
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.faults.cluster import Cluster, Process, cluster, drop, make_documents
from tests.faults.jepsen import assert_databases_intact, assert_exactly_once, resent_arrivals
from tests.faults.scenario import query


def _workers(c: Cluster, names: list[str]) -> dict[str, Process]:
    return {name: Process([sys.executable, "-m", "sohoa.cli", "central", "run", "--home",
                           str(c.central_home), "--worker", name], c.root / f"central-{name}.log")
            for name in names}


def _wait_subscribed(worker: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "subscriptions acknowledged" in worker.log.read_text(errors="replace"):
            return
        assert worker.alive, f"worker died: see {worker.log}"
        time.sleep(0.1)
    raise TimeoutError(f"worker did not subscribe: see {worker.log}")


def _stored_by(c: Cluster) -> dict[str, int]:
    """How many documents each worker's journal fed (segments' journal files name the worker)."""
    rows = query(c.central_home / "catalog.db", "SELECT claimed_by, count(*) FROM jobs GROUP BY claimed_by")
    return {str(name): int(str(n)) for name, n in rows}


def _use_postgres(c: Cluster, url: str) -> None:
    """Point the home's ingest at PostgreSQL and carry the enrolled device over (enrolment after
    this writes both catalogs itself)."""
    import psycopg  # noqa: PLC0415
    import tomli_w  # noqa: PLC0415

    from central.ingest import pgstore  # noqa: PLC0415

    config = c.central_home / "central.toml"
    data = tomllib.loads(config.read_text())
    data["catalog"] = {"url": url}
    config.write_text(tomli_w.dumps(data))
    rows = query(c.central_home / "catalog.db", "SELECT id, verify_key FROM devices")
    with pgstore.connect(url, ensure_schema=True) as conn, conn.transaction():
        store = pgstore.PostgresIngestStore(conn)
        for device, key in rows:
            store.add_device(str(device), bytes(key))  # type: ignore[arg-type]
    c.catalog_url = url
    assert isinstance(psycopg.__version__, str)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_three_workers_one_killed_mid_run_lose_and_double_nothing(tmp_path: Path, backend: str,
                                                                  request: pytest.FixtureRequest) -> None:
    rng = random.Random(11)
    with cluster(tmp_path) as c:
        c.central.stop()   # the plain single central of the fixture: replaced by three workers
        if backend == "postgres":
            _use_postgres(c, request.getfixturevalue("postgres").create_database())
        workers = _workers(c, ["a", "b", "c"])
        try:
            for worker in workers.values():
                worker.start()
            for worker in workers.values():
                _wait_subscribed(worker)
            c.dropped = make_documents(tmp_path / "docs", 24, seed=11, side=160)
            drop(tmp_path / "docs", c.watch)
            c.edge.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(c.catalog().arrivals) < 5:
                time.sleep(0.2)
            arrived_at_kill = len(c.catalog().arrivals)
            assert 0 < arrived_at_kill < len(c.dropped), "the kill must land while documents are in flight"
            workers["b"].kill()
            time.sleep(rng.uniform(0.5, 2.0))
            workers["b"].start()
            _wait_subscribed(workers["b"])
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not c.synced():
                for name, worker in workers.items():
                    assert worker.alive, f"worker {name} died: see {worker.log}"
                time.sleep(0.5)
            assert c.synced(), c.edge_counts()
            report = assert_exactly_once(c.dropped, c.catalog())
            assert report.summary.ok == len(c.dropped)
            assert resent_arrivals(c.catalog()) == []
            # The shared subscription split the work: more than one worker assembled documents.
            logs = {name: w.log.read_text(errors="replace") for name, w in workers.items()}
            assert sum("stored " in text for text in logs.values()) >= 2, {n: len(t) for n, t in logs.items()}
            if backend == "sqlite":
                assert _stored_by(c) == {}   # no assembly job left behind
        finally:
            for worker in workers.values():
                worker.stop()
        c.edge.stop()
        assert_databases_intact(c.edge_home)
        assert_databases_intact(c.central_home)
