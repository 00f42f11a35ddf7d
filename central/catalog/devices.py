"""Devices: enrolment, presence and status, the fleet's problems and sorting, possible clones."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from central.catalog.schema import _STORED, utc_now


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: str
    verify_key: bytes
    status: str


def add_device(conn: sqlite3.Connection, device_id: str, verify_key: bytes, *,
               replaces: str | None = None) -> None:
    conn.execute("INSERT INTO devices (id, verify_key, enrolled_at, status, replaces)"
                 " VALUES (?, ?, ?, 'active', ?)", (device_id, verify_key, utc_now(), replaces))


# A replacement of a replacement: the chain is followed this far back (a loop cannot be made, since a
# device names its predecessor when it is enrolled, but a bound keeps a hand-edited catalog harmless).
MAX_REPLACED = 16


def replaced_awaiting(conn: sqlite3.Connection, device: str, sha256: str) -> list[int]:
    """Arrivals of the devices ``device`` replaces (directly or through earlier replacements) that
    still await an original with these bytes: the new box has just sent it, so they are complete."""
    rows = conn.execute(
        "WITH RECURSIVE chain (id, depth) AS ("
        " SELECT replaces, 1 FROM devices WHERE id = ? AND replaces IS NOT NULL"
        " UNION SELECT d.replaces, c.depth + 1 FROM devices d JOIN chain c ON d.id = c.id"
        "  WHERE d.replaces IS NOT NULL AND c.depth < ?)"
        " SELECT doc.id FROM documents doc JOIN chain ON doc.device = chain.id"
        " WHERE doc.sha256 = ? AND doc.state = 'awaiting_original' ORDER BY doc.id",
        (device, MAX_REPLACED, sha256))
    return [int(r[0]) for r in rows]


def get_device(conn: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
    row = conn.execute("SELECT id, verify_key, status FROM devices WHERE id = ?", (device_id,)).fetchone()
    return DeviceRecord(row["id"], bytes(row["verify_key"]), row["status"]) if row else None


def set_device_status(conn: sqlite3.Connection, device_id: str, status: str) -> bool:
    cur = conn.execute("UPDATE devices SET status = ? WHERE id = ?", (status, device_id))
    return cur.rowcount == 1


def add_audit(conn: sqlite3.Connection, *, actor: str, action: str, target: str | None = None,
              remote: str | None = None, detail: str | None = None) -> None:
    conn.execute("INSERT INTO audit (at, actor, action, target, remote, detail) VALUES (?, ?, ?, ?, ?, ?)",
                 (utc_now(), actor, action, target, remote, detail))


def list_audit(conn: sqlite3.Connection, limit: int = 1000) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT id, at, actor, action, target, remote, detail FROM audit"
                        " ORDER BY id DESC LIMIT ?", (limit,))
    return [dict(r) for r in rows]


def touch_devices(conn: sqlite3.Connection, device_ids: Iterable[str], at: str) -> None:
    conn.executemany("UPDATE devices SET last_seen = ? WHERE id = ?", [(at, d) for d in device_ids])


def update_device_status(conn: sqlite3.Connection, device_id: str, *, online: bool, backlog_docs: int,
                         backlog_bytes: int, last_error: str | None, status_json: str, at: str) -> None:
    conn.execute(
        "UPDATE devices SET online = ?, backlog_docs = ?, backlog_bytes = ?, last_error = ?,"
        " status_json = ?, last_seen = ? WHERE id = ?",
        (int(online), backlog_docs, backlog_bytes, last_error, status_json, at, device_id))


def mark_offline(conn: sqlite3.Connection, device_id: str, *, at: str) -> None:
    """The box's last will: offline now; everything it last reported stays as it was."""
    conn.execute("UPDATE devices SET online = 0, last_seen = ? WHERE id = ?", (at, device_id))


# Nothing is retained at the broker (retain_available false), so after a restart of central or the
# broker no status is replayed: a box is online only while it keeps talking. It publishes its status
# every 30 s (edge uplink.status_interval); three missed ones and it is offline, will or no will.
STATUS_INTERVAL_S = 30
STALE_AFTER_S = 3 * STATUS_INTERVAL_S

# A backlog older than this is a problem even on a box that is online and reports no error.
STALE_BACKLOG_S = 6 * 3600

# Online at query time: the last word from the box was not its will, and it is recent.
_ONLINE = "(d.online = 1 AND d.last_seen >= :fresh_since)"
# Problem rank, worst first: two boxes sharing one identity (their scans are being refused), then a
# box over its budget of rejected transfers (bombs, bad signatures: a stolen key or a broken box;
# slowed at admission, never revoked), then offline with documents stuck on the box, then a reported
# error, then a backlog that is not draining, then merely offline; revoked boxes are nobody's problem.
_PROBLEM = f"""CASE
    WHEN d.status != 'active' THEN -1
    WHEN d.possible_clone_since IS NOT NULL THEN 6
    WHEN d.misbehaving_since IS NOT NULL THEN 5
    WHEN NOT {_ONLINE} AND d.backlog_docs > 0 THEN 4
    WHEN coalesce(d.last_error, '') != '' THEN 3
    WHEN d.backlog_docs > 0 AND {{age}} >= {STALE_BACKLOG_S} THEN 2
    WHEN NOT {_ONLINE} THEN 1
    ELSE 0 END"""
_PROBLEM_NAMES = {6: "possible clone", 5: "rejected transfers", 4: "offline with backlog", 3: "error",
                  2: "stale backlog", 1: "offline"}
# The age the box reported with its last status; only meaningful while it holds a backlog.
_OLDEST_AGE = ("CASE WHEN d.backlog_docs > 0 THEN"
               " coalesce(json_extract(d.status_json, '$.oldest_age_s'), 0) ELSE 0 END")
# A seek per device in ``transfers_by_device`` (device, state, stored_at): the newest stored time is
# the last entry of the device's 'stored' range. (Without that index SQLite planned this through the
# state index, which at 200k transfers and 3,000 devices took about a minute.)
_LAST_RECEIPT = ("(SELECT max(t.stored_at) FROM transfers t"
                 " WHERE t.device = d.id AND t.state = 'stored')")

# Sortable columns -> SQL; a whitelist, so a query parameter never becomes SQL text.
DEVICE_SORTS: dict[str, str] = {
    "id": "d.id", "status": "d.status", "online": "online", "last_seen": "d.last_seen",
    "backlog_docs": "d.backlog_docs", "backlog_bytes": "d.backlog_bytes", "last_error": "d.last_error",
    "oldest_age_s": "oldest_age_s", "last_receipt": "last_receipt", "problems": "problem_rank",
}


def fresh_since(now: datetime | None = None) -> str:
    """The oldest ``last_seen`` that still counts as online at ``now`` (the catalog's time format)."""
    at = (now or datetime.now(UTC)) - timedelta(seconds=STALE_AFTER_S)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class DevicePage:
    rows: list[dict[str, Any]]
    total: int   # devices matching the filter, whatever the page


def query_devices(conn: sqlite3.Connection, *, sort: str = "id", descending: bool = False,
                  q: str | None = None, limit: int | None = None, offset: int = 0,
                  now: datetime | None = None) -> DevicePage:
    """One page of devices, sorted and filtered in SQL; ``q`` is a case-insensitive id substring.

    Ties are broken by id so pages never overlap or skip a device. ``sort="problems"`` with
    ``descending=True`` puts the worst first, and the oldest backlog first within a rank.
    ``online`` is decided at ``now`` (default: the wall clock), see ``STALE_AFTER_S``.
    """
    if sort not in DEVICE_SORTS:
        raise ValueError(f"cannot sort devices by {sort!r}")
    where = "WHERE instr(lower(d.id), lower(:q)) > 0" if q else ""
    params: dict[str, Any] = {"q": q, "fresh_since": fresh_since(now),
                              "limit": -1 if limit is None else limit, "offset": offset}
    total = int(conn.execute(f"SELECT count(*) FROM devices d {where}", params).fetchone()[0])  # noqa: S608
    direction = "DESC" if descending else "ASC"
    keys = [f"{DEVICE_SORTS[sort]} {direction} NULLS LAST"]
    if sort == "problems":
        keys += [f"oldest_age_s {direction}", f"d.backlog_docs {direction}"]
    keys.append("d.id ASC")
    sql = (f"SELECT d.id, d.status, {_ONLINE} AS online, d.last_seen, d.backlog_docs,"  # noqa: S608
           f" d.backlog_bytes, d.last_error, d.possible_clone_since, {_OLDEST_AGE} AS oldest_age_s,"
           f" {_PROBLEM.format(age=_OLDEST_AGE)} AS problem_rank, {_LAST_RECEIPT} AS last_receipt"
           f" FROM devices d {where} ORDER BY {', '.join(keys)} LIMIT :limit OFFSET :offset")
    rows = conn.execute(sql, params).fetchall()
    return DevicePage([{
        "id": r["id"], "status": r["status"], "online": bool(r["online"]), "last_seen": r["last_seen"],
        "backlog_docs": r["backlog_docs"], "backlog_bytes": r["backlog_bytes"],
        "last_receipt": r["last_receipt"],
        "last_error": r["last_error"], "oldest_age_s": r["oldest_age_s"],
        "problem": _PROBLEM_NAMES.get(r["problem_rank"]),
        # Rare (a flagged box), so its details are looked up per flagged row only.
        "possible_clone": (possible_clone(conn, r["id"], since=r["possible_clone_since"])
                           if r["possible_clone_since"] else None),
    } for r in rows], total)


def list_devices(conn: sqlite3.Connection, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every device by id (the original unpaged shape of ``GET /api/devices``)."""
    return query_devices(conn, now=now).rows


def fleet_summary(conn: sqlite3.Connection, *, today_since: str,
                  now: datetime | None = None) -> dict[str, Any]:
    """Fleet-wide counts for the dashboard header, aggregated in SQL (one pass over devices).

    Online/offline count active devices only, so total = online + offline + revoked. Backlog, errors
    and possible clones count active devices too: a revoked box's queue will never be accepted.
    """
    d = conn.execute(
        "SELECT count(*) AS total,"  # noqa: S608 - constant fragments only
        f" coalesce(sum(d.status = 'active' AND {_ONLINE}), 0) AS online,"
        f" coalesce(sum(d.status = 'active' AND NOT {_ONLINE}), 0) AS offline,"
        " coalesce(sum(d.status != 'active'), 0) AS revoked,"
        " coalesce(sum(d.status = 'active' AND coalesce(d.last_error, '') != ''), 0) AS with_error,"
        " coalesce(sum(d.status = 'active' AND d.backlog_docs > 0), 0) AS with_backlog,"
        f" coalesce(sum(d.status = 'active' AND NOT {_ONLINE} AND d.backlog_docs > 0), 0)"
        "   AS offline_with_backlog,"
        " coalesce(sum(d.status = 'active' AND d.possible_clone_since IS NOT NULL), 0) AS possible_clone,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_docs END), 0) AS backlog_docs,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_bytes END), 0) AS backlog_bytes"
        " FROM devices d", {"fresh_since": fresh_since(now)}).fetchone()
    oldest = conn.execute(
        f"SELECT d.id, {_OLDEST_AGE} AS age FROM devices d"  # noqa: S608
        " WHERE d.status = 'active' AND d.backlog_docs > 0 ORDER BY age DESC, d.id LIMIT 1").fetchone()
    docs_total = conn.execute(f"SELECT count(*) FROM documents WHERE {_STORED}").fetchone()[0]  # noqa: S608
    awaiting = conn.execute("SELECT count(*) FROM documents WHERE state = 'awaiting_original'").fetchone()[0]
    # Of those, the ones whose box is revoked and replaced by none: nobody will send them.
    stranded = conn.execute(
        "SELECT count(*) FROM documents doc JOIN devices dv ON dv.id = doc.device"
        " WHERE doc.state = 'awaiting_original' AND dv.status != 'active'"
        " AND NOT EXISTS (SELECT 1 FROM devices r WHERE r.replaces = doc.device)").fetchone()[0]
    objects_total, bytes_stored = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM objects").fetchone()
    docs_today = conn.execute(f"SELECT count(*) FROM documents WHERE {_STORED} AND received_at >= ?",  # noqa: S608
                              (today_since,)).fetchone()[0]
    return {
        "devices": {k: int(d[k]) for k in ("total", "online", "offline", "revoked", "with_error",
                                           "with_backlog", "offline_with_backlog", "possible_clone")},
        "backlog": {"docs": int(d["backlog_docs"]), "bytes": int(d["backlog_bytes"]),
                    "oldest_age_s": float(oldest["age"]) if oldest else None,
                    "oldest_device": oldest["id"] if oldest else None},
        # total: arrivals (one per commune that sent a scan); objects/bytes: what is stored, once.
        "documents": {"total": int(docs_total), "objects": int(objects_total), "bytes": int(bytes_stored),
                      "today": int(docs_today), "today_since": today_since,
                      # Catalogued from their notices, searchable, not archived: originals on their way.
                      "awaiting_original": int(awaiting),
                      # ... of which their box was revoked and not replaced: the operator must act.
                      "awaiting_from_revoked": int(stranded)},
    }


# -- possible clones ----------------------------------------------------------------------------

def record_seq_collision(conn: sqlite3.Connection, *, device: str, seq: int, tid: str, other_tid: str,
                         at: str) -> bool:
    """Note that ``tid`` reused ``seq``, which ``other_tid`` holds, and flag the device.

    Returns True the first time this refused transfer is seen (a repeated init only updates
    ``last_seen``), so the caller writes one fixity event per refused transfer, not per retry.
    """
    new = conn.execute(
        "INSERT INTO seq_collisions (device, tid, seq, other_tid, first_seen, last_seen)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, tid) DO NOTHING",
        (device, tid, seq, other_tid, at, at)).rowcount == 1
    if not new:
        conn.execute("UPDATE seq_collisions SET last_seen = ? WHERE device = ? AND tid = ?",
                     (at, device, tid))
    conn.execute("UPDATE devices SET possible_clone_since = coalesce(possible_clone_since, ?) WHERE id = ?",
                 (at, device))
    return new


def possible_clone(conn: sqlite3.Connection, device: str, *,
                   since: str | None = None) -> dict[str, Any] | None:
    """The clone suspicion on ``device``: when first seen, how many refused transfers, the first pair.

    Only collisions seen since the flag was (last) raised count; None when the flag is clear.
    """
    if since is None:
        row = conn.execute("SELECT possible_clone_since FROM devices WHERE id = ?", (device,)).fetchone()
        if row is None or row[0] is None:
            return None
        since = str(row[0])
    rows = conn.execute("SELECT tid, seq, other_tid, first_seen, last_seen FROM seq_collisions"
                        " WHERE device = ? AND last_seen >= ? ORDER BY first_seen, tid",
                        (device, since)).fetchall()
    first = rows[0] if rows else None
    return {"since": since, "count": len(rows),
            "last_seen": max((r["last_seen"] for r in rows), default=since),
            "seq": first["seq"] if first else None,
            # The transfer that holds the sequence number, then the one refused for reusing it.
            "tids": [first["other_tid"], first["tid"]] if first else []}


def clear_possible_clone(conn: sqlite3.Connection, device: str) -> bool:
    """Clear the flag (an admin re-enrolled one of the boxes); True if it was set."""
    return conn.execute("UPDATE devices SET possible_clone_since = NULL"
                        " WHERE id = ? AND possible_clone_since IS NOT NULL", (device,)).rowcount == 1
