"""The dashboard's API at fleet scale: 3,000 boxes in a real catalog, exact numbers, paging, timing.

Expected values are computed here from the generated fleet, independently of the SQL under test.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpClient

from central import catalog
from central.config import CentralConfig
from central.http.app import create_app
from protocol.messages import MAX_STATUS_COUNT, Status, encode

FLEET = 3000
DOCS_PER_BOX = 2
BOXES_WITH_DOCS = 400
HISTORY = 60_000   # stored transfers for the timing test: 20 per box
OLD_DAY = "2020-01-01T08:00:00.000Z"
ERROR = "Lỗi OCR – ổ đĩa gần đầy (Tuyên Quang)"


@dataclass(frozen=True, slots=True)
class Box:
    id: str
    revoked: bool
    online: bool
    backlog_docs: int
    backlog_bytes: int
    oldest_age_s: float
    last_error: str | None
    reported: bool   # has it ever published a status?
    clone: bool      # a sequence number was reused: two boxes share its identity

    @property
    def active(self) -> bool:
        return not self.revoked

    @property
    def age(self) -> float:
        return self.oldest_age_s if self.backlog_docs > 0 and self.reported else 0.0

    @property
    def problem_rank(self) -> int:
        if self.revoked:
            return -1
        if self.clone:
            return 5
        if not self.online and self.backlog_docs > 0:
            return 4
        if self.last_error:
            return 3
        if self.backlog_docs > 0 and self.age >= catalog.STALE_BACKLOG_S:
            return 2
        return 1 if not self.online else 0


def make_fleet() -> list[Box]:
    boxes = []
    for i in range(FLEET):
        reported = i % 97 != 0
        backlog = i % 7 if reported else 0
        boxes.append(Box(
            id=f"xa-{i:04d}" if i % 5 else f"phuong-{i:04d}", revoked=i % 50 == 0,
            online=reported and i % 3 != 0, backlog_docs=backlog,
            backlog_bytes=backlog * 1_000_003 + i if backlog else 0,
            # Spread so some, not all, backlogs are older than the stale threshold.
            oldest_age_s=float((i * 37) % 40_000) + 0.5 if backlog else 0.0,
            last_error=ERROR if reported and i % 11 == 0 else None, reported=reported,
            clone=i % 251 == 3))
    return boxes


def populate(config: CentralConfig, boxes: list[Box]) -> list[tuple[str, str]]:
    """Write the fleet and some stored documents; returns (device, received_at) per document."""
    conn = catalog.connect(config.paths.catalog)
    docs: list[tuple[str, str]] = []
    try:
        for box in boxes:
            catalog.add_device(conn, box.id, bytes(32))
            if box.reported:
                _, payload = encode(Status(box.id, online=box.online, queue_docs=box.backlog_docs,
                                           queue_bytes=box.backlog_bytes, oldest_age_s=box.oldest_age_s,
                                           last_error=box.last_error))
                catalog.update_device_status(conn, box.id, online=box.online, backlog_docs=box.backlog_docs,
                                             backlog_bytes=box.backlog_bytes, last_error=box.last_error,
                                             status_json=payload.decode(), at=catalog.utc_now())
            if box.revoked:
                catalog.set_device_status(conn, box.id, "revoked")
            if box.clone:
                catalog.record_seq_collision(conn, device=box.id, seq=7, tid="b" * 32, other_tid="a" * 32,
                                             at=catalog.utc_now())
        for n, box in enumerate(boxes[:BOXES_WITH_DOCS]):
            for seq in range(1, DOCS_PER_BOX + 1):
                received = OLD_DAY if seq == 1 else catalog.utc_now()
                tid = f"{n:016x}{seq:016x}"
                catalog.insert_transfer(conn, tid=tid, device=box.id, seq=seq, header=b"h")
                doc_id = catalog.insert_document(conn, catalog.NewDocument(
                    device=box.id, tid=tid, seq=seq, filename=f"Công văn số {seq} – {box.id}.pdf",
                    sha256=f"{n:032x}{seq:032x}", size=1000 + n, pages=1, media_type="application/pdf",
                    received_at=received, text="Quyết định về việc sáp nhập thôn", metadata="{}",
                    package_sha256=f"{seq:032x}{n:032x}", captured_at=received))
                catalog.store_transfer(conn, tid, document_id=doc_id, duplicate=False, receipt=b"r",
                                       stored_at=received)
                docs.append((box.id, received))
        conn.commit()
    finally:
        conn.close()
    return docs


@dataclass(frozen=True, slots=True)
class Fleet:
    client: TestClient  # type: ignore[type-arg]
    boxes: list[Box]
    docs: list[tuple[str, str]]
    auth: dict[str, str]

    async def get(self, path: str, **params: Any) -> tuple[Any, dict[str, str]]:
        response = await self.client.get(path, params={k: str(v) for k, v in params.items()},
                                         headers=self.auth)
        assert response.status == 200, await response.text()
        return await response.json(), dict(response.headers)


@pytest.fixture
async def fleet(config: CentralConfig, aiohttp_client: AiohttpClient) -> Fleet:
    boxes = make_fleet()
    docs = populate(config, boxes)
    client = await aiohttp_client(create_app(config, ingest=False))
    return Fleet(client, boxes, docs, {"Authorization": f"Bearer {config.api_token}"})


def problems_first(boxes: list[Box]) -> list[str]:
    return [b.id for b in sorted(boxes, key=lambda b: (-b.problem_rank, -b.age, -b.backlog_docs, b.id))]


async def all_pages(fleet: Fleet, limit: int, **params: Any) -> list[str]:
    ids: list[str] = []
    while True:
        rows, _ = await fleet.get("/api/devices", limit=limit, offset=len(ids), **params)
        ids += [r["id"] for r in rows]
        if len(rows) < limit:
            return ids


async def test_fleet_summary_is_exact(fleet: Fleet) -> None:
    summary, _ = await fleet.get("/api/fleet")
    boxes = fleet.boxes
    active = [b for b in boxes if b.active]
    backlogged = [b for b in active if b.backlog_docs > 0]
    oldest = min(backlogged, key=lambda b: (-b.age, b.id))
    assert summary["devices"] == {
        "total": FLEET,
        "online": sum(b.online for b in active),
        "offline": sum(not b.online for b in active),
        "revoked": sum(b.revoked for b in boxes),
        "with_error": sum(b.last_error is not None for b in active),
        "with_backlog": len(backlogged),
        "offline_with_backlog": sum(not b.online for b in backlogged),
        "possible_clone": sum(b.clone for b in active),
    }
    assert summary["devices"]["possible_clone"] > 0
    counts = summary["devices"]
    assert counts["online"] + counts["offline"] + counts["revoked"] == FLEET
    assert summary["backlog"] == {"docs": sum(b.backlog_docs for b in active),
                                  "bytes": sum(b.backlog_bytes for b in active),
                                  "oldest_age_s": oldest.age, "oldest_device": oldest.id}
    today = summary["documents"]["today_since"]
    assert summary["documents"]["total"] == len(fleet.docs) == BOXES_WITH_DOCS * DOCS_PER_BOX
    assert summary["documents"]["objects"] == len(fleet.docs)   # every generated document differs
    assert summary["documents"]["today"] == sum(received >= today for _, received in fleet.docs)
    assert summary["documents"]["today"] == BOXES_WITH_DOCS   # the seq-1 documents are from 2020
    assert (await fleet.client.get("/api/fleet")).status == 401


async def test_default_device_list_is_unchanged(fleet: Fleet) -> None:
    rows, headers = await fleet.get("/api/devices")
    assert [r["id"] for r in rows] == sorted(b.id for b in fleet.boxes)
    assert headers["X-Total-Count"] == str(FLEET)
    design_keys = {"id", "online", "last_seen", "backlog_docs", "backlog_bytes", "last_receipt", "last_error"}
    assert design_keys <= rows[0].keys()
    by_id = {r["id"]: r for r in rows}
    with_docs = fleet.boxes[1]
    assert by_id[with_docs.id]["last_receipt"] == max(r for d, r in fleet.docs if d == with_docs.id)
    assert by_id[fleet.boxes[-1].id]["last_receipt"] is None


async def test_problems_first_paged_and_filtered(fleet: Fleet) -> None:
    expected = problems_first(fleet.boxes)
    rows, headers = await fleet.get("/api/devices", sort="problems", limit=100)
    assert headers["X-Total-Count"] == str(FLEET)
    assert [r["id"] for r in rows] == expected[:100]
    assert rows[0]["problem"] == "possible clone"
    assert rows[0]["possible_clone"] == {"since": rows[0]["possible_clone"]["since"], "count": 1, "seq": 7,
                                         "last_seen": rows[0]["possible_clone"]["since"],
                                         "tids": ["a" * 32, "b" * 32]}
    first_other = next(r for r in rows if r["problem"] != "possible clone")
    assert first_other["problem"] == "offline with backlog" and first_other["backlog_docs"] > 0
    assert all(r["possible_clone"] is None for r in rows if r["problem"] != "possible clone")
    assert [r["problem"] for r in rows].count(None) == 0
    # Walking every page gives each device exactly once, in order.
    assert await all_pages(fleet, 100, sort="problems") == expected
    # The ranks appear in blocks: possible clone, offline-with-backlog, error, stale, offline, fine,
    # revoked.
    ranks = [b.problem_rank for b in sorted(fleet.boxes, key=lambda b: expected.index(b.id))]
    assert ranks == sorted(ranks, reverse=True) and {5, 4, 3, 2, 1, 0, -1} <= set(ranks)

    # Filter: a case-insensitive id substring, counted before paging.
    matching = [b for b in fleet.boxes if "PHUONG-1".lower() in b.id]
    rows, headers = await fleet.get("/api/devices", q="PHUONG-1", sort="problems", limit=7, offset=7)
    assert headers["X-Total-Count"] == str(len(matching))
    assert [r["id"] for r in rows] == problems_first(matching)[7:14]
    rows, headers = await fleet.get("/api/devices", q="không-có-hộp-này")
    assert rows == [] and headers["X-Total-Count"] == "0"


@pytest.mark.parametrize(("sort", "key"), [
    ("backlog_bytes", lambda b: b.backlog_bytes),
    ("oldest_age_s", lambda b: b.age),
    ("id", lambda b: b.id),
])
@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_sort_by_column(fleet: Fleet, sort: str, key: Any, order: str) -> None:
    boxes = sorted(fleet.boxes, key=lambda b: b.id)   # ties go by id ascending
    # Python's reverse sort is stable too, so ties stay in id order as the SQL tie-break keeps them.
    expected = [b.id for b in sorted(boxes, key=key, reverse=order == "desc")]
    rows, _ = await fleet.get("/api/devices", sort=sort, order=order, limit=100, offset=200)
    assert [r["id"] for r in rows] == expected[200:300]


async def test_sort_by_last_receipt_puts_never_received_last(fleet: Fleet) -> None:
    rows, _ = await fleet.get("/api/devices", sort="last_receipt", order="desc",
                              limit=BOXES_WITH_DOCS + 5)
    receipts = [r["last_receipt"] for r in rows]
    assert all(receipts[:BOXES_WITH_DOCS]) and receipts[BOXES_WITH_DOCS:] == [None] * 5
    assert receipts[:BOXES_WITH_DOCS] == sorted(receipts[:BOXES_WITH_DOCS], reverse=True)


@pytest.mark.parametrize("params", [{"sort": "verify_key"}, {"order": "sideways"}, {"limit": "-1"},
                                    {"offset": "x"}, {"limit": ""}])
async def test_bad_device_params_are_refused(fleet: Fleet, params: dict[str, str]) -> None:
    response = await fleet.client.get("/api/devices", params=params, headers=fleet.auth)
    assert response.status == 400 and "error" in await response.json()


async def test_document_pages_and_search_pages(fleet: Fleet) -> None:
    seen: list[int] = []
    for offset in range(0, len(fleet.docs), 300):
        rows, _ = await fleet.get("/api/documents", limit=300, offset=offset)
        seen += [r["id"] for r in rows]
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == len(fleet.docs)
    first, _ = await fleet.get("/api/documents", q="quyet dinh", limit=50)
    second, _ = await fleet.get("/api/documents", q="Quyết định", limit=50, offset=50)
    assert len(first) == len(second) == 50 and first[-1]["id"] > second[0]["id"]


async def test_dashboard_endpoints_are_fast_at_3000_devices(fleet: Fleet, config: CentralConfig) -> None:
    # A history of stored transfers, so a per-device receipt lookup planned badly would show.
    conn = catalog.connect(config.paths.catalog)
    try:
        at = catalog.utc_now()
        conn.executemany(
            "INSERT INTO transfers (tid, device, seq, header, state, created_at, updated_at, stored_at)"
            " VALUES (?, ?, ?, x'00', 'stored', ?, ?, ?)",
            [(f"{10**20 + k:032x}", box.id, 100 + k, at, at, at)
             for k in range(HISTORY) for box in [fleet.boxes[k % FLEET]]])
        conn.commit()
    finally:
        conn.close()
    timings: dict[str, list[float]] = {}
    for name, path, params in (("fleet", "/api/fleet", {}),
                               ("devices_page", "/api/devices", {"sort": "problems", "limit": 100}),
                               ("devices_by_receipt", "/api/devices", {"sort": "last_receipt", "limit": 100}),
                               ("devices_all", "/api/devices", {})):
        for _ in range(5):
            start = time.perf_counter()
            await fleet.get(path, **params)
            timings.setdefault(name, []).append(time.perf_counter() - start)
    report = {name: f"first {t[0] * 1000:.1f} ms, median {statistics.median(t) * 1000:.1f} ms"
              for name, t in timings.items()}
    print(f"\n{FLEET} devices, {HISTORY} transfers: {report}")
    # Generous: a loaded 2-core CI box, not a benchmark. Typical figures are a few tens of ms.
    assert all(max(t) < 1.0 for t in timings.values()), report


async def test_metrics_per_device_series_are_bounded(fleet: Fleet) -> None:
    from central.metrics import DEVICE_SERIES_MAX  # noqa: PLC0415
    from tests.support.prom import parse  # noqa: PLC0415

    response = await fleet.client.get("/metrics")
    assert response.status == 200
    _, samples = parse(await response.text())
    problems = sum(b.problem_rank > 0 for b in fleet.boxes)
    assert problems > DEVICE_SERIES_MAX
    up = [name for name in samples if name.startswith("sohoa_device_up{")]
    assert len(up) == DEVICE_SERIES_MAX
    assert samples["sohoa_device_series_dropped"] == problems - DEVICE_SERIES_MAX
    # The worst first: every possible clone is among the exported devices.
    clones = [b.id for b in fleet.boxes if b.clone and b.active]
    assert all(f'sohoa_device_up{{device="{c}"}}' in samples for c in clones)
    assert samples['sohoa_devices{state="revoked"}'] == sum(b.revoked for b in fleet.boxes)


def test_the_fleet_sums_stay_in_range_with_every_box_at_the_largest_status(tmp_path: Path) -> None:
    """Statuses are capped (protocol.messages.MAX_STATUS_COUNT) so that 30,000 boxes each at the cap
    still sum within SQLite's integers: one box's 2^63 - 1 used to fail the fleet page and /metrics."""
    conn = catalog.connect(tmp_path / "catalog.db")
    for n in range(3):
        device = f"xa-{n}"
        catalog.add_device(conn, device, b"\0" * 32)
        catalog.update_device_status(conn, device, online=True, backlog_docs=MAX_STATUS_COUNT,
                                     backlog_bytes=MAX_STATUS_COUNT, last_error=None,
                                     status_json=f'{{"disk_free_bytes": {MAX_STATUS_COUNT}}}',
                                     at=catalog.utc_now())
    conn.execute("UPDATE devices SET backlog_bytes = backlog_bytes * 10000")   # 30,000 boxes' worth
    summary = catalog.fleet_summary(conn, today_since="2000-01-01T00:00:00Z")
    snapshot = catalog.metrics_snapshot(conn)
    assert snapshot["backlog_bytes"] == 3 * 10000 * MAX_STATUS_COUNT
    assert summary
