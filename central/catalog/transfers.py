"""Transfers, the segment log, per-device admission state and expiry, assembly jobs."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from central.catalog.schema import utc_now
from protocol.ranges import RangeSet
from protocol.transfer import HeldSegment


@dataclass(frozen=True, slots=True)
class TransferRecord:
    tid: str
    device: str
    seq: int
    header: bytes
    state: str
    error: str | None
    error_class: str | None
    receipt: bytes | None
    size: int | None = None                      # the signed ciphertext size
    held: tuple[tuple[int, int], ...] = ()       # durably held, coalesced [start, end) ranges
    held_bytes: int = 0

    @property
    def complete(self) -> bool:
        return self.size is not None and self.held_bytes == self.size and (
            self.size == 0 or self.held == ((0, self.size),))


def ranges_json(ranges: RangeSet) -> str:
    return json.dumps(ranges.as_list(), separators=(",", ":"))


def _ranges(text: str) -> tuple[tuple[int, int], ...]:
    return tuple((int(s), int(e)) for s, e in json.loads(text))


def _transfer(row: sqlite3.Row | None) -> TransferRecord | None:
    if row is None:
        return None
    return TransferRecord(row["tid"], row["device"], row["seq"], bytes(row["header"]), row["state"],
                          row["error"], row["error_class"],
                          bytes(row["receipt"]) if row["receipt"] is not None else None,
                          row["size"], _ranges(row["held"]), row["held_bytes"])


_TRANSFER_COLUMNS = "tid, device, seq, header, state, error, error_class, receipt, size, held, held_bytes"


def get_transfer(conn: sqlite3.Connection, tid: str) -> TransferRecord | None:
    return _transfer(conn.execute(f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE tid = ?",  # noqa: S608
                                  (tid,)).fetchone())


def get_transfers(conn: sqlite3.Connection, tids: Iterable[str]) -> dict[str, TransferRecord]:
    """Several transfers in one query (the batch stage reads every transfer it touches at once)."""
    wanted = list(tids)
    found: dict[str, TransferRecord] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {_TRANSFER_COLUMNS} FROM transfers"  # noqa: S608
                                f" WHERE tid IN ({marks})", chunk):
            record = _transfer(row)
            assert record is not None
            found[record.tid] = record
    return found


def transfer_by_seq(conn: sqlite3.Connection, device: str, seq: int) -> TransferRecord | None:
    return _transfer(conn.execute(
        f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE device = ? AND seq = ?",  # noqa: S608
        (device, seq)).fetchone())


def insert_transfer(conn: sqlite3.Connection, *, tid: str, device: str, seq: int, header: bytes,
                    size: int | None = None) -> None:
    now = utc_now()
    conn.execute("INSERT INTO transfers (tid, device, seq, header, state, created_at, updated_at, size)"
                 " VALUES (?, ?, ?, ?, 'receiving', ?, ?, ?)", (tid, device, seq, header, now, now, size))


def reject_transfer(conn: sqlite3.Connection, tid: str, error: str, error_class: str) -> None:
    """The transfer is refused for good; its segments (and any job) are no longer needed."""
    conn.execute("UPDATE transfers SET state = 'rejected', error = ?, error_class = ?, updated_at = ?"
                 " WHERE tid = ?", (error, error_class, utc_now(), tid))
    conn.execute("DELETE FROM segments WHERE tid = ?", (tid,))
    conn.execute("DELETE FROM jobs WHERE tid = ?", (tid,))


def store_transfer(conn: sqlite3.Connection, tid: str, *, document_id: int, duplicate: bool,
                   receipt: bytes, stored_at: str) -> None:
    conn.execute("UPDATE transfers SET state = 'stored', document_id = ?, duplicate = ?, receipt = ?,"
                 " stored_at = ?, updated_at = ? WHERE tid = ?",
                 (document_id, int(duplicate), receipt, stored_at, stored_at, tid))
    # The segment log is only needed to resume; the stored objects are now the truth.
    conn.execute("DELETE FROM segments WHERE tid = ?", (tid,))
    conn.execute("DELETE FROM jobs WHERE tid = ?", (tid,))


@dataclass(frozen=True, slots=True)
class StoredSegment:
    """A held segment and where its bytes are: journal file ``log`` at ``pos`` (None: the legacy
    ``staging/<tid>.part`` at ``offset``)."""

    offset: int
    length: int
    crc: int
    log: str | None
    pos: int | None


def add_segments(conn: sqlite3.Connection, tid: str,
                 segments: Iterable[HeldSegment | StoredSegment]) -> None:
    conn.executemany("INSERT OR IGNORE INTO segments (tid, offset, length, crc, log, pos)"
                     " VALUES (?, ?, ?, ?, ?, ?)",
                     [(tid, s.offset, s.length, s.crc, getattr(s, "log", None), getattr(s, "pos", None))
                      for s in segments])


def set_held(conn: sqlite3.Connection, tid: str, held: RangeSet) -> None:
    conn.execute("UPDATE transfers SET held = ?, held_bytes = ?, updated_at = ? WHERE tid = ?",
                 (ranges_json(held), held.total(), utc_now(), tid))


def held_segments(conn: sqlite3.Connection, tid: str) -> list[HeldSegment]:
    rows = conn.execute("SELECT offset, length, crc FROM segments WHERE tid = ? ORDER BY offset", (tid,))
    return [HeldSegment(r["offset"], r["length"], r["crc"]) for r in rows]


def segment_at(conn: sqlite3.Connection, tid: str, offset: int) -> HeldSegment | None:
    row = conn.execute("SELECT length, crc FROM segments WHERE tid = ? AND offset = ?",
                       (tid, offset)).fetchone()
    return HeldSegment(offset, row["length"], row["crc"]) if row else None


def stored_segments(conn: sqlite3.Connection, tid: str) -> list[StoredSegment]:
    rows = conn.execute("SELECT offset, length, crc, log, pos FROM segments WHERE tid = ? ORDER BY offset",
                        (tid,))
    return [StoredSegment(r["offset"], r["length"], r["crc"], r["log"], r["pos"]) for r in rows]


def journal_in_use(conn: sqlite3.Connection, log: str) -> bool:
    return conn.execute("SELECT 1 FROM segments WHERE log = ? LIMIT 1", (log,)).fetchone() is not None


def segments_in_journal(conn: sqlite3.Connection, log: str) -> list[tuple[str, StoredSegment, bool]]:
    """Every segment row pointing into journal file ``log``: (tid, segment, movable). Movable: its
    transfer is receiving and has no assembly job (no assembler can be reading its positions)."""
    rows = conn.execute(
        "SELECT s.tid, s.offset, s.length, s.crc, s.log, s.pos,"
        " t.state = 'receiving' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.tid = s.tid) AS movable"
        " FROM segments s JOIN transfers t ON t.tid = s.tid WHERE s.log = ? ORDER BY s.log, s.pos", (log,))
    return [(str(r[0]), StoredSegment(r[1], r[2], r[3], r[4], r[5]), bool(r[6])) for r in rows]


def move_segments(conn: sqlite3.Connection, moves: Iterable[tuple[str, int, str, int]]) -> None:
    """Point segments (tid, offset) at their copies (log, pos): journal compaction."""
    conn.executemany("UPDATE segments SET log = ?, pos = ? WHERE tid = ? AND offset = ?",
                     [(new_log, pos, tid, offset) for tid, offset, new_log, pos in moves])


# -- admission state and expiry (central.ingest.quota) -------------------------------------------

@dataclass(frozen=True, slots=True)
class DeviceLoad:
    """What admission weighs before a device's new transfer: its receiving transfers (count and signed
    bytes: what it announced and central has not stored) and its two buckets."""

    open_transfers: int = 0
    open_bytes: int = 0
    init_tokens: float | None = None     # None: a full bucket (never spent)
    init_tokens_at: float | None = None
    strikes: float = 0.0
    strikes_at: float | None = None
    misbehaving_since: str | None = None


def device_load(conn: sqlite3.Connection, device: str) -> DeviceLoad:
    # A range of transfers_by_device (device, 'receiving'): at most the open-transfer cap of rows.
    row = conn.execute(
        "SELECT d.init_tokens, d.init_tokens_at, d.strikes, d.strikes_at, d.misbehaving_since,"
        " (SELECT count(*) FROM transfers t WHERE t.device = d.id AND t.state = 'receiving') AS n,"
        " (SELECT coalesce(sum(t.size), 0) FROM transfers t WHERE t.device = d.id AND t.state = 'receiving')"
        " AS b FROM devices d WHERE d.id = ?", (device,)).fetchone()
    if row is None:
        return DeviceLoad()
    return DeviceLoad(int(row["n"]), int(row["b"]), row["init_tokens"], row["init_tokens_at"],
                      float(row["strikes"]), row["strikes_at"], row["misbehaving_since"])


def set_init_tokens(conn: sqlite3.Connection, device: str, level: float, at: float) -> None:
    conn.execute("UPDATE devices SET init_tokens = ?, init_tokens_at = ? WHERE id = ?", (level, at, device))


def set_strikes(conn: sqlite3.Connection, device: str, level: float, at: float, *,
                flag_at: str | None) -> bool:
    """Record the rejected-transfer bucket; ``flag_at``: the device is over its budget (kept if already
    flagged). True when the flag is newly raised."""
    row = conn.execute("SELECT misbehaving_since IS NULL FROM devices WHERE id = ?", (device,)).fetchone()
    raised = flag_at is not None and row is not None and bool(row[0])
    conn.execute("UPDATE devices SET strikes = ?, strikes_at = ?,"
                 " misbehaving_since = coalesce(misbehaving_since, ?) WHERE id = ?",
                 (level, at, flag_at, device))
    return raised


def clear_misbehaving(conn: sqlite3.Connection, *, quiet_since: float) -> list[str]:
    """Lower the flag of devices with no counted rejection since ``quiet_since`` (epoch seconds)."""
    rows = conn.execute("UPDATE devices SET misbehaving_since = NULL, strikes = 0"
                        " WHERE misbehaving_since IS NOT NULL AND coalesce(strikes_at, 0) < ? RETURNING id",
                        (quiet_since,)).fetchall()
    return sorted(str(r[0]) for r in rows)


def expire_stalled(conn: sqlite3.Connection, *, before: str, limit: int = 500) -> list[tuple[str, str]]:
    """Receiving transfers without progress since ``before`` (and no assembly job) become ``expired``:
    their segment rows go (the journal files they pinned can then be deleted), the row stays so a late
    segment is answered UNKNOWN and a new init starts the transfer again. Returns (tid, device)."""
    rows = conn.execute("SELECT t.tid, t.device FROM transfers t LEFT JOIN jobs j ON j.tid = t.tid"
                        " WHERE t.state = 'receiving' AND t.updated_at < ? AND j.tid IS NULL"
                        " ORDER BY t.updated_at LIMIT ?", (before, limit)).fetchall()
    now = utc_now()
    for tid, _ in rows:
        conn.execute("UPDATE transfers SET state = 'expired', held = '[]', held_bytes = 0, error = ?,"
                     " error_class = 'TransferExpired', updated_at = ? WHERE tid = ?",
                     (f"no progress since {before} or earlier: its bytes were dropped", now, tid))
        conn.execute("DELETE FROM segments WHERE tid = ?", (tid,))
    return [(str(t), str(d)) for t, d in rows]


def journals_of_receiving(conn: sqlite3.Connection) -> list[str]:
    """The journal files that receiving transfers' segments point into (start-up checks they exist)."""
    rows = conn.execute("SELECT DISTINCT s.log FROM segments s JOIN transfers t ON t.tid = s.tid"
                        " WHERE t.state = 'receiving' AND s.log IS NOT NULL")
    return [str(r[0]) for r in rows]


def transfers_in_journal(conn: sqlite3.Connection, log: str) -> list[tuple[str, str]]:
    rows = conn.execute("SELECT DISTINCT t.tid, t.device FROM segments s JOIN transfers t ON t.tid = s.tid"
                        " WHERE s.log = ? AND t.state = 'receiving' ORDER BY t.tid", (log,))
    return [(str(r[0]), str(r[1])) for r in rows]


def forget_held(conn: sqlite3.Connection, tid: str, reason: str) -> None:
    """The bytes a receiving transfer's rows point at are gone (its journal file was lost: a central
    restored from a backup without ``staging/``): it becomes ``expired`` like a stalled one, so its next
    segment or fin is answered UNKNOWN and the box sends it again from zero under the same tid."""
    conn.execute("UPDATE transfers SET state = 'expired', held = '[]', held_bytes = 0, error = ?,"
                 " error_class = 'StagingLost', updated_at = ? WHERE tid = ? AND state = 'receiving'",
                 (reason[:2000], utc_now(), tid))
    conn.execute("DELETE FROM segments WHERE tid = ?", (tid,))
    conn.execute("DELETE FROM jobs WHERE tid = ?", (tid,))


def revive_transfer(conn: sqlite3.Connection, tid: str) -> None:
    """An expired transfer's init came again (and was admitted): receiving, from zero."""
    conn.execute("UPDATE transfers SET state = 'receiving', held = '[]', held_bytes = 0, error = NULL,"
                 " error_class = NULL, updated_at = ? WHERE tid = ? AND state = 'expired'", (utc_now(), tid))


# -- jobs ----------------------------------------------------------------------------------------

def add_job(conn: sqlite3.Connection, tid: str, *, kind: str = "assemble") -> None:
    conn.execute("INSERT INTO jobs (tid, kind, created_at) VALUES (?, ?, ?) ON CONFLICT (tid) DO NOTHING",
                 (tid, kind, utc_now()))


def claim_job(conn: sqlite3.Connection, tid: str, *, worker: str, lease_s: float) -> bool:
    """Take the job on ``tid`` unless another worker holds an unexpired lease on it."""
    now = datetime.now(UTC)
    return conn.execute(
        "UPDATE jobs SET claimed_by = ?, lease_until = ?, attempts = attempts + 1"
        " WHERE tid = ? AND (claimed_by IS NULL OR claimed_by = ? OR lease_until < ?)",
        (worker, _iso(now + timedelta(seconds=lease_s)), tid, worker, _iso(now))).rowcount == 1


def claimable_jobs(conn: sqlite3.Connection, *, worker: str, limit: int = 100) -> list[str]:
    """Jobs nobody holds: new, or whose lease ran out (a worker died), or this worker's own."""
    rows = conn.execute("SELECT tid FROM jobs WHERE claimed_by IS NULL OR claimed_by = ? OR lease_until < ?"
                        " ORDER BY created_at LIMIT ?", (worker, utc_now(), limit))
    return [str(r[0]) for r in rows]


def release_job(conn: sqlite3.Connection, tid: str, error: str) -> None:
    """Give the job back (our own trouble, e.g. disk): another try later, by anyone."""
    conn.execute("UPDATE jobs SET claimed_by = NULL, lease_until = NULL, last_error = ? WHERE tid = ?",
                 (error[:2000], tid))


def complete_transfers_without_job(conn: sqlite3.Connection, limit: int = 100) -> list[str]:
    """Receiving transfers whose bytes are all held but that have no job (a crash between the two, or a
    catalog from before the jobs table): the reconciler gives them one."""
    rows = conn.execute("SELECT t.tid FROM transfers t LEFT JOIN jobs j ON j.tid = t.tid"
                        " WHERE t.state = 'receiving' AND t.size IS NOT NULL AND t.held_bytes = t.size"
                        " AND j.tid IS NULL LIMIT ?", (limit,))
    return [str(r[0]) for r in rows]


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def count_active_transfers(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM transfers WHERE state = 'receiving'").fetchone()[0])
