"""Custody: the reconciler that alone moves, releases and quarantines originals, from outbox facts.

Real SQLite outbox and real files in a temporary scan folder; the clock is injected.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge.alarms import Alarms
from edge.custody import Custody, verify_for_release
from edge.job import Layout
from edge.outbox import Doc, DocState, Outbox, Place
from edge.quarantine import REASON_SUFFIX, list_failed

NAME = "Công văn số 5 – Tuyên Quang.pdf"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    home = tmp_path / "home"
    watch = tmp_path / "scans"
    for directory in (home / "processed", home / "envelopes", home / "work", watch):
        directory.mkdir(parents=True)
    return Layout(processed=home / "processed", envelopes=home / "envelopes", work=home / "work",
                  watch=watch, refused=watch / "_Lỗi")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def outbox(tmp_path: Path, clock: Clock) -> AsyncIterator[Outbox]:
    box = await Outbox.open(tmp_path / "home" / "outbox.db", clock=clock)
    yield box
    await box.close()


def _custody(outbox: Outbox, layout: Layout, clock: Clock, **options: object) -> tuple[Custody, list[str]]:
    held: list[str] = []
    custody = Custody(outbox, layout, Alarms(), clock=clock, on_held=held.append, **options)  # type: ignore[arg-type]
    return custody, held


async def _taken(outbox: Outbox, layout: Layout, data: bytes, name: str = NAME,
                 rel: str | None = None) -> Doc:
    path = layout.watch / (rel or name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return await outbox.add(name=name, rel_path=rel or name, src_path=str(path), size=len(data),
                            sha256=hashlib.sha256(data).hexdigest(), media_type="application/pdf", pages=1,
                            captured_at=path.stat().st_mtime)


async def _deliver(outbox: Outbox, doc: Doc, layout: Layout) -> None:
    envelope = layout.envelopes / f"{doc.tid}.env"
    envelope.write_bytes(b"ciphertext")
    await outbox.mark_packaged(doc.tid, envelope_path=str(envelope), signed_header=b"h", ciphertext_size=10,
                               segment_size=1024)
    await outbox.mark_sending(doc.tid)
    await outbox.mark_delivered(doc.tid, central_document_id=1, duplicate=False)


async def test_hold_moves_the_scan_out_privately_and_queues_it(outbox: Outbox, layout: Layout) -> None:
    custody, held = _custody(outbox, layout, Clock())
    doc = await _taken(outbox, layout, b"%PDF scan")
    got = await custody.hold(doc)
    assert got.place is Place.HELD and got.pending_path is None and held == [doc.tid]
    path = layout.processed / f"{doc.tid}.pdf"
    assert got.src_path == str(path) and path.read_bytes() == b"%PDF scan"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and list(layout.watch.iterdir()) == []


async def test_an_interrupted_move_is_finished_from_its_recorded_intent(outbox: Outbox,
                                                                      layout: Layout) -> None:
    custody, held = _custody(outbox, layout, Clock())
    doc = await _taken(outbox, layout, b"%PDF scan")
    target = layout.processed / f"{doc.tid}.pdf"
    await outbox.intend(doc.tid, str(target))
    Path(doc.src_path).rename(target)            # the rename happened, then the power went
    assert await custody.reconcile() is None
    got = await outbox.get(doc.tid)
    assert got is not None and got.place is Place.HELD and got.src_path == str(target)
    assert got.pending_path is None and held == [doc.tid]
    # The other way round: intent recorded, rename never happened → the move is simply redone.
    other = await _taken(outbox, layout, b"%PDF other", name="Tờ trình.pdf")
    await outbox.intend(other.tid, str(layout.processed / f"{other.tid}.pdf"))
    await custody.reconcile()
    got = await outbox.get(other.tid)
    assert got is not None and got.place is Place.HELD and Path(got.src_path).read_bytes() == b"%PDF other"


async def test_release_waits_then_deletes_only_the_receipted_bytes(outbox: Outbox, layout: Layout,
                                                                   clock: Clock) -> None:
    custody, _ = _custody(outbox, layout, clock, release_after=60.0)
    doc = await custody.hold(await _taken(outbox, layout, b"%PDF receipted"))
    await _deliver(outbox, doc, layout)
    due = await custody.reconcile()
    assert due == pytest.approx(clock.now + 60.0)
    assert Path(doc.src_path).exists()          # not yet: a late writer would still be caught
    clock.now += 61
    assert await custody.reconcile() is None
    got = await outbox.get(doc.tid)
    assert got is not None and got.place is Place.GONE and got.envelope_path is None
    assert list(layout.processed.iterdir()) == [] and list(layout.envelopes.iterdir()) == []


async def test_a_file_changed_after_the_take_goes_back_to_the_scan_folder(outbox: Outbox,
                                                                          layout: Layout) -> None:
    custody, _ = _custody(outbox, layout, Clock(), release_after=0.0)
    doc = await custody.hold(await _taken(outbox, layout, b"%PDF page 1", rel="Tổ 3/" + NAME))
    await _deliver(outbox, doc, layout)
    with Path(doc.src_path).open("ab") as writer:   # the scanner's descriptor, still open
        writer.write(b" page 2")
    (layout.watch / "Tổ 3" / NAME).write_bytes(b"a new scan under the same name")
    await custody.reconcile()
    got = await outbox.get(doc.tid)
    assert got is not None and got.place is Place.RETURNED and got.state is DocState.DELIVERED
    back = Path(got.src_path)
    assert back == layout.watch / "Tổ 3" / "Công văn số 5 – Tuyên Quang (2).pdf"
    assert back.read_bytes() == b"%PDF page 1 page 2"   # nothing cut off; taken again as a new scan
    assert list(layout.processed.iterdir()) == []


async def test_keep_originals_keeps_the_verified_file(outbox: Outbox, layout: Layout) -> None:
    custody, _ = _custody(outbox, layout, Clock(), release_after=0.0, keep_originals=True)
    doc = await custody.hold(await _taken(outbox, layout, b"%PDF keep me"))
    await _deliver(outbox, doc, layout)
    await custody.reconcile()
    got = await outbox.get(doc.tid)
    assert got is not None and got.place is Place.KEPT and Path(got.src_path).read_bytes() == b"%PDF keep me"


async def test_refused_scans_go_to_the_clerk_with_a_vietnamese_note(outbox: Outbox, layout: Layout) -> None:
    custody, _ = _custody(outbox, layout, Clock())
    held = await custody.hold(await _taken(outbox, layout, b"%PDF refused later"))
    envelope = layout.envelopes / f"{held.tid}.env"
    envelope.write_bytes(b"x")
    await outbox.mark_packaged(held.tid, envelope_path=str(envelope), signed_header=b"h",
                               ciphertext_size=1, segment_size=1024)
    await outbox.mark_failed(held.tid, "central refused it: SequenceReusedError: seq 7 already used",
                             "identity_clash")
    junk = layout.watch / "ghi chú.txt"
    junk.write_text("không phải bản quét")
    await outbox.add_refused(name="ghi chú.txt", src_path=str(junk), reason="the file is not a PNG, JPEG, "
                             "TIFF or PDF", reason_code="not_a_scan")
    await custody.reconcile()
    items = {item.name: item for item in list_failed(layout.refused)}
    assert set(items) == {NAME, "ghi chú.txt"}
    assert items[NAME].code == "identity_clash" and "danh tính" in items[NAME].reason
    assert (layout.refused / NAME).read_bytes() == b"%PDF refused later" and not envelope.exists()
    note = (layout.refused / (NAME + REASON_SUFFIX)).read_text("utf-8")
    assert "sohoa edge retry --all" in note and held.tid in note
    assert (await outbox.stats()).failed == 2
    # The clerk takes one back into the scan folder: it no longer waits for a human.
    (layout.refused / "ghi chú.txt").rename(layout.watch / "ghi chú.txt")
    await custody.reconcile()
    assert (await outbox.stats()).failed == 1


async def test_a_scan_that_vanished_before_the_take_is_recorded_not_invented(outbox: Outbox,
                                                                              layout: Layout) -> None:
    custody, held = _custody(outbox, layout, Clock())
    doc = await _taken(outbox, layout, b"%PDF gone")
    Path(doc.src_path).unlink()
    await custody.reconcile()
    got = await outbox.get(doc.tid)
    assert got is not None and got.place is Place.MISSING and got.state is DocState.FAILED
    assert got.reason_code == "vanished" and held == []


def test_verify_for_release_verdicts(tmp_path: Path) -> None:
    path = tmp_path / "held.pdf"
    path.write_bytes(b"exact bytes")
    good = hashlib.sha256(b"exact bytes").hexdigest()
    assert verify_for_release(path, good, delete=False) == "kept" and path.exists()
    assert verify_for_release(path, "0" * 64, delete=True) == "changed" and path.exists()
    assert verify_for_release(path, good, delete=True) == "released" and not path.exists()
    assert verify_for_release(path, good, delete=True) == "missing"
    os.symlink("/etc/passwd", path)
    assert verify_for_release(path, good, delete=True) == "changed" and path.is_symlink()
