"""Ingest: turn a batch of received MQTT messages into durable state and the replies to send.

Rules (DESIGN §1, §3, §6):
  - An init is checked (device known and active, signature valid, seq and tid never reused) before
    anything of the transfer is accepted; it is then recorded in the catalog, idempotently.
  - An accepted segment is written into ``staging/<tid>.part`` at its offset; at the end of the batch
    every touched staging file is fsynced, then the segment log rows are committed, and only then do
    its bytes appear in the ack. One ack per touched transfer per batch (coalesced).
  - When a transfer's ranges cover the signed size it is assembled (verify, decrypt, unpack), stored
    content-addressed, catalogued with a fixity event, and answered with a signed receipt and a
    STORED ack. A verification failure moves the ciphertext to ``quarantine/`` with a reason.
  - Receivers are rebuilt lazily from the segment log, so a restart resumes half-received transfers.
  - Revocation is re-checked on every segment and fin (once per device per batch) and again, fresh,
    right before assembly: a device revoked mid-transfer never gets a document stored; its open
    transfers are rejected for good.

Everything here is synchronous and runs on the one thread that owns the writer connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from central import catalog
from central.assemble import assemble
from central.errors import (
    AbortedError,
    ReplayError,
    RevokedDeviceError,
    SequenceReusedError,
    UnknownDeviceError,
)
from central.fsutil import fsync_dir, write_atomic
from central.keys import CentralKeys
from central.metrics import Metrics
from central.paths import CentralPaths
from central.storage import ObjectStore, Put
from protocol.envelope import ABYTES, SignedHeader, key_id
from protocol.errors import (
    EnvelopeError,
    ProtocolError,
    SizeLimitError,
    TransferError,
    UnknownKeyError,
)
from protocol.messages import (
    Abort,
    Ack,
    AckState,
    Fin,
    Init,
    Message,
    Receipt,
    ReceiptBody,
    Segment,
    Status,
    decode,
    encode,
)
from protocol.topics import Kind, Topic
from protocol.transfer import HeldSegment, SegmentVerdict, TransferReceiver

log = logging.getLogger("sohoa.central.ingest")

Reply = Ack | Receipt


@dataclass(slots=True)
class _Active:
    """A transfer being received: its verified header, receiver and the device key to re-verify."""

    signed: SignedHeader
    receiver: TransferReceiver
    device_key: nacl.signing.VerifyKey


class Ingestor:
    """Central's ingest state machine over the catalog, staging files and the object store."""

    def __init__(self, conn: sqlite3.Connection, paths: CentralPaths, keys: CentralKeys, *,
                 max_plaintext: int, metrics: Metrics | None = None) -> None:
        self._conn = conn
        self._paths = paths
        self._keys = keys
        self._key_id = key_id(bytes(keys.encryption.public_key))
        self._max_plaintext = max_plaintext
        self._store = ObjectStore(paths.objects)
        self.metrics = metrics or Metrics()
        self._active: dict[str, _Active] = {}
        self._remove_stale_staging()

    # -- the batch --------------------------------------------------------------------------------
    def handle_batch(self, items: Sequence[tuple[str, bytes]]) -> list[Reply]:
        """Apply received (topic, payload) pairs; return the acks and receipts to publish."""
        batch = _Batch()
        try:
            for topic, payload in items:
                try:
                    msg = decode(topic, payload)
                except ProtocolError as exc:
                    self._refused(exc, f"undecodable message on {topic[:120]!r}")
                    continue
                batch.devices.add(msg.device)
                try:
                    self._dispatch(msg, batch)
                except ProtocolError as exc:
                    self._refused(exc, f"{type(msg).__name__} from {msg.device}")
            self._make_durable(batch)
            for tid in sorted(batch.touched):   # a copy: answering may reject (and discard) a tid
                self._answer(tid, batch)
        except BaseException:
            # Our own failure (database, disk, a bug): undo what is not committed and forget the
            # in-memory view of every transfer touched, so nothing is acked that is not durable.
            self._conn.rollback()
            for fd in batch.fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            for tid in set(batch.written) | batch.touched:
                self._active.pop(tid, None)
            raise
        return batch.replies

    def _dispatch(self, msg: Message, batch: _Batch) -> None:
        if isinstance(msg, Init):
            self._on_init(msg, batch)
        elif isinstance(msg, Segment):
            self._on_segment(msg, batch)
        elif isinstance(msg, Fin):
            self._on_fin(msg, batch)
        elif isinstance(msg, Abort):
            self._on_abort(msg, batch)
        elif isinstance(msg, Status):
            self._on_status(msg)
        # Acks and receipts travel down only; central never acts on one it sees.

    # -- init -------------------------------------------------------------------------------------
    def _on_init(self, msg: Init, batch: _Batch) -> None:
        signed = msg.signed_header
        header = signed.header
        device = catalog.get_device(self._conn, msg.device)
        if device is None:
            self._reject(batch, msg.device, msg.tid, UnknownDeviceError(
                f"device {msg.device!r} is not enrolled", device=msg.device, tid=msg.tid))
            return
        if device.status != "active":
            self._reject(batch, msg.device, msg.tid, RevokedDeviceError(
                f"device {msg.device!r} is {device.status}", device=msg.device, tid=msg.tid))
            return
        device_key = nacl.signing.VerifyKey(device.verify_key)
        try:
            signed.verify(device_key)   # before anything of this transfer is accepted or answered
        except EnvelopeError as exc:
            self._reject(batch, msg.device, msg.tid, exc)
            return
        existing = catalog.get_transfer(self._conn, msg.tid)
        if existing is not None:
            if existing.header != signed.encode():
                self._reject(batch, msg.device, msg.tid, ReplayError(
                    "transfer id reused with a different header", device=msg.device, tid=msg.tid))
                return
            self._answer_known(existing, batch)
            return
        holder = catalog.transfer_by_seq(self._conn, msg.device, header.seq)
        if holder is not None:
            self._possible_clone(batch, msg, holder)
            return
        catalog.insert_transfer(self._conn, tid=msg.tid, device=msg.device, seq=header.seq,
                                header=signed.encode())
        refusal: ProtocolError | None = None
        if header.central_key_id != self._key_id:
            refusal = UnknownKeyError("sealed to a key this central does not hold",
                                      device=msg.device, tid=msg.tid)
        elif header.plaintext_size > self._max_plaintext:
            refusal = SizeLimitError(f"declared package of {header.plaintext_size} bytes exceeds "
                                     f"{self._max_plaintext}", device=msg.device, tid=msg.tid)
        elif header.ciphertext_size > max_ciphertext_size(header.plaintext_size, header.chunk_size):
            # Staged bytes are only hash-checked once all have arrived: bound them before any lands.
            refusal = SizeLimitError(f"declared ciphertext of {header.ciphertext_size} bytes is more than "
                                     f"a {header.plaintext_size}-byte package can seal to",
                                     device=msg.device, tid=msg.tid)
        if refusal is not None:
            # Recorded as rejected so the seq stays spent and a repeated init gets the same answer.
            catalog.reject_transfer(self._conn, msg.tid, str(refusal), type(refusal).__name__)
            self._reject(batch, msg.device, msg.tid, refusal)
            return
        self._active[msg.tid] = _Active(signed, TransferReceiver(header), device_key)
        batch.touched.add(msg.tid)

    def _possible_clone(self, batch: _Batch, msg: Init, holder: catalog.TransferRecord) -> None:
        """A signed init reusing another transfer's seq: two boxes with one identity. Refuse, flag."""
        seq = msg.signed_header.header.seq
        at = catalog.utc_now()
        new = catalog.record_seq_collision(self._conn, device=msg.device, seq=seq, tid=msg.tid,
                                           other_tid=holder.tid, at=at)
        if new:
            catalog.add_fixity(self._conn, event="possible_clone", device=msg.device, tid=msg.tid, at=at,
                               detail=json.dumps({"seq": seq, "other_tid": holder.tid}))
        log.warning("possible clone of device %s: transfer %s reuses sequence number %d of transfer %s",
                    msg.device, msg.tid, seq, holder.tid)
        self._reject(batch, msg.device, msg.tid, SequenceReusedError(
            f"sequence number {seq} is already used by transfer {holder.tid}: two boxes seem to share "
            f"the identity {msg.device!r}", device=msg.device, tid=msg.tid))

    def _answer_known(self, record: catalog.TransferRecord, batch: _Batch) -> None:
        """Re-answer a transfer central already knows (a repeated init or fin)."""
        if record.state == "stored":
            batch.replies.append(Ack(record.device, record.tid, AckState.STORED))
            if record.receipt is not None:
                receipt = decode(str(Topic(Kind.RECEIPT, record.device)), record.receipt)
                assert isinstance(receipt, Receipt)
                batch.replies.append(receipt)
        elif record.state == "rejected":
            batch.replies.append(Ack(record.device, record.tid, AckState.REJECTED,
                                     error=record.error, error_class=record.error_class))
        elif self._lookup(record.device, record.tid, batch) is not None:
            batch.touched.add(record.tid)

    def _lookup(self, device: str, tid: str, batch: _Batch) -> _Active | None:
        """The active transfer for a segment/fin, rebuilt from the segment log if needed."""
        active = self._active.get(tid)
        if active is not None:
            return active
        record = catalog.get_transfer(self._conn, tid)
        if record is None or record.device != device:
            batch.replies.append(Ack(device, tid, AckState.UNKNOWN))
            return None
        if record.state != "receiving":
            self._answer_known(record, batch)
            return None
        device_record = catalog.get_device(self._conn, device)
        if device_record is None or device_record.status != "active":
            self._reject(batch, device, tid, RevokedDeviceError(f"device {device!r} is not active",
                                                                device=device, tid=tid))
            return None
        signed = SignedHeader.decode(record.header)
        held = catalog.held_segments(self._conn, tid)
        active = _Active(signed, TransferReceiver(signed.header, held),
                         nacl.signing.VerifyKey(device_record.verify_key))
        self._active[tid] = active
        return active

    # -- segments, fin, abort, status -------------------------------------------------------------
    def _on_segment(self, seg: Segment, batch: _Batch) -> None:
        active = self._lookup(seg.device, seg.tid, batch)
        if active is None or not self._still_trusted(seg.device, seg.tid, batch):
            return
        try:
            verdict = active.receiver.on_segment(seg)
        except TransferError as exc:
            self._refused(exc, f"segment at {seg.offset}")
            batch.errors[seg.tid] = exc
            batch.touched.add(seg.tid)
            return
        batch.touched.add(seg.tid)
        if verdict is SegmentVerdict.DUPLICATE:
            return
        try:
            fd = batch.fds.get(seg.tid)
            if fd is None:
                fd = os.open(self._staging(seg.tid), os.O_RDWR | os.O_CREAT, 0o600)
                batch.fds[seg.tid] = fd
            _pwrite_all(fd, seg.data, seg.offset)
        except OSError as exc:
            active.receiver.abandon(seg.offset)
            self.metrics.error(type(exc).__name__)
            log.error("cannot stage segment %s@%d: %s", seg.tid, seg.offset, exc)  # noqa: TRY400 - the cause is enough
            return
        batch.written.setdefault(seg.tid, []).append(HeldSegment(seg.offset, len(seg.data), seg.crc))

    def _on_fin(self, fin: Fin, batch: _Batch) -> None:
        active = self._lookup(fin.device, fin.tid, batch)
        if active is None or not self._still_trusted(fin.device, fin.tid, batch):
            return
        header = active.signed.header
        if fin.size != header.ciphertext_size or fin.sha256 != header.ciphertext_sha256:
            exc = TransferError("fin disagrees with the signed header", device=fin.device, tid=fin.tid)
            self._refused(exc, "fin")
            batch.errors[fin.tid] = exc
        batch.touched.add(fin.tid)

    def _on_abort(self, abort: Abort, batch: _Batch) -> None:
        record = catalog.get_transfer(self._conn, abort.tid)
        if record is None or record.device != abort.device or record.state != "receiving":
            return
        reason = AbortedError(f"aborted by the device: {abort.reason[:500]}", device=abort.device,
                              tid=abort.tid)
        catalog.reject_transfer(self._conn, abort.tid, str(reason), type(reason).__name__)
        self._active.pop(abort.tid, None)
        batch.touched.discard(abort.tid)
        batch.aborted.add(abort.tid)

    def _on_status(self, status: Status) -> None:
        device = catalog.get_device(self._conn, status.device)
        if device is None or device.status != "active":
            return   # a revoked box's last will or a late status must not make it look alive
        if not status.online and status.updated_at is None:
            # The bare last will (the broker speaking for a box that vanished): it knows nothing
            # of the queue, so keep the backlog and error the box last reported — "offline with
            # documents stuck on it" is exactly what an operator must see.
            catalog.mark_offline(self._conn, status.device, at=catalog.utc_now())
            return
        _, payload = encode(status)
        catalog.update_device_status(
            self._conn, status.device, online=status.online, backlog_docs=status.queue_docs,
            backlog_bytes=status.queue_bytes, last_error=status.last_error,
            status_json=payload.decode("utf-8"), at=catalog.utc_now())

    # -- durability and answers -------------------------------------------------------------------
    def _make_durable(self, batch: _Batch) -> None:
        try:
            for fd in batch.fds.values():
                os.fsync(fd)   # the bytes first, then the log rows that claim them
            for tid, segments in batch.written.items():
                catalog.add_segments(self._conn, tid, segments)
            catalog.touch_devices(self._conn, batch.devices, catalog.utc_now())
            self._conn.commit()
        except (OSError, sqlite3.Error) as exc:
            self._conn.rollback()
            self.metrics.error(type(exc).__name__)
            log.error("batch not made durable, nothing acknowledged: %s", exc)  # noqa: TRY400 - the cause is enough
            # Forget in-memory state; it is rebuilt from what the catalog really holds.
            for tid in set(batch.written) | batch.touched:
                self._active.pop(tid, None)
            batch.touched.clear()
            batch.replies.clear()
            return
        finally:
            for fd in batch.fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            batch.fds.clear()
        for tid, segments in batch.written.items():
            active = self._active.get(tid)
            for seg in segments:
                if active is not None:
                    active.receiver.committed(seg.offset)
                self.metrics.segments_received += 1
                self.metrics.bytes_received += seg.length
        for tid in batch.aborted:
            with contextlib.suppress(FileNotFoundError):
                self._staging(tid).unlink()

    def _answer(self, tid: str, batch: _Batch) -> None:
        active = self._active.get(tid)
        if active is None:
            return
        receiver = active.receiver
        if receiver.complete:
            self._complete(active, batch)
            return
        ack = receiver.ack()
        error = batch.errors.get(tid)
        if error is not None:
            ack = Ack(ack.device, ack.tid, ack.state, ack.ranges, str(error)[:500], type(error).__name__)
        batch.replies.append(ack)

    def _complete(self, active: _Active, batch: _Batch) -> None:
        header = active.signed.header
        device, tid = header.device_id, header.tid
        record = catalog.get_device(self._conn, device)   # fresh: a revoke may have landed this batch
        if record is None or record.status != "active":
            self._revoke_transfer(batch, device, tid)
            self._conn.commit()
            return
        staging = self._staging(tid)
        try:
            assembled = assemble(staging, active.signed, active.device_key, self._keys.encryption,
                                 max_plaintext=self._max_plaintext, work_dir=self._paths.tmp)
        except ProtocolError as exc:
            self._quarantine(device, tid, exc)
            self._reject(batch, device, tid, exc)
            return
        except OSError as exc:
            # Disk trouble is ours, not the device's: keep the transfer, answer the fin again later.
            self.metrics.error(type(exc).__name__)
            log.error("cannot assemble %s: %s", tid, exc)  # noqa: TRY400 - the cause is enough
            batch.replies.append(active.receiver.ack())
            return
        meta = assembled.metadata
        stored_at = catalog.utc_now()
        sha = assembled.original_sha256
        # Content once: the object is stored (or, if the copy there is missing or rotten, repaired
        # from this one — perhaps the last good copy, the edge forgets it on our receipt) whatever
        # the catalog says, so a central restored from an older backup takes the bytes again.
        duplicate = catalog.object_exists(self._conn, sha)
        put = self._store.put_file(assembled.original, sha)
        # Provenance per arrival: this box's name, capture time and text get their own document,
        # unless this very arrival is already catalogued (the same scan sent again).
        document = catalog.NewDocument(
            device=device, tid=tid, seq=header.seq, filename=meta.original_name, sha256=sha,
            size=meta.original_size, pages=meta.pages, media_type=meta.media_type, received_at=stored_at,
            text=assembled.text, metadata=assembled.metadata_json, package_sha256=assembled.package_sha256,
            captured_at=meta.captured_at)
        existing = catalog.arrival_by_key(self._conn, document.key)
        if existing is None:
            self._store.put_file(assembled.package, assembled.package_sha256)
            document_id = catalog.insert_document(self._conn, document)
        else:
            document_id = existing
            # The package names this transfer (tid, seq): never the stored arrival's own package.
            assembled.package.unlink()
        if duplicate and put is not Put.KEPT:
            previous = "missing" if put is Put.STORED else "damaged"
            log.warning("object %s was %s; repaired from %s (document %d)", sha, previous, tid, document_id)
            catalog.add_fixity(self._conn, event="repaired", device=device, tid=tid, at=stored_at,
                               document_id=document_id, original_sha256=sha,
                               detail=json.dumps({"previous": previous}))
        receipt = Receipt.sign(ReceiptBody(device=device, tid=tid, sha256=assembled.original_sha256,
                                           stored_at=stored_at, document_id=document_id,
                                           duplicate=duplicate), self._keys.receipt)
        _, receipt_payload = encode(receipt)
        catalog.store_transfer(self._conn, tid, document_id=document_id, duplicate=duplicate,
                               receipt=receipt_payload, stored_at=stored_at)
        catalog.add_fixity(self._conn, event="duplicate" if duplicate else "ingest", device=device, tid=tid,
                           at=stored_at, document_id=document_id,
                           original_sha256=assembled.original_sha256,
                           package_sha256=assembled.package_sha256,
                           ciphertext_sha256=assembled.ciphertext_sha256,
                           detail=json.dumps({"seq": header.seq, "filename": meta.original_name,
                                              "new_arrival": existing is None}, ensure_ascii=False))
        self._conn.commit()
        staging.unlink()
        fsync_dir(staging.parent)
        self._active.pop(tid, None)
        self.metrics.documents_ingested += 1
        log.info("stored %s from %s as document %d%s%s", tid, device, document_id,
                 " (content already stored)" if duplicate else "",
                 "" if existing is None else " (arrival already catalogued)")
        batch.replies.append(Ack(device, tid, AckState.STORED))
        batch.replies.append(receipt)

    # -- refusals ---------------------------------------------------------------------------------
    def _still_trusted(self, device: str, tid: str, batch: _Batch) -> bool:
        trusted = batch.trusted.get(device)
        if trusted is None:
            record = catalog.get_device(self._conn, device)
            trusted = batch.trusted[device] = record is not None and record.status == "active"
        if not trusted:
            self._revoke_transfer(batch, device, tid)
        return trusted

    def _revoke_transfer(self, batch: _Batch, device: str, tid: str) -> None:
        """Reject a transfer of a device revoked after its init, for good (it never resumes)."""
        exc = RevokedDeviceError(f"device {device!r} was revoked", device=device, tid=tid)
        catalog.reject_transfer(self._conn, tid, str(exc), type(exc).__name__)
        batch.errors.pop(tid, None)
        self._reject(batch, device, tid, exc)
        # Kept (never decrypted) for whoever investigates what a revoked box was still sending.
        with contextlib.suppress(FileNotFoundError):
            self._staging(tid).replace(self._paths.quarantine / f"{tid}.part")

    def _refused(self, exc: ProtocolError, what: str) -> None:
        self.metrics.error(type(exc).__name__)
        log.warning("refused %s: %s: %s", what, type(exc).__name__, exc)

    def _reject(self, batch: _Batch, device: str, tid: str, exc: ProtocolError) -> None:
        self._refused(exc, f"transfer {tid} from {device}")
        self._active.pop(tid, None)
        batch.touched.discard(tid)
        batch.replies.append(Ack(device, tid, AckState.REJECTED, error=str(exc)[:500],
                                 error_class=type(exc).__name__))

    def _quarantine(self, device: str, tid: str, exc: ProtocolError) -> None:
        catalog.reject_transfer(self._conn, tid, str(exc)[:2000], type(exc).__name__)
        at = catalog.utc_now()
        catalog.add_fixity(self._conn, event="rejected", device=device, tid=tid, at=at,
                           detail=json.dumps({"error_class": type(exc).__name__, "error": str(exc)},
                                             ensure_ascii=False))
        self._conn.commit()
        reason = {"device": device, "tid": tid, "at": at, "error_class": type(exc).__name__,
                  "error": str(exc), "hint": exc.hint}
        write_atomic(self._paths.quarantine / f"{tid}.reason.json",
                     json.dumps(reason, ensure_ascii=False, indent=1).encode())
        with contextlib.suppress(FileNotFoundError):
            self._staging(tid).replace(self._paths.quarantine / f"{tid}.part")
            fsync_dir(self._paths.quarantine)

    # -- files ------------------------------------------------------------------------------------
    def _staging(self, tid: str) -> Path:
        return self._paths.staging / f"{tid}.part"   # tid is checked hex: never a sender's name

    def _remove_stale_staging(self) -> None:
        """Drop staging files of stored transfers (a crash between commit and unlink) and temp files."""
        for part in self._paths.staging.glob("*.part"):
            record = catalog.get_transfer(self._conn, part.stem)
            if record is not None and record.state == "stored":
                part.unlink()
        # Half-written decrypted packages from an interrupted assembly; it restarts from staging.
        for leftover in self._paths.tmp.glob("*"):
            if leftover.is_file():
                leftover.unlink()


def max_ciphertext_size(plaintext_size: int, chunk_size: int) -> int:
    """The most ciphertext an honest sealer can make of ``plaintext_size`` bytes (generously).

    zstd's worst case is a little over its input (ZSTD_compressBound ≈ n + n/256 + 128 KiB at
    most); we allow n + n/128 + 1 MiB. secretstream adds ABYTES per chunk, and the sealer makes at
    most one chunk per ``chunk_size`` compressed bytes plus the final one.
    """
    compressed = plaintext_size + plaintext_size // 128 + (1 << 20)
    return compressed + ABYTES * (compressed // chunk_size + 1)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite made no progress at offset {offset}")
        view, offset = view[written:], offset + written


@dataclass(slots=True)
class _Batch:
    """What one batch touched; made durable together, then answered together."""

    replies: list[Reply] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    fds: dict[str, int] = field(default_factory=dict)
    written: dict[str, list[HeldSegment]] = field(default_factory=dict)
    errors: dict[str, ProtocolError] = field(default_factory=dict)
    aborted: set[str] = field(default_factory=set)
    trusted: dict[str, bool] = field(default_factory=dict)   # device → still active, this batch
