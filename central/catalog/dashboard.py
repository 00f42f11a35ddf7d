"""What the dashboard's device and document pages, search and /metrics read (issue 10)."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

from central.catalog.devices import (
    _OLDEST_AGE,
    _ONLINE,
    _PROBLEM,
    _PROBLEM_NAMES,
    fresh_since,
    possible_clone,
)
from central.catalog.documents import _SUMMARY, _WITH_OBJECT, _WORD, _arrivals, _summary, awaiting_load
from central.catalog.schema import _STORED
from central.catalog.transfers import count_active_transfers
from protocol.names import fold

# Plain SQL over the same tables; FTS5's bm25() orders search results (PostgreSQL: ts_rank).

HISTORY_DAYS = 14
SNIPPET_CHARS = 220
_SPACES = re.compile(r"\s+")


def _ts(iso: str | None) -> float | None:
    """A catalog time (ISO 8601, 'Z') as a Unix timestamp."""
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _health(status_json: str | None) -> dict[str, Any]:
    """The fields of a box's last status that are about its health, not its queue."""
    if not status_json:
        return {}
    try:
        status = json.loads(status_json)
    except ValueError:
        return {}
    if not isinstance(status, dict):
        return {}
    keys = ("disk_free_bytes", "version", "failed_docs", "alarms", "updated_at", "last_error",
            "oldest_age_s", "queue_docs", "queue_bytes", "last_receipt_at")
    return {key: status.get(key) for key in keys}


def metrics_snapshot(conn: sqlite3.Connection, *, now: datetime | None = None,
                     device_series_max: int = 200) -> dict[str, Any]:
    """Everything ``/metrics`` reads from the catalog, in a handful of aggregate queries.

    ``problem_devices`` are the worst ``device_series_max`` devices with a problem (the bounded
    per-device series); ``problem_devices_dropped`` how many more there were.
    """
    params = {"fresh_since": fresh_since(now)}
    d = conn.execute(
        "SELECT"  # noqa: S608 - constant fragments only
        f" coalesce(sum(d.status = 'active' AND {_ONLINE}), 0) AS online,"
        f" coalesce(sum(d.status = 'active' AND NOT {_ONLINE} AND d.last_seen IS NOT NULL), 0) AS offline,"
        " coalesce(sum(d.status = 'active' AND d.last_seen IS NULL), 0) AS never_seen,"
        " coalesce(sum(d.status != 'active'), 0) AS revoked,"
        " coalesce(sum(d.status = 'active' AND d.possible_clone_since IS NOT NULL), 0) AS possible_clone,"
        " coalesce(sum(d.status = 'active' AND coalesce(d.last_error, '') != ''), 0) AS with_error,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_docs END), 0) AS backlog_docs,"
        " coalesce(sum(CASE WHEN d.status = 'active' THEN d.backlog_bytes END), 0) AS backlog_bytes,"
        f" coalesce(max(CASE WHEN d.status = 'active' THEN {_OLDEST_AGE} END), 0) AS oldest_age_s"
        " FROM devices d", params).fetchone()
    problem = _PROBLEM.format(age=_OLDEST_AGE)
    rows = conn.execute(
        f"SELECT d.id, {_ONLINE} AS online, d.last_seen, d.backlog_docs, {_OLDEST_AGE} AS oldest_age_s,"  # noqa: S608
        f" json_extract(d.status_json, '$.disk_free_bytes') AS disk_free_bytes"
        f" FROM devices d WHERE ({problem}) > 0"
        f" ORDER BY ({problem}) DESC, oldest_age_s DESC, d.id LIMIT :limit",
        {**params, "limit": device_series_max}).fetchall()
    problem_total = int(conn.execute(f"SELECT count(*) FROM devices d WHERE ({problem}) > 0",  # noqa: S608
                                     params).fetchone()[0])
    objects, stored = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM objects").fetchone()
    return {
        "transfers_active": count_active_transfers(conn),
        "documents": int(conn.execute(f"SELECT count(*) FROM documents WHERE {_STORED}").fetchone()[0]),  # noqa: S608
        "documents_awaiting_original": int(conn.execute(
            "SELECT count(*) FROM documents WHERE state = 'awaiting_original'").fetchone()[0]),
        "objects": int(objects), "stored_bytes": int(stored),
        "backlog_docs": int(d["backlog_docs"]), "backlog_bytes": int(d["backlog_bytes"]),
        "oldest_age_s": float(d["oldest_age_s"]),
        "devices": {k: int(d[k]) for k in ("online", "offline", "never_seen", "revoked", "possible_clone",
                                           "with_error")},
        "problem_devices": [{"id": r["id"], "online": bool(r["online"]), "last_seen_ts": _ts(r["last_seen"]),
                             "backlog_docs": int(r["backlog_docs"]), "oldest_age_s": float(r["oldest_age_s"]),
                             "disk_free_bytes": r["disk_free_bytes"]} for r in rows],
        "problem_devices_dropped": max(0, problem_total - len(rows)),
    }


def presence(conn: sqlite3.Connection, *, now: datetime | None = None) -> dict[str, tuple[bool, str | None]]:
    """Every active device that ever spoke: online now?, and when it last spoke."""
    rows = conn.execute(f"SELECT d.id, {_ONLINE} AS online, d.last_seen FROM devices d"  # noqa: S608
                        " WHERE d.status = 'active' AND d.last_seen IS NOT NULL",
                        {"fresh_since": fresh_since(now)})
    return {r["id"]: (bool(r["online"]), r["last_seen"]) for r in rows}


def record_history(conn: sqlite3.Connection, *, now: datetime | None = None, interval_s: float = 60.0) -> int:
    """Fold the backlog each device last reported into its row for this hour; prune old hours.

    Only devices heard from within ``interval_s`` are sampled, so an hour a box was silent has no
    row (the chart shows a gap: it was offline). Returns the number of devices sampled. No commit.
    """
    at = now or datetime.now(UTC)
    hour = at.strftime("%Y-%m-%dT%H")
    heard = (at - timedelta(seconds=interval_s)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    cur = conn.execute(
        "INSERT INTO device_history (device, hour, backlog_docs, backlog_bytes, samples, online_samples)"  # noqa: S608
        f" SELECT d.id, :hour, d.backlog_docs, d.backlog_bytes, 1, {_ONLINE} FROM devices d"
        " WHERE d.status = 'active' AND d.last_seen >= :heard"
        " ON CONFLICT (device, hour) DO UPDATE SET"
        " backlog_docs = max(device_history.backlog_docs, excluded.backlog_docs),"
        " backlog_bytes = max(device_history.backlog_bytes, excluded.backlog_bytes),"
        " samples = device_history.samples + 1,"
        " online_samples = device_history.online_samples + excluded.online_samples",
        {"hour": hour, "heard": heard, "fresh_since": fresh_since(at)})
    cutoff = (at - timedelta(days=HISTORY_DAYS)).strftime("%Y-%m-%dT%H")
    conn.execute("DELETE FROM device_history WHERE hour < ?", (cutoff,))
    return cur.rowcount


def device_detail(conn: sqlite3.Connection, device_id: str, *, now: datetime | None = None,
                  hours: int = 72, recent: int = 10) -> dict[str, Any] | None:
    """One device for its page: the fleet row, its health, hourly history, recent documents, errors."""
    at = now or datetime.now(UTC)
    row = conn.execute(
        f"SELECT d.id, d.status, d.enrolled_at, {_ONLINE} AS online, d.last_seen, d.backlog_docs,"  # noqa: S608
        " d.backlog_bytes, d.last_error, d.status_json, d.possible_clone_since, d.replaces,"
        f" {_OLDEST_AGE} AS oldest_age_s, {_PROBLEM.format(age=_OLDEST_AGE)} AS problem_rank"
        " FROM devices d WHERE d.id = :id",
        {"id": device_id, "fresh_since": fresh_since(at)}).fetchone()
    if row is None:
        return None
    since_hour = (at - timedelta(hours=hours - 1)).strftime("%Y-%m-%dT%H")
    backlog = {r["hour"]: r for r in conn.execute(
        "SELECT hour, backlog_docs, backlog_bytes, samples, online_samples FROM device_history"
        " WHERE device = ? AND hour >= ? ORDER BY hour", (device_id, since_hour))}
    stored = {r["hour"]: r for r in conn.execute(
        "SELECT substr(t.stored_at, 1, 13) AS hour, count(*) AS docs, coalesce(sum(o.size), 0) AS bytes"
        " FROM transfers t JOIN documents doc ON doc.id = t.document_id"
        " JOIN objects o ON o.sha256 = doc.sha256"
        " WHERE t.device = ? AND t.state = 'stored' AND t.stored_at >= ? GROUP BY hour",
        (device_id, since_hour))}
    history = []
    for k in range(hours):
        hour = (at - timedelta(hours=hours - 1 - k)).strftime("%Y-%m-%dT%H")
        b, s = backlog.get(hour), stored.get(hour)
        history.append({"hour": hour + ":00Z",
                        "backlog_docs": b["backlog_docs"] if b else None,
                        "online": (b["online_samples"] / b["samples"]) if b and b["samples"] else None,
                        "stored_docs": s["docs"] if s else 0, "stored_bytes": s["bytes"] if s else 0})
    documents = [_summary(r) for r in conn.execute(
        f"SELECT {_SUMMARY} FROM documents d {_WITH_OBJECT} WHERE d.device = ?"  # noqa: S608
        " ORDER BY d.id DESC LIMIT ?", (device_id, recent))]
    errors = [dict(r) for r in conn.execute(
        "SELECT tid, updated_at AS at, error_class, error FROM transfers"
        " WHERE device = ? AND state = 'rejected' ORDER BY updated_at DESC LIMIT ?", (device_id, recent))]
    last_receipt = conn.execute("SELECT max(stored_at) FROM transfers WHERE device = ? AND state = 'stored'",
                                (device_id,)).fetchone()[0]
    documents_total = conn.execute(f"SELECT count(*) FROM documents WHERE device = ? AND {_STORED}",  # noqa: S608
                                   (device_id,)).fetchone()[0]
    documents_awaiting = awaiting_load(conn, device_id)[0]
    replaced_by = conn.execute("SELECT id FROM devices WHERE replaces = ?", (device_id,)).fetchone()
    return {
        "id": row["id"], "status": row["status"], "enrolled_at": row["enrolled_at"],
        "online": bool(row["online"]), "last_seen": row["last_seen"], "backlog_docs": row["backlog_docs"],
        "backlog_bytes": row["backlog_bytes"], "last_error": row["last_error"],
        "oldest_age_s": row["oldest_age_s"], "last_receipt": last_receipt,
        "problem": _PROBLEM_NAMES.get(row["problem_rank"]),
        "possible_clone": (possible_clone(conn, device_id, since=row["possible_clone_since"])
                           if row["possible_clone_since"] else None),
        "health": _health(row["status_json"]), "documents_total": int(documents_total),
        "documents_awaiting_original": documents_awaiting,
        "replaces": row["replaces"], "replaced_by": replaced_by[0] if replaced_by else None,
        "history": history, "recent_documents": documents, "recent_errors": errors,
    }


def document_fixity(conn: sqlite3.Connection, doc_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """The fixity events that name this arrival, oldest first (what was received, hashes, when)."""
    rows = conn.execute(
        "SELECT at, event, device, tid, original_sha256, package_sha256, ciphertext_sha256, detail, actor,"
        " object_sha256"
        " FROM fixity WHERE document_id = ? ORDER BY id LIMIT ?", (doc_id, limit))
    return [dict(r) for r in rows]


def _segments(text: str, terms: set[str], *, limit: int = SNIPPET_CHARS) -> list[list[Any]]:
    """``text`` cut to a window around its first matching word, as [[piece, is_match], ...].

    Matching is done on folded words (as the index does), so the piece shown keeps its diacritics;
    the page inserts the pieces as text, never as HTML.
    """
    words = [(m.start(), m.end()) for m in _WORD.finditer(text) if fold(m.group()) in terms]
    start = 0
    if words and words[0][0] > limit // 3:
        start = text.rfind(" ", 0, words[0][0] - limit // 3) + 1
    end = min(len(text), start + limit)
    if end < len(text):
        space = text.rfind(" ", start, end)
        keep_after = words[0][1] if words and words[0][1] <= end else start
        if space > keep_after:
            end = space   # end on a word boundary, never cutting the first match
    pieces: list[list[Any]] = []
    at = start
    for s, e in words:
        if s < start or e > end:
            continue
        if s > at:
            pieces.append([text[at:s], False])
        pieces.append([text[s:e], True])
        at = e
    if at < end:
        pieces.append([text[at:end], False])
    cleaned = [[_SPACES.sub(" ", p), hit] for p, hit in pieces]
    if cleaned and start > 0:
        cleaned.insert(0, ["… ", False])
    if end < len(text):
        cleaned.append([" …", False])
    return [p for p in cleaned if p[0]]


def search_ranked(conn: sqlite3.Connection, *, device: str | None = None, q: str | None = None,
                  received_from: str | None = None, received_before: str | None = None,
                  limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Arrivals for the dashboard: with ``q``, best match first (bm25) with a highlighted snippet of
    the text and the file name; without, newest first. ``received_from``/``received_before`` are
    catalog times (the day boundaries the caller chose, e.g. midnight in Vietnam)."""
    found = _arrivals(q=q, device=device, received_from=received_from, received_before=received_before)
    if found is None:
        return []
    source, where, params = found
    terms: set[str] = set()
    order = "d.id DESC"
    extra = ""
    if q:
        terms = set(_WORD.findall(fold(q)))
        # The file name weighs more than the body: a clerk's name for a scan says what it is.
        extra = ", d.text, bm25(documents_fts, 4.0, 1.0) AS score"
        order = "score, d.id DESC"
    sql = (f"SELECT {_SUMMARY}{extra} FROM {source}{where}"  # noqa: S608
           f" ORDER BY {order} LIMIT ? OFFSET ?")
    results = []
    for r in conn.execute(sql, [*params, limit, offset]):
        item = _summary(r)
        if q:
            item["score"] = round(-float(r["score"]), 4)   # higher is better, as people expect
            item["snippet"] = _segments(r["text"], terms)
            item["title"] = _segments(r["filename"], terms, limit=1000)
        results.append(item)
    return results
