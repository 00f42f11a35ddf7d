"""The clerk's page on the office LAN: read-only, Vietnamese, one HTML page and ``/metrics``.

``GET /`` lists each recent scan by file name (received → OCR'd → sent → archived, or refused
with the reason in plain Vietnamese and what to do), the link to central, free disk and the last
successful send; ``?lang=en`` switches to English. It is server-rendered HTML with no script, so
any browser in the office shows it. It does not reload itself (a timed refresh moves the page
under someone reading it, WCAG 2.2.1): it says when its figures are from, with a reload link.
``GET /metrics`` is the box's Prometheus exposition, ``GET /status.json`` the clerk's view as
JSON. Nothing here changes anything on the box.

The same task writes the view to ``HOME/status-view.json`` (0640) for `sohoa edge status`.
A page that cannot bind its port (taken, no such address) is logged and skipped: the box's real
work never stops for its status page.

The server is a few lines over ``asyncio.start_server``, not aiohttp: three read-only GET pages do
not need a web framework, and importing aiohttp's server and client kept ~11.6 MB resident in the
box's one long-lived process (a sixth of it). One request per connection, its head bounded in size
(8 KiB) and in time (10 s), at most 16 connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.clerk import (
    CHECK_EVERY_S,
    LANGS,
    VIEW_MODE,
    VIEW_NAME,
    WRITE_EVERY_S,
    age,
    alarm_text,
    build_view,
    size,
    t,
    vn_time,
)
from edge.fsutil import disk_free, write_status_file
from edge.quarantine import list_failed
from edge.reasons import explain
from protocol.version import version

if TYPE_CHECKING:
    from edge.service import EdgeService

log = logging.getLogger("sohoa.edge.statuspage")

# name → (type, help): the documented edge metrics (a test holds the exposition to this list).
METRICS: dict[str, tuple[str, str]] = {
    "sohoa_edge_info": ("gauge", "Always 1; the labels say which box and which sohoa version."),
    "sohoa_edge_documents": ("gauge", "Outbox rows by state."),
    "sohoa_edge_queue_documents": ("gauge", "Documents taken and not yet receipted by central."),
    "sohoa_edge_queue_bytes": ("gauge", "Bytes they hold on the box (originals and envelopes)."),
    "sohoa_edge_queue_cap_bytes": ("gauge", "The outbox cap."),
    "sohoa_edge_oldest_queued_age_seconds": ("gauge", "Age of the oldest document waiting."),
    "sohoa_edge_refused_documents": ("gauge", "Scans in the clerk's refused folder."),
    "sohoa_edge_link_up": ("gauge", "1 while connected to the broker."),
    "sohoa_edge_disk_free_bytes": ("gauge", "Free bytes on the box's home filesystem."),
    "sohoa_edge_last_receipt_timestamp_seconds": ("gauge", "When central last receipted a document."),
    "sohoa_edge_alarms": ("gauge", "Alarms raised now."),
    "sohoa_edge_scans_taken": ("counter", "Scans taken from the scan folder by this process."),
    "sohoa_edge_scans_refused_at_intake": ("counter", "Files refused at intake by this process."),
    "sohoa_edge_ocr_pages": ("counter", "Pages OCR'd by this process."),
    "sohoa_edge_ocr_seconds": ("counter", "Seconds spent in OCR by this process."),
    "sohoa_edge_original_bytes": ("counter", "Bytes of originals taken by this process."),
    "sohoa_edge_sealed_bytes": ("counter", "Bytes of envelopes sealed by this process."),
    "sohoa_edge_sent_bytes": ("counter", "Payload bytes published to the broker (re-sends included)."),
    "sohoa_edge_resent_bytes": ("counter", "Of which segments sent before."),
    "sohoa_edge_receipts": ("counter", "Central receipts recorded by this process."),
    "sohoa_edge_rejections": ("counter", "Documents central refused, seen by this process."),
    "sohoa_edge_connects": ("counter", "Successful broker connections by this process."),
}

_STEPS = ("received", "ocr", "sent", "archived")
_DONE = {"received": 1, "ocr": 2, "sending": 2, "archived": 4}


class _Collector(Collector):
    def __init__(self, service: EdgeService, view: dict[str, Any]) -> None:
        self._service = service
        self._view = view

    def collect(self) -> Iterator[Metric]:
        s, v = self._service, self._view
        info = GaugeMetricFamily("sohoa_edge_info", METRICS["sohoa_edge_info"][1],
                                 labels=["device", "version"])
        info.add_metric([v["device"], version()], 1)
        yield info
        states = GaugeMetricFamily("sohoa_edge_documents", METRICS["sohoa_edge_documents"][1],
                                   labels=["state"])
        for state, count in sorted(v["counts"].items()):
            states.add_metric([state], count)
        yield states
        gauges = {"sohoa_edge_queue_documents": v["queued_docs"],
                  "sohoa_edge_queue_bytes": v["queued_bytes"],
                  "sohoa_edge_queue_cap_bytes": v["cap_bytes"],
                  "sohoa_edge_oldest_queued_age_seconds": v["oldest_age_s"],
                  "sohoa_edge_refused_documents": len(v["refused"]), "sohoa_edge_link_up": int(v["online"]),
                  "sohoa_edge_alarms": len(v["alarms"])}
        if v["disk_free_bytes"] is not None:
            gauges["sohoa_edge_disk_free_bytes"] = v["disk_free_bytes"]
        if v["last_receipt_at"] is not None:
            gauges["sohoa_edge_last_receipt_timestamp_seconds"] = v["last_receipt_at"]
        for name, value in gauges.items():
            yield GaugeMetricFamily(name, METRICS[name][1], value=value)
        counters = s.counters
        uplink = s._uplink
        for name, value in (("sohoa_edge_scans_taken", counters.taken),
                            ("sohoa_edge_scans_refused_at_intake", counters.failed),
                            ("sohoa_edge_ocr_pages", counters.pages),
                            ("sohoa_edge_ocr_seconds", counters.ocr_seconds),
                            ("sohoa_edge_original_bytes", counters.original_bytes),
                            ("sohoa_edge_sealed_bytes", counters.ciphertext_bytes),
                            ("sohoa_edge_sent_bytes", uplink.bytes_on_wire if uplink else 0),
                            ("sohoa_edge_resent_bytes", uplink.resent_bytes if uplink else 0),
                            ("sohoa_edge_receipts", uplink.delivered if uplink else 0),
                            ("sohoa_edge_rejections", uplink.rejected if uplink else 0),
                            ("sohoa_edge_connects", uplink.connects if uplink else 0)):
            yield CounterMetricFamily(name, METRICS[name][1], value=value)


async def current_view(service: EdgeService) -> dict[str, Any]:
    """The clerk's view, now (outbox, refused folder, link, disk, alarms)."""
    cfg = service.config
    outbox = service.outbox
    stats = await outbox.stats()
    recent = await outbox.recent(60)
    refused = await asyncio.to_thread(list_failed, cfg.refused_dir)
    uplink = service._uplink
    try:
        free = disk_free(cfg.home)
    except OSError:
        free = None
    return build_view(
        device=cfg.device_id, stats=stats, recent=recent, refused=refused,
        refused_folder=cfg.intake.refused_folder, online=bool(uplink and uplink.connected),
        link_error=uplink.last_error if uplink else None, connected_since=None, disk_free=free,
        alarms=sorted(service.alarms.active), last_error=service.alarms.current_error(),
        cap_bytes=cfg.outbox.cap_bytes,
        version=version(), now=time.time())


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def render_page(view: dict[str, Any], lang: str) -> str:
    """The page as HTML (everything from the box escaped; no script)."""
    def tr(key: str, **params: Any) -> str:
        return _e(t(lang, key, **params))

    def when(at: float | None) -> str:
        if at is None:
            return tr("never")
        return f"{_e(vn_time(at))} ({_e(age(max(0.0, view['written_at'] - at), lang))})"

    folder = view["refused_folder"]
    link = (f'<span class="on">{tr("online")}</span>' if view["online"]
            else f'<span class="off">{tr("offline")}</span>')
    if not view["online"] and view["link_error"]:
        link += f'<br><small>{tr("link_error", error=view["link_error"])}</small>'
    facts = [
        (tr("link"), link),
        (tr("last_send"), when(view["last_receipt_at"])),
        (tr("waiting"), tr("waiting_value", docs=view["queued_docs"],
                           bytes=size(view["queued_bytes"], lang))),
        (tr("oldest"), _e(age(view["oldest_age_s"], lang)) if view["queued_docs"] else "—"),
        (tr("archived"), _e(view["counts"].get("delivered", 0))),
        (tr("refused_count", folder=folder), _e(len(view["refused"]))),
        (tr("disk_free"), _e(size(view["disk_free_bytes"], lang))),
    ]
    rows = "\n".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    alarms = ""
    if view["alarms"]:
        alarms = (f'<h2>{tr("alarms")}</h2><ul class="alarms">'
                  + "".join(f"<li>{_e(alarm_text(lang, a))}</li>" for a in view["alarms"]) + "</ul>")
    refused_items = []
    for item in view["refused"]:
        what, todo = ((item["what_vi"], item["todo_vi"]) if lang == "vi"
                      else (item["what_en"], item["todo_en"]))
        refused_items.append(
            f'<li class="refused"><b>{_e(item["name"])}</b> <small>({_e(vn_time(item["since"]))})</small>'
            f'<br>{tr("reason")}: {_e(what)}<br>{tr("todo")}: {_e(todo)}</li>')
    if refused_items:
        refused = (f'<p>{tr("refused_where", folder=folder)} {tr("retry")}</p>'
                   f'<ul id="refused">{"".join(refused_items)}</ul>')
    else:
        refused = f'<p id="refused">{tr("refused_none")}</p>'
    scan_rows = []
    for scan in view["recent"]:
        stage = scan["stage"]
        if stage == "refused":
            why = explain(scan["reason_code"])
            progress = (f'<span class="off">{tr("stage_refused")}</span>: '
                        f'{_e(why.what_vi if lang == "vi" else why.what_en)}')
        else:
            done = _DONE[stage]
            steps = " → ".join(
                (f"<b>✓ {tr('step_' + step)}</b>" if i < done else
                 f'<span class="todo">{tr("step_" + step)}</span>') for i, step in enumerate(_STEPS))
            progress = f'{steps}<br><small>{tr("stage_" + stage)}</small>'
        scan_rows.append(f'<tr data-stage="{_e(stage)}">'
                         f'<td data-label="{tr("col_file")}">{_e(scan["name"])}</td>'
                         f'<td data-label="{tr("col_progress")}">{progress}</td>'
                         f'<td data-label="{tr("col_time")}">{_e(vn_time(scan["at"]))}</td></tr>')
    recent = (f'<table id="recent"><thead><tr><th scope="col">{tr("col_file")}</th>'
              f'<th scope="col">{tr("col_progress")}</th><th scope="col">{tr("col_time")}</th></tr></thead>'
              f'<tbody>{"".join(scan_rows)}</tbody></table>') if scan_rows else f'<p>{tr("recent_none")}</p>'
    other = "en" if lang == "vi" else "vi"
    return f"""<!doctype html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{tr("title", device=view["device"])}</title>
<style>
{_CSS}</style>
</head>
<body>
<header><h1>{tr("title", device=view["device"])}</h1>
<a href="{tr("switch_href")}" lang="{other}" hreflang="{other}">{tr("switch")}</a></header>
<main>
<dl id="facts">
{rows}
</dl>
{alarms}
<h2>{tr("refused")}</h2>
{refused}
<h2>{tr("recent")}</h2>
{recent}
</main>
<footer><p class="note">{tr("times_note", time=vn_time(view["written_at"]))}
<a href="?lang={lang}">{tr("reload")}</a></p></footer>
</body>
</html>
"""


_CSS = """* { box-sizing: border-box; }
body { font: 16px/1.45 system-ui, "Noto Sans", "DejaVu Sans", sans-serif; margin: 0 auto;
       padding: 0 1rem 2rem; max-width: 60rem; color: #1d1d1d; overflow-wrap: anywhere; }
header { display: flex; flex-wrap: wrap; justify-content: space-between; align-items: center; gap: .5rem; }
h1 { font-size: 1.3rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
a { color: #0b4f9c; } .on { color: #0a6b0a; font-weight: bold; } .off { color: #a00000; font-weight: bold; }
dl { display: grid; grid-template-columns: minmax(10rem, max-content) 1fr; gap: .3rem 1rem; }
dt { color: #555; } dd { margin: 0; } small, .todo, .note { color: #555; }
ul.alarms li, li.refused b { color: #a00000; } li.refused { margin-bottom: .7rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35rem .5rem; border-bottom: 1px solid #ddd; vertical-align: top; }
@media (max-width: 640px) {
  dl { grid-template-columns: 1fr; } dd { margin-bottom: .4rem; }
  table, tbody, tr, td { display: block; width: 100%; }
  thead { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
  tr { border: 1px solid #ccc; border-radius: 4px; margin-bottom: .6rem; padding: .3rem .5rem; }
  td { border: 0; padding: .1rem 0; } td::before { content: attr(data-label) ": "; color: #555; }
}
"""
PAGE_HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                           "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                "Referrer-Policy": "no-referrer"}
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16


@dataclass(frozen=True, slots=True)
class Response:
    """What one route answers (Content-Length and Connection are added when it is sent)."""

    body: bytes
    content_type: str
    status: HTTPStatus = HTTPStatus.OK
    headers: Mapping[str, str] = field(default_factory=dict)


def _plain(status: HTTPStatus, headers: Mapping[str, str] | None = None) -> Response:
    return Response(f"{status.value}: {status.phrase}".encode(), "text/plain; charset=utf-8", status,
                    headers or {})


async def _page(service: EdgeService, query: dict[str, list[str]]) -> Response:
    lang = query.get("lang", ["vi"])[-1]
    if lang not in LANGS:
        lang = "vi"
    view = await current_view(service)
    return Response(render_page(view, lang).encode("utf-8"), "text/html; charset=utf-8", headers=PAGE_HEADERS)


async def _metrics(service: EdgeService, query: dict[str, list[str]]) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(service, await current_view(service)))
    return Response(generate_latest(registry), CONTENT_TYPE_LATEST)


async def _view(service: EdgeService, query: dict[str, list[str]]) -> Response:
    body = json.dumps(await current_view(service), ensure_ascii=False).encode("utf-8")
    return Response(body, "application/json; charset=utf-8")


Route = Callable[["EdgeService", dict[str, list[str]]], Awaitable[Response]]
ROUTES: dict[str, Route] = {"/": _page, "/metrics": _metrics, "/status.json": _view}


def parse_request_line(head: bytes) -> tuple[str, str, dict[str, list[str]]] | HTTPStatus:
    """``GET /path?query HTTP/1.1`` → (method, path, query), or the status that refuses it."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        return HTTPStatus.BAD_REQUEST
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return HTTPStatus.BAD_REQUEST
    url = urlsplit(target)
    return method, url.path, parse_qs(url.query)


async def answer(service: EdgeService, head: bytes) -> tuple[Response, bool]:
    """The response to one request head, and whether to send its body (not for HEAD)."""
    parsed = parse_request_line(head)
    if isinstance(parsed, HTTPStatus):
        return _plain(parsed), True
    method, path, query = parsed
    route = ROUTES.get(path)
    if route is None:
        return _plain(HTTPStatus.NOT_FOUND), method != "HEAD"
    if method not in ("GET", "HEAD"):
        return _plain(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, HEAD"}), True
    return await route(service, query), method == "GET"


def _encode(response: Response, *, with_body: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status.value} {response.status.phrase}",
             f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}",
             "Connection: close", *(f"{name}: {value}" for name, value in response.headers.items())]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + response.body if with_body else head


class StatusServer:
    """The page's listener: one request per connection, answered from the service's live view."""

    def __init__(self, service: EdgeService) -> None:
        self._service = service
        self._open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            except asyncio.LimitOverrunError:
                writer.write(_encode(_plain(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE), with_body=True))
                return
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            try:
                response, with_body = await answer(self._service, head)
            except Exception:
                log.exception("status page: cannot answer %r", head.split(b"\r\n", 1)[0][:200])
                response, with_body = _plain(HTTPStatus.INTERNAL_SERVER_ERROR), True
            writer.write(_encode(response, with_body=with_body))
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def write_view(path: Path, view: dict[str, Any]) -> None:
    write_status_file(path, json.dumps(view, ensure_ascii=False).encode("utf-8"), VIEW_MODE)


async def run(service: EdgeService) -> None:
    """Serve the page (if configured) and keep ``status-view.json`` current, until cancelled."""
    cfg = service.config.status_page
    server: asyncio.Server | None = None
    if cfg.enabled:
        try:
            server = await asyncio.start_server(StatusServer(service).handle, cfg.host, cfg.port,
                                                limit=MAX_REQUEST_HEAD)
            sockets = server.sockets
            service.status_page_port = int(sockets[0].getsockname()[1]) if sockets else cfg.port
            log.info("clerk's status page on http://%s:%d/", cfg.host, service.status_page_port)
        except OSError as exc:
            log.warning("status page not served on %s:%d: %s", cfg.host, cfg.port, exc)
            server = None
    path = service.config.home / VIEW_NAME
    written: tuple[dict[str, Any], float] | None = None
    last: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                view = await current_view(service)
                same = {**view, "written_at": None, "disk_free_bytes": None}
                # Spare the SD card: write when something the clerk sees changed, else every 10 s
                # (the heartbeat that tells `sohoa edge status` the service runs).
                if written is None or same != written[0] or loop.time() - written[1] >= WRITE_EVERY_S:
                    await asyncio.to_thread(write_view, path, view)
                    written, last = (same, loop.time()), view
            except OSError as exc:   # a full disk: the status.json fallback carries the alarm
                log.debug("cannot write %s: %s", path, exc)
            await asyncio.sleep(CHECK_EVERY_S)
    finally:
        # A clean stop says so at once: `sohoa edge status` must not show a stopped box as running
        # for the minute its last view stays fresh (and, as root, then reads the outbox itself).
        if written is not None:
            with contextlib.suppress(OSError):
                write_view(path, {**last, "stopped_at": time.time()})
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

