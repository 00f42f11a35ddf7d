"""Journal compaction: a transfer kept barely alive must not pin whole journal files.

A journal file is deleted once no segment row points into it (``central.ingest.staging``), and a
transfer without progress for 72 hours expires (``central.ingest.expire``). Between the two, a box —
hostile, or a flaky link — that sends one segment every few hours keeps its transfer alive and with it
every 64 MiB file its few segments landed in. Compaction copies the live segments of such a file into
the current journal and points their rows there, so the old file is freed by the next ``collect``.

Rules:
  - It runs inside the writer's transaction (the reconciler's sweep), so the copies are made durable
    by the same ``before_commit`` as any segment and the rows move only if that commit succeeds. A
    crash before the commit leaves copies nothing points at (never read, freed with their file).
  - Only this worker's closed files, untouched for ``min_age_s``, whose live bytes are at most
    ``live_fraction`` of the file: compaction is rare and cheap, and never touches a file being filled.
  - A file is left alone if any of its segments belongs to a transfer with an assembly job: an
    assembler may be reading those rows' old positions right now.
  - Every copied segment's CRC is checked first; bytes that do not match are not moved (the
    assembly will find and report them, as it would have).
  - At most ``max_bytes`` are copied per sweep, so one sweep never holds the writer for long.
"""

from __future__ import annotations

import logging
import zlib

from central.catalog import StoredSegment
from central.ingest.staging import SegmentJournal, SegmentReader
from central.ingest.store import IngestStore

log = logging.getLogger("sohoa.central.ingest")

LIVE_FRACTION = 0.25
MIN_AGE_S = 3600.0
MAX_BYTES = 64 * 1024 * 1024


def compact(db: IngestStore, journal: SegmentJournal, *, now: float, live_fraction: float = LIVE_FRACTION,
            min_age_s: float = MIN_AGE_S, max_bytes: int = MAX_BYTES) -> None:
    """Move the live segments of this worker's sparse, idle journal files into the current one
    (the files are freed by the next ``collect``, after this transaction commits)."""
    reader = SegmentReader(journal.directory)
    files: list[str] = []
    moved: list[tuple[str, int, str, int]] = []
    copied = 0
    for name in journal.own_files():
        if name == journal.current:
            continue
        path = journal.directory / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if now - stat.st_mtime < min_age_s:
            continue
        rows = db.segments_in_journal(name)
        live = sum(seg.length for _, seg, _ in rows)
        if not rows or live > live_fraction * stat.st_size or not all(movable for _, _, movable in rows):
            continue
        if copied and copied + live > max_bytes:
            break
        try:
            moves = _copy(reader, journal, name, [(tid, seg) for tid, seg, _ in rows])
        except OSError as exc:   # unreadable: left for the assembly to report, as it would have been
            log.warning("journal %s not compacted: %s", name, exc)
            continue
        if moves is None:
            continue
        moved += moves
        copied += live
        files.append(name)
    if moved:
        db.move_segments(moved)
        log.info("compacted %d journal file(s): %d live segment(s), %d bytes moved to %s", len(files),
                 len(moved), copied, journal.current)


def _copy(reader: SegmentReader, journal: SegmentJournal, name: str,
          rows: list[tuple[str, StoredSegment]]) -> list[tuple[str, int, str, int]] | None:
    """Append each segment's bytes to the current journal; None (nothing to move) if one is damaged."""
    moves: list[tuple[str, int, str, int]] = []
    for tid, seg in rows:
        (_, data), = reader.chunks(tid, [seg])
        if zlib.crc32(data) != seg.crc:
            log.warning("journal %s: segment %s@%d does not match its CRC; the file is not compacted",
                        name, tid, seg.offset)
            return None
        new_log, pos = journal.append(data)
        moves.append((tid, seg.offset, new_log, pos))
    return moves

