"""The ingest service: MQTT in → durable batch in the writer thread → acks and receipts out.

Runs as one TaskGroup (named tasks ``mqtt`` and ``ingest``) inside the web app's cleanup context,
and ``central.app.serve_config`` runs that app until cancelled.

``IngestSupervisor`` keeps it running: the HTTP side outlives an ingest that dies of an unexpected
error, so without it /healthz would say ok while nothing is received. A dead service is logged,
reported (/healthz 503, ``ingest_running 0``) and replaced by a fresh one (new MQTT client, new
writer connection; what was not acked is redelivered by the broker) after a growing pause.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from central.config import CentralConfig
from central.db import Database
from central.ingest import Ingestor
from central.keys import load_keys
from central.metrics import Metrics
from central.mqtt import Inbound, MqttClient, MqttSettings, PublishError
from protocol.messages import encode
from protocol.topics import CENTRAL_SHARED_FILTER

log = logging.getLogger("sohoa.central.service")

PUBLISH_TIMEOUT_S = 30.0
RESTART_BACKOFF_INITIAL_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0


def mqtt_settings(config: CentralConfig) -> MqttSettings:
    address = config.broker.address
    return MqttSettings(host=address.host, port=address.port, username=config.broker.username,
                        password=config.broker.password, client_id=config.broker.client_id,
                        session_expiry_s=config.broker.session_expiry_s,
                        # Statuses too come through the shared subscription: nothing is retained at
                        # the broker (retain_available false), so there is nothing a plain one would
                        # add; a box's liveness is how recently it spoke (catalog.STALE_AFTER_S).
                        subscriptions=((CENTRAL_SHARED_FILTER, 1),))


@dataclass(slots=True)
class IngestService:
    config: CentralConfig
    writer: Database
    ingestor: Ingestor
    client: MqttClient

    @classmethod
    async def start(cls, config: CentralConfig, metrics: Metrics) -> IngestService:
        writer = Database(config.paths.catalog, readonly=False, name="catalog-writer")
        keys = load_keys(config.paths)
        ingestor = await writer.call(lambda conn: Ingestor(
            conn, config.paths, keys, max_plaintext=config.ingest.max_plaintext_bytes, metrics=metrics))
        return cls(config, writer, ingestor, MqttClient(mqtt_settings(config)))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.client.run(), name="mqtt")
            group.create_task(self._ingest_loop(), name="ingest")

    async def close(self) -> None:
        await self.writer.close()

    async def _ingest_loop(self) -> None:
        inbox = self.client.inbox
        limit = self.config.ingest.batch_max
        while True:
            batch: list[Inbound] = [await inbox.get()]
            while len(batch) < limit and not inbox.empty():
                batch.append(inbox.get_nowait())
            items = [(m.topic, m.payload) for m in batch]
            try:
                replies = await self.writer.call(lambda _conn, items=items: self.ingestor.handle_batch(items))
            except Exception:
                # Devices resend what is not acked; a failing batch must not stop the service.
                log.exception("ingest batch of %d messages failed", len(batch))
                replies = []
            for message in batch:
                self.client.ack(message)
            publishes = [self.client.publish(*encode(reply)) for reply in replies]
            if publishes:
                try:
                    async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                        results = await asyncio.gather(*publishes, return_exceptions=True)
                except TimeoutError:
                    log.warning("broker did not acknowledge %d replies in %.0f s", len(publishes),
                                PUBLISH_TIMEOUT_S)
                    results = []
                for result in results:
                    if isinstance(result, PublishError):
                        log.warning("reply not delivered (the device will ask again): %s", result)
                    elif isinstance(result, BaseException):
                        raise result



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
