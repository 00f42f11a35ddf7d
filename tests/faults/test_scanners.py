"""Scanners as offices have them (issue 7, situation 1), against the real broker and real tesseract.

A scanner that pauses between pages with the file open, one that leaves a finished-looking PDF
after every page, a PNG written in two bursts, and a writer that goes on writing after the box
took the file. In every case the *final* file must reach central, nothing may be lost, and nothing
may be refused for being unfinished. On 39f124d each of these lost the later pages or put the file
into failed/ while the scanner kept writing into it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time

import pytest

from tests.faults.scanners import page_jpegs, scan_pdf_page_by_page, write_in_bursts
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(420)
NAME = "Quyết định số 12 – UBND xã.pdf"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _arrivals(deployment: Deployment) -> list[dict[str, object]]:
    docs = await deployment.get_json("/api/documents")
    assert isinstance(docs, list)
    return docs


async def _settled(service: object, delivered: int) -> bool:
    outbox = service.outbox  # type: ignore[attr-defined]
    stats = await outbox.stats()
    return (stats.counts.get("delivered", 0) >= delivered and stats.queued_docs == 0
            and not await outbox.custody_pending())


def _edge_is_empty(deployment: Deployment) -> None:
    cfg = deployment.edge_config()
    assert [p.name for p in cfg.watch_dir.iterdir()] == []      # no _Lỗi either: nothing refused
    assert list(cfg.processed_dir.iterdir()) == [] and list(cfg.envelopes_dir.iterdir()) == []


@pytest.mark.parametrize(("incremental", "pauses"), [
    pytest.param(False, [3.0, 6.0], id="streaming-pdf-3s-6s"),
    pytest.param(True, [3.0, 6.0], id="finished-looking-after-each-page-3s-6s"),
])
async def test_a_scanner_pausing_between_pages_delivers_the_whole_document(
        deployment: Deployment, incremental: bool, pauses: list[float]) -> None:
    pages = page_jpegs(3, seed=3)
    watch = deployment.edge_config().watch_dir
    async with running(deployment) as service:
        final = await scan_pdf_page_by_page(watch / NAME, pages, pauses, incremental=incremental,
                                            after_last_page=2.0)
        closed = time.monotonic()
        assert await wait_until(lambda: _settled(service, 1), within=180), await service.outbox.stats()
        print(f"\nclose → receipted and released: {time.monotonic() - closed:.1f} s")
        docs = await _arrivals(deployment)
        assert [(d["filename"], d["sha256"], d["pages"]) for d in docs] == [(NAME, _sha(final), 3)]
        original = await deployment.get_bytes(f"/api/documents/{docs[0]['id']}/original")
    assert original == final
    _edge_is_empty(deployment)


@pytest.mark.torture
@pytest.mark.parametrize("pause", [20.0, 60.0])
async def test_long_page_turns_with_production_quiet_periods(deployment: Deployment, pause: float) -> None:
    """The field's defaults (5 s quiet after close, 10 min for a silent open file), a 20–60 s pause."""
    pages = page_jpegs(2, seed=4)
    cfg = deployment.edge_config(quiet_seconds=5.0, open_quiet_seconds=600.0)
    async with running(deployment, edge_config=cfg) as service:
        final = await scan_pdf_page_by_page(cfg.watch_dir / NAME, pages, [pause], incremental=True)
        closed = time.monotonic()
        assert await wait_until(lambda: _settled(service, 1), within=240)
        print(f"\n{pause:.0f} s pause: close → receipted {time.monotonic() - closed:.1f} s")
        docs = await _arrivals(deployment)
    assert [(d["sha256"], d["pages"]) for d in docs] == [(_sha(final), 2)]
    _edge_is_empty(deployment)


async def test_a_png_written_in_two_bursts_is_neither_refused_nor_cut(deployment: Deployment) -> None:
    from PIL import Image  # noqa: PLC0415

    jpeg, _width, _height = page_jpegs(1, seed=5)[0]
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, format="PNG", dpi=(150, 150))
    data = buffer.getvalue()
    watch = deployment.edge_config().watch_dir
    async with running(deployment) as service:
        await write_in_bursts(watch / "Biên bản họp thôn.png", data, bursts=2, pause=4.0)
        assert await wait_until(lambda: _settled(service, 1), within=120)
        docs = await _arrivals(deployment)
    assert [d["sha256"] for d in docs] == [_sha(data)]
    _edge_is_empty(deployment)


async def test_a_writer_that_goes_on_after_the_box_took_the_file_loses_nothing(
        deployment: Deployment) -> None:
    """The worst case: the close event is lost (open_quiet 1 s stands in for it), the box takes a
    finished-looking page 1 while the scanner still holds the file, and page 2 arrives after the
    take. Central must end up holding the final bytes; the box must delete only what central
    receipted (the re-hash at release, after ``release_after_seconds``)."""
    pages = page_jpegs(2, seed=6)
    cfg = deployment.edge_config(open_quiet_seconds=1.0, release_after_seconds=3.0)
    path = cfg.watch_dir / NAME
    async with running(deployment, edge_config=cfg) as service:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            from tests.faults.scanners import StreamingPdf  # noqa: PLC0415

            pdf = StreamingPdf(fd, incremental=True)
            pdf.start()
            pdf.add_page(*pages[0])

            async def taken() -> bool:
                return not path.exists()

            assert await wait_until(taken, within=60), "the box never took the open file"
            await asyncio.sleep(0.5)   # the clerk feeds the second sheet
            pdf.add_page(*pages[1])
        finally:
            os.close(fd)
        held = sorted(cfg.processed_dir.iterdir())
        assert len(held) == 1
        final = held[0].read_bytes()   # what the scanner wrote, through its descriptor, after the take

        async def final_at_central() -> bool:
            docs = await _arrivals(deployment)
            return _sha(final) in {d["sha256"] for d in docs} and await _settled(service, 1)

        assert await wait_until(final_at_central, within=180), await _arrivals(deployment)
        docs = await _arrivals(deployment)
    # Page 1 alone may have been receipted first (then the change was caught at release and sent as
    # a new version) or the change was caught before packaging (one version): never anything lost.
    assert _sha(final) in {d["sha256"] for d in docs} and len(docs) <= 2
    assert all(str(d["filename"]).startswith("Quyết định số 12") for d in docs)
    _edge_is_empty(deployment)
