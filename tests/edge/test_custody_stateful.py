"""The custody rule, stated as a property and attacked with random office days (Hypothesis stateful).

Rule: bytes leave the box only when central has signed for exactly those bytes. Hypothesis drives
the real outbox (SQLite on disk), the real take stage and the real custody reconciler through
random sequences of: scans dropped and re-dropped, packaging, a scanner writing into a file after
the box took it, receipts, refusals, clerks retrying refused scans, restarts of the box, and central
restored from an older copy (forgetting everything it held). OCR, envelopes and MQTT are modelled:
"packaging" snapshots the held file's bytes as the envelope, a "receipt" stores that snapshot at the
model central and records the receipt with its sha256.

The invariant checked after every step: every content (sha256) that disappeared from the box's
files (scan folder, processed/, refused folder) during the step is covered by a receipt central
signed for exactly those bytes, and each receipt covers one drop only (a receipt is consumed by
the deletion it justified: a re-drop of the same bytes needs a receipt of its own). A receipt stays
valid if central is restored afterwards: the box cannot know, and the release delay
(``retention.release_after_seconds``) is what narrows that window — see docs/DECISIONS.md.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from PIL import Image

from edge.alarms import Alarms
from edge.config import EdgeConfig, from_mapping
from edge.custody import Custody
from edge.job import Layout
from edge.outbox import DocState, Outbox, Place
from edge.quarantine import list_failed, restore
from edge.take import Taker

NAMES = ("Quyết định số 12.png", "Công văn số 5 – Tuyên Quang.png", "Tờ trình 3.png")


def _png(seed: int) -> bytes:
    image = Image.new("L", (8, 8))
    image.frombytes(bytes((seed * 37 + i * 11) % 256 for i in range(64)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


CONTENTS = tuple(_png(seed) for seed in range(4))
PICK = st.integers(min_value=0, max_value=63)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _config(home: Path, watch: Path) -> EdgeConfig:
    key = base64.b64encode(bytes(32)).decode()
    return from_mapping({
        "device_id": "xa-kiem-thu", "watch_dir": str(watch),
        "broker": {"url": "mqtt://127.0.0.1:1", "username": "xa-kiem-thu", "password": "p"},
        "central": {"encryption_public_key": key, "receipt_public_key": key},
        "intake": {"incomplete_grace_seconds": 0.0},
    }, home=home)


class OfficeDay(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="sohoa-custody-"))
        self.home, self.watch = self.root / "home", self.root / "scans"
        self.config = _config(self.home, self.watch)
        self.layout = Layout(processed=self.config.processed_dir, envelopes=self.config.envelopes_dir,
                             work=self.config.work_dir, watch=self.watch, refused=self.config.refused_dir)
        for directory in (*self.layout.private_dirs(), self.watch):
            directory.mkdir(parents=True, exist_ok=True)
        self.loop = asyncio.new_event_loop()
        self.central: set[str] = set()            # what the model central holds now
        self.receipts: collections.Counter[str] = collections.Counter()   # signed, not yet used
        self.envelopes: dict[str, bytes] = {}     # tid → the bytes its envelope carries
        self.outbox: Outbox | None = None
        self.custody: Custody | None = None
        self.taker: Taker | None = None
        self.before: collections.Counter[str] = collections.Counter()
        self.counter = 0

    # -- plumbing ---------------------------------------------------------------------------------
    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    async def _open(self) -> None:
        self.outbox = await Outbox.open(self.config.outbox_path)
        self.custody = Custody(self.outbox, self.layout, Alarms(), release_after=0.0)
        self.taker = Taker(self.outbox, self.custody, self.config, Alarms())

    def edge_contents(self) -> collections.Counter[str]:
        found: collections.Counter[str] = collections.Counter()
        for top in (self.watch, self.layout.processed):
            for path in top.rglob("*"):
                if path.is_file() and not path.name.endswith((".lý-do.txt", ".tmp")):
                    found[_sha(path.read_bytes())] += 1
        return found

    async def rows(self, *states: DocState, place: Place | None = None) -> list[str]:
        assert self.outbox is not None
        return [d.tid for d in await self.outbox.recent(10_000)
                if d.state in states and (place is None or d.place is place)]

    async def held_paths(self, *states: DocState) -> list[Path]:
        assert self.outbox is not None
        return [Path(d.src_path) for d in await self.outbox.recent(10_000)
                if d.place is Place.HELD and Path(d.src_path).exists() and (not states or d.state in states)]

    # -- the day ----------------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        self.run(self._open())
        self.before = self.edge_contents()

    @rule(content=st.sampled_from(range(len(CONTENTS))), name=st.sampled_from(NAMES))
    def clerk_drops_a_scan(self, content: int, name: str) -> None:
        target = self.watch / name
        if target.exists():
            return
        temp = self.watch / f".{name}.part"
        temp.write_bytes(CONTENTS[content])
        temp.rename(target)

    @rule(content=st.sampled_from(range(len(CONTENTS))), name=st.sampled_from(NAMES))
    def a_scan_goes_all_the_way_to_a_receipt(self, content: int, name: str) -> None:
        """The common case in one step (drop, take, package, receipt), so the rarer steps around
        it — a late writer, a restore, a restart before release — get tried against it often."""
        self.clerk_drops_a_scan(content, name)
        self.box_takes_what_is_in_the_scan_folder()
        for tid in self.run(self.rows(DocState.STABLE, place=Place.HELD)):  # type: ignore[union-attr]
            self.run(self._package(tid))
        for tid in self.run(self.rows(DocState.PACKAGED, DocState.SENDING)):  # type: ignore[union-attr]
            self._receipt(tid)

    @rule()
    def box_takes_what_is_in_the_scan_folder(self) -> None:
        assert self.taker is not None
        for path in sorted(p for p in self.watch.iterdir() if p.is_file() and not p.name.startswith(".")):
            self.run(self.taker.take(path))

    # Rows are picked by position (ordered by seq), never by tid: tids are random, and Hypothesis
    # must be able to replay a sequence of draws.
    @rule(pick=PICK)
    def box_packages_a_held_scan(self, pick: int) -> None:
        tids = self.run(self.rows(DocState.STABLE, place=Place.HELD))
        assert isinstance(tids, list)
        if tids:
            self.run(self._package(tids[pick % len(tids)]))

    async def _package(self, tid: str) -> None:
        assert self.outbox is not None
        doc = await self.outbox.get(tid)
        assert doc is not None
        snapshot = Path(doc.src_path).read_bytes()
        if _sha(snapshot) != doc.sha256:      # what the processor does on ContentChangedError
            info = Path(doc.src_path).stat()
            await self.outbox.content_changed(tid, sha256=_sha(snapshot), size=len(snapshot),
                                              captured_at=info.st_mtime)
            return
        envelope = self.layout.envelopes / f"{tid}.env"
        envelope.write_bytes(b"sealed")
        self.envelopes[tid] = snapshot
        await self.outbox.mark_packaged(tid, envelope_path=str(envelope), signed_header=b"h",
                                        ciphertext_size=len(snapshot), segment_size=1024)

    @rule(pick=PICK, receipted=st.booleans())
    def scanner_writes_into_a_held_file(self, pick: int, receipted: bool) -> None:
        """The scanner's descriptor outlived the take; ``receipted`` aims at the worst moment:
        central has just receipted the earlier bytes and the box has not released them yet."""
        held = self.run(self.held_paths(DocState.DELIVERED) if receipted else self.held_paths())
        assert isinstance(held, list)
        if not held:
            return
        with held[pick % len(held)].open("ab") as writer:
            writer.write(b"page 2")
        self.before = self.edge_contents()   # the writer's own change, not a deletion by the box

    @rule(pick=PICK)
    def central_receipts_a_transfer(self, pick: int) -> None:
        tids = self.run(self.rows(DocState.PACKAGED, DocState.SENDING))
        assert isinstance(tids, list)
        if tids:
            self._receipt(tids[pick % len(tids)])

    def _receipt(self, tid: str) -> None:
        sha = _sha(self.envelopes[tid])
        self.central.add(sha)
        self.receipts[sha] += 1
        assert self.outbox is not None
        self.run(self.outbox.mark_delivered(tid, central_document_id=1, duplicate=False, receipt_sha256=sha))

    @rule(pick=PICK)
    def central_or_the_box_refuses_one(self, pick: int) -> None:
        tids = self.run(self.rows(DocState.STABLE, DocState.PACKAGED, DocState.SENDING))
        assert isinstance(tids, list)
        if tids:
            assert self.outbox is not None
            self.run(self.outbox.mark_failed(tids[pick % len(tids)], "refused", "central_refused"))

    @rule()
    def custody_reconciles(self) -> None:
        assert self.custody is not None
        self.run(self.custody.reconcile())

    @rule()
    def clerk_retries_every_refused_scan(self) -> None:
        for item in list_failed(self.layout.refused):
            restore(self.layout.refused, item.name, self.watch)

    @rule()
    def box_restarts(self) -> None:
        assert self.outbox is not None and self.custody is not None
        self.run(self.outbox.close())
        self.run(self._open())
        self.custody.sweep_leftovers()
        self.run(self.custody.reconcile())

    @precondition(lambda self: bool(self.central))
    @rule()
    def central_is_restored_from_an_old_backup(self) -> None:
        self.central.clear()

    # -- the rule ---------------------------------------------------------------------------------
    @invariant()
    def nothing_leaves_the_box_without_a_receipt_for_exactly_those_bytes(self) -> None:
        if self.outbox is None:
            return
        now = self.edge_contents()
        gone = self.before - now
        unreceipted = {sha[:12]: n for sha, n in gone.items() if self.receipts[sha] < n}
        assert not unreceipted, f"deleted from the box without a receipt of its own: {unreceipted}"
        self.receipts -= gone
        self.before = now

    def teardown(self) -> None:
        try:
            if self.outbox is not None:
                self._drain()
        finally:
            # Always: a failed example must not leave its SQLite thread or its loop behind.
            if self.outbox is not None:
                self.run(self.outbox.close())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)

    def _drain(self) -> None:
        """Finish the day: everything queued reaches central, and then nothing is left behind."""
        assert self.outbox is not None and self.custody is not None
        for _ in range(6):
            self.box_takes_what_is_in_the_scan_folder()
            for tid in self.run(self.rows(DocState.STABLE, place=Place.HELD)):  # type: ignore[union-attr]
                self.run(self._package(tid))
            for tid in self.run(self.rows(DocState.PACKAGED, DocState.SENDING)):  # type: ignore[union-attr]
                self._receipt(tid)
            self.run(self.custody.reconcile())
            self.nothing_leaves_the_box_without_a_receipt_for_exactly_those_bytes()
        stats = self.run(self.outbox.stats())
        assert stats.queued_docs == 0, stats  # type: ignore[attr-defined]
        assert self.run(self.outbox.custody_pending()) == []
        assert [p for p in self.watch.iterdir() if p.name != self.config.intake.refused_folder] == []


TestOfficeDay = OfficeDay.TestCase
TestOfficeDay.settings = settings(
    max_examples=int(os.environ.get("SOHOA_CUSTODY_EXAMPLES", "60")), stateful_step_count=30,
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.torture
@pytest.mark.timeout(3600)
def test_custody_rule_long_run() -> None:
    """The same machine, many more office days (``-m torture``)."""
    from hypothesis.stateful import run_state_machine_as_test  # noqa: PLC0415

    run_state_machine_as_test(OfficeDay, settings=settings(
        max_examples=2000, stateful_step_count=60, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
