"""The batch stage: apply a batch of received messages inside the writer's transaction.

Rules (DESIGN §1, §3):
  - Runs inside a transaction the writer owns and never commits. Accepted segment bytes go to the
    segment journal; the writer syncs the journal before it commits the rows that point into it,
    and the replies are published only after that commit. So an ack never names bytes that are not
    durable, and one fsync of the journal plus one commit cover a whole group of batches.
  - A transfer's state is read from the catalog each batch (signed size, held ranges), never from a
    cache: several workers may hold segments of one transfer. A repeat of a held segment (same
    offset, length, checksum) is a duplicate; any other overlap is a conflict, never a merge.
  - Revocation is re-checked on every segment and fin, once per device per batch; a revoked device's
    open transfers are rejected for good and their bytes kept in quarantine.
  - When a transfer's bytes are all held, it gets an assembly job in the same transaction; its answer
    is the assembly's outcome (STORED and the receipt, or REJECTED), from the archive stage. If
    another worker holds the job, the device gets an ack covering everything meanwhile. No other
    transfer's ack waits behind an assembly.
  - One answer per touched transfer per batch (acks are coalesced).
  - A notice (a document's sealed text and metadata, ahead of its original: protocol.notice) is
    verified like an init — enrolled and active device, its signature (notice context), central's
    key, the sequence number its transfer uses and no other — then opened with caps and catalogued
    as an arrival awaiting its original, answered ``Noted``. It is never acked as a transfer and
    never receipted: only the original's transfer is (custody is unchanged). A repeat is answered
    the same; a notice after its transfer was stored names that document; a device whose awaiting
    arrivals exceed ``MAX_AWAITING_DOCS``/``MAX_AWAITING_TEXT_BYTES`` has its notices refused (its
    documents still come whole).
  - A new transfer is weighed against the device's quotas (``central.ingest.quota``) at its init only;
    over a quota it is deferred (DEFERRED + retry_after, logged once per device per interval), and
    rejections an honest box never causes count against the device's rejected-transfer budget.
    A late segment or fin of an expired transfer is answered UNKNOWN; its init starts it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing

from central import catalog
from central.errors import (
    AbortedError,
    LateNoticeError,
    NoticeQuotaError,
    QuotaExceededError,
    ReplayError,
    RevokedDeviceError,
    SequenceReusedError,
    UnknownDeviceError,
)
from central.ingest import quota
from central.ingest.admission import Admit, Clone, Defer, Known, Refuse, Revive, admit
from central.ingest.rate import topic_device
from central.ingest.staging import SegmentJournal, SegmentReader
from central.ingest.store import IngestStore
from central.metrics import Metrics
from central.paths import CentralPaths
from protocol.errors import ProtocolError, TransferError, UnknownKeyError
from protocol.messages import (
    Abort,
    Ack,
    AckState,
    Fin,
    Init,
    Message,
    Noted,
    Notice,
    NoticeState,
    Receipt,
    Segment,
    Status,
    decode,
    encode,
)
from protocol.notice import open_notice
from protocol.ranges import RangeSet
from protocol.topics import Kind, Topic

log = logging.getLogger("sohoa.central.ingest")

Reply = Ack | Receipt | Noted
# Per device, arrivals catalogued from notices whose originals have not come: a box with a big backlog
# after days offline stays well inside (its notices go first, then its originals drain); a hostile
# enrolled box can make central keep at most this much of its text (then its notices are refused).
MAX_AWAITING_DOCS = 2000
MAX_AWAITING_TEXT_BYTES = 64 * 1024 * 1024
QUOTA_LOG_INTERVAL_S = 300.0   # one INFO line per deferred device per interval, with the count
_REPEAT = TransferError("a repeat of a held segment")   # a sentinel, never raised nor sent


@dataclass(slots=True)
class _Open:
    """A receiving transfer as this batch sees it: its catalog row plus what the batch added."""

    record: catalog.TransferRecord
    held: RangeSet
    pending: dict[int, catalog.StoredSegment] = field(default_factory=dict)
    error: ProtocolError | None = None

    @property
    def size(self) -> int:
        assert self.record.size is not None
        return self.record.size


@dataclass(slots=True)
class BatchOutcome:
    """What a batch decided; its replies may be published once the writer has committed."""

    replies: list[Reply] = field(default_factory=list)
    ready: list[str] = field(default_factory=list)       # complete transfers this worker now assembles
    jobs: list[Any] = field(default_factory=list)        # their snapshots (archive.AssemblyJob), if taken
    parked: list[int] = field(default_factory=list)      # items of transfers not announced yet
    segments: int = 0                                    # newly held segments and bytes (metrics)
    bytes: int = 0


@dataclass(slots=True)
class _Batch:
    outcome: BatchOutcome = field(default_factory=BatchOutcome)
    open: dict[str, _Open] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)      # tids already given their one answer
    touched: set[str] = field(default_factory=set)       # tids to answer from their state at the end
    devices: set[str] = field(default_factory=set)
    trusted: dict[str, bool] = field(default_factory=dict)
    noted: set[str] = field(default_factory=set)         # notices answered in this batch

    def reply(self, tid: str, *replies: Reply) -> None:
        self.answered.add(tid)
        self.touched.discard(tid)
        self.outcome.replies.extend(replies)


class BatchStage:
    """Applies batches for one worker: admission, staging into the journal, the segment log."""

    def __init__(self, paths: CentralPaths, journal: SegmentJournal, *, key_id: bytes, max_plaintext: int,
                 worker: str, metrics: Metrics, lease_s: float,
                 notice_key: nacl.public.PrivateKey | None = None, quotas: quota.Quotas | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._paths = paths
        self._notice_key = notice_key   # central's encryption key: notices are opened in the batch
        self._journal = journal
        self._reader = SegmentReader(paths.staging)
        self._key_id = key_id
        self._max_plaintext = max_plaintext
        self._worker = worker
        self._metrics = metrics
        self._lease_s = lease_s
        self.quotas = quotas or quota.Quotas()
        self.clock = clock   # wall-clock seconds for the quota buckets (a fake in tests)
        self._refusal_log = LogBudget()
        self._deferred: dict[str, tuple[float, int]] = {}   # device → (last logged, deferred since)
        self.expired = 0   # transfers this worker expired (central.ingest.pipeline.sweep)

    def apply(self, db: IngestStore, items: list[tuple[str, bytes]],
              park: Sequence[bool] | None = None) -> BatchOutcome:
        """Apply ``items``; a segment or fin of a transfer nobody announced yet is parked (its index
        in ``outcome.parked``) rather than answered UNKNOWN where ``park[i]`` allows it: with several
        workers, its init may be in another worker's batch right now."""
        batch = _Batch()
        messages: list[tuple[int, Message]] = []
        for index, (topic, payload) in enumerate(items):
            try:
                messages.append((index, decode(topic, payload)))
            except ProtocolError as exc:
                self._refused(exc, f"undecodable message on {topic[:120]!r}", device=topic_device(topic))
        wanted = {m.tid for _, m in messages if isinstance(m, Segment | Fin)}
        known = db.get_transfers(wanted) if wanted else {}
        for index, msg in messages:
            if park is not None and park[index] and isinstance(msg, Segment | Fin) and (
                    msg.tid not in known and msg.tid not in batch.open and msg.tid not in batch.answered):
                batch.outcome.parked.append(index)
                continue
            batch.devices.add(msg.device)
            try:
                if isinstance(msg, Init):
                    self._on_init(db, msg, batch, known)
                elif isinstance(msg, Segment):
                    self._on_segment(db, msg, batch, known)
                elif isinstance(msg, Fin):
                    self._on_fin(db, msg, batch, known)
                elif isinstance(msg, Abort):
                    self._on_abort(db, msg, batch, known)
                elif isinstance(msg, Status):
                    self._on_status(db, msg)
                elif isinstance(msg, Notice):
                    self._on_notice(db, msg, batch)
                # Acks and receipts travel down only; central never acts on one it sees.
            except ProtocolError as exc:
                self._refused(exc, f"{type(msg).__name__} from {msg.device}")
        self._record(db, batch)
        return batch.outcome

    # -- init -------------------------------------------------------------------------------------
    def _on_init(self, db: IngestStore, msg: Init, batch: _Batch,
                 known: dict[str, catalog.TransferRecord]) -> None:
        if msg.tid in batch.answered:
            return
        header = msg.signed_header.header
        existing = db.get_transfer(msg.tid)
        device = db.get_device(msg.device)
        holder = None
        if existing is None and device is not None:
            holder = db.transfer_by_seq(msg.device, header.seq)
        load = None
        new = (existing is None and holder is None) or (existing is not None and existing.state == "expired")
        if new and device is not None and device.status == "active":
            load = db.device_load(msg.device)   # only a new transfer is weighed: once per document
        now = self.clock()
        verdict = admit(msg, device=device, existing=existing, seq_holder=holder, key_id=self._key_id,
                        max_plaintext=self._max_plaintext, quotas=self.quotas, load=load, now=now)
        if isinstance(verdict, Admit | Revive | Refuse) and verdict.tokens is not None:
            db.set_init_tokens(msg.device, verdict.tokens, now)
        if isinstance(verdict, Defer):
            self._defer(batch, msg, verdict)
        elif isinstance(verdict, Revive):
            db.revive_transfer(msg.tid)
            # UNKNOWN: the device forgets what it thought central held and sends from zero.
            batch.reply(msg.tid, Ack(msg.device, msg.tid, AckState.UNKNOWN))
            log.info("transfer %s of %s expired earlier and starts again from zero", msg.tid, msg.device)
        elif isinstance(verdict, Refuse):
            if verdict.record:
                db.insert_transfer(tid=msg.tid, device=msg.device, seq=header.seq,
                                        header=msg.signed_header.encode(), size=header.ciphertext_size)
                db.reject_transfer(msg.tid, str(verdict.error), type(verdict.error).__name__)
            if device is not None and device.status == "active":
                count_rejection(db, msg.device, msg.tid, type(verdict.error).__name__, quotas=self.quotas,
                                now=now)
            self._reject(batch, msg.device, msg.tid, verdict.error)
        elif isinstance(verdict, Clone):
            self._possible_clone(db, batch, msg, verdict.holder)
        elif isinstance(verdict, Known):
            self._answer_known(verdict.record, batch)
        else:
            assert isinstance(verdict, Admit)
            db.insert_transfer(tid=msg.tid, device=msg.device, seq=header.seq,
                                    header=msg.signed_header.encode(), size=header.ciphertext_size)
            record = db.get_transfer(msg.tid)
            assert record is not None
            known[msg.tid] = record
            batch.open[msg.tid] = _Open(record, RangeSet())
            batch.touched.add(msg.tid)

    def _possible_clone(self, db: IngestStore, batch: _Batch, msg: Init,
                        holder: catalog.TransferRecord) -> None:
        """A signed init reusing another transfer's seq: two boxes with one identity. Refuse, flag."""
        seq = msg.signed_header.header.seq
        at = catalog.utc_now()
        new = db.record_seq_collision(device=msg.device, seq=seq, tid=msg.tid,
                                           other_tid=holder.tid, at=at)
        if new:
            db.add_fixity(event="possible_clone", device=msg.device, tid=msg.tid, at=at,
                               detail=json.dumps({"seq": seq, "other_tid": holder.tid}))
        log.warning("possible clone of device %s: transfer %s reuses sequence number %d of transfer %s",
                    msg.device, msg.tid, seq, holder.tid)
        self._reject(batch, msg.device, msg.tid, SequenceReusedError(
            f"sequence number {seq} is already used by transfer {holder.tid}: two boxes seem to share "
            f"the identity {msg.device!r}", device=msg.device, tid=msg.tid))

    def _answer_known(self, record: catalog.TransferRecord, batch: _Batch) -> None:
        """Answer a transfer central already knows (a repeated init, a late segment or fin)."""
        if record.state == "stored":
            replies: list[Reply] = [Ack(record.device, record.tid, AckState.STORED)]
            if record.receipt is not None:
                receipt = decode(str(Topic(Kind.RECEIPT, record.device)), record.receipt)
                assert isinstance(receipt, Receipt)
                replies.append(receipt)
            batch.reply(record.tid, *replies)
        elif record.state == "rejected":
            batch.reply(record.tid, Ack(record.device, record.tid, AckState.REJECTED,
                                        error=record.error, error_class=record.error_class))
        elif record.state == "expired":
            # Its bytes were dropped: the device announces it again and sends it from zero.
            batch.reply(record.tid, Ack(record.device, record.tid, AckState.UNKNOWN))
        else:
            batch.open.setdefault(record.tid, _Open(record, RangeSet.of(record.held)))
            batch.touched.add(record.tid)

    def _open(self, db: IngestStore, device: str, tid: str, batch: _Batch,
              known: dict[str, catalog.TransferRecord]) -> _Open | None:
        """The receiving transfer a segment or fin belongs to, or None once it has been answered."""
        if tid in batch.answered:
            return None
        current = batch.open.get(tid)
        if current is not None:
            return current if self._still_trusted(db, device, tid, batch) else None
        record = known.get(tid)
        if record is None or record.device != device:
            batch.reply(tid, Ack(device, tid, AckState.UNKNOWN))
            return None
        if record.state != "receiving":
            self._answer_known(record, batch)
            return None
        if record.size is None:   # a header no version of central could read: never assembled
            batch.reply(tid, Ack(device, tid, AckState.UNKNOWN))
            return None
        if not self._still_trusted(db, device, tid, batch):
            return None
        opened = batch.open[tid] = _Open(record, RangeSet.of(record.held))
        return opened

    # -- segments, fin, abort, status -------------------------------------------------------------
    def _on_segment(self, db: IngestStore, seg: Segment, batch: _Batch,
                    known: dict[str, catalog.TransferRecord]) -> None:
        transfer = self._open(db, seg.device, seg.tid, batch, known)
        if transfer is None:
            return
        batch.touched.add(seg.tid)
        end = seg.end
        conflict = self._conflict(db, transfer, seg)
        if conflict is _REPEAT:
            return   # a repeat: acknowledged, not written
        if conflict is not None:
            self._refused(conflict, f"segment at {seg.offset}")
            transfer.error = conflict
            return
        try:
            name, position = self._journal.append(seg.data)
        except OSError as exc:
            # Our trouble (disk full): not held, not acked; the device sends it again.
            self._metrics.error(type(exc).__name__)
            log.error("cannot stage segment %s@%d: %s", seg.tid, seg.offset, exc)  # noqa: TRY400 - the cause is enough
            return
        transfer.pending[seg.offset] = catalog.StoredSegment(seg.offset, len(seg.data), seg.crc, name,
                                                             position)
        transfer.held.add(seg.offset, end)

    @staticmethod
    def _conflict(db: IngestStore, transfer: _Open, seg: Segment) -> TransferError | None:
        """None for new bytes, ``_REPEAT`` for a byte-identical repeat, else the conflict."""
        if seg.end > transfer.size:
            return TransferError(f"segment [{seg.offset}, {seg.end}) past the signed size {transfer.size}",
                                 device=seg.device, tid=seg.tid, offset=seg.offset)
        if not transfer.held.overlaps(seg.offset, seg.end):
            return None
        held = transfer.pending.get(seg.offset) or db.segment_at(seg.tid, seg.offset)
        if held is not None and held.length == len(seg.data) and held.crc == seg.crc:
            return _REPEAT
        return TransferError("conflicting segment at a held offset" if held is not None else
                             "segment overlaps held bytes with a different geometry",
                             device=seg.device, tid=seg.tid, offset=seg.offset)

    def _on_fin(self, db: IngestStore, fin: Fin, batch: _Batch,
                known: dict[str, catalog.TransferRecord]) -> None:
        transfer = self._open(db, fin.device, fin.tid, batch, known)
        if transfer is None:
            return
        batch.touched.add(fin.tid)
        from protocol.envelope import SignedHeader  # noqa: PLC0415 - decoded only for fins

        header = SignedHeader.decode(transfer.record.header).header
        if fin.size != header.ciphertext_size or fin.sha256 != header.ciphertext_sha256:
            exc = TransferError("fin disagrees with the signed header", device=fin.device, tid=fin.tid)
            self._refused(exc, "fin")
            transfer.error = exc

    def _on_abort(self, db: IngestStore, abort: Abort, batch: _Batch,
                  known: dict[str, catalog.TransferRecord]) -> None:
        record = known.get(abort.tid) or db.get_transfer(abort.tid)
        if record is None or record.device != abort.device or record.state != "receiving":
            return
        reason = AbortedError(f"aborted by the device: {abort.reason[:500]}", device=abort.device,
                              tid=abort.tid)
        db.reject_transfer(abort.tid, str(reason), type(reason).__name__)
        batch.open.pop(abort.tid, None)
        batch.touched.discard(abort.tid)
        batch.answered.add(abort.tid)   # nothing to say to a device that gave up
        self.remove_legacy_part(abort.tid)

    def _on_status(self, db: IngestStore, status: Status) -> None:
        device = db.get_device(status.device)
        if device is None or device.status != "active":
            return   # a revoked box's last will or a late status must not make it look alive
        if not status.online and status.updated_at is None:
            # The bare last will (the broker speaking for a box that vanished): it knows nothing
            # of the queue, so keep the backlog and error the box last reported — "offline with
            # documents stuck on it" is exactly what an operator must see.
            db.mark_offline(status.device, at=catalog.utc_now())
            return
        _, payload = encode(status)
        db.update_device_status(
            status.device, online=status.online, backlog_docs=status.queue_docs,
            backlog_bytes=status.queue_bytes, last_error=status.last_error,
            status_json=payload.decode("utf-8"), at=catalog.utc_now())

    # -- notices ----------------------------------------------------------------------------------
    def _on_notice(self, db: IngestStore, notice: Notice, batch: _Batch) -> None:
        if notice.tid in batch.noted:
            return   # one answer per notice per batch
        batch.noted.add(notice.tid)
        try:
            answer = self._take_notice(db, notice)
        except ProtocolError as exc:
            self._refused(exc, f"notice {notice.tid} from {notice.device}")
            answer = Noted(notice.device, notice.tid, NoticeState.REFUSED, error=str(exc)[:500],
                           error_class=type(exc).__name__)
        batch.outcome.replies.append(answer)

    def _take_notice(self, db: IngestStore, notice: Notice) -> Noted:
        """Verify and catalogue one notice; raise the ProtocolError it is refused for."""
        device_id, tid = notice.device, notice.tid
        header = notice.signed_header.header
        device = db.get_device(device_id)
        if device is None:
            raise UnknownDeviceError(f"device {device_id!r} is not enrolled", device=device_id, tid=tid)
        if device.status != "active":
            raise RevokedDeviceError(f"device {device_id!r} is {device.status}", device=device_id, tid=tid)
        # The signature first (open_notice checks it before anything else), then what it says.
        if self._notice_key is None or header.central_key_id != self._key_id:
            raise UnknownKeyError("sealed to a key this central does not hold", device=device_id, tid=tid)
        content = open_notice(notice.signed_header, notice.ciphertext,
                              nacl.signing.VerifyKey(device.verify_key), self._notice_key)
        payload_sha256 = hashlib.sha256(encode(notice)[1]).hexdigest()
        previous = db.get_notice(tid)
        if previous is not None:
            if (previous.device, previous.seq, previous.payload_sha256) != (device_id, header.seq,
                                                                          payload_sha256):
                raise ReplayError("transfer id reused with a different notice", device=device_id, tid=tid)
            return Noted(device_id, tid, NoticeState.CATALOGUED, previous.document_id)
        transfer = db.get_transfer(tid)
        if transfer is not None and (transfer.device != device_id or transfer.seq != header.seq):
            raise ReplayError("notice names a transfer id another transfer uses", device=device_id, tid=tid)
        if transfer is None:
            holder = db.transfer_by_seq(device_id, header.seq) or db.notice_by_seq(device_id, header.seq)
            if holder is not None:
                raise SequenceReusedError(f"sequence number {header.seq} is already used by transfer "
                                          f"{holder.tid}", device=device_id, tid=tid)
        elif transfer.state == "rejected":
            raise LateNoticeError("the document's transfer was refused", device=device_id, tid=tid)
        at = catalog.utc_now()
        meta = content.metadata
        document_id: int | None
        if transfer is not None and transfer.state == "stored" and transfer.receipt is not None:
            # Late (the original overtook it): the stored arrival already has the package's text.
            receipt = decode(str(Topic(Kind.RECEIPT, device_id)), transfer.receipt)
            assert isinstance(receipt, Receipt)
            document_id = receipt.body.document_id
        else:
            document = catalog.NewDocument(
                device=device_id, tid=tid, seq=header.seq, filename=meta.original_name,
                sha256=meta.original_sha256, size=meta.original_size, pages=meta.pages,
                media_type=meta.media_type, received_at=at, text=content.text,
                metadata=meta.to_json().decode("utf-8"), package_sha256="", captured_at=meta.captured_at)
            document_id = db.arrival_by_key(document.key)   # the same arrival, catalogued already
            if document_id is None:
                count, text_bytes = db.awaiting_load(device_id)
                if count >= MAX_AWAITING_DOCS or text_bytes + len(content.text.encode()) > \
                        MAX_AWAITING_TEXT_BYTES:
                    raise NoticeQuotaError(f"{count} documents ({text_bytes} bytes of text) from this device "
                                           "already await their originals", device=device_id, tid=tid)
                document_id = db.insert_document(document, awaiting=True)
        db.insert_notice(tid=tid, device=device_id, seq=header.seq, payload_sha256=payload_sha256,
                         document_id=document_id, at=at)
        db.add_fixity(event="notice", device=device_id, tid=tid, at=at, document_id=document_id,
                      original_sha256=meta.original_sha256,
                      detail=json.dumps({"seq": header.seq, "filename": meta.original_name,
                                         "bytes": len(notice.ciphertext)}, ensure_ascii=False))
        log.info("catalogued notice %s from %s as document %s (original on its way)", tid, device_id,
                 document_id)
        return Noted(device_id, tid, NoticeState.CATALOGUED, document_id)

    # -- the end of the batch ---------------------------------------------------------------------
    def _record(self, db: IngestStore, batch: _Batch) -> None:
        for tid, transfer in batch.open.items():
            if transfer.pending and tid not in batch.answered:
                db.add_segments(tid, transfer.pending.values())
                db.set_held(tid, transfer.held)
                batch.outcome.segments += len(transfer.pending)
                batch.outcome.bytes += sum(s.length for s in transfer.pending.values())
        if batch.devices:
            db.touch_devices(sorted(batch.devices), catalog.utc_now())
        for tid in sorted(batch.touched):
            transfer = batch.open[tid]
            record = transfer.record
            if transfer.held.covers(0, transfer.size):
                db.add_job(tid)
                if db.claim_job(tid, worker=self._worker, lease_s=self._lease_s):
                    # Its answer is the assembly's outcome (STORED and the receipt, or REJECTED),
                    # published as soon as it is recorded; other transfers' acks do not wait for it.
                    batch.outcome.ready.append(tid)
                    continue
            ack = Ack(record.device, tid, AckState.RECEIVING, tuple(transfer.held.as_list()))
            if transfer.error is not None:
                error = transfer.error
                ack = Ack(ack.device, tid, ack.state, ack.ranges, str(error)[:500], type(error).__name__)
            batch.outcome.replies.append(ack)

    # -- refusals ---------------------------------------------------------------------------------
    def _defer(self, batch: _Batch, msg: Init, verdict: Defer) -> None:
        over = verdict.over
        self._metrics.error(QuotaExceededError.__name__)
        batch.reply(msg.tid, Ack(msg.device, msg.tid, AckState.DEFERRED, error=over.reason[:500],
                                 error_class=QuotaExceededError.__name__, retry_after=over.retry_after))
        now = time.monotonic()
        logged, since = self._deferred.get(msg.device, (float("-inf"), 0))
        if now - logged < QUOTA_LOG_INTERVAL_S:
            self._deferred[msg.device] = (logged, since + 1)
            return
        if len(self._deferred) > 10_000:   # a bound on what the log limiter remembers
            self._deferred = {d: v for d, v in self._deferred.items() if now - v[0] < QUOTA_LOG_INTERVAL_S}
        self._deferred[msg.device] = (now, 0)
        log.info("deferred a new transfer of %s (quota %s): %s; asked to retry in %d s%s", msg.device,
                 over.quota, over.reason, over.retry_after,
                 f" ({since} more deferred in the last {QUOTA_LOG_INTERVAL_S:.0f} s)" if since else "")

    def _still_trusted(self, db: IngestStore, device: str, tid: str, batch: _Batch) -> bool:
        trusted = batch.trusted.get(device)
        if trusted is None:
            record = db.get_device(device)
            trusted = batch.trusted[device] = record is not None and record.status == "active"
        if not trusted:
            self.revoke_transfer(db, device, tid, batch.open.pop(tid, None))
            self._reject(batch, device, tid, RevokedDeviceError(f"device {device!r} was revoked",
                                                                device=device, tid=tid))
        return trusted

    def revoke_transfer(self, db: IngestStore, device: str, tid: str,
                        transfer: _Open | None = None) -> None:
        """Reject a transfer of a device revoked after its init, for good (it never resumes)."""
        exc = RevokedDeviceError(f"device {device!r} was revoked", device=device, tid=tid)
        held = db.stored_segments(tid)
        if transfer is not None:
            held += list(transfer.pending.values())
        if held:
            # Kept (never decrypted) for whoever investigates what a revoked box was still sending.
            try:
                self._reader.copy_to(tid, sorted(held, key=lambda s: s.offset),
                                     self._paths.quarantine / f"{tid}.part")
            except OSError as error:
                log.error("cannot keep the bytes of revoked transfer %s: %s", tid, error)  # noqa: TRY400
        db.reject_transfer(tid, str(exc), type(exc).__name__)
        self.remove_legacy_part(tid)

    def remove_legacy_part(self, tid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._paths.staging / f"{tid}.part").unlink()

    def _refused(self, exc: ProtocolError, what: str, *, device: str | None = None) -> None:
        self._metrics.error(type(exc).__name__)
        key = device or exc.device or "?"
        suppressed = self._refusal_log.take(key, time.monotonic())
        if suppressed is None:
            return
        if suppressed:
            log.warning("%d more refusals of %s's messages were not logged (sohoa_errors_total counts them)",
                        suppressed, key)
        log.warning("refused %s: %s: %s", what, type(exc).__name__, exc)

    def _reject(self, batch: _Batch, device: str, tid: str, exc: ProtocolError) -> None:
        self._refused(exc, f"transfer {tid} from {device}")
        batch.open.pop(tid, None)
        batch.reply(tid, Ack(device, tid, AckState.REJECTED, error=str(exc)[:500],
                             error_class=type(exc).__name__))


@dataclass(slots=True)
class LogBudget:
    """At most ``burst`` log lines per key (a device) per ``window_s``; the rest are counted and the
    count is said with the key's next logged line. One box sending junk at its message rate (200/s)
    wrote a warning for every message, ~3 GB of journal a day, burying everyone else's lines."""

    burst: int = 20
    window_s: float = 60.0
    max_keys: int = 10_000
    # key -> [window start, lines logged in it, lines held back]
    _spent: dict[str, list[float | int]] = field(default_factory=dict)

    def take(self, key: str, now: float) -> int | None:
        """None: do not log this one. Otherwise log it, after saying how many were held back."""
        entry = self._spent.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            held_back = int(entry[2]) if entry is not None else 0
            if entry is None and len(self._spent) >= self.max_keys:
                self._spent.clear()   # many keys at once: forget the counts rather than grow
            self._spent[key] = [now, 1, 0]
            return held_back
        if entry[1] >= self.burst:
            entry[2] += 1
            return None
        entry[1] += 1
        return 0


def count_rejection(db: IngestStore, device: str, tid: str, error_class: str, *, quotas: quota.Quotas,
                    now: float) -> None:
    """A rejection an honest box never causes counts against the device's budget; over it, the device
    is flagged (fleet view, fixity event, one warning) and slowed at admission. Never revoked."""
    if error_class not in quota.COUNTED_REJECTIONS:
        return
    level, over = quota.strike(db.device_load(device), now, quotas)
    at = catalog.utc_now()
    if db.set_strikes(device, level, now, flag_at=at if over else None):
        import json  # noqa: PLC0415 - rare path

        log.warning("device %s is over its budget of %d rejected transfers in %.0f h (last: %s, %s): its "
                    "new transfers are slowed until it has been clean for that long", device,
                    quotas.rejected_budget, quotas.rejected_window_s / 3600, tid, error_class)
        db.add_fixity(event="over_rejection_budget", device=device, tid=tid, at=at,
                      detail=json.dumps({"error_class": error_class, "budget": quotas.rejected_budget,
                                         "window_s": quotas.rejected_window_s}))


def staging_part(paths: CentralPaths, tid: str) -> Path:
    return paths.staging / f"{tid}.part"   # tid is checked hex: never a sender's name
