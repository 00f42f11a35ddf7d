"""HTTP handlers for DESIGN §7: JSON API, /metrics, /healthz, the dashboard and admin actions.

Authentication happens in ``central.auth``; handlers only say which role they need.

Errors become HTTP statuses here and nowhere else; stored files are served by their hash path,
with the sender's name only ever in a Content-Disposition header.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote

from aiohttp import web

from central import catalog, commands
from central.auth import audit, require
from central.errors import DeviceError
from central.metrics import render
from central.state import CONFIG, INGEST, METRICS, PRINCIPAL, READER
from central.storage import ObjectStore
from protocol.names import fold

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT = 5000
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                "style-src 'unsafe-inline'; frame-ancestors 'none'"),
}


def _int_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise web.HTTPBadRequest(text=json.dumps({"error": f"{name} must be a non-negative integer"}),
                                 content_type="application/json")
    return min(int(raw), maximum)


def _bad_request(error: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": error}), content_type="application/json")


async def devices(request: web.Request) -> web.Response:
    """DESIGN §7's list, optionally ``?sort=&order=asc|desc&q=&limit=&offset=``.

    Without parameters it is every device by id, as before. The list stays a plain JSON list;
    the number of matching devices travels in ``X-Total-Count`` for paging.
    """
    sort = request.query.get("sort") or "id"
    if sort not in catalog.DEVICE_SORTS:
        raise _bad_request(f"sort must be one of {', '.join(catalog.DEVICE_SORTS)}")
    # Worst first is the useful reading of "problems"; everything else reads naturally ascending.
    order = request.query.get("order") or ("desc" if sort == "problems" else "asc")
    if order not in ("asc", "desc"):
        raise _bad_request("order must be asc or desc")
    q = request.query.get("q") or None
    limit = _int_param(request, "limit", -1, MAX_LIMIT) if "limit" in request.query else None
    offset = _int_param(request, "offset", 0, 1 << 31)
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


async def documents(request: web.Request) -> web.Response:
    device = request.query.get("device") or None
    q = request.query.get("q") or None
    limit = _int_param(request, "limit", 100, MAX_LIMIT)
    offset = _int_param(request, "offset", 0, 1 << 31)
    rows = await request.app[READER].call(
        lambda conn: catalog.search_documents(conn, device=device, q=q, limit=limit, offset=offset))
    return web.json_response(rows, dumps=_dumps)


async def _document_or_404(request: web.Request) -> dict[str, Any]:
    doc_id = int(request.match_info["id"])
    doc = await request.app[READER].call(catalog.get_document, doc_id)
    if doc is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no document {doc_id}"}),
                               content_type="application/json")
    return doc


async def document(request: web.Request) -> web.Response:
    doc = await _document_or_404(request)
    doc["metadata"] = json.loads(doc["metadata"])
    return web.json_response(doc, dumps=_dumps)


def content_disposition(filename: str) -> str:
    """RFC 6266/5987: an ASCII fallback plus the exact UTF-8 name in ``filename*``."""
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\%' else "_" for ch in fold(filename))
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


async def original(request: web.Request) -> web.StreamResponse:
    require(request, "operator")
    doc = await _document_or_404(request)
    path = ObjectStore(request.app[CONFIG].paths.objects).path_for(doc["sha256"])
    if not path.is_file():
        raise web.HTTPGone(text=json.dumps({"error": "the stored original is missing",
                                            "hint": "run the storage verify command"}),
                           content_type="application/json")
    # Audited before a byte leaves: who took which original is the question a curious operator raises.
    await audit(request, "download_original", str(doc["id"]),
                {"sha256": doc["sha256"], "filename": doc["filename"], "device": doc["device"]})
    return web.FileResponse(path, headers={"Content-Type": doc["media_type"],
                                           "Content-Disposition": content_disposition(doc["filename"]),
                                           "X-Content-SHA256": doc["sha256"]})


async def healthz(request: web.Request) -> web.Response:
    supervisor = request.app.get(INGEST)
    if supervisor is None:   # a catalog-only app: there is no ingest to be unhealthy
        return web.json_response({"status": "ok", "mqtt_connected": None})
    service = supervisor.service
    mqtt = service.client.connected.is_set() if service is not None else False
    if not request.app[METRICS].ingest_running:
        return web.json_response({"status": "ingest stopped", "mqtt_connected": mqtt,
                                  "ingest_failures": request.app[METRICS].ingest_failures,
                                  "last_error": supervisor.last_error}, status=503)
    return web.json_response({"status": "ok", "mqtt_connected": mqtt})


async def metrics(request: web.Request) -> web.Response:
    totals = await request.app[READER].call(catalog.totals)
    return web.Response(text=render(request.app[METRICS], totals),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def dashboard(request: web.Request) -> web.Response:
    signed_in = PRINCIPAL in request
    page = "static/dashboard.html" if signed_in else "static/login.html"
    html = resources.files("central").joinpath(page).read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html", charset="utf-8",
                        status=200 if signed_in else 401, headers=PAGE_HEADERS)


async def revoke_device(request: web.Request) -> web.Response:
    principal = require(request, "admin")
    device_id = request.match_info["id"]
    try:
        result = await asyncio.to_thread(commands.revoke, request.app[CONFIG].home, device_id,
                                         actor=principal.actor)
    except DeviceError as exc:
        raise web.HTTPNotFound(text=json.dumps({"error": str(exc)}), content_type="application/json") from exc
    return web.json_response({"device": device_id, "status": "revoked", "was_active": result.was_active,
                              "broker_reloaded": result.broker_pid is not None})


async def audit_log(request: web.Request) -> web.Response:
    require(request, "admin")
    rows = await request.app[READER].call(catalog.list_audit, _int_param(request, "limit", 200, MAX_LIMIT))
    return web.json_response(rows, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
