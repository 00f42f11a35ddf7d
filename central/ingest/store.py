"""What the ingest stages need of the catalog: one typed interface, one implementation per backend.

The stages (admission, batch, archive) are written against ``IngestStore`` and never commit: the
writer (``central.ingest.writer``) owns the transaction, whichever database is behind it. Records are
the catalog's frozen dataclasses (``DeviceRecord``, ``TransferRecord``, ``StoredSegment``,
``NewDocument``, ``ArrivalKey``); no dicts cross this line. ``tests/central/test_ingest_store.py`` is
the contract suite every implementation passes: SQLite (``SqliteIngestStore``, the default, over the
plain functions of ``central.catalog``) and PostgreSQL (``central.ingest.pgstore``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Protocol

from central import catalog
from central.catalog import (
    ArrivalKey,
    AwaitingDocument,
    DeviceLoad,
    DeviceRecord,
    NewDocument,
    NoticeRecord,
    StoredSegment,
    TransferRecord,
)
from protocol.ranges import RangeSet
from protocol.transfer import HeldSegment

try:   # the errors a catalog backend raises for its own trouble (not a device's)
    from psycopg import Error as _PostgresError
except ImportError:   # psycopg is only needed with a PostgreSQL catalog
    class _PostgresError(Exception):  # type: ignore[no-redef]
        """Stands in for psycopg.Error where psycopg is not installed."""

# Our own trouble (disk, database), never a device's: the batch is not acknowledged and comes again.
OUR_TROUBLE: tuple[type[Exception], ...] = (OSError, sqlite3.Error, _PostgresError)


class IngestStore(Protocol):
    """Ingest-side catalog operations, inside a transaction someone else commits."""

    # devices
    def get_device(self, device_id: str) -> DeviceRecord | None: ...
    def touch_devices(self, device_ids: Iterable[str], at: str) -> None: ...
    def update_device_status(self, device_id: str, *, online: bool, backlog_docs: int, backlog_bytes: int,
                             last_error: str | None, status_json: str, at: str) -> None: ...
    def mark_offline(self, device_id: str, *, at: str) -> None: ...
    def record_seq_collision(self, *, device: str, seq: int, tid: str, other_tid: str, at: str) -> bool: ...

    # admission state (central.ingest.quota); device_load locks the device's row where workers race
    def device_load(self, device: str) -> DeviceLoad: ...
    def set_init_tokens(self, device: str, level: float, at: float) -> None: ...
    def set_strikes(self, device: str, level: float, at: float, *, flag_at: str | None) -> bool: ...
    def clear_misbehaving(self, *, quiet_since: float) -> list[str]: ...
    def expire_stalled(self, *, before: str, limit: int = 500) -> list[tuple[str, str]]: ...
    def revive_transfer(self, tid: str) -> None: ...
    def journals_of_receiving(self) -> list[str]: ...
    def transfers_in_journal(self, log: str) -> list[tuple[str, str]]: ...
    def forget_held(self, tid: str, reason: str) -> None: ...

    # transfers and the segment log
    def get_transfer(self, tid: str) -> TransferRecord | None: ...
    def get_transfers(self, tids: Iterable[str]) -> dict[str, TransferRecord]: ...
    def transfer_by_seq(self, device: str, seq: int) -> TransferRecord | None: ...
    def insert_transfer(self, *, tid: str, device: str, seq: int, header: bytes,
                        size: int | None) -> None: ...
    def reject_transfer(self, tid: str, error: str, error_class: str) -> None: ...
    def store_transfer(self, tid: str, *, document_id: int, duplicate: bool, receipt: bytes,
                       stored_at: str) -> None: ...
    def add_segments(self, tid: str, segments: Iterable[StoredSegment]) -> None: ...
    def set_held(self, tid: str, held: RangeSet) -> None: ...
    def segment_at(self, tid: str, offset: int) -> HeldSegment | None: ...
    def stored_segments(self, tid: str) -> list[StoredSegment]: ...
    def journal_in_use(self, log: str) -> bool: ...
    def segments_in_journal(self, log: str) -> list[tuple[str, StoredSegment, bool]]: ...
    def move_segments(self, moves: Iterable[tuple[str, int, str, int]]) -> None: ...

    # jobs
    def add_job(self, tid: str) -> None: ...
    def claim_job(self, tid: str, *, worker: str, lease_s: float) -> bool: ...
    def claimable_jobs(self, *, worker: str, limit: int = 100) -> list[str]: ...
    def release_job(self, tid: str, error: str) -> None: ...
    def complete_transfers_without_job(self, limit: int = 100) -> list[str]: ...

    # objects, arrivals, fixity
    def object_exists(self, sha256: str) -> bool: ...
    def arrival_by_key(self, key: ArrivalKey) -> int | None: ...
    def insert_document(self, doc: NewDocument, *, awaiting: bool = False) -> int: ...
    def add_fixity(self, *, event: str, device: str, tid: str, at: str, document_id: int | None = None,
                   original_sha256: str | None = None, package_sha256: str | None = None,
                   ciphertext_sha256: str | None = None, detail: str | None = None) -> None: ...

    # notices: arrivals catalogued before their original is stored
    def get_notice(self, tid: str) -> NoticeRecord | None: ...
    def notice_by_seq(self, device: str, seq: int) -> NoticeRecord | None: ...
    def insert_notice(self, *, tid: str, device: str, seq: int, payload_sha256: str,
                      document_id: int | None, at: str) -> None: ...
    def awaiting_load(self, device: str) -> tuple[int, int]: ...
    def awaiting_document(self, *, device: str | None = None, tid: str | None = None,
                          doc_id: int | None = None) -> AwaitingDocument | None: ...
    def complete_document(self, doc_id: int, doc: NewDocument) -> None: ...
    def drop_awaiting_document(self, doc_id: int, *, successor: int) -> None: ...
    def replaced_awaiting(self, device: str, sha256: str) -> list[int]: ...


class AdminStore(IngestStore, Protocol):
    """What enrolment, revocation and search need besides (every backend has them too)."""

    def add_device(self, device_id: str, verify_key: bytes, *, replaces: str | None = None) -> None: ...
    def set_device_status(self, device_id: str, status: str) -> bool: ...
    def search(self, q: str, *, device: str | None = None, limit: int = 100) -> list[int]: ...


class SqliteIngestStore:
    """``IngestStore`` over one SQLite connection (the plain functions of ``central.catalog``)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def get_device(self, device_id: str) -> DeviceRecord | None:
        return catalog.get_device(self.conn, device_id)

    def touch_devices(self, device_ids: Iterable[str], at: str) -> None:
        catalog.touch_devices(self.conn, device_ids, at)

    def update_device_status(self, device_id: str, *, online: bool, backlog_docs: int, backlog_bytes: int,
                             last_error: str | None, status_json: str, at: str) -> None:
        catalog.update_device_status(self.conn, device_id, online=online, backlog_docs=backlog_docs,
                                     backlog_bytes=backlog_bytes, last_error=last_error,
                                     status_json=status_json, at=at)

    def mark_offline(self, device_id: str, *, at: str) -> None:
        catalog.mark_offline(self.conn, device_id, at=at)

    def record_seq_collision(self, *, device: str, seq: int, tid: str, other_tid: str, at: str) -> bool:
        return catalog.record_seq_collision(self.conn, device=device, seq=seq, tid=tid, other_tid=other_tid,
                                            at=at)

    def device_load(self, device: str) -> DeviceLoad:
        return catalog.device_load(self.conn, device)

    def set_init_tokens(self, device: str, level: float, at: float) -> None:
        catalog.set_init_tokens(self.conn, device, level, at)

    def set_strikes(self, device: str, level: float, at: float, *, flag_at: str | None) -> bool:
        return catalog.set_strikes(self.conn, device, level, at, flag_at=flag_at)

    def clear_misbehaving(self, *, quiet_since: float) -> list[str]:
        return catalog.clear_misbehaving(self.conn, quiet_since=quiet_since)

    def expire_stalled(self, *, before: str, limit: int = 500) -> list[tuple[str, str]]:
        return catalog.expire_stalled(self.conn, before=before, limit=limit)

    def revive_transfer(self, tid: str) -> None:
        catalog.revive_transfer(self.conn, tid)

    def journals_of_receiving(self) -> list[str]:
        return catalog.journals_of_receiving(self.conn)

    def transfers_in_journal(self, log: str) -> list[tuple[str, str]]:
        return catalog.transfers_in_journal(self.conn, log)

    def forget_held(self, tid: str, reason: str) -> None:
        catalog.forget_held(self.conn, tid, reason)

    def get_transfer(self, tid: str) -> TransferRecord | None:
        return catalog.get_transfer(self.conn, tid)

    def get_transfers(self, tids: Iterable[str]) -> dict[str, TransferRecord]:
        return catalog.get_transfers(self.conn, tids)

    def transfer_by_seq(self, device: str, seq: int) -> TransferRecord | None:
        return catalog.transfer_by_seq(self.conn, device, seq)

    def insert_transfer(self, *, tid: str, device: str, seq: int, header: bytes, size: int | None) -> None:
        catalog.insert_transfer(self.conn, tid=tid, device=device, seq=seq, header=header, size=size)

    def reject_transfer(self, tid: str, error: str, error_class: str) -> None:
        catalog.reject_transfer(self.conn, tid, error, error_class)

    def store_transfer(self, tid: str, *, document_id: int, duplicate: bool, receipt: bytes,
                       stored_at: str) -> None:
        catalog.store_transfer(self.conn, tid, document_id=document_id, duplicate=duplicate, receipt=receipt,
                               stored_at=stored_at)

    def add_segments(self, tid: str, segments: Iterable[StoredSegment]) -> None:
        catalog.add_segments(self.conn, tid, segments)

    def set_held(self, tid: str, held: RangeSet) -> None:
        catalog.set_held(self.conn, tid, held)

    def segment_at(self, tid: str, offset: int) -> HeldSegment | None:
        return catalog.segment_at(self.conn, tid, offset)

    def stored_segments(self, tid: str) -> list[StoredSegment]:
        return catalog.stored_segments(self.conn, tid)

    def journal_in_use(self, log: str) -> bool:
        return catalog.journal_in_use(self.conn, log)

    def segments_in_journal(self, log: str) -> list[tuple[str, StoredSegment, bool]]:
        return catalog.segments_in_journal(self.conn, log)

    def move_segments(self, moves: Iterable[tuple[str, int, str, int]]) -> None:
        catalog.move_segments(self.conn, moves)

    def add_job(self, tid: str) -> None:
        catalog.add_job(self.conn, tid)

    def claim_job(self, tid: str, *, worker: str, lease_s: float) -> bool:
        return catalog.claim_job(self.conn, tid, worker=worker, lease_s=lease_s)

    def claimable_jobs(self, *, worker: str, limit: int = 100) -> list[str]:
        return catalog.claimable_jobs(self.conn, worker=worker, limit=limit)

    def release_job(self, tid: str, error: str) -> None:
        catalog.release_job(self.conn, tid, error)

    def complete_transfers_without_job(self, limit: int = 100) -> list[str]:
        return catalog.complete_transfers_without_job(self.conn, limit)

    def object_exists(self, sha256: str) -> bool:
        return catalog.object_exists(self.conn, sha256)

    def arrival_by_key(self, key: ArrivalKey) -> int | None:
        return catalog.arrival_by_key(self.conn, key)

    def insert_document(self, doc: NewDocument, *, awaiting: bool = False) -> int:
        return catalog.insert_document(self.conn, doc, awaiting=awaiting)

    def get_notice(self, tid: str) -> NoticeRecord | None:
        return catalog.get_notice(self.conn, tid)

    def notice_by_seq(self, device: str, seq: int) -> NoticeRecord | None:
        return catalog.notice_by_seq(self.conn, device, seq)

    def insert_notice(self, *, tid: str, device: str, seq: int, payload_sha256: str,
                      document_id: int | None, at: str) -> None:
        catalog.insert_notice(self.conn, tid=tid, device=device, seq=seq, payload_sha256=payload_sha256,
                              document_id=document_id, at=at)

    def awaiting_load(self, device: str) -> tuple[int, int]:
        return catalog.awaiting_load(self.conn, device)

    def awaiting_document(self, *, device: str | None = None, tid: str | None = None,
                          doc_id: int | None = None) -> AwaitingDocument | None:
        return catalog.awaiting_document(self.conn, device=device, tid=tid, doc_id=doc_id)

    def complete_document(self, doc_id: int, doc: NewDocument) -> None:
        catalog.complete_document(self.conn, doc_id, doc)

    def drop_awaiting_document(self, doc_id: int, *, successor: int) -> None:
        catalog.drop_awaiting_document(self.conn, doc_id, successor=successor)

    def add_device(self, device_id: str, verify_key: bytes, *, replaces: str | None = None) -> None:
        catalog.add_device(self.conn, device_id, verify_key, replaces=replaces)

    def replaced_awaiting(self, device: str, sha256: str) -> list[int]:
        return catalog.replaced_awaiting(self.conn, device, sha256)

    def set_device_status(self, device_id: str, status: str) -> bool:
        return catalog.set_device_status(self.conn, device_id, status)

    def search(self, q: str, *, device: str | None = None, limit: int = 100) -> list[int]:
        return [int(d["id"]) for d in catalog.search_documents(self.conn, q=q, device=device, limit=limit)]

    def add_fixity(self, *, event: str, device: str, tid: str, at: str, document_id: int | None = None,
                   original_sha256: str | None = None, package_sha256: str | None = None,
                   ciphertext_sha256: str | None = None, detail: str | None = None) -> None:
        catalog.add_fixity(self.conn, event=event, device=device, tid=tid, at=at, document_id=document_id,
                           original_sha256=original_sha256, package_sha256=package_sha256,
                           ciphertext_sha256=ciphertext_sha256, detail=detail)
