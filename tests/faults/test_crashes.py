"""Never lose, never double: kill -9 the edge, the broker and central at random moments.

Each run drops documents, injects the faults, lets the system drain, and then judges it like
Jepsen (ok / lost / duplicated per document) and runs ``PRAGMA integrity_check`` on every SQLite
file. The default run is short so every push proves the property; ``-m torture`` runs the long
versions reported in the issue.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.faults.cluster import Cluster, cluster, drop, make_documents
from tests.faults.jepsen import assert_databases_intact, assert_exactly_once, resent_arrivals


def _judge(c: Cluster) -> None:
    report = assert_exactly_once(c.dropped, c.catalog())
    assert report.summary.ok == len(c.dropped)
    # The edge never sent the same document twice under two transfer ids.
    assert resent_arrivals(c.catalog()) == []
    assert sorted(p.name for p in c.watch.iterdir()) == []
    assert sorted(p.name for p in (c.edge_home / "processed").iterdir()) == []
    assert sorted(p.name for p in (c.edge_home / "envelopes").iterdir()) == []
    c.edge.stop()
    c.central.stop()
    assert_databases_intact(c.edge_home)
    assert_databases_intact(c.central_home)


def _edge_kills(tmp_path: Path, documents: int, kills: int, seed: int, *, rate_kbit: float,
                interval: tuple[float, float], side: int) -> None:
    rng = random.Random(seed)
    with cluster(tmp_path, rate_kbit=rate_kbit) as c:
        # Incompressible scans (side² bytes each) behind a capped uplink, so the backlog outlives
        # the kills (each restart also starts with a fresh token-bucket burst).
        c.dropped = make_documents(tmp_path / "docs", documents, seed=seed, side=side)
        drop(tmp_path / "docs", c.watch)
        c.edge.start()
        during_backlog = 0
        for _ in range(kills):
            time.sleep(rng.uniform(*interval))
            c.edge.kill()
            if c.edge_counts().get("delivered", 0) < documents:
                during_backlog += 1
            c.edge.start()
        # The kills must have landed while there was work to lose, or the test proves nothing.
        assert during_backlog >= kills * 0.8, (during_backlog, kills)
        assert c.wait_synced(timeout=120 + documents), c.edge_counts()
        _judge(c)


def _server_kills(tmp_path: Path, documents: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    with cluster(tmp_path) as c:
        c.dropped = make_documents(tmp_path / "docs", documents, seed=seed)
        drop(tmp_path / "docs", c.watch)
        c.edge.start()
        for index in range(kills):
            time.sleep(rng.uniform(0.3, 2.0))
            if index % 2 == 0:
                c.broker.kill()
                c.broker.start()
            else:
                c.central.kill()
                c.restart_central()
        assert c.wait_synced(timeout=180 + documents), c.edge_counts()
        _judge(c)


@pytest.mark.timeout(300)
def test_edge_killed_during_backlog(tmp_path: Path) -> None:
    _edge_kills(tmp_path, documents=30, kills=6, seed=1, rate_kbit=256, interval=(0.3, 1.5),
                side=200)


@pytest.mark.timeout(300)
def test_broker_and_central_killed_during_sync(tmp_path: Path) -> None:
    _server_kills(tmp_path, documents=20, kills=4, seed=2)


@pytest.mark.torture
@pytest.mark.timeout(3600)
def test_torture_100_edge_kills_200_documents(tmp_path: Path) -> None:
    _edge_kills(tmp_path, documents=200, kills=100, seed=3, rate_kbit=128, interval=(0.2, 1.2),
                side=256)


@pytest.mark.torture
@pytest.mark.timeout(3600)
def test_torture_20_broker_and_20_central_kills(tmp_path: Path) -> None:
    _server_kills(tmp_path, documents=100, kills=40, seed=4)
