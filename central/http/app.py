"""The central web application: ``create_app(config)`` wires the catalog, ingest and routes.

Long-lived resources (the reader connection, the ingest service and its TaskGroup) live in
``cleanup_ctx`` so tests and ``serve`` start and stop them the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from central.catalog.db import Database
from central.config import CentralConfig
from central.http import auth, handlers, presence, records
from central.http.limiter import LoginLimiter
from central.http.state import AUTH_DB, CONFIG, INGEST, LIMITER, METRICS, READER
from central.ingest.service import IngestService, IngestStarter, IngestSupervisor
from central.keys import load_keys
from central.metrics import Metrics
from central.records import archive_jobs

log = logging.getLogger("sohoa.central.app")

ROUTES = [
    web.get("/", handlers.page),
    web.get("/devices/{id}", handlers.page),
    web.get("/documents/{id}", handlers.page),
    web.get("/static/{name:.+}", handlers.static),
    web.get("/favicon.ico", handlers.favicon),
    web.get("/healthz", handlers.healthz),
    web.get("/readyz", handlers.readyz),
    web.get("/metrics", handlers.metrics),
    web.get("/api/devices", handlers.devices),
    web.get("/api/devices/{id}", handlers.device),
    web.get("/api/fleet", handlers.fleet),
    web.get("/api/documents", handlers.documents),
    # Any segment: the handler answers a malformed or out-of-range id with a 400 that says why.
    web.get("/api/documents/{id}", handlers.document),
    web.get("/api/documents/{id}/original", handlers.original),
    web.get("/api/documents/{id}/preview", handlers.preview),
    web.get("/api/openapi.json", handlers.openapi),
    web.get("/api/session", auth.session),
    web.get("/api/audit", handlers.audit_log),
    web.post("/api/devices/{id}/revoke", handlers.revoke_device),
    web.post("/api/devices/{id}/clear-clone", handlers.clear_clone),
    web.post("/login", auth.login),
    web.post("/logout", auth.logout),
    *records.ROUTES,   # issue 9: archival copy, metadata corrections and history, events, export
]
handlers.QUERY_PARAMETERS.update(records.QUERY_PARAMETERS)


async def _ingest_ctx(app: web.Application) -> AsyncIterator[None]:
    supervisor = app[INGEST]
    await supervisor.open()
    task = asyncio.create_task(supervisor.run(), name="central-ingest")
    task.add_done_callback(supervisor.on_done)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if supervisor.service is not None:   # cancelled between a restart and its run
            await supervisor.service.close()


def _database_ctx(key: web.AppKey[Database], *, readonly: bool,
                  name: str) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context owning one catalog connection for the app's lifetime."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        db = Database(app[CONFIG].paths.catalog, readonly=readonly, name=name)
        app[key] = db
        try:
            yield
        finally:
            await db.close()

    return ctx


def create_app(config: CentralConfig, *, ingest: bool = True,
               start_ingest: IngestStarter = IngestService.start,
               watch_presence: bool | None = None) -> web.Application:
    """The aiohttp app; ``ingest=False`` serves the catalog without connecting to the broker.

    ``start_ingest`` builds each ingest service (tests inject failing ones). ``watch_presence``
    (default: with ingest) runs ``central.http.presence``: online/offline log lines, history samples.
    """
    load_keys(config.paths)   # refuse to start without keys, before anything listens
    # Outermost first: errors become JSON, then who is calling, then which parameters are known.
    app = web.Application(middlewares=[handlers.json_errors, auth.authenticate, handlers.known_parameters])
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[LIMITER] = LoginLimiter()
    if ingest:
        app[INGEST] = IngestSupervisor(config, app[METRICS], start=start_ingest)
        app.cleanup_ctx.append(_ingest_ctx)   # first: the writer creates or migrates the schema
        app.cleanup_ctx.append(archive_jobs.worker_ctx(config.paths))   # builds and signs the archival copies
    # Auth writes (sessions, audit) get their own connection; browsing reads never block ingest.
    app.cleanup_ctx.append(_database_ctx(AUTH_DB, readonly=False, name="catalog-auth"))
    app.cleanup_ctx.append(_database_ctx(READER, readonly=True, name="catalog-reader"))
    if ingest if watch_presence is None else watch_presence:
        app.cleanup_ctx.append(presence.presence_ctx)
    app.router.add_routes(ROUTES)
    return app


async def serve_config(config: CentralConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run the HTTP app (which owns the ingest service) until cancelled."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        # reuse_port: several workers on one home serve the same address; the kernel spreads
        # connections among them (Linux SO_REUSEPORT).
        site = web.TCPSite(runner, config.http.host, config.http.port, reuse_port=True)
        await site.start()
        log.info("central listening on http://%s", config.http)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
