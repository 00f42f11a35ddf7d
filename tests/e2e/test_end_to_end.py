"""The product's spine: scans dropped like a scanner writes them arrive at central byte-exact,
searchable with and without diacritics, receipted, and then forgotten by the edge.

Real Mosquitto (generated config with per-device ACL), real tesseract ``vie``, real SQLite.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from reportlab.pdfgen import canvas

from edge.cli import status_report
from edge.samples import Sample, generate_samples
from protocol.names import fold, nfc
from tests.support.deployment import Deployment, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(420)


def _drop(source: Path, watch: Path, name: str | None = None) -> Path:
    target = watch / nfc(name or source.name)
    temp = watch / f".{target.name}.part"
    shutil.copyfile(source, temp)
    temp.rename(target)
    return target


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _documents(deployment: Deployment, **params: str) -> list[dict[str, object]]:
    result = await deployment.get_json("/api/documents", **params)
    assert isinstance(result, list)
    return result


async def test_scans_arrive_byte_exact_searchable_and_forgotten(
        deployment: Deployment, tmp_path: Path) -> None:
    samples: list[Sample] = generate_samples(tmp_path / "samples", pages=10)
    kinds = {s.media_type for s in samples}
    assert {"image/png", "image/jpeg", "image/tiff", "application/pdf"} <= kinds
    assert sum(s.pages for s in samples) >= 10
    expected = {nfc(s.path.name): _sha(s.path) for s in samples}
    watch = deployment.edge_config().watch_dir

    async with running(deployment) as service:
        for sample in samples:
            _drop(sample.path, watch)

        async def all_receipted() -> bool:
            stats = await service.outbox.stats()
            return (stats.counts.get("delivered", 0) == len(samples)
                    and not await service.outbox.custody_pending())

        assert await wait_until(all_receipted, within=300), await service.outbox.stats()

        docs = await _documents(deployment)
        assert sorted(str(d["filename"]) for d in docs) == sorted(expected)
        for doc in docs:
            original = await deployment.get_bytes(f"/api/documents/{doc['id']}/original")
            assert hashlib.sha256(original).hexdigest() == expected[str(doc["filename"])]
            assert doc["sha256"] == expected[str(doc["filename"])]

        # Every sample's phrases are searchable, with diacritics and folded to plain ASCII.
        for sample in samples:
            phrase = sample.phrases[0]
            for query in (phrase, _strip(phrase)):
                hits = await _documents(deployment, q=query)
                assert nfc(sample.path.name) in {h["filename"] for h in hits}, (query, hits)

        # Nothing left on the edge: envelopes and plaintext originals are gone after the receipts.
        stats = await service.outbox.stats()
        assert stats.queued_docs == 0 and stats.queued_bytes == 0
        cfg = deployment.edge_config()
        assert list(cfg.envelopes_dir.iterdir()) == []
        assert list(cfg.processed_dir.iterdir()) == []
        assert list(watch.iterdir()) == []

        # Re-dropping an already synced scan: the box does not trust its memory of the old receipt
        # (central may have been restored since); it sends the scan again and central, which holds
        # the content, stores nothing twice and receipts this drop.
        again = samples[0]
        _drop(again.path, watch)

        async def receipted_again() -> bool:
            stats = await service.outbox.stats()
            return stats.counts.get("delivered", 0) == len(samples) + 1

        assert await wait_until(receipted_again, within=120)
        same = [d for d in await _documents(deployment) if d["sha256"] == _sha(again.path)]
        assert same and {d["filename"] for d in same} == {nfc(again.path.name)}
        stored = [p for p in (deployment.central_home / "storage").rglob("*") if p.is_file()
                  and p.name == _sha(again.path)]
        assert len(stored) == 1

    report = await status_report(deployment.edge_home)
    assert report["counts"].get("delivered") == len(samples) + 1
    assert report["failed"] == []


async def test_bad_input_is_quarantined_with_a_reason_and_the_service_keeps_going(
        deployment: Deployment, tmp_path: Path) -> None:
    samples = generate_samples(tmp_path / "samples", pages=10)
    good = next(s for s in samples if s.media_type == "image/png")
    jpeg = next(s for s in samples if s.media_type == "image/jpeg")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "Trống rỗng.png").write_bytes(b"")
    (bad_dir / "Không phải ảnh.jpg").write_text("đây là văn bản, không phải ảnh\n" * 20)
    (bad_dir / "Ảnh bị cắt.jpg").write_bytes(jpeg.path.read_bytes()[: jpeg.path.stat().st_size // 3])
    encrypted = canvas.Canvas(str(bad_dir / "Mật.pdf"), encrypt="mat-khau")
    encrypted.drawString(72, 720, "Tài liệu mật")
    encrypted.save()
    watch = deployment.edge_config().watch_dir

    async with running(deployment) as service:
        for bad in sorted(bad_dir.iterdir()):
            _drop(bad, watch)
        _drop(good.path, watch, "Quyết định số 12 – UBND.png")

        async def settled() -> bool:
            stats = await service.outbox.stats()
            return stats.counts.get("delivered", 0) == 1 and stats.failed == 4

        assert await wait_until(settled, within=180)
        docs = await _documents(deployment)
        assert [d["filename"] for d in docs] == ["Quyết định số 12 – UBND.png"]

    report = await status_report(deployment.edge_home)
    names = {item["name"] for item in report["failed"]}
    assert names == {"Trống rỗng.png", "Không phải ảnh.jpg", "Ảnh bị cắt.jpg", "Mật.pdf"}
    assert all(item["reason"] for item in report["failed"])
    codes = {item["name"]: item["code"] for item in report["failed"]}
    assert codes == {"Trống rỗng.png": "empty", "Không phải ảnh.jpg": "not_a_scan",
                     "Ảnh bị cắt.jpg": "incomplete", "Mật.pdf": "encrypted"}
    refused = deployment.edge_config().refused_dir
    # The refused files are handed back to the clerk, byte-for-byte, in the scan share.
    assert refused.parent == watch and refused.name == "_Lỗi"
    assert (refused / "Ảnh bị cắt.jpg").read_bytes() == (bad_dir / "Ảnh bị cắt.jpg").read_bytes()
    note = (refused / "Mật.pdf.lý-do.txt").read_text("utf-8")
    assert "Lý do: Tệp PDF có đặt mật khẩu." in note and "password" in note


def _strip(text: str) -> str:
    return fold(text)


async def test_device_link_over_tls_with_the_ca_from_the_bundle(tls_deployment: Deployment,
                                                                 tmp_path: Path) -> None:
    cfg = tls_deployment.edge_config()
    assert cfg.broker.url.startswith("mqtts://") and cfg.broker.ca_file
    assert (tls_deployment.edge_home / "keys" / "ca.pem").stat().st_mode & 0o777 == 0o600
    sample = generate_samples(tmp_path / "samples", pages=10)[0]
    async with running(tls_deployment) as service:
        _drop(sample.path, cfg.watch_dir, "Công văn số 5 – Tuyên Quang" + sample.path.suffix)

        async def delivered() -> bool:
            return (await service.outbox.stats()).counts.get("delivered", 0) == 1

        assert await wait_until(delivered, within=120)
        docs = await _documents(tls_deployment)
        assert [d["sha256"] for d in docs] == [_sha(sample.path)]
