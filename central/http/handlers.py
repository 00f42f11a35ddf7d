"""HTTP handlers for DESIGN §7: JSON API, /metrics, /healthz, the dashboard and admin actions.

Authentication happens in ``central.http.auth``; handlers only say which role they need.

Errors become HTTP statuses here and nowhere else; stored files are served by their hash path,
with the sender's name only ever in a Content-Disposition header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from central import catalog
from central.admin import commands
from central.catalog import fixity
from central.errors import DeviceError
from central.http.auth import audit, require
from central.http.preview import PreviewCache, PreviewError
from central.http.state import AUTH_DB, CONFIG, INGEST, METRICS, PRINCIPAL, READER
from central.metrics import DEVICE_SERIES_MAX, Scrape, render
from central.records import corrections
from central.storage import ObjectStore, file_sha256
from protocol.errors import DecodeError
from protocol.names import check_device_id, fold

log = logging.getLogger("sohoa.central.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT = 5000
# Scripts and styles are files of our own (central/http/static), never inline: the policy can forbid
# inline script outright, so a device name or OCR text that slipped into the page could not run.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
                                "base-uri 'none'"),
}
# Vietnam has kept UTC+7 without daylight saving since 1975: a fixed offset needs no tz database.
VIETNAM = timezone(timedelta(hours=7), "ICT")
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".json": "application/json",
                ".html": "text/html"}
PREVIEWS = PreviewCache()


def _is_api(path: str) -> bool:
    return path.startswith("/api/") or path in ("/login", "/logout")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error of the JSON API is JSON with a message (the router's 404 and 405 included), and
    an unexpected exception is a logged 500 that tells the client nothing about internals."""
    if not _is_api(request.path):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items()
                   if k.lower() not in ("content-type", "content-length")}
        return web.json_response({"error": exc.reason}, status=exc.status, headers=headers)
    except Exception:
        log.exception("%s %s failed", request.method, request.path[:200])
        return web.json_response({"error": "internal error", "hint": "see central's log"}, status=500)


# The query parameters each JSON route takes; anything else (a typo such as ?devcie=) is refused
# rather than silently ignored, and a parameter given twice is ambiguous.
QUERY_PARAMETERS: dict[str, frozenset[str]] = {
    "/api/devices": frozenset({"sort", "order", "q", "limit", "offset"}),
    "/api/documents": frozenset({"device", "q", "since", "until", "limit", "offset"}),
    "/api/audit": frozenset({"limit"}),
}


@web.middleware
async def known_parameters(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _is_api(request.path) and request.query:
        route = request.match_info.route.resource
        allowed = QUERY_PARAMETERS.get(route.canonical if route is not None else "", frozenset())
        for name in request.query:
            if name not in allowed:
                takes = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none"
                raise _bad_request(f"unknown query parameter {name[:40]!r}: {takes}")
            if len(request.query.getall(name)) > 1:
                raise _bad_request(f"query parameter {name!r} is given more than once")
    return await handler(request)


# Parameters are checked here, before any SQL: ASCII digits by regex (str.isdigit would take '²'),
# bounds that SQLite's 64-bit integers and the pagers can hold, enums from whitelists, bounded text.
_DIGITS = re.compile(r"[0-9]{1,19}")
MAX_ID = (1 << 63) - 1
MAX_OFFSET = 1 << 31
MAX_QUERY_CHARS = 500


def _bad_request(error: str, **extra: Any) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": error, **extra}, ensure_ascii=False),
                              content_type="application/json")


def _integer(raw: str, name: str, minimum: int, maximum: int) -> int:
    value = int(raw) if _DIGITS.fullmatch(raw) else None
    if value is None or not minimum <= value <= maximum:
        raise _bad_request(f"{name} must be a whole number from {minimum} to {maximum}", value=raw[:40])
    return value


def _int_param(request: web.Request, name: str, default: int, maximum: int, minimum: int = 0) -> int:
    raw = request.query.get(name)
    return default if raw is None else _integer(raw, name, minimum, maximum)


def _text_param(request: web.Request, name: str) -> str | None:
    """An optional free-text parameter: bounded, and text SQLite can bind (no lone surrogates)."""
    raw = request.query.get(name) or None
    if raw is None:
        return None
    if len(raw) > MAX_QUERY_CHARS:
        raise _bad_request(f"{name} is longer than {MAX_QUERY_CHARS} characters")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad_request(f"{name} is not valid UTF-8 text") from exc
    return raw


def _device_param(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        check_device_id(value)
    except DecodeError as exc:
        raise _bad_request(f"{name} is not a device id (a-z, 0-9 and '-')", value=value[:80]) from exc
    return value


def _document_id(request: web.Request) -> int:
    return _integer(request.match_info["id"], "document id", 1, MAX_ID)


async def devices(request: web.Request) -> web.Response:
    """DESIGN §7's list, optionally ``?sort=&order=asc|desc&q=&limit=&offset=``.

    Without parameters it is every device by id, as before. The list stays a plain JSON list;
    the number of matching devices travels in ``X-Total-Count`` for paging.
    """
    sort = request.query.get("sort", "id")
    if sort not in catalog.DEVICE_SORTS:
        raise _bad_request(f"sort must be one of {', '.join(catalog.DEVICE_SORTS)}")
    # Worst first is the useful reading of "problems"; everything else reads naturally ascending.
    order = request.query.get("order", "desc" if sort == "problems" else "asc")
    if order not in ("asc", "desc"):
        raise _bad_request("order must be asc or desc")
    q = _text_param(request, "q")
    limit = _int_param(request, "limit", -1, MAX_LIMIT) if "limit" in request.query else None
    offset = _int_param(request, "offset", 0, MAX_OFFSET)
    page = await request.app[READER].call(
        lambda conn: catalog.query_devices(conn, sort=sort, descending=order == "desc", q=q,
                                           limit=limit, offset=offset))
    return web.json_response(page.rows, dumps=_dumps, headers={"X-Total-Count": str(page.total)})


async def fleet(request: web.Request) -> web.Response:
    """Fleet-wide numbers for an operator watching thousands of boxes; see ``catalog.fleet_summary``."""
    now = datetime.now(UTC)
    since = now.replace(hour=0, minute=0, second=0, microsecond=0)
    summary = await request.app[READER].call(
        lambda conn: catalog.fleet_summary(conn, today_since=_iso(since)))
    summary["generated_at"] = _iso(now)
    return web.json_response(summary, dumps=_dumps)


def _iso(at: datetime) -> str:
    # The catalog's own format (catalog.utc_now), so string comparison in SQL orders correctly.
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _day_param(request: web.Request, name: str) -> date | None:
    raw = request.query.get(name) or None
    if raw is None:
        return None
    bad = _bad_request(f"{name} must be a day as YYYY-MM-DD (Vietnam time)", value=raw[:40])
    if not _DAY.fullmatch(raw):
        raise bad
    try:
        return date.fromisoformat(raw)
    except ValueError as exc:
        raise bad from exc


def _vietnam_midnight(day: date) -> str:
    """The catalog time (UTC) at which ``day`` begins in Vietnam."""
    return _iso(datetime(day.year, day.month, day.day, tzinfo=VIETNAM).astimezone(UTC))


async def documents(request: web.Request) -> web.Response:
    """Arrivals: ``?device=`` what one box sent, ``?since=&until=`` received on those days (Vietnam
    time), ``?q=`` full text (folded), best match first with highlighted snippets; else newest first."""
    device = _device_param("device", request.query.get("device") or None)
    q = _text_param(request, "q")
    since, until = _day_param(request, "since"), _day_param(request, "until")
    if since and until and until < since:
        raise _bad_request("until is before since")
    received_from = _vietnam_midnight(since) if since else None
    received_before = None
    if until:
        try:
            received_before = _vietnam_midnight(until + timedelta(days=1))
        except OverflowError:   # 9999-12-31: no day after it, so no upper bound at all
            received_before = None
    limit = _int_param(request, "limit", 100, MAX_LIMIT)
    offset = _int_param(request, "offset", 0, MAX_OFFSET)
    rows = await request.app[READER].call(
        lambda conn: catalog.search_ranked(conn, device=device, q=q, received_from=received_from,
                                           received_before=received_before, limit=limit, offset=offset))
    return web.json_response(rows, dumps=_dumps)


async def device(request: web.Request) -> web.Response:
    """One device for its page: health, 72 h of hourly history, recent documents and errors."""
    device_id = _device_param("device id", request.match_info["id"])
    assert device_id is not None
    detail = await request.app[READER].call(lambda conn: catalog.device_detail(conn, device_id))
    if detail is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no device {device_id}"}),
                               content_type="application/json")
    return web.json_response(detail, dumps=_dumps)


async def _document_or_404(request: web.Request) -> dict[str, Any]:
    doc_id = _document_id(request)
    doc = await request.app[READER].call(catalog.get_document, doc_id)
    if doc is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no document {doc_id}"}),
                               content_type="application/json")
    return doc


async def document(request: web.Request) -> web.Response:
    doc = await _document_or_404(request)
    doc = await request.app[READER].call(corrections.document_view, doc)   # metadata, archival copy
    doc["fixity"] = await request.app[READER].call(catalog.document_fixity, doc["id"])
    doc["can_download"] = request[PRINCIPAL].can("operator")
    return web.json_response(doc, dumps=_dumps)


def _stored_path(request: web.Request, doc: dict[str, Any]) -> Path:
    if doc.get("state") == catalog.AWAITING:
        # Catalogued from its notice: searchable, but its original is still on the box's link.
        raise web.HTTPConflict(text=json.dumps({"error": "the original is on its way",
                                                "hint": "try again once the device's transfer arrives"}),
                               content_type="application/json")
    path = ObjectStore(request.app[CONFIG].paths.objects).path_for(doc["sha256"])
    if not path.is_file():
        raise web.HTTPGone(text=json.dumps({"error": "the stored original is missing",
                                            "hint": "run the storage verify command"}),
                           content_type="application/json")
    return path


async def preview(request: web.Request) -> web.Response:
    """A PNG of the first page (any role: it shows no more than the OCR text a viewer reads)."""
    doc = await _document_or_404(request)
    path = _stored_path(request, doc)
    try:
        png = await asyncio.to_thread(PREVIEWS.get_or_render, doc["sha256"], path, doc["media_type"])
    except PreviewError as exc:
        raise web.HTTPUnprocessableEntity(
            text=json.dumps({"error": "no preview for this original", "hint": str(exc)[:200]}),
            content_type="application/json") from exc
    return web.Response(body=png, content_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600",
                                 "X-Content-Type-Options": "nosniff"})


def content_disposition(filename: str) -> str:
    """RFC 6266/5987: an ASCII fallback plus the exact UTF-8 name in ``filename*``."""
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\%' else "_" for ch in fold(filename))
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


async def record_download(request: web.Request, doc: dict[str, Any], *, kind: str, sha256: str,
                          path: Path) -> None:
    """A download of a stored object is a fixity event (who, which object, its hash), written before a
    byte leaves; the audit log says the same for the security side.

    The object is hashed first: bytes that no longer match the hash central signed for are not
    served as if they did (the response names that hash), and the failure is a fixity event."""
    principal = request[PRINCIPAL]
    found = await asyncio.to_thread(file_sha256, path)
    intact = found == sha256

    def write(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            fixity.add_event(conn, event="download", actor=principal.actor, document_id=int(doc["id"]),
                             object_sha256=sha256, original_sha256=doc["sha256"],
                             outcome=None if intact else "failure",
                             detail={"kind": kind, "remote": request.remote,
                                     **({} if intact else {"problem": "does not hash to its name",
                                                           "found_sha256": found})})
            conn.commit()
        except BaseException:
            conn.rollback()
            raise

    await request.app[AUTH_DB].call(write)
    if not intact:
        log.error("download of %s %s (document %s) refused: the stored bytes hash to %s", kind, sha256,
                  doc["id"], found)
        raise web.HTTPInternalServerError(
            text=json.dumps({"error": f"the stored {kind} copy no longer matches its sha256; not served",
                             "hint": "run `sohoa central verify` and restore the object from a backup"}),
            content_type="application/json")


async def original(request: web.Request) -> web.StreamResponse:
    require(request, "operator")
    doc = await _document_or_404(request)
    path = _stored_path(request, doc)
    # Audited before a byte leaves: who took which original is the question a curious operator raises.
    await audit(request, "download_original", str(doc["id"]),
                {"sha256": doc["sha256"], "filename": doc["filename"], "device": doc["device"]})
    await record_download(request, doc, kind=fixity.ORIGINAL, sha256=doc["sha256"], path=path)
    return web.FileResponse(path, headers={"Content-Type": doc["media_type"],
                                           "Content-Disposition": content_disposition(doc["filename"]),
                                           "X-Content-SHA256": doc["sha256"]})


async def openapi(request: web.Request) -> web.Response:
    """The description of this JSON API (OpenAPI 3.0), the one the fuzz test runs against."""
    spec = resources.files("central.http").joinpath("openapi.json").read_text(encoding="utf-8")
    return web.Response(text=spec, content_type="application/json", charset="utf-8")


def _broker_connected(request: web.Request) -> bool | None:
    supervisor = request.app.get(INGEST)
    if supervisor is None:   # a catalog-only app: no broker to be connected to
        return None
    service = supervisor.service
    return service.client.ready.is_set() if service is not None else False


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers and its ingest supervisor is alive (it restarts a dead ingest
    by itself, so only a dead supervisor is worth a restart of central)."""
    supervisor = request.app.get(INGEST)
    mqtt = _broker_connected(request)
    if supervisor is not None and supervisor.dead:
        return web.json_response({"status": "ingest supervisor died", "mqtt_connected": mqtt,
                                  "ingest_failures": request.app[METRICS].ingest_failures,
                                  "last_error": supervisor.last_error}, status=503)
    return web.json_response({"status": "ok", "mqtt_connected": mqtt})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: connected to the broker (subscribed) and the ingest service running."""
    supervisor = request.app.get(INGEST)
    if supervisor is None:
        return web.json_response({"status": "ready", "mqtt_connected": None, "problems": []})
    metrics = request.app[METRICS]
    mqtt = bool(_broker_connected(request))
    problems = []
    if not metrics.ingest_running:
        problems.append(f"ingest stopped ({supervisor.last_error or 'starting'}); it is restarted by itself")
    if not mqtt:
        problems.append("not connected to the broker")
    body = {"status": "ready" if not problems else "not ready", "mqtt_connected": mqtt,
            "ingest_running": metrics.ingest_running, "ingest_failures": metrics.ingest_failures,
            "last_error": supervisor.last_error, "problems": problems}
    return web.json_response(body, status=503 if problems else 200)


async def metrics(request: web.Request) -> web.Response:
    snapshot = await request.app[READER].call(
        lambda conn: catalog.metrics_snapshot(conn, device_series_max=DEVICE_SERIES_MAX))
    body = render(request.app[METRICS], Scrape(snapshot, _broker_connected(request)))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def page(request: web.Request) -> web.Response:
    """The dashboard's pages (fleet, a device, a document): one HTML shell, or the sign-in page."""
    signed_in = PRINCIPAL in request
    name = "static/dashboard.html" if signed_in else "static/login.html"
    html = resources.files("central.http").joinpath(name).read_text(encoding="utf-8")
    # The sign-in page is a page like any other (200): a 401 document is a console error in browsers.
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Cache-Control": "max-age=86400"})


_STATIC_NAME = re.compile(r"(?:i18n/)?[a-z][a-z0-9-]*\.(?:js|css|json)")


async def static(request: web.Request) -> web.Response:
    """Our own scripts, styles and string tables (open: the sign-in page needs them too)."""
    name = request.match_info["name"]
    if not _STATIC_NAME.fullmatch(name):
        raise web.HTTPNotFound()
    resource = resources.files("central.http").joinpath("static", *name.split("/"))
    if not resource.is_file():
        raise web.HTTPNotFound()
    suffix = name[name.rindex("."):]
    return web.Response(body=resource.read_bytes(), content_type=STATIC_TYPES[suffix], charset="utf-8",
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


_T = TypeVar("_T")


async def _device_command(request: web.Request, command: Callable[..., _T]) -> tuple[str, _T]:
    """Run an admin's ``commands.revoke``-like call on the device named in the path (404 if unknown)."""
    principal = require(request, "admin")
    device_id = _device_param("device id", request.match_info["id"])
    assert device_id is not None
    try:
        result = await asyncio.to_thread(command, request.app[CONFIG].home, device_id, actor=principal.actor)
    except DeviceError as exc:
        raise web.HTTPNotFound(text=json.dumps({"error": str(exc)}), content_type="application/json") from exc
    return device_id, result


async def revoke_device(request: web.Request) -> web.Response:
    device_id, result = await _device_command(request, commands.revoke)
    return web.json_response({"device": device_id, "status": "revoked", "was_active": result.was_active,
                              "broker_reloaded": result.broker_pid is not None,
                              "awaiting_originals": result.awaiting_originals})


async def clear_clone(request: web.Request) -> web.Response:
    device_id, result = await _device_command(request, commands.clear_clone)
    return web.json_response({"device": device_id, "was_flagged": result.was_flagged,
                              "possible_clone": None}, dumps=_dumps)


async def audit_log(request: web.Request) -> web.Response:
    require(request, "admin")
    limit = _int_param(request, "limit", 200, MAX_LIMIT)
    rows = await request.app[READER].call(catalog.list_audit, limit)
    return web.json_response(rows, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
