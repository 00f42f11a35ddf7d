"""The ingest service: MQTT in → the ingest pipeline (central.ingest.pipeline) → acks and receipts out.

Runs as one TaskGroup (named tasks ``mqtt`` and the pipeline's) inside the web app's cleanup context,
and ``central.http.app.serve_config`` runs that app until cancelled.

``IngestSupervisor`` keeps it running: the HTTP side outlives an ingest that dies of an unexpected
error, so without it /healthz would say ok while nothing is received. A dead service is logged,
reported (/healthz 503, ``ingest_running 0``) and replaced by a fresh one (new MQTT client, new
writer connection; what was not acked is redelivered by the broker) after a growing pause.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from central.config import CentralConfig
from central.ingest.mqtt import MqttClient, MqttSettings
from central.ingest.pipeline import IngestCore, IngestPipeline, PipelineSettings
from central.ingest.quota import Quotas
from central.ingest.rate import MessageRate
from central.ingest.writer import GroupWriter
from central.keys import load_keys
from central.metrics import Metrics
from protocol.topics import CENTRAL_SHARED_FILTER

log = logging.getLogger("sohoa.central.service")

RESTART_BACKOFF_INITIAL_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0


def mqtt_settings(config: CentralConfig) -> MqttSettings:
    address = config.broker.address
    return MqttSettings(host=address.host, port=address.port, username=config.broker.username,
                        password=config.broker.password, client_id=config.broker.client_id,
                        session_expiry_s=config.broker.session_expiry_s,
                        receive_maximum=config.ingest.receive_maximum,
                        # Statuses too come through the shared subscription: nothing is retained at
                        # the broker (retain_available false), so there is nothing a plain one would
                        # add; a box's liveness is how recently it spoke (catalog.STALE_AFTER_S).
                        # Every worker subscribes to the same shared group, each with its own client id.
                        subscriptions=((CENTRAL_SHARED_FILTER, 1),))


def pipeline_settings(config: CentralConfig) -> PipelineSettings:
    ingest = config.ingest
    return PipelineSettings(worker=config.broker.client_id, batch_max=ingest.batch_max,
                            batches_in_flight=ingest.batches_in_flight, assemblers=ingest.assemblers,
                            assembler_processes=ingest.assembler_processes,
                            durability=ingest.durability, quotas=quotas(config),
                            expire_after_s=ingest.expire_after_hours * 3600.0,
                            message_rate=MessageRate(per_second=ingest.max_messages_per_second,
                                                     burst=ingest.max_messages_burst))


def quotas(config: CentralConfig) -> Quotas:
    ingest = config.ingest
    return Quotas(max_open_transfers=ingest.max_open_transfers_per_device,
                  max_open_bytes=ingest.max_open_bytes_per_device,
                  new_transfers_per_hour=ingest.new_transfers_per_hour,
                  new_transfers_burst=ingest.new_transfers_burst,
                  rejected_budget=ingest.rejected_transfers_budget,
                  rejected_window_s=ingest.rejected_transfers_window_hours * 3600.0,
                  flagged_new_transfers_per_hour=ingest.flagged_new_transfers_per_hour)


@dataclass(slots=True)
class IngestService:
    config: CentralConfig
    writer: GroupWriter
    ingestor: IngestCore
    client: MqttClient

    @classmethod
    async def start(cls, config: CentralConfig, metrics: Metrics) -> IngestService:
        core = IngestCore.create(config.paths, load_keys(config.paths), pipeline_settings(config),
                                 max_plaintext=config.ingest.max_plaintext_bytes, metrics=metrics)
        if config.catalog_url:
            from central.ingest import pgstore  # noqa: PLC0415 - psycopg only with a PostgreSQL catalog

            writer = await asyncio.to_thread(
                GroupWriter, before_commit=core.durability.before_commit, begin="BEGIN",
                connect=functools.partial(pgstore.connect, config.catalog_url, ensure_schema=True),
                store=pgstore.PostgresIngestStore)
        else:
            writer = await asyncio.to_thread(GroupWriter, config.paths.catalog,
                                             before_commit=core.durability.before_commit)
        await writer.call(core.start_up)
        return cls(config, writer, core, MqttClient(mqtt_settings(config)))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.client.run(), name="mqtt")
            group.create_task(IngestPipeline(self.ingestor, self.writer, self.client).run(), name="ingest")

    async def close(self) -> None:
        await self.writer.close()
        self.ingestor.journal.close()
        self.ingestor.durability.close()


IngestStarter = Callable[[CentralConfig, Metrics], Awaitable[IngestService]]


class IngestSupervisor:
    """Runs the current ``IngestService``; an unexpected end is logged, reported and restarted.

    ``start`` is the seam that builds a service (``IngestService.start`` in production).
    """

    def __init__(self, config: CentralConfig, metrics: Metrics, *,
                 start: IngestStarter = IngestService.start,
                 backoff_initial_s: float = RESTART_BACKOFF_INITIAL_S,
                 backoff_max_s: float = RESTART_BACKOFF_MAX_S) -> None:
        self._config = config
        self._metrics = metrics
        self._start = start
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self.service: IngestService | None = None
        self.last_error: str | None = None   # an exception class name, never its text (no secrets)
        self.dead = False                    # the supervisor itself ended: only a restart helps
        self.up = asyncio.Event()            # set while a service runs
        self.down = asyncio.Event()          # set while none does (after a failure, or never started)
        self.down.set()

    async def open(self) -> None:
        """Build the first service; a failure here fails the app's startup, loudly."""
        self.service = await self._start(self._config, self._metrics)
        self._set_running(True)   # healthy from the first request on: run() follows at once

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        failures_in_row = 0
        while True:
            service = self.service
            if service is not None:
                started = loop.time()
                try:
                    self._set_running(True)
                    await service.run()
                except Exception as exc:
                    self._failed(exc, "ingest service stopped unexpectedly")
                else:   # it only ever ends by cancellation or an error
                    self._failed(RuntimeError("returned"), "ingest service stopped unexpectedly")
                finally:
                    self._set_running(False)
                    self.service = None
                    await service.close()
                if loop.time() - started > self._backoff_max_s:
                    failures_in_row = 0   # it had been working: a new fault, not a crash loop
            failures_in_row += 1
            await asyncio.sleep(self._backoff(failures_in_row))
            try:
                self.service = await self._start(self._config, self._metrics)
            except Exception as exc:
                self._failed(exc, "cannot restart the ingest service")

    def on_done(self, task: asyncio.Task[None]) -> None:
        """Last resort, should the supervisor itself die: say so, and stay unhealthy."""
        self._set_running(False)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.dead = True
            self._metrics.ingest_failures += 1
            self.last_error = type(exc).__name__
            log.error("ingest supervisor died; nothing is ingested until central restarts", exc_info=exc)

    def _failed(self, exc: BaseException, what: str) -> None:
        self._metrics.ingest_failures += 1
        self.last_error = type(exc).__name__
        log.error("%s (%s); restarting it", what, type(exc).__name__, exc_info=exc)

    def _set_running(self, running: bool) -> None:
        self._metrics.ingest_running = running
        (self.down if running else self.up).clear()
        (self.up if running else self.down).set()

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_max_s, self._backoff_initial_s * 2 ** min(attempt - 1, 16))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 - not cryptographic
