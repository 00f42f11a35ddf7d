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
import threading
import time
import tomllib
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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


def _has_session(c: Cluster, client_id: str) -> bool:
    """Whether the broker still keeps a session for ``client_id`` (asked the MQTT way: a CONNECT with
    clean_start false is answered with session_present), leaving none behind either way."""
    broker = tomllib.loads((c.central_home / "central.toml").read_text())["broker"]
    answered = threading.Event()
    present: list[bool] = []

    def on_connect(_c: object, _u: object, flags: mqtt.ConnectFlags, *_rest: object) -> None:
        present.append(bool(flags.session_present))
        answered.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(broker["username"], broker["password"])
    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0   # and end it now
    client.connect("127.0.0.1", c.broker.port, clean_start=False, properties=props)
    client.loop_start()
    try:
        assert answered.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return present[0]


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


@pytest.mark.timeout(300)
def test_a_second_worker_scaled_up_then_down_leaves_the_first_whole(tmp_path: Path) -> None:
    """The plain central plus ``--worker 2`` on one home, then worker 2 stopped (scaled down) while
    documents flow: nothing lost, nothing doubled, and nothing stalls. Two regressions: the plain
    worker's journal clean-up took ``journal-sohoa-central-2-*`` for its own files (and deleted a live
    worker's journal), and a stopped worker kept its broker session in the shared group, so the broker
    queued part of every box's segments for nobody for a week. A second process under a name that
    is running is refused, not let in to fight over the client id and the journal."""
    with cluster(tmp_path) as c:
        twin = Process([sys.executable, "-m", "sohoa.cli", "central", "run", "--home", str(c.central_home)],
                       c.root / "central-twin.log")
        twin.start()
        assert twin.proc is not None and twin.proc.wait(timeout=60) == 75   # EX_TEMPFAIL
        assert "already running as 'sohoa-central'" in twin.log.read_text(errors="replace")
        assert c.central.alive

        (second,) = _workers(c, ["2"]).values()
        second.start()
        try:
            _wait_subscribed(second)
            c.dropped = make_documents(tmp_path / "docs", 16, seed=13, side=160)
            drop(tmp_path / "docs", c.watch)
            c.edge.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "stored " not in second.log.read_text(errors="replace"):
                time.sleep(0.2)
            assert "stored " in second.log.read_text(errors="replace"), "worker 2 never got a share"
            assert len(c.catalog().arrivals) < len(c.dropped), "the scale-down must land mid-run"
        finally:
            second.stop()
        assert not _has_session(c, "sohoa-central-2"), "a stopped worker must leave no session behind"
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not c.synced():
            assert c.central.alive, "the plain worker died"
            time.sleep(0.5)
        assert c.synced(), c.edge_counts()
        report = assert_exactly_once(c.dropped, c.catalog())
        assert report.summary.ok == len(c.dropped)
        logs = (c.root / "central.log").read_text(errors="replace") + second.log.read_text(errors="replace")
        assert "is missing" not in logs   # no worker lost a journal file to another's clean-up
        c.edge.stop()
        assert_databases_intact(c.central_home)
