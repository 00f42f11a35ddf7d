"""A hostile *enrolled* device (a stolen key) against real Mosquitto and a real central, while an honest
box with a real edge service sends its scans: bombs, then a thousand transfers opened and left
hanging (slow-loris). The honest scans all arrive exactly once, central's memory and disk stay
bounded, the hostile box is deferred with the quota's reason and shows as a problem; nobody is revoked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import tomllib
from pathlib import Path

import psutil
import pytest
import tomli_w
from nacl.public import PublicKey

from central.admin import commands as central_commands
from central.ingest.batch import LogBudget
from central.ingest.rate import MAX_WAITING
from edge.ocr import FakeOcrEngine
from protocol.messages import Ack, AckState, Segment, decode, encode
from tests.central.builders import Sealed, seal_stream
from tests.central.conftest import Bundle, read_bundle
from tests.central.test_broker import connected
from tests.faults.cluster import drop, make_documents
from tests.faults.jepsen import assert_exactly_once
from tests.faults.scenario import catalog
from tests.support.deployment import DEVICE, Deployment, running
from tests.support.files import leftover_files
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

HOSTILE = "xa-ke-xau"
MiB = 1024 * 1024
BOMB = 16 * MiB


def _tune(central_home: Path, **ingest: int) -> None:
    path = central_home / "central.toml"
    data = tomllib.loads(path.read_text())
    data["ingest"].update(ingest)
    path.write_text(tomli_w.dumps(data))


def _enroll_hostile(deployment: Deployment, tmp_path: Path, **ingest: int) -> tuple[Bundle, PublicKey]:
    """Central tuned (``[ingest]``), the hostile device enrolled and its account live; its bundle and
    central's encryption key (what a stolen box holds)."""
    from central.keys import load_keys  # noqa: PLC0415
    from central.paths import CentralPaths  # noqa: PLC0415

    _tune(deployment.central_home, **ingest)
    out = tmp_path / "hostile.bundle.toml"
    central_commands.enroll(deployment.central_home, HOSTILE, out)
    deployment.broker.reload()
    return read_bundle(out), load_keys(CentralPaths(deployment.central_home)).encryption.public_key


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def test_a_hostile_device_cannot_starve_an_honest_one(deployment: Deployment, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from central.paths import CentralPaths  # noqa: PLC0415

    # This one is about quotas: a message rate wide enough for everything it sends at once.
    hostile, central_key = _enroll_hostile(deployment, tmp_path, rejected_transfers_budget=2,
                                           max_messages_burst=100_000)

    def seal(seq: int, pieces: list[bytes], size: int) -> Sealed:
        return seal_stream(device=HOSTILE, seq=seq, signing_key=hostile.signing_key, central_key=central_key,
                           pieces=pieces, size=size)

    zeros = bytes(MiB)
    bombs = [seal(seq, [zeros] * (BOMB // MiB), BOMB) for seq in (1, 2, 3)]
    loris = [seal(10 + n, [os.urandom(40_000)], 40_000) for n in range(1000)]
    dropped = make_documents(tmp_path / "docs", 10, seed=11, side=144)
    me = psutil.Process()

    with caplog.at_level(logging.INFO, logger="sohoa.central.ingest"):
        async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
            rss_before = me.memory_info().rss
            home_before = _du(deployment.central_home)
            started = time.monotonic()
            async with connected(deployment.broker.device_port, hostile.username, hostile.password,
                                 ((f"sohoa/v1/down/{HOSTILE}/#", 1),)) as box:
                answers: dict[str, list[Ack]] = {}

                async def listen() -> None:
                    while True:
                        inbound = await box.inbox.get()
                        msg = decode(inbound.topic, inbound.payload)
                        if isinstance(msg, Ack):
                            answers.setdefault(msg.tid, []).append(msg)

                listener = asyncio.create_task(listen())
                # 1. Bombs: validly signed, each expands past what its package says: rejected.
                for bomb in bombs:
                    for message in bomb.messages(64 * 1024):
                        await box.publish(*encode(message))

                async def bombs_rejected() -> bool:
                    return all(any(a.state is AckState.REJECTED for a in answers.get(b.tid, []))
                               for b in bombs)

                assert await wait_until(bombs_rejected, within=40), answers
                # 2. The honest box gets its scans while the hostile one opens a thousand transfers
                #    and sends one segment of each (never the rest: slow-loris).
                drop(tmp_path / "docs", deployment.edge_config().watch_dir)
                for sealed in loris:
                    await box.publish(*encode(sealed.init()))
                    await box.publish(*encode(Segment(HOSTILE, sealed.tid, 0, sealed.ciphertext[:16_384])))

                async def all_answered() -> bool:
                    return all(sealed.tid in answers for sealed in loris)

                assert await wait_until(all_answered, within=40)
                listener.cancel()

            async def delivered() -> bool:
                return (await service.outbox.stats()).counts.get("delivered", 0) == 10

            assert await wait_until(delivered, within=60), await service.outbox.stats()
            elapsed = time.monotonic() - started
            rss_grown = me.memory_info().rss - rss_before
            home_grown = _du(deployment.central_home) - home_before
            devices = await deployment.get_json("/api/devices")

    assert_exactly_once(dropped, catalog(deployment.central_home), device=DEVICE)
    first = {tid: acks[0] for tid, acks in answers.items() if tid in {s.tid for s in loris}}
    deferred = [a for a in first.values() if a.state is AckState.DEFERRED]
    opened = [a for a in first.values() if a.state is AckState.RECEIVING]
    # Flagged by its bombs, the device may hold one transfer open at a time; the rest wait.
    assert len(opened) <= 1 and len(deferred) >= 999
    assert {(a.error_class, a.retry_after is not None) for a in deferred} == {("QuotaExceededError", True)}
    assert all(a.state is not AckState.REJECTED for a in first.values())   # deferred, never refused
    rows = {d["id"]: d for d in devices}  # type: ignore[union-attr]
    assert rows[HOSTILE]["problem"] == "rejected transfers" and rows[HOSTILE]["status"] == "active"
    assert rows[DEVICE]["problem"] in (None, "offline")
    quota_lines = [r for r in caplog.records if f"deferred a new transfer of {HOSTILE}" in r.getMessage()]
    assert len(quota_lines) == 1   # once per device per interval, not 999 times
    print(f"hostile: 3 bombs of {BOMB // MiB} MiB rejected, {len(deferred)} of 1000 transfers deferred, "
          f"{len(opened)} opened; honest: 10 scans delivered once in {elapsed:.1f} s; "
          f"process RSS grew {rss_grown / MiB:.1f} MiB, central home grew {home_grown / 1024:.0f} KiB")
    assert rss_grown < 200 * MiB
    # The hostile box's hanging transfer holds at most one 16 KiB segment; the rest is the honest
    # box's documents (10 × ~21 KiB, original and package) and the catalog.
    assert home_grown < 16 * MiB
    assert leftover_files(CentralPaths(deployment.central_home).tmp) == []


async def test_a_device_flooding_messages_is_held_to_its_rate(deployment: Deployment, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Every message costs central something before any quota can weigh it (a repeat of a held
    segment: a decode, a lookup and an answer). A box sending thousands a second without waiting for
    answers gets its burst, then its rate, a queue's worth paced, and the rest is dropped unread and
    logged once; the honest box's scans still arrive once, and the flooding box, once it slows down,
    is answered again."""
    hostile, central_key = _enroll_hostile(deployment, tmp_path, max_messages_per_second=50,
                                           max_messages_burst=200)
    sealed = seal_stream(device=HOSTILE, seq=1, signing_key=hostile.signing_key, central_key=central_key,
                         pieces=[os.urandom(100_000)], size=100_000)
    first = Segment(HOSTILE, sealed.tid, 0, sealed.ciphertext[:16_384])
    flood = 3000
    dropped = make_documents(tmp_path / "docs", 5, seed=12, side=144)

    with caplog.at_level(logging.WARNING, logger="sohoa.central.ingest"):
        async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
            async with connected(deployment.broker.device_port, hostile.username, hostile.password,
                                 ((f"sohoa/v1/down/{HOSTILE}/#", 1),)) as box:
                answers: list[Ack] = []

                async def listen() -> None:
                    while True:
                        inbound = await box.inbox.get()
                        msg = decode(inbound.topic, inbound.payload)
                        if isinstance(msg, Ack) and msg.tid == sealed.tid:
                            answers.append(msg)

                listener = asyncio.create_task(listen())
                async def answered_beyond(count: int) -> bool:
                    return len(answers) > count

                await box.publish(*encode(sealed.init()))
                assert await wait_until(lambda: answered_beyond(0), within=20)
                drop(tmp_path / "docs", deployment.edge_config().watch_dir)
                started = time.monotonic()
                topic, payload = encode(first)
                # The same held segment, again and again, as fast as the broker takes them.
                acks = [box.start_publish(topic, payload) for _ in range(flood)]
                await asyncio.gather(*(a for a in acks if a is not None))
                sent_s = time.monotonic() - started
                quiet = len(answers)

                async def settled() -> bool:
                    nonlocal quiet
                    await asyncio.sleep(1.0)
                    before, quiet = quiet, len(answers)
                    return before == quiet

                assert await wait_until(settled, within=30)
                answered = len(answers) - 1
                await asyncio.sleep(1.0)                # slowed down: its next message is answered
                await box.publish(*encode(first))
                assert await wait_until(lambda: answered_beyond(answered + 1), within=10)
                listener.cancel()

            async def delivered() -> bool:
                return (await service.outbox.stats()).counts.get("delivered", 0) == 5

            assert await wait_until(delivered, within=60), await service.outbox.stats()
            scrape = (await deployment.get_bytes("/metrics")).decode()

    assert_exactly_once(dropped, catalog(deployment.central_home), device=DEVICE)
    rate_drops = [line for line in scrape.splitlines()
                  if line.startswith("sohoa_central_ingest_errors") and "MessageRateExceeded" in line]
    unread = int(float(rate_drops[0].split()[-1])) if rate_drops else 0
    # The burst, the rate while sending (with slack), and what may wait in its queue to be paced.
    allowed = 200 + 50 * (sent_s + 2.0) + MAX_WAITING
    print(f"flood: {flood} repeats in {sent_s:.1f} s, {flood - unread} read (at most {allowed:.0f} allowed), "
          f"{unread} dropped unread, {answered} answers")
    assert flood - unread <= allowed < flood
    lines = [r for r in caplog.records if f"device {HOSTILE} sends more than" in r.getMessage()]
    assert len(lines) == 1


async def test_an_honest_box_over_its_rate_is_paced_not_dropped(deployment: Deployment,
                                                                 tmp_path: Path) -> None:
    """A box on a fast LAN may send faster than its message rate, but it waits for answers (a window
    of segments per transfer): it is slowed to its rate and loses nothing, so it never sits out a
    resend timeout."""
    _tune(deployment.central_home, max_messages_per_second=10, max_messages_burst=5)
    dropped = make_documents(tmp_path / "docs", 6, seed=13, side=400)
    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        drop(tmp_path / "docs", deployment.edge_config().watch_dir)

        async def delivered() -> bool:
            return (await service.outbox.stats()).counts.get("delivered", 0) == 6

        assert await wait_until(delivered, within=90), await service.outbox.stats()
        scrape = (await deployment.get_bytes("/metrics")).decode()
    assert_exactly_once(dropped, catalog(deployment.central_home), device=DEVICE)
    assert "MessageRateExceeded" not in scrape
    [paced] = [line for line in scrape.splitlines() if line.startswith("sohoa_central_messages_paced_total")]
    assert float(paced.split()[-1]) > 0, paced     # it was over its rate, and waited


def test_refusals_are_logged_within_a_budget_per_device_and_the_rest_counted() -> None:
    """A box sending junk at its message rate used to write one warning per message (~3 GB of
    journal a day); now 20 lines per device per minute, then how many were held back."""
    budget = LogBudget(burst=3, window_s=60)
    said = [budget.take("xa-on", t) for t in range(10)] + [budget.take("xa-khac", 5)]
    assert said == [0, 0, 0, None, None, None, None, None, None, None, 0]   # another device logs
    assert budget.take("xa-on", 61) == 7   # the next window's first line says what was held back
    assert budget.take("xa-on", 62) == 0
