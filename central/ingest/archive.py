"""The archive stage: assemble a complete transfer off the hot path, then one short catalog write.

Rules (DESIGN §1 "assemble", §6; EMQX's assembler per transfer):
  - ``claim`` (writer, in its transaction) re-checks the device fresh — a revoke may have landed
    since the bytes arrived — and snapshots what the assembler needs: the signed header, the device
    key and where the segments are. Nothing of it changes afterwards (a complete transfer takes no
    new bytes), so the assembler needs no database connection.
  - ``assemble`` (an assembler worker, no catalog): whole-ciphertext hash and device signature,
    then decrypt, unpack, and store the original and the package content-addressed and durably.
    A verification failure keeps the ciphertext and a reason in quarantine; our own disk trouble
    gives the job back for a later try.
  - ``record`` (writer, in its transaction, never commits): catalog the arrival, the fixity event and
    the signed receipt. Only after the writer's commit are the STORED ack and the receipt sent.
  - Every step is idempotent: a job interrupted anywhere (crash, lost lease) is simply run again.
  - An arrival catalogued from its notice (``batch``) is completed by its transfer, not doubled: the
    same row takes the package's text and metadata and its object. If the notice announced another
    original than the one that came, the notice's row goes and the transfer is catalogued on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

from central import catalog
from central.errors import RevokedDeviceError
from central.fsutil import fsync_dir, make_private_dir, write_atomic
from central.ingest.assemble import assemble
from central.ingest.batch import Reply, count_rejection
from central.ingest.durability import Durability
from central.ingest.quota import Quotas
from central.ingest.staging import JournalLostError, SegmentReader
from central.ingest.store import IngestStore
from central.keys import CentralKeys
from central.metrics import Metrics
from central.paths import CentralPaths
from central.storage import ObjectStore, Put
from protocol.envelope import SignedHeader
from protocol.errors import ProtocolError
from protocol.messages import Ack, AckState, Receipt, ReceiptBody, encode

log = logging.getLogger("sohoa.central.ingest")

# ``BatchStage.revoke_transfer``: reject a revoked device's transfer for good, keep its bytes.
RevokeFn = Callable[[IngestStore, str, str], None]


@dataclass(frozen=True, slots=True)
class AssemblyJob:
    tid: str
    device: str
    signed: SignedHeader
    device_key: bytes
    segments: tuple[catalog.StoredSegment, ...]


@dataclass(frozen=True, slots=True)
class Archived:
    """Stored durably, not yet catalogued."""

    job: AssemblyJob
    metadata_json: str
    text: str
    original_name: str
    original_sha256: str
    original_size: int
    media_type: str
    pages: int
    captured_at: str
    package_sha256: str
    ciphertext_sha256: str
    put: Put


@dataclass(frozen=True, slots=True)
class Quarantined:
    job: AssemblyJob
    error: ProtocolError


@dataclass(frozen=True, slots=True)
class Deferred:
    """Our trouble (disk, a missing journal file): the job goes back for a later try."""

    job: AssemblyJob
    error: OSError


Assembly = Archived | Quarantined | Deferred


class Archiver:
    def __init__(self, paths: CentralPaths, keys: CentralKeys, *, max_plaintext: int,
                 metrics: Metrics, durability: Durability, work_dir: Path,
                 quotas: Quotas | None = None) -> None:
        self._paths = paths
        self.work_dir = work_dir   # this worker's own folder under tmp/ (CentralPaths.worker_tmp)
        self._quotas = quotas or Quotas()
        self._durability = durability
        self._keys = keys
        self._max_plaintext = max_plaintext
        self._metrics = metrics
        self._store = ObjectStore(paths.objects)

    # -- writer: claim ----------------------------------------------------------------------------
    def claim(self, db: IngestStore, tid: str,
              revoke: RevokeFn) -> tuple[AssemblyJob | None, list[Reply]]:
        """The job's snapshot, or None (and the replies to send) if it is no longer to be assembled."""
        record = db.get_transfer(tid)
        if record is None or record.state != "receiving" or not record.complete:
            return None, []
        device = db.get_device(record.device)   # fresh: a revoke may have landed meanwhile
        if device is None or device.status != "active":
            revoke(db, record.device, tid)
            exc = RevokedDeviceError(f"device {record.device!r} was revoked", device=record.device,
                                     tid=tid)
            self._metrics.error(type(exc).__name__)
            return None, [Ack(record.device, tid, AckState.REJECTED, error=str(exc)[:500],
                              error_class=type(exc).__name__)]
        segments = tuple(db.stored_segments(tid))
        return AssemblyJob(tid, record.device, SignedHeader.decode(record.header), device.verify_key,
                           segments), []

    # -- assembler worker ---------------------------------------------------------------------
    def assemble(self, job: AssemblyJob) -> Assembly:
        result = assemble_job(job, self._paths, self._keys, max_plaintext=self._max_plaintext,
                              sync=self._durability.sync_objects, work_dir=self.work_dir)
        if isinstance(result, Archived):
            self._durability.stored()
        return result

    def stored_elsewhere(self, result: Assembly) -> Assembly:
        """A result from an assembler process: its objects await this process's barrier."""
        if isinstance(result, Archived):
            self._durability.stored()
        return result

    @property
    def sync_objects(self) -> bool:
        return self._durability.sync_objects

    @property
    def max_plaintext(self) -> int:
        return self._max_plaintext

    # -- writer: record ---------------------------------------------------------------------------
    def record(self, db: IngestStore, result: Assembly, revoke: RevokeFn) -> list[Reply]:
        job = result.job
        device, tid = job.device, job.tid
        record = db.get_transfer(tid)
        if record is None or record.state != "receiving":
            return []   # another worker finished it meanwhile; it answered
        if isinstance(result, Deferred) and isinstance(result.error, JournalLostError):
            # Retrying cannot bring the bytes back: the box must send them again (it still holds the
            # original: nothing was receipted). UNKNOWN makes it announce the transfer again at once.
            self._metrics.error(type(result.error).__name__)
            forget_lost(db, [(tid, device)], str(result.error))
            return [Ack(device, tid, AckState.UNKNOWN, error=str(result.error)[:500],
                        error_class=type(result.error).__name__)]
        if isinstance(result, Deferred):
            self._metrics.error(type(result.error).__name__)
            log.error("cannot assemble %s: %s", tid, result.error)
            db.release_job(tid, f"{type(result.error).__name__}: {result.error}")
            return [Ack(device, tid, AckState.RECEIVING, record.held)]
        if isinstance(result, Quarantined):
            exc = result.error
            self._metrics.error(type(exc).__name__)
            log.warning("refused transfer %s from %s: %s: %s", tid, device, type(exc).__name__, exc)
            db.reject_transfer(tid, str(exc)[:2000], type(exc).__name__)
            db.add_fixity(event="rejected", device=device, tid=tid, at=catalog.utc_now(),
                               detail=json.dumps({"error_class": type(exc).__name__, "error": str(exc)},
                                                 ensure_ascii=False))
            count_rejection(db, device, tid, type(exc).__name__, quotas=self._quotas, now=time.time())
            return [Ack(device, tid, AckState.REJECTED, error=str(exc)[:500],
                        error_class=type(exc).__name__)]
        status = db.get_device(device)
        if status is None or status.status != "active":
            # Revoked while it was being assembled: never catalogued, never receipted. The stored files
            # stay: another commune's identical bytes (or this arrival sent again) may have been
            # written to the same content address and not be committed yet, and deleting them would
            # break a receipt another box deletes its original on. An orphan object costs only disk.
            revoke(db, device, tid)
            exc2 = RevokedDeviceError(f"device {device!r} was revoked", device=device, tid=tid)
            return [Ack(device, tid, AckState.REJECTED, error=str(exc2)[:500],
                        error_class=type(exc2).__name__)]
        stored_at = catalog.utc_now()
        sha = result.original_sha256
        duplicate = db.object_exists(sha)
        # Provenance per arrival: this box's name, capture time and text get their own document,
        # unless this very arrival is already catalogued (the same scan sent again).
        document = catalog.NewDocument(
            device=device, tid=tid, seq=job.signed.header.seq, filename=result.original_name, sha256=sha,
            size=result.original_size, pages=result.pages, media_type=result.media_type,
            received_at=stored_at, text=result.text, metadata=result.metadata_json,
            package_sha256=result.package_sha256, captured_at=result.captured_at)
        awaiting = db.awaiting_document(device=device, tid=tid)
        if awaiting is not None and awaiting.sha256 != sha:
            # The notice announced other bytes than those that came: what came is the truth. It still
            # completes the notice's row (same device and transfer: the drop a clerk may have found,
            # bookmarked or an operator corrected), taking the package's name, text and metadata.
            log.warning("notice of %s announced original %s…, the transfer carried %s…", tid,
                        awaiting.sha256[:12], sha[:12])
            db.add_fixity(event="notice_mismatch", device=device, tid=tid, at=stored_at,
                          original_sha256=sha, detail=json.dumps({"announced_sha256": awaiting.sha256,
                                                                  "document_id": awaiting.id}))
        existing = db.arrival_by_key(document.key)
        if awaiting is None and existing is not None:
            # The same arrival announced by another transfer's notice (the scan sent again).
            awaiting = db.awaiting_document(doc_id=existing)
        if awaiting is not None and existing is not None and existing != awaiting.id:
            # The notice's arrival is one already stored: it gives way to it, with its corrections.
            db.drop_awaiting_document(awaiting.id, successor=existing)
            awaiting = None
        completed = awaiting is not None
        if awaiting is not None:
            document_id = awaiting.id
            db.complete_document(document_id, document)
            existing = None
        elif existing is None:
            document_id = db.insert_document(document)
        else:
            document_id = existing
            # The package names this transfer (tid, seq): never the stored arrival's own package.
            with contextlib.suppress(FileNotFoundError):
                self._store.path_for(result.package_sha256).unlink()
        for announced in db.replaced_awaiting(device, sha):
            # The revoked box this one replaces announced these bytes and never sent them: they are
            # here now, so its arrival gives way to this one (its notice and corrections move too).
            db.drop_awaiting_document(announced, successor=document_id)
            db.add_fixity(event="replaced_box_completed", device=device, tid=tid, at=stored_at,
                          document_id=document_id, original_sha256=sha,
                          detail=json.dumps({"announced_document_id": announced}))
            log.info("document %d announced by the box %s replaces is completed by %s as document %d",
                     announced, device, tid, document_id)
        if duplicate and result.put is not Put.KEPT:
            previous = "missing" if result.put is Put.STORED else "damaged"
            log.warning("object %s was %s; repaired from %s (document %d)", sha, previous, tid, document_id)
            db.add_fixity(event="repaired", device=device, tid=tid, at=stored_at,
                               document_id=document_id, original_sha256=sha,
                               detail=json.dumps({"previous": previous}))
        receipt = Receipt.sign(ReceiptBody(device=device, tid=tid, sha256=sha, stored_at=stored_at,
                                           document_id=document_id, duplicate=duplicate), self._keys.receipt)
        _, receipt_payload = encode(receipt)
        db.store_transfer(tid, document_id=document_id, duplicate=duplicate,
                               receipt=receipt_payload, stored_at=stored_at)
        db.add_fixity(event="duplicate" if duplicate else "ingest", device=device, tid=tid,
                           at=stored_at, document_id=document_id, original_sha256=sha,
                           package_sha256=result.package_sha256, ciphertext_sha256=result.ciphertext_sha256,
                           detail=json.dumps({"seq": job.signed.header.seq, "filename": result.original_name,
                                              "new_arrival": existing is None,
                                              "from_notice": completed}, ensure_ascii=False))
        log.info("stored %s from %s as document %d%s%s%s", tid, device, document_id,
                 " (content already stored)" if duplicate else "",
                 "" if existing is None else " (arrival already catalogued)",
                 " (catalogued from its notice before)" if completed else "")
        return [Ack(device, tid, AckState.STORED), receipt]


def forget_lost(db: IngestStore, transfers: list[tuple[str, str]], reason: str) -> None:
    """Receiving transfers whose journal bytes are gone start again from zero (``forget_held``),
    each with a fixity event and a warning: where the bytes are now is the box, which re-sends."""
    at = catalog.utc_now()
    for tid, device in transfers:
        db.forget_held(tid, reason)
        db.add_fixity(event="staging_lost", device=device, tid=tid, at=at,
                      detail=json.dumps({"reason": reason}, ensure_ascii=False))
        log.warning("transfer %s from %s: %s; its held bytes are forgotten and the box will send it again "
                    "from zero (it keeps the original until a receipt)", tid, device, reason)


def check_journals(db: IngestStore, staging: Path) -> int:
    """At start-up: receiving transfers whose segments point into a journal file that is not there
    (central restored without ``staging/``) are forgotten at once, so their boxes re-send from zero
    instead of sending the rest of a transfer central can never assemble. Returns how many."""
    lost = 0
    for name in db.journals_of_receiving():
        if not (staging / name).exists():
            transfers = db.transfers_in_journal(name)
            forget_lost(db, transfers, f"journal {name} is missing")
            lost += len(transfers)
    return lost


def tmp_leftovers(tmp: Path, work_dir: Path) -> None:
    """Half-written decrypted packages of this worker's interrupted assemblies (in ``work_dir``; they
    restart from the journal), and files a release before per-worker folders left in ``tmp`` itself.
    Never another worker's folder: its assemblies may be running."""
    make_private_dir(work_dir)
    for directory in (work_dir, tmp):
        for leftover in directory.glob("*"):
            if leftover.is_file():
                leftover.unlink()


def assemble_job(job: AssemblyJob, paths: CentralPaths, keys: CentralKeys, *, max_plaintext: int,
                 sync: bool, work_dir: Path) -> Assembly:
    """Verify, decrypt, unpack and store one complete transfer; no catalog (any thread or process)."""
    reader = SegmentReader(paths.staging)
    store = ObjectStore(paths.objects)
    try:
        assembled = assemble(lambda: (data for _, data in reader.chunks(job.tid, job.segments)),
                             job.signed, nacl.signing.VerifyKey(job.device_key), keys.encryption,
                             max_plaintext=max_plaintext, work_dir=work_dir, sync=sync)
    except ProtocolError as exc:
        try:
            _keep_in_quarantine(reader, paths, job, exc)
        except OSError as error:
            return Deferred(job, error)
        return Quarantined(job, exc)
    except OSError as exc:
        return Deferred(job, exc)
    try:
        meta = assembled.metadata
        # Content once: the object is stored (or, if the copy there is missing or rotten, repaired
        # from this one — perhaps the last good copy, the edge forgets it on our receipt) whatever
        # the catalog says, so a central restored from an older backup takes the bytes again.
        put = store.put_file(assembled.original, assembled.original_sha256, hashed=True, sync=sync)
        store.put_file(assembled.package, assembled.package_sha256, hashed=True, sync=sync)
    except OSError as exc:
        for leftover in (assembled.original, assembled.package):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        return Deferred(job, exc)
    return Archived(job, assembled.metadata_json, assembled.text, meta.original_name,
                    assembled.original_sha256, meta.original_size, meta.media_type, meta.pages,
                    meta.captured_at, assembled.package_sha256, assembled.ciphertext_sha256, put)


def _keep_in_quarantine(reader: SegmentReader, paths: CentralPaths, job: AssemblyJob,
                        exc: ProtocolError) -> None:
    reason = {"device": job.device, "tid": job.tid, "at": catalog.utc_now(),
              "error_class": type(exc).__name__, "error": str(exc), "hint": exc.hint}
    reader.copy_to(job.tid, job.segments, paths.quarantine / f"{job.tid}.part")
    write_atomic(paths.quarantine / f"{job.tid}.reason.json",
                 json.dumps(reason, ensure_ascii=False, indent=1).encode())
    fsync_dir(paths.quarantine)


# -- assembler processes: each loads the keys once, then assembles the jobs it is sent ----------

_PROCESS: tuple[CentralPaths, CentralKeys, int, bool, Path] | None = None


def init_process(home: Path, max_plaintext: int, sync: bool, work_dir: Path) -> None:
    from central.keys import load_keys  # noqa: PLC0415 - in the child only

    global _PROCESS  # noqa: PLW0603 - one assembler per process, set once by the pool's initializer
    paths = CentralPaths(home)
    _PROCESS = (paths, load_keys(paths), max_plaintext, sync, work_dir)


def assemble_in_process(job: AssemblyJob) -> Assembly:
    assert _PROCESS is not None, "init_process was not run"
    paths, keys, max_plaintext, sync, work_dir = _PROCESS
    return assemble_job(job, paths, keys, max_plaintext=max_plaintext, sync=sync, work_dir=work_dir)
