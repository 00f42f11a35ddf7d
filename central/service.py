"""The ingest service: MQTT in → durable batch in the writer thread → acks and receipts out.

Runs as one TaskGroup (named tasks ``mqtt`` and ``ingest``) inside the web app's cleanup context,
and ``central.app.serve_config`` runs that app until cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from central.config import CentralConfig
from central.db import Database
from central.ingest import Ingestor
from central.keys import load_keys
from central.metrics import Metrics
from central.mqtt import Inbound, MqttClient, MqttSettings, PublishError
from protocol.messages import encode
from protocol.topics import CENTRAL_SHARED_FILTER, UP

log = logging.getLogger("sohoa.central.service")

PUBLISH_TIMEOUT_S = 30.0
# Shared subscriptions never deliver retained messages, so statuses retained while central was
# away also come through a plain subscription (a status seen twice is upserted twice, harmlessly).
STATUS_FILTER = f"{UP}/+/status"


def mqtt_settings(config: CentralConfig) -> MqttSettings:
    address = config.broker.address
    return MqttSettings(host=address.host, port=address.port, username=config.broker.username,
                        password=config.broker.password, client_id=config.broker.client_id,
                        session_expiry_s=config.broker.session_expiry_s,
                        subscriptions=((CENTRAL_SHARED_FILTER, 1), (STATUS_FILTER, 1)))


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

