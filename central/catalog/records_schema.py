"""Catalog schema v4 (issue 9): archival-copy jobs, operator corrections of the extracted metadata,
and fixity events that are not a device's transfer (verification, download, correction, archival).

Run by ``central.catalog.migrate`` as the step from v3 (also on a new catalog, after the v3 schema is
created), inside its one ``BEGIN IMMEDIATE`` transaction. Plain SQL and no imports from the catalog,
so the catalog can import this module.
"""

from __future__ import annotations

import sqlite3

# The fixity table is rebuilt (SQLite's table-rebuild recipe, ids kept): device and tid become
# optional, because a verification of a stored object, a download or a correction is nobody's
# transfer; ``actor`` says who (an operator, a token, ``cli``, ``central``), ``object_sha256`` which
# stored object the event is about, ``outcome`` success or failure where the event is a check.
FIXITY_V3 = """
CREATE TABLE fixity_v3 (
    id                INTEGER PRIMARY KEY,
    at                TEXT NOT NULL,
    event             TEXT NOT NULL,
    device            TEXT,
    tid               TEXT,
    document_id       INTEGER,
    original_sha256   TEXT,
    package_sha256    TEXT,
    ciphertext_sha256 TEXT,
    detail            TEXT,
    actor             TEXT,
    object_sha256     TEXT,
    outcome           TEXT CHECK (outcome IN ('success', 'failure'))
)
"""

TABLES = (
    # One archival copy per stored original (content once): the job that builds it, then its result.
    # ``document_id`` is the arrival whose package (hOCR, page geometry) the copy is built from.
    """
    CREATE TABLE archive_jobs (
        sha256           TEXT PRIMARY KEY REFERENCES objects (sha256),
        document_id      INTEGER NOT NULL REFERENCES documents (id),
        state            TEXT NOT NULL CHECK (state IN ('pending', 'running', 'failed', 'done')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  TEXT NOT NULL,
        owner            TEXT,              -- the worker holding the lease
        lease_until      TEXT,              -- a running job whose lease ran out is taken again
        candidate_sha256 TEXT,              -- built and being stored: a retry finishes, not rebuilds
        archival_sha256  TEXT,
        archival_size    INTEGER,
        last_error       TEXT,
        created_at       TEXT NOT NULL,
        updated_at       TEXT NOT NULL,
        done_at          TEXT
    ) WITHOUT ROWID
    """,
    "CREATE INDEX archive_jobs_due ON archive_jobs (state, next_attempt_at)",
    # How far the job reconciler has looked at documents (ids only grow: one writer at a time).
    """
    CREATE TABLE archive_cursor (
        id               INTEGER PRIMARY KEY CHECK (id = 1),
        last_document_id INTEGER NOT NULL
    )
    """,
    # Operator corrections of the extracted fields; the extracted value stays in documents.metadata.
    # ``value`` NULL: the operator cleared the field. The latest row per (document, field) wins.
    """
    CREATE TABLE metadata_corrections (
        id          INTEGER PRIMARY KEY,
        document_id INTEGER NOT NULL REFERENCES documents (id),
        field       TEXT NOT NULL,
        value       TEXT,
        previous    TEXT,
        actor       TEXT NOT NULL,
        at          TEXT NOT NULL,
        note        TEXT
    )
    """,
    "CREATE INDEX metadata_corrections_by_document ON metadata_corrections (document_id, field, id)",
)


def v3_to_v4(conn: sqlite3.Connection) -> None:
    conn.execute(FIXITY_V3)
    conn.execute("INSERT INTO fixity_v3 (id, at, event, device, tid, document_id, original_sha256,"
                 " package_sha256, ciphertext_sha256, detail)"
                 " SELECT id, at, event, device, tid, document_id, original_sha256, package_sha256,"
                 " ciphertext_sha256, detail FROM fixity")
    conn.execute("DROP TABLE fixity")
    conn.execute("ALTER TABLE fixity_v3 RENAME TO fixity")
    conn.execute("CREATE INDEX fixity_by_document ON fixity (document_id, id)")
    conn.execute("CREATE INDEX fixity_by_object ON fixity (object_sha256, id)")
    for statement in TABLES:
        conn.execute(statement)
