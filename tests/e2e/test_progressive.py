"""Progressive sync end to end: a small scan dropped while a big one is already sending over a slow
link is searchable at central (by its text) long before the big one completes; at the end both are
single documents with their originals, byte-exact, and the watch folder empties only after receipts.

Real Mosquitto (generated config and ACL), central and edge; the edge's link through the fault proxy.
``uplink.max_active = 1``: without notices the small scan could not even start before the big one
ended. The OCR engine is the fake one, with a text per file, so ``q=`` finds the small scan's text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest

from bench.searchable_behind_big import noise_jpeg, place
from edge.media import MediaInfo
from edge.ocr import FakeOcrEngine, OcrResult
from tests.faults.proxy import FaultProxy
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

LINK_KBIT = 1024           # the big scan takes ~12 s on the wire: long enough to see the difference
LATENCY_S = 0.05
SMALL_TEXT = "Công văn khẩn về phòng chống lũ lụt xã Xuân Lộc"


class TextPerFile(FakeOcrEngine):
    """The fake engine, reading the big scan as a land record and the small one as an urgent letter."""

    async def recognize(self, path: Path, media: MediaInfo) -> OcrResult:
        result = await super().recognize(path, media)
        text = SMALL_TEXT if path.stat().st_size < 200_000 else "Hồ sơ địa chính thửa đất số 12"
        return dataclasses.replace(result, text=text)


async def test_a_small_scan_is_searchable_long_before_the_big_one_ahead_of_it_completes(
        deployment: Deployment) -> None:
    big, small = noise_jpeg(1_500_000, seed=1), noise_jpeg(60_000, seed=2)
    async with FaultProxy("127.0.0.1", deployment.broker.device_port) as proxy:
        proxy.throttle(LINK_KBIT, LATENCY_S)
        cfg = deployment.edge_config()
        cfg = dataclasses.replace(
            cfg, broker=dataclasses.replace(cfg.broker, url=f"mqtt://127.0.0.1:{proxy.port}"),
            uplink=dataclasses.replace(cfg.uplink, max_active=1))
        watch = cfg.watch_dir
        async with running(deployment, ocr_engine=TextPerFile(), edge_config=cfg) as service:
            place(big, watch, "Hồ sơ địa chính.jpg")

            async def big_sending() -> bool:
                return any(d.state.value == "sending" for d in await service.outbox.recent(10))

            assert await wait_until(big_sending, within=30)
            place(small, watch, "Công văn khẩn.jpg")
            dropped = time.monotonic()

            async def found() -> list[dict[str, object]]:
                result = await deployment.get_json("/api/documents", q="khan lu lut xuan loc")
                assert isinstance(result, list)
                return result

            async def any_found() -> bool:
                return bool(await found())

            assert await wait_until(any_found, within=30, interval=0.2)
            searchable_after = time.monotonic() - dropped
            (hit,) = await found()
            assert hit["state"] == "awaiting_original" and hit["filename"] == "Công văn khẩn.jpg"
            # Long before the big one completes: it is still on the wire, nothing is receipted, and the
            # notice's answer let the edge forget nothing (both scans still held on the box).
            docs = {d.name: d for d in await service.outbox.recent(10)}
            assert docs["Hồ sơ địa chính.jpg"].state.value == "sending"
            assert docs["Công văn khẩn.jpg"].state.value in ("packaged", "sending")
            assert all(d.receipt_sha256 is None and d.place.value in ("held", "watch") for d in docs.values())
            detail = await deployment.get_json(f"/api/documents/{hit['id']}")
            assert isinstance(detail, dict) and detail["state"] == "awaiting_original"
            assert SMALL_TEXT in str(detail["text"])

            async def both_receipted() -> bool:
                stats = await service.outbox.stats()
                return stats.counts.get("delivered", 0) == 2 and not await service.outbox.custody_pending()

            assert await wait_until(both_receipted, within=60)
            big_done_after = time.monotonic() - dropped
            assert searchable_after < big_done_after / 2, (searchable_after, big_done_after)
            print(f"searchable after {searchable_after:.1f} s; both receipted after {big_done_after:.1f} s")
            assert not [p for p in watch.iterdir() if not p.name.startswith(".")]

            listed = await deployment.get_json("/api/documents")
            assert isinstance(listed, list) and len(listed) == 2
            by_name = {d["filename"]: d for d in listed}
            assert by_name["Công văn khẩn.jpg"]["id"] == hit["id"]   # completed in place, not doubled
            for name, data in (("Hồ sơ địa chính.jpg", big), ("Công văn khẩn.jpg", small)):
                doc = by_name[name]
                assert doc["state"] == "stored" and doc["sha256"] == hashlib.sha256(data).hexdigest()
                assert await deployment.get_bytes(f"/api/documents/{doc['id']}/original") == data

