"""Situations a real commune office creates that the earlier suites did not: long Vietnamese names
refused or returned, a box clock that was years off, a scan share remounted under the service.

Real broker, real central, files on disk; the OCR engine is the fake one (this is about custody,
names and folders; the real engine has its own end-to-end test).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from central.admin import commands as central_commands
from edge import cli as edge_cli
from edge.cli import status_report
from edge.ocr import FakeOcrEngine
from edge.quarantine import REASON_SUFFIX
from tests.faults.cluster import make_documents
from tests.support.deployment import DEVICE, Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def _longest_name(words: str, suffix: str) -> str:
    """The longest name this file system takes (255 bytes), in Vietnamese: what a Windows clerk
    typing a whole trích yếu into the name gets through Samba."""
    name = ""
    while len(os.fsencode(name + words[len(name) % len(words)] + suffix)) <= 255:
        name += words[len(name) % len(words)]
    return name + suffix


async def test_a_refused_scan_with_the_longest_name_reaches_the_clerk_with_its_reason(
        deployment: Deployment) -> None:
    """The note `<name>.lý-do.txt` cannot exist beside a 255-byte name (ENAMETOOLONG): the scan
    must still land in _Lỗi with a readable reason, and the row must not stay in custody forever."""
    cfg = deployment.edge_config()
    name = _longest_name("Tờ trình về việc đề nghị phê duyệt kế hoạch lưu trữ ", ".pdf")
    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        (cfg.watch_dir / name).write_bytes(b"%PDF-1.4\nkhong phai ban quet\n%%EOF\n")

        async def settled() -> bool:
            return ((await service.outbox.stats()).failed == 1
                    and not await service.outbox.custody_pending())

        assert await wait_until(settled, within=60), (
            await service.outbox.stats(), service.alarms.last_error,
            sorted(p.name for p in cfg.refused_dir.iterdir()) if cfg.refused_dir.exists() else None)
        refused = sorted(cfg.refused_dir.iterdir())
        assert [p for p in cfg.watch_dir.iterdir() if p != cfg.refused_dir] == []
        # The scan itself is there, byte for byte, and one note explains it.
        scans = [p for p in refused if not p.name.endswith(REASON_SUFFIX)]
        notes = [p for p in refused if p.name.endswith(REASON_SUFFIX)]
        assert len(scans) == 1 and len(notes) == 1, [p.name for p in refused]
        assert scans[0].read_bytes().startswith(b"%PDF-1.4\nkhong")
        note = notes[0].read_text("utf-8")
        assert f"Tệp: {name}\n" in note and "Lý do: " in note    # the clerk's whole name, in the note
        assert notes[0].name == scans[0].name + REASON_SUFFIX
    report = await status_report(deployment.edge_home)
    assert [item["code"] for item in report["failed"]] == ["incomplete"], report["failed"]


async def test_a_receipt_taken_while_the_clock_was_years_ahead_still_releases_after_ntp(
        deployment: Deployment, tmp_path: Path) -> None:
    """A box whose RTC battery died boots years off; its receipt is recorded at that time, then NTP
    corrects the clock. The held original must still be released (re-hashed against the receipt)
    after the release delay, not years later, when the box's disk has long filled up."""
    sources = make_documents(tmp_path / "src", 1, seed=21)
    name = next(iter(sources))
    held_cfg = deployment.edge_config(release_after_seconds=3600.0)
    async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=held_cfg) as service:
        (held_cfg.watch_dir / name).write_bytes((tmp_path / "src" / name).read_bytes())

        async def delivered() -> bool:
            return (await service.outbox.stats()).counts["delivered"] == 1

        assert await wait_until(delivered, within=60), await service.outbox.stats()
    # What the box recorded while its clock read five years ahead (the receipt's local time).
    years = 5 * 365 * 86400.0
    with contextlib.closing(sqlite3.connect(held_cfg.outbox_path)) as db, db:
        db.execute("UPDATE docs SET delivered_at = delivered_at + ?, created_at = created_at + ?,"
                   " updated_at = updated_at + ?", (years, years, years))
    assert [p.name for p in held_cfg.processed_dir.iterdir()]      # held, waiting for release

    cfg = deployment.edge_config(release_after_seconds=1.0)     # NTP has set the clock right
    async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=cfg) as service:
        async def released() -> bool:
            return not list(cfg.processed_dir.iterdir()) and not await service.outbox.custody_pending()

        assert await wait_until(released, within=45), [
            (d.state, d.place, d.delivered_at) for d in await service.outbox.recent()]
        [doc] = await service.outbox.recent()
        assert doc.place.value == "gone"
        docs = await deployment.get_json("/api/documents")
    assert isinstance(docs, list) and [d["sha256"] for d in docs] == [sources[name]]


async def test_file_events_resume_after_the_scan_share_is_removed_and_recreated(
        deployment: Deployment, tmp_path: Path) -> None:
    """The share is remounted (or the folder deleted and made again by an admin): inotify's watch
    died with the old folder. Without file events a scan is judged by its mtime's age alone
    (`unknown_quiet_seconds`, 60 s in the field) and a scanner pausing with its file open is no
    longer seen as writing. After the folder comes back, a closed scan must again be taken after
    the short closed-file quiet period, as before the remount."""
    sources = make_documents(tmp_path / "src", 2, seed=31)
    first, second = sorted(sources)
    cfg = deployment.edge_config(unknown_quiet_seconds=60.0)    # the field's value: events matter
    async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=cfg) as service:
        async def delivered(n: int) -> bool:
            return (await service.outbox.stats()).counts["delivered"] == n

        (cfg.watch_dir / first).write_bytes((tmp_path / "src" / first).read_bytes())
        assert await wait_until(lambda: delivered(1), within=30), await service.outbox.stats()

        shutil.rmtree(cfg.watch_dir)
        await asyncio.sleep(0.5)                     # the share is away for a moment
        cfg.watch_dir.mkdir()
        await asyncio.sleep(2 * cfg.intake.rescan_seconds + 0.5)     # and back, then a scan
        (cfg.watch_dir / second).write_bytes((tmp_path / "src" / second).read_bytes())
        assert await wait_until(lambda: delivered(2), within=20), (
            await service.outbox.stats(), service.alarms.last_error)


async def test_a_revoked_box_tells_the_clerk_and_its_unsent_scans_come_back_after_re_enrolment(
        deployment: Deployment, tmp_path: Path) -> None:
    """The admin revokes a box while scans are on their way (a box to be replaced, one that was
    stolen and found). Its scans can never be sent under that identity: the box must say so, and
    after it is enrolled again under a new id (`edge init --force --abandon-queue`) the unsent
    scans must come back to the clerk (the refused folder, with a note) for `sohoa edge retry
    --all`, not sit under tid names in a private folder that nobody will ever send."""
    sources = make_documents(tmp_path / "src", 3, seed=41, side=300)
    cfg = deployment.edge_config()
    slow = dataclasses.replace(cfg, uplink=dataclasses.replace(cfg.uplink, rate_kbit=64))
    async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=slow) as service:
        for name in sorted(sources):
            (cfg.watch_dir / name).write_bytes((tmp_path / "src" / name).read_bytes())

        async def on_its_way() -> bool:
            stats = await service.outbox.stats()
            return stats.counts["sending"] >= 1 and stats.counts["stable"] == 0

        assert await wait_until(on_its_way, within=30), await service.outbox.stats()
        await asyncio.to_thread(central_commands.revoke, deployment.central_home, DEVICE)

        async def told() -> bool:
            status = await service.status()
            return not status.online and any("revoked" in alarm for alarm in status.alarms)

        assert await wait_until(told, within=20), await service.status()
        unsent = {d.sha256 for d in await service.outbox.recent() if d.state.value != "delivered"}
        assert unsent and unsent <= set(sources.values())
    # The admin enrolls the box again under a new id and re-initialises it.
    bundle = tmp_path / "new-bundle.toml"
    await asyncio.to_thread(central_commands.enroll, deployment.central_home, "xa-tan-trao-2", bundle)
    edge_cli.init(deployment.edge_home, bundle, cfg.watch_dir, force=True, abandon_queue=True)
    back = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in cfg.refused_dir.iterdir()
            if not p.name.endswith(REASON_SUFFIX)}
    assert set(back) == unsent, sorted(p.name for p in cfg.refused_dir.iterdir())
    assert {p.name for p in back.values()} <= set(sources)         # under the clerk's own names
    assert all(p.with_name(p.name + REASON_SUFFIX).exists() for p in back.values())
    assert edge_cli.retry(deployment.edge_home, [], every=True)
    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        async def all_in() -> bool:
            docs = await deployment.get_json("/api/documents")
            assert isinstance(docs, list)
            return {str(d["sha256"]) for d in docs} == set(sources.values())

        assert await wait_until(all_in, within=60), await service.outbox.stats()


async def test_a_replaced_box_completes_what_the_old_one_announced_once_not_twice(
        deployment: Deployment, tmp_path: Path) -> None:
    """With progressive sync central catalogues a scan from its notice before the original arrives.
    If the box is revoked then, those documents can only be completed by the same box's held scans,
    sent again under a new identity. The operator must see that nobody will send them (revoked, not
    replaced), then that the replacement will; and once it has, each scan is one stored document:
    the old box's announcement gives way to the replacement's arrival instead of staying "awaiting"
    forever beside it."""
    sources = make_documents(tmp_path / "src", 3, seed=43, side=300)
    cfg = deployment.edge_config()
    slow = dataclasses.replace(cfg, uplink=dataclasses.replace(cfg.uplink, rate_kbit=16))

    async def documents() -> list[dict[str, object]]:
        docs = await deployment.get_json("/api/documents")
        assert isinstance(docs, list)
        return docs

    async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=slow):
        for name in sorted(sources):
            (cfg.watch_dir / name).write_bytes((tmp_path / "src" / name).read_bytes())

        async def announced() -> bool:
            docs = await documents()
            return len(docs) == 3 and any(d["state"] == "awaiting_original" for d in docs)

        assert await wait_until(announced, within=60), await documents()
        revoked = await asyncio.to_thread(central_commands.revoke, deployment.central_home, DEVICE)
        docs = await documents()
        waiting = {int(str(d["id"])) for d in docs if d["state"] == "awaiting_original"}
        assert waiting and revoked.awaiting_originals == len(waiting)
        assert {d["awaiting_reason"] for d in docs if d["state"] == "awaiting_original"} == {"box_revoked"}
        fleet = await deployment.get_json("/api/fleet")
        assert isinstance(fleet, dict) and fleet["documents"]["awaiting_from_revoked"] == len(waiting)

        bundle = tmp_path / "new-bundle.toml"
        await asyncio.to_thread(central_commands.enroll, deployment.central_home, "xa-tan-trao-2", bundle,
                                replaces=DEVICE)
        docs = await documents()
        assert {d["awaiting_reason"] for d in docs if d["state"] == "awaiting_original"} == {"box_replaced"}
        fleet = await deployment.get_json("/api/fleet")
        assert isinstance(fleet, dict) and fleet["documents"]["awaiting_from_revoked"] == 0
        device = await deployment.get_json("/api/devices/xa-tan-trao-2")
        assert isinstance(device, dict) and device["replaces"] == DEVICE

    edge_cli.init(deployment.edge_home, bundle, cfg.watch_dir, force=True, abandon_queue=True)
    assert edge_cli.retry(deployment.edge_home, [], every=True)
    async with running(deployment, ocr_engine=FakeOcrEngine()) as service:
        async def all_stored() -> bool:
            docs = await documents()
            return len(docs) >= 3 and all(d["state"] == "stored" for d in docs)

        assert await wait_until(all_stored, within=60), (await documents(), await service.outbox.stats())
        docs = await documents()
        replaced = [await _document(deployment, int(str(d["id"])))
                    for d in docs if d["device"] == "xa-tan-trao-2"]
    assert sorted(str(d["sha256"]) for d in docs) == sorted(sources.values())     # each scan once
    assert not {int(str(d["id"])) for d in docs} & waiting      # the announcements gave way
    assert len(replaced) == len(waiting)
    for detail in replaced:
        assert "replaced_box_completed" in {e["event"] for e in detail["fixity"]}, detail["fixity"]


async def _document(deployment: Deployment, doc_id: int) -> dict[str, list[dict[str, object]]]:
    doc = await deployment.get_json(f"/api/documents/{doc_id}")
    assert isinstance(doc, dict)
    return doc


async def test_a_zero_byte_placeholder_then_the_content_is_one_scan_not_a_refusal(
        deployment: Deployment, tmp_path: Path) -> None:
    """Some scanners (and copy tools) create the file empty, close it, and write the content a few
    seconds later once the pages are processed. The empty file is not a finished scan: the box
    must wait for the content, not hand the clerk an "empty file, scan again" refusal."""
    sources = make_documents(tmp_path / "src", 1, seed=51)
    [name] = sources
    cfg = deployment.edge_config(incomplete_grace_seconds=20.0)
    async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=cfg) as service:
        (cfg.watch_dir / name).write_bytes(b"")                     # the placeholder, closed
        await asyncio.sleep(4 * cfg.intake.quiet_seconds + 2 * cfg.intake.check_interval)  # warming up
        (cfg.watch_dir / name).write_bytes((tmp_path / "src" / name).read_bytes())

        async def delivered() -> bool:
            return (await service.outbox.stats()).counts["delivered"] == 1

        assert await wait_until(delivered, within=30), await service.outbox.stats()
        stats = await service.outbox.stats()
        assert stats.failed == 0 and not cfg.refused_dir.exists(), sorted(cfg.refused_dir.iterdir())
        docs = await deployment.get_json("/api/documents")
    assert isinstance(docs, list) and [d["sha256"] for d in docs] == [sources[name]]


async def test_a_day_folder_dropped_at_once_and_a_scan_renamed_into_it(
        deployment: Deployment, tmp_path: Path) -> None:
    """The clerk drags a whole day's folder into the share (one rename: no file events for what is
    inside), then renames a loose scan into that folder while the box is still waiting for it to
    settle. Every scan arrives once, under the name it ended with."""
    sources = make_documents(tmp_path / "day", 4, seed=61)
    loose, *in_day = sorted(sources)
    cfg = deployment.edge_config(quiet_seconds=1.5)
    day = cfg.watch_dir / "2026-11-30"
    staging = cfg.watch_dir.parent / "usb"
    staging.mkdir()
    for name in in_day:
        (staging / name).write_bytes((tmp_path / "day" / name).read_bytes())
    async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=cfg) as service:
        (cfg.watch_dir / "scan0001.png").write_bytes((tmp_path / "day" / loose).read_bytes())
        staging.rename(day)                                              # the folder, at once
        (cfg.watch_dir / "scan0001.png").rename(day / "Quyết định số 12.png")   # renamed, moved in

        async def delivered() -> bool:
            return (await service.outbox.stats()).counts["delivered"] == 4

        assert await wait_until(delivered, within=40), await service.outbox.stats()
        docs = await deployment.get_json("/api/documents")
        stats = await service.outbox.stats()
    assert isinstance(docs, list)
    assert sorted((str(d["filename"]), str(d["sha256"])) for d in docs) == sorted(
        [("Quyết định số 12.png", sources[loose])] + [(name, sources[name]) for name in in_day])
    assert stats.failed == 0
