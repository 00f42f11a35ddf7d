"""Fixity and provenance events in the spirit of PREMIS (who, what, which hashes, when, outcome), and the
``sohoa central verify`` check that re-hashes every stored object and records what it found.

Ingest writes its own events (``catalog.add_fixity``); this module adds the events that are not a
device's transfer: verification of stored objects, downloads, metadata corrections and the archival
copy. SQL in plain functions that never commit (the caller owns the transaction).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from central import catalog
from central.paths import CentralPaths
from central.storage import ObjectStore, file_sha256

log = logging.getLogger("sohoa.central.fixity")

# The kinds of stored object a check or download is about.
ORIGINAL, PACKAGE, ARCHIVAL = "original", "package", "archival"


def add_event(conn: sqlite3.Connection, *, event: str, actor: str, document_id: int | None = None,
              object_sha256: str | None = None, outcome: str | None = None,
              detail: dict[str, Any] | None = None, original_sha256: str | None = None,
              device: str | None = None, tid: str | None = None, at: str | None = None) -> None:
    conn.execute(
        "INSERT INTO fixity (at, event, device, tid, document_id, original_sha256, detail, actor,"
        " object_sha256, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (at or catalog.utc_now(), event, device, tid, document_id, original_sha256,
         json.dumps(detail, ensure_ascii=False, sort_keys=True) if detail is not None else None,
         actor, object_sha256, outcome))


def document_events(conn: sqlite3.Connection, document_id: int, sha256: str, *,
                    limit: int = 1000) -> list[dict[str, Any]]:
    """Every event about this arrival or its stored objects (original, package, archival copy), oldest
    first. Verifications are per object, so an object shared by several arrivals shows them in each."""
    rows = conn.execute(
        "SELECT id, at, event, device, tid, document_id, original_sha256, package_sha256,"
        " ciphertext_sha256, object_sha256, actor, outcome, detail FROM fixity"
        " WHERE document_id = ? OR object_sha256 IN ("
        "   SELECT ? UNION SELECT package_sha256 FROM documents WHERE id = ?"
        "   UNION SELECT archival_sha256 FROM archive_jobs WHERE sha256 = ?)"
        " ORDER BY id LIMIT ?", (document_id, sha256, document_id, sha256, limit))
    events = []
    for row in rows:
        event = {k: row[k] for k in row.keys() if row[k] is not None and k != "detail"}  # noqa: SIM118
        # Ingest rows predate ``actor``: the device that sent the transfer is who acted.
        event.setdefault("actor", f"device:{row['device']}" if row["device"] else "central")
        if row["detail"]:
            event["detail"] = json.loads(row["detail"])
        events.append(event)
    return events


# -- verification -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StoredObject:
    kind: str           # ORIGINAL, PACKAGE or ARCHIVAL
    sha256: str
    document_id: int | None


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    rebuilds: int = 0    # archival copies found bad and queued to be built again

    @property
    def ok(self) -> bool:
        return not self.problems


def stored_objects(conn: sqlite3.Connection) -> Iterator[StoredObject]:
    """Every object the catalog says is stored, once each (an object may serve several arrivals)."""
    for row in conn.execute("SELECT sha256 FROM objects ORDER BY sha256"):
        yield StoredObject(ORIGINAL, row[0], None)
    for row in conn.execute("SELECT package_sha256, min(id) FROM documents WHERE state = 'stored'"
                            " GROUP BY package_sha256"
                            " ORDER BY package_sha256"):
        yield StoredObject(PACKAGE, row[0], int(row[1]))
    for row in conn.execute("SELECT archival_sha256, document_id FROM archive_jobs"
                            " WHERE state = 'done' ORDER BY archival_sha256"):
        yield StoredObject(ARCHIVAL, row[0], int(row[1]))


def verify_store(paths: CentralPaths, *, actor: str = "cli") -> VerifyReport:
    """Re-hash every stored object and record the outcome: one event per run, one per bad object.

    A bad archival copy is derived data: its job is queued again, so the worker rebuilds it from the
    original (which is checked in the same run). A bad original or package cannot be rebuilt here;
    ingest repairs it if a device sends the same bytes again.
    """
    store = ObjectStore(paths.objects)
    started = time.monotonic()
    report = VerifyReport()
    reader = catalog.connect(paths.catalog, readonly=True)
    try:
        objects = list(stored_objects(reader))
    finally:
        reader.close()
    failures: list[tuple[StoredObject, str, str | None]] = []
    for obj in objects:
        path = store.path_for(obj.sha256)
        report.checked += 1
        try:
            found: str | None = file_sha256(path)
            report.bytes += path.stat().st_size
        except FileNotFoundError:
            found = None
        if found == obj.sha256:
            continue
        what = f"{obj.kind} {obj.sha256}" + (f" (document {obj.document_id})" if obj.document_id else "")
        problem = "is missing" if found is None else "does not hash to its name"
        report.problems.append(f"{what} {problem}")
        failures.append((obj, problem, found))
    report.seconds = time.monotonic() - started
    conn = catalog.connect(paths.catalog)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for obj, problem, found in failures:
            add_event(conn, event="fixity_check", actor=actor, object_sha256=obj.sha256,
                      document_id=obj.document_id, outcome="failure",
                      detail={"kind": obj.kind, "problem": problem, "found_sha256": found})
            if obj.kind == ARCHIVAL:
                report.rebuilds += conn.execute(
                    "UPDATE archive_jobs SET state = 'pending', next_attempt_at = ?, archival_sha256 = NULL,"
                    " archival_size = NULL, candidate_sha256 = NULL, last_error = ?, updated_at = ?"
                    " WHERE archival_sha256 = ? AND state = 'done'",
                    (catalog.utc_now(), f"stored archival copy {problem}: rebuilding", catalog.utc_now(),
                     obj.sha256)).rowcount
        add_event(conn, event="fixity_check", actor=actor, outcome="success" if report.ok else "failure",
                  detail={"objects": report.checked, "bytes": report.bytes,
                          "problems": len(report.problems), "seconds": round(report.seconds, 3),
                          "archival_rebuilds": report.rebuilds})
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()
    log.info("verified %d stored objects (%d bytes) in %.1f s: %d problem(s)", report.checked, report.bytes,
             report.seconds, len(report.problems))
    return report
