"""HTTP handlers for the archive's records (issue 9): the archival copy, metadata corrections and their
history, a document's fixity events, and the metadata export. Registered by ``central.http.app`` from
``ROUTES``; roles, CSRF and JSON errors work as for every other route (``central.http.auth``,
``central.http.handlers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from central import catalog
from central.catalog import fixity
from central.fsutil import make_private_dir
from central.http.auth import audit, require
from central.http.handlers import (
    MAX_LIMIT,
    _bad_request,
    _device_param,
    _document_or_404,
    _dumps,
    _int_param,
    _text_param,
    content_disposition,
    record_download,
)
from central.http.state import AUTH_DB, CONFIG, READER
from central.records import archive_jobs, corrections, export
from central.storage import ObjectStore
from protocol.schemas import DEFAULT_TEMPLATE, Template

# The query parameters each of these routes takes (merged into handlers.QUERY_PARAMETERS by the app).
QUERY_PARAMETERS: dict[str, frozenset[str]] = {
    "/api/export": frozenset({"format", "device", "q", "from", "to", "template"}),
    "/api/documents/{id}/events": frozenset({"limit"}),
}
MAX_BODY = 64 * 1024
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def _json_error(cls: type[web.HTTPException], error: str, **extra: Any) -> web.HTTPException:
    return cls(text=json.dumps({"error": error, **extra}, ensure_ascii=False),
               content_type="application/json")


async def archival(request: web.Request) -> web.StreamResponse:
    """The signed PDF/A-2b archival copy; same role and audit as the original."""
    require(request, "operator")
    doc = await _document_or_404(request)
    view = await request.app[READER].call(archive_jobs.job_view, doc["sha256"])
    if view["state"] != "done":
        raise _json_error(web.HTTPNotFound, "the archival copy is not built yet", archival=view)
    sha = str(view["sha256"])
    path = ObjectStore(request.app[CONFIG].paths.objects).path_for(sha)
    if not path.is_file():
        raise _json_error(web.HTTPGone, "the stored archival copy is missing",
                          hint="run `sohoa central verify`: it queues the copy to be built again")
    await audit(request, "download_archival", str(doc["id"]),
                {"sha256": sha, "original_sha256": doc["sha256"], "device": doc["device"]})
    await record_download(request, doc, kind=fixity.ARCHIVAL, sha256=sha, path=path)
    stem = doc["filename"].rsplit(".", 1)[0] if "." in doc["filename"] else doc["filename"]
    disposition = content_disposition(f"{stem} (lưu trữ).pdf")
    return web.FileResponse(path, headers={"Content-Type": "application/pdf",
                                           "Content-Disposition": disposition, "X-Content-SHA256": sha})


async def correct_metadata(request: web.Request) -> web.Response:
    """``PATCH /api/documents/{id}/metadata`` with ``{"ngay": "2025-03-14", "note": "why"}`` (null clears a
    field; the note is optional): each change is kept with who and when, and is a fixity event."""
    principal = require(request, "operator")
    if request.content_type != "application/json":
        raise _json_error(web.HTTPUnsupportedMediaType, "send application/json")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _json_error(web.HTTPRequestEntityTooLarge, f"the body is over {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise _json_error(web.HTTPRequestEntityTooLarge, f"the body is over {MAX_BODY} bytes")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad_request("the body is not JSON") from exc
    try:
        changes, note = corrections.validate_changes(body)
    except corrections.CorrectionError as exc:
        raise _bad_request(str(exc), **({"field": exc.field} if exc.field else {})) from exc
    doc = await _document_or_404(request)

    def write(conn: sqlite3.Connection) -> list[str]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            changed = corrections.correct(conn, document_id=doc["id"], metadata_json=doc["metadata"],
                                          changes=changes, actor=principal.actor, note=note)
            if changed:
                catalog.add_audit(conn, actor=principal.actor, action="correct_metadata",
                                  target=str(doc["id"]), remote=request.remote,
                                  detail=json.dumps({k: changes[k] for k in changed}, ensure_ascii=False))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return changed

    changed = await request.app[AUTH_DB].call(write)
    view = await request.app[AUTH_DB].call(lambda conn: corrections.current(
        doc["metadata"], corrections.latest_corrections(conn, [doc["id"]]).get(doc["id"], {})))
    return web.json_response({"id": doc["id"], "changed": changed, "metadata": view}, dumps=_dumps)


async def metadata_history(request: web.Request) -> web.Response:
    require(request, "viewer")
    doc = await _document_or_404(request)
    entries = await request.app[READER].call(corrections.history, doc)
    return web.json_response({"id": doc["id"], "history": entries}, dumps=_dumps)


async def document_events(request: web.Request) -> web.Response:
    """PREMIS-style events of one document: ingest, archival copy, verifications, corrections, downloads."""
    require(request, "operator")
    limit = _int_param(request, "limit", 1000, MAX_LIMIT)
    doc = await _document_or_404(request)
    events = await request.app[READER].call(
        lambda conn: fixity.document_events(conn, doc["id"], doc["sha256"], limit=limit))
    return web.json_response({"id": doc["id"], "events": events}, dumps=_dumps)


async def export_documents(request: web.Request) -> web.StreamResponse:
    """``GET /api/export?format=csv|xlsx&device=&q=&from=YYYY-MM-DD&to=YYYY-MM-DD&template=``: the
    "văn bản" sheet of the selected documents (arrival dates in Vietnam's time, inclusive)."""
    require(request, "viewer")
    fmt = request.query.get("format", "csv")
    if fmt not in ("csv", "xlsx"):
        raise _bad_request("format must be csv or xlsx")
    # Given but empty is a mistake (a form field left blank), not "no filter": say so.
    device = _device_param("device", request.query.get("device"))
    try:
        template = export.template_or_error(request.query.get("template"), DEFAULT_TEMPLATE)
        since, until = export.day_bounds(request.query.get("from"), request.query.get("to"))
    except ValueError as exc:
        raise _bad_request(str(exc)) from exc
    selection = export.Selection(device=device, q=_text_param(request, "q"), since=since, until=until)
    generated_at = catalog.utc_now()
    await audit(request, "export_metadata", None, {"format": fmt, "template": export.template_tag(template),
                                                   **selection.describe()})
    name = f"van-ban_{template.id}-v{template.version}_{generated_at[:10]}.{fmt}"
    headers = {"Content-Disposition": content_disposition(name), "Cache-Control": "no-store",
               "X-Sohoa-Template": f"{template.id}; version={template.version}"}
    if fmt == "csv":
        return await _export_csv(request, selection, template, headers)
    return await _export_xlsx(request, selection, template, headers, generated_at)


async def _pages(request: web.Request, selection: export.Selection) -> AsyncIterator[list[dict[str, Any]]]:
    after = 0
    while True:
        rows = await request.app[READER].call(
            lambda conn, after=after: export.fetch_page(conn, selection, after_id=after))
        if not rows:
            return
        yield rows
        after = rows[-1]["id"]


async def _export_csv(request: web.Request, selection: export.Selection, template: Template,
                      headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(headers={**headers, "Content-Type": "text/csv; charset=utf-8"})
    await response.prepare(request)
    await response.write((export.BOM + export.csv_lines([export.headers(template)])).encode("utf-8"))
    async for rows in _pages(request, selection):
        text = export.csv_lines([export.values(row, template) for row in rows])
        await response.write(text.encode("utf-8"))
    await response.write_eof()
    return response


async def _export_xlsx(request: web.Request, selection: export.Selection, template: Template,
                       headers: dict[str, str], generated_at: str) -> web.StreamResponse:
    scratch = request.app[CONFIG].paths.home / "export-tmp"
    make_private_dir(scratch)
    workdir = tempfile.mkdtemp(dir=scratch)
    try:
        path = scratch / workdir / "export.xlsx"
        sheet = await asyncio.to_thread(export.XlsxSheet, path, template, tmpdir=scratch / workdir)
        async for rows in _pages(request, selection):
            values = [export.values(row, template) for row in rows]
            if not await asyncio.to_thread(sheet.add_all, values):
                break
        await asyncio.to_thread(sheet.close, selection=selection, generated_at=generated_at)
        with path.open("rb") as handle:
            # Unlinked before a byte leaves: no copy of the sheet outlives the response, whatever happens.
            await asyncio.to_thread(shutil.rmtree, scratch / workdir)
            size = os.fstat(handle.fileno()).st_size
            response = web.StreamResponse(headers={**headers, "Content-Type": XLSX_TYPE,
                                                   "Content-Length": str(size)})
            await response.prepare(request)
            while chunk := await asyncio.to_thread(handle.read, 256 * 1024):
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(shutil.rmtree, scratch / workdir)


ROUTES = [
    web.get("/api/documents/{id}/archival", archival),
    web.patch("/api/documents/{id}/metadata", correct_metadata),
    web.get("/api/documents/{id}/metadata/history", metadata_history),
    web.get("/api/documents/{id}/events", document_events),
    web.get("/api/export", export_documents),
]
