"""The archival copy as a background job in the catalog: built from the stored original and the stored
package's hOCR, signed by the archive, stored content-addressed, recorded as a fixity event; one per
stored original; a crash at any point finishes the same copy; a failure is recorded and retried later.

Real SQLite, real child process (pikepdf + pyHanko), checks by poppler's pdfsig and pdftotext."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pikepdf
import pytest

from bench.archival_pdfa import pdfa_checks
from central import catalog
from central.admin import commands
from central.catalog.db import Database
from central.config import CentralConfig
from central.keys import CentralKeys
from central.records import archive_jobs
from central.records.archive_jobs import ArchiveWorker, Job, WorkerSettings
from central.records.archive_sign import CERT_NAME, KEY_NAME, SigningIdentityError, ensure_signing_identity
from central.storage import ObjectStore
from tests.central.conftest import Enroll
from tests.central.records_builders import ingest, page_words, scanner_pdf

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def worker(config: CentralConfig) -> AsyncIterator[ArchiveWorker]:
    db = Database(config.paths.catalog, readonly=False, name="test-archive")
    worker = ArchiveWorker(config.paths, db, WorkerSettings(backoff_initial_s=60.0))
    await worker.start()
    try:
        yield worker
    finally:
        await db.close()


async def run_once(worker: ArchiveWorker) -> Job | None:
    """One turn of the worker's loop: reconcile, claim, process (what ``run`` does, without waiting)."""
    job = await worker.db.call(worker._next)
    if job is not None:
        await worker.process(job)
    return job


def job_row(config: CentralConfig, sha256: str) -> dict[str, object]:
    conn = catalog.connect(config.paths.catalog, readonly=True)
    try:
        row = conn.execute("SELECT * FROM archive_jobs WHERE sha256 = ?", (sha256,)).fetchone()
        return dict(row) if row else {}
    finally:
        conn.close()


def events(config: CentralConfig, event: str) -> list[dict[str, object]]:
    conn = catalog.connect(config.paths.catalog, readonly=True)
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM fixity WHERE event = ? ORDER BY id", (event,))]
    finally:
        conn.close()


def pdfsig(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pdfsig", str(path)], capture_output=True, text=True, check=False)


async def test_archival_copy_built_signed_stored_and_recorded(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, worker: ArchiveWorker,
        tmp_path: Path) -> None:
    original_path = tmp_path / "scan.pdf"
    jpegs = scanner_pdf(original_path, 3)
    original = original_path.read_bytes()
    doc = ingest(config, central_keys, enroll("xa-tan-trao"), seq=1, original=original, pages=3)
    store = ObjectStore(config.paths.objects)

    job = await run_once(worker)
    assert job is not None and job.sha256 == doc.sha256
    row = job_row(config, doc.sha256)
    assert row["state"] == "done" and row["attempts"] == 1 and row["candidate_sha256"] is None
    copy = store.path_for(str(row["archival_sha256"]))
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == row["archival_sha256"]
    assert copy.stat().st_size == row["archival_size"]
    # The original is untouched, beside it.
    assert store.path_for(doc.sha256).read_bytes() == original
    # PDF/A-2b properties, JPEG pages byte for byte, the hOCR words as an invisible text layer.
    assert all(pdfa_checks(copy).values()), pdfa_checks(copy)
    with pikepdf.open(copy) as pdf:
        assert [bytes(next(iter(p.get_images().values())).read_raw_bytes()) for p in pdf.pages] == jpegs
    text = subprocess.run(["pdftotext", str(copy), "-"], capture_output=True, text=True, check=True).stdout
    assert all(word in text for word, _ in page_words(2))
    # Signed by the archive: an independent tool verifies it.
    sig = pdfsig(copy)
    assert sig.returncode == 0 and "Signature is Valid" in sig.stdout, sig.stdout
    assert "Lưu trữ số hóa sohoa" in sig.stdout
    [event] = events(config, "archival_copy")
    assert (event["outcome"], event["object_sha256"], event["original_sha256"], event["document_id"]) == (
        "success", row["archival_sha256"], doc.sha256, doc.document_id)
    assert event["actor"] == archive_jobs.ACTOR
    # Nothing else is due: the loop would sleep, not spin.
    assert await run_once(worker) is None
    assert list(archive_jobs.archive_tmp(config.paths).iterdir()) == []


async def test_same_original_twice_is_one_archival_copy(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, worker: ArchiveWorker,
        tmp_path: Path) -> None:
    scanner_pdf(tmp_path / "scan.pdf", 1)
    original = (tmp_path / "scan.pdf").read_bytes()
    first = ingest(config, central_keys, enroll("xa-tan-trao"), seq=1, original=original, pages=1)
    second = ingest(config, central_keys, enroll("xa-minh-thanh"), seq=1, original=original, pages=1,
                    name="Quyết định 125 – Minh Thanh.pdf")
    assert first.document_id != second.document_id
    assert await run_once(worker) is not None
    assert await run_once(worker) is None
    conn = catalog.connect(config.paths.catalog, readonly=True)
    try:
        jobs = conn.execute("SELECT sha256, document_id, state FROM archive_jobs").fetchall()
        views = [archive_jobs.job_view(conn, first.sha256)]
    finally:
        conn.close()
    assert [tuple(j) for j in jobs] == [(first.sha256, first.document_id, "done")]
    assert views[0]["built_from_document"] == first.document_id
    assert len(events(config, "archival_copy")) == 1


@pytest.mark.parametrize("crash", ["after claim", "after build", "after candidate recorded",
                                   "after stored"])
async def test_a_crash_at_any_point_finishes_one_copy(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, worker: ArchiveWorker,
        tmp_path: Path, crash: str) -> None:
    """A worker killed (kill -9, power cut) at each step leaves a 'running' job with a lease; after
    the lease, a new worker takes it and ends with exactly one stored archival copy."""
    scanner_pdf(tmp_path / "scan.pdf", 1)
    doc = ingest(config, central_keys, enroll("xa-tan-trao"), seq=1,
                 original=(tmp_path / "scan.pdf").read_bytes(), pages=1)
    store = ObjectStore(config.paths.objects)
    dead = "dead-worker"

    def claim_as_dead(conn: object) -> Job | None:
        def step(c: object) -> Job | None:
            archive_jobs.enqueue_new(c, now=catalog.utc_now())  # type: ignore[arg-type]
            # A lease of 0 s: it has run out by the time the next worker looks.
            return archive_jobs.claim(c, owner=dead, now=catalog.utc_now(), lease_s=0)  # type: ignore[arg-type]
        return archive_jobs.in_transaction(conn, step)  # type: ignore[arg-type]

    job = await worker.db.call(claim_as_dead)
    assert job is not None
    expected: str | None = None
    if crash != "after claim":
        answer = await worker._build(job)   # the dead worker's child finished its file
        expected = str(answer["sha256"])
        if crash in ("after candidate recorded", "after stored"):
            await worker._write(archive_jobs.record_candidate, job.sha256, owner=dead, candidate=expected,
                                now=catalog.utc_now())
        if crash == "after stored":
            store.put_file(Path(str(answer["path"])), expected)
    if crash == "after build":
        expected = None   # never recorded: the file is an orphan, removed at start-up, and rebuilt
    before = {p.name for p in config.paths.objects.rglob("*") if p.is_file()}

    await worker.start()   # a restarted central: start-up, then the loop
    done = await run_once(worker)
    assert done is not None and done.attempts == 2
    row = job_row(config, doc.sha256)
    assert row["state"] == "done"
    if expected is not None:
        assert row["archival_sha256"] == expected   # finished, not built a second time
    after = {p.name for p in config.paths.objects.rglob("*") if p.is_file()}
    # Exactly one new object beyond what was there: the archival copy (none if it was already stored).
    assert after - before <= {row["archival_sha256"]}
    assert row["archival_sha256"] in after
    assert list(archive_jobs.archive_tmp(config.paths).iterdir()) == []
    assert len(events(config, "archival_copy")) == 1
    # The dead worker, come back to life, may not record anything over it.
    assert not await worker._write(archive_jobs.complete, job, owner=dead, archival_sha256="0" * 64, size=1,
                                   now=catalog.utc_now(), detail={})


async def test_failure_is_recorded_with_its_reason_and_retried_later(
        config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, worker: ArchiveWorker) -> None:
    bundle = enroll("xa-tan-trao")
    not_png = b"\x89PNG\r\n\x1a\n" + "không phải ảnh".encode()
    doc = ingest(config, central_keys, bundle, seq=1, original=not_png, pages=1, media_type="image/png",
                 name="Trang hỏng.png")
    started = datetime.now(UTC)
    job = await run_once(worker)
    assert job is not None
    row = job_row(config, doc.sha256)
    assert row["state"] == "failed" and row["attempts"] == 1
    assert "error" in str(row["last_error"]) and row["owner"] is None
    retry_at = datetime.fromisoformat(str(row["next_attempt_at"]).replace("Z", "+00:00"))
    assert (retry_at - started).total_seconds() >= 30   # backoff_initial_s / 2 at least
    [event] = events(config, "archival_copy")
    assert event["outcome"] == "failure" and json.loads(str(event["detail"]))["attempt"] == 1
    # Not due yet: the worker does not spin on it, and other documents go ahead.
    assert await run_once(worker) is None
    ok = ingest(config, central_keys, bundle, seq=2, original=b"\xff\xd8" + b"x" * 10, pages=1,
                media_type="image/jpeg", name="Ảnh hỏng.jpg")
    assert (await run_once(worker)) is not None and job_row(config, ok.sha256)["state"] == "failed"
    # Due again: retried, the attempt counted, the pause grows.
    conn = catalog.connect(config.paths.catalog)
    conn.execute("UPDATE archive_jobs SET next_attempt_at = ? WHERE sha256 = ?",
                 (catalog.utc_now(), doc.sha256))
    conn.commit()
    conn.close()
    again = await run_once(worker)
    assert again is not None and again.sha256 == doc.sha256 and again.attempts == 2
    assert worker._backoff(2) >= 60 and worker._backoff(30) <= worker.settings.backoff_max_s


async def test_verify_finds_a_single_bit_flip_in_every_kind_of_stored_object(
        home: Path, config: CentralConfig, central_keys: CentralKeys, enroll: Enroll, worker: ArchiveWorker,
        tmp_path: Path) -> None:
    scanner_pdf(tmp_path / "scan.pdf", 1)
    doc = ingest(config, central_keys, enroll("xa-tan-trao"), seq=1,
                 original=(tmp_path / "scan.pdf").read_bytes(), pages=1)
    await run_once(worker)
    assert commands.verify(home) == []
    conn = catalog.connect(config.paths.catalog, readonly=True)
    package = conn.execute("SELECT package_sha256 FROM documents WHERE id = ?",
                           (doc.document_id,)).fetchone()[0]
    conn.close()
    archival = str(job_row(config, doc.sha256)["archival_sha256"])
    store = ObjectStore(config.paths.objects)
    for kind, sha in (("original", doc.sha256), ("package", package), ("archival", archival)):
        path = store.path_for(sha)
        good = path.read_bytes()
        flipped = bytearray(good)
        flipped[len(flipped) // 2] ^= 0x01   # one bit
        path.chmod(0o600)
        path.write_bytes(bytes(flipped))
        [problem] = commands.verify(home, actor="test")
        assert problem.startswith(f"{kind} {sha}") and "does not hash to its name" in problem
        failures = [e for e in events(config, "fixity_check") if e["outcome"] == "failure"]
        assert failures[-2]["object_sha256"] == sha and failures[-2]["actor"] == "test"
        assert json.loads(str(failures[-1]["detail"]))["problems"] == 1   # the run's summary
        if kind != "archival":
            path.write_bytes(good)
            path.chmod(0o400)
    # A damaged archival copy is derived data: queued again, rebuilt from the original, verified clean.
    assert job_row(config, doc.sha256)["state"] == "pending"
    assert await run_once(worker) is not None
    rebuilt = job_row(config, doc.sha256)
    assert rebuilt["state"] == "done" and rebuilt["archival_sha256"] != archival
    assert commands.verify(home) == []
    assert json.loads(str(events(config, "fixity_check")[-1]["detail"]))["objects"] == 3


def test_init_makes_the_signing_identity_once(home: Path, config: CentralConfig, tmp_path: Path) -> None:
    keys = config.paths.keys
    key, cert = keys / KEY_NAME, keys / CERT_NAME
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes(), cert.read_bytes()
    sig = subprocess.run(["openssl", "x509", "-noout", "-subject", "-in", str(cert)], capture_output=True,
                         text=True, check=True).stdout
    assert "Lưu trữ số hóa sohoa" in sig or "L\\C6\\B0u" in sig
    assert not ensure_signing_identity(keys, archive_name="Khác")   # never replaced
    assert (key.read_bytes(), cert.read_bytes()) == before
    other = tmp_path / "other"
    commands.init(other, broker_url="mqtt://127.0.0.1:1", http="127.0.0.1:2", device_url="mqtt://127.0.0.1:3",
                  archive_name="Lưu trữ lịch sử tỉnh Tuyên Quang")
    pem = (other / "keys" / CERT_NAME).read_bytes()
    from cryptography import x509  # noqa: PLC0415

    assert "Lưu trữ lịch sử tỉnh Tuyên Quang" in x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
    # A key without its certificate is an error to fix by hand, never a reason to make a new key.
    (keys / CERT_NAME).unlink()
    with pytest.raises(SigningIdentityError):
        ensure_signing_identity(keys, archive_name="x")
    assert key.read_bytes() == before[0]


async def test_an_existing_home_without_the_key_gets_one_on_first_run(
        config: CentralConfig, caplog: pytest.LogCaptureFixture) -> None:
    keys = config.paths.keys
    (keys / KEY_NAME).unlink()
    (keys / CERT_NAME).unlink()
    db = Database(config.paths.catalog, readonly=False, name="test-archive")
    try:
        with caplog.at_level(logging.WARNING, logger="sohoa.central.archive"):
            await ArchiveWorker(config.paths, db).start()
    finally:
        await db.close()
    assert (keys / KEY_NAME).stat().st_mode & 0o777 == 0o600 and (keys / CERT_NAME).is_file()
    assert any("signing key was missing: created" in r.getMessage() for r in caplog.records)
