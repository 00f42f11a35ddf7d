"""Central end to end over a real broker: MQTT ingest through the app's cleanup_ctx, then HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from urllib.parse import unquote

import nacl.signing
from aiohttp import web
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pytest_aiohttp.plugin import AiohttpClient, AiohttpServer

from central.config import CentralConfig
from central.http.app import create_app
from central.http.state import INGEST
from central.ingest.mqtt import MqttClient
from central.ingest.service import IngestService, IngestStarter
from central.keys import CentralKeys
from central.metrics import Metrics
from protocol.messages import RECEIPT_IS_STORED, Ack, AckState, Message, Receipt, Status, decode, encode
from tests.central.builders import Sealed, seal_document
from tests.central.conftest import Enroll
from tests.central.test_broker import TIMEOUT, connected
from tests.support.broker import Broker
from tests.support.prom import parse


async def send_and_wait_receipt(device: MqttClient, sealed: Sealed, segment_size: int = 16 * 1024) -> Receipt:
    for message in sealed.messages(segment_size):
        await device.publish(*encode(message))
    async with asyncio.timeout(TIMEOUT):
        while True:
            inbound = await device.inbox.get()
            reply = decode(inbound.topic, inbound.payload)
            if isinstance(reply, Ack):
                assert reply.state is not AckState.REJECTED, reply
            if isinstance(reply, Receipt) and reply.tid == sealed.tid:
                return reply


async def test_ingest_over_mqtt_then_browse_over_http(config: CentralConfig, central_broker: Broker,
                                                      central_keys: CentralKeys, enroll: Enroll,
                                                      aiohttp_client: AiohttpClient) -> None:
    bundle = enroll("xa-tan-trao")
    client = await aiohttp_client(create_app(config))
    await ingest_ready(client.app)
    original = b"%PDF-1.4\n" + secrets.token_bytes(70_000)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=bundle.signing_key,
                           central_key=central_keys.encryption.public_key, original=original)
    async with connected(central_broker.device_port, bundle.username, bundle.password,
                         (("sohoa/v1/down/xa-tan-trao/#", 1),)) as device:
        await device.publish(*encode(Status("xa-tan-trao", online=True, queue_docs=1, queue_bytes=70_000)))
        receipt = await send_and_wait_receipt(device, sealed)
    body = receipt.verify(central_keys.receipt.verify_key)
    assert body.sha256 == hashlib.sha256(original).hexdigest()

    auth = {"Authorization": f"Bearer {config.api_token}"}
    for path in ("/api/devices", "/api/documents", f"/api/documents/{body.document_id}",
                 f"/api/documents/{body.document_id}/original"):
        assert (await client.get(path)).status == 401
        assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status == 401

    devices = await (await client.get("/api/devices", headers=auth)).json()
    assert [(d["id"], d["online"], d["backlog_docs"]) for d in devices] == [("xa-tan-trao", True, 1)]
    assert devices[0]["last_receipt"] and devices[0]["last_seen"]

    for q in ("Quyết định", "quyet dinh"):
        found = await (await client.get("/api/documents", params={"q": q}, headers=auth)).json()
        assert [d["id"] for d in found] == [body.document_id]
    assert await (await client.get("/api/documents", params={"q": "không có"}, headers=auth)).json() == []

    detail = await (await client.get(f"/api/documents/{body.document_id}", headers=auth)).json()
    assert detail["filename"] == "Công văn số 5 – Tuyên Quang.pdf" and "Quyết định" in detail["text"]
    assert detail["package_metadata"]["tid"] == sealed.tid   # metadata: the six archival fields

    response = await client.get(f"/api/documents/{body.document_id}/original", headers=auth)
    assert response.status == 200 and await response.read() == original
    assert response.headers["Content-Type"] == "application/pdf"
    disposition = response.headers["Content-Disposition"]
    encoded = re.search(r"filename\*=UTF-8''(\S+)", disposition)
    assert encoded and unquote(encoded.group(1)) == "Công văn số 5 – Tuyên Quang.pdf"
    assert (await client.get("/api/documents/999999", headers=auth)).status == 404

    metrics = await (await client.get("/metrics")).text()
    samples = parse_prometheus(metrics)
    assert samples["sohoa_catalog_documents"] == 1 and samples["sohoa_catalog_stored_bytes"] == len(original)
    assert samples["sohoa_central_segments_received_total"] == len(sealed.segments(16 * 1024))
    assert samples["sohoa_central_transfers_active"] == 0 and samples['sohoa_devices{state="online"}'] == 1
    assert (await (await client.get("/healthz")).json())["mqtt_connected"] is True
    assert (await client.get("/readyz")).status == 200
    page = await client.get("/")   # no session: the sign-in page, never the dashboard
    assert page.status == 200 and 'id="login"' in await page.text()


async def test_bad_signature_over_mqtt_gets_rejected(config: CentralConfig, central_broker: Broker,
                                                     central_keys: CentralKeys, enroll: Enroll,
                                                     aiohttp_client: AiohttpClient) -> None:
    bundle = enroll("xa-tan-trao")
    await ingest_ready((await aiohttp_client(create_app(config))).app)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=nacl.signing.SigningKey.generate(),
                           central_key=central_keys.encryption.public_key, original=b"%PDF-1.4 forged")
    async with connected(central_broker.device_port, bundle.username, bundle.password,
                         (("sohoa/v1/down/xa-tan-trao/#", 1),)) as device:
        await device.publish(*encode(sealed.init()))
        async with asyncio.timeout(TIMEOUT):
            inbound = await device.inbox.get()
    ack = decode(inbound.topic, inbound.payload)
    assert isinstance(ack, Ack) and (ack.state, ack.error_class) == (AckState.REJECTED, "SignatureError")


async def test_central_restart_mid_transfer_resumes(config: CentralConfig, central_broker: Broker,
                                                    central_keys: CentralKeys, enroll: Enroll,
                                                    aiohttp_server: AiohttpServer) -> None:
    bundle = enroll("xa-tan-trao")
    original = secrets.token_bytes(100_000)
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=bundle.signing_key,
                           central_key=central_keys.encryption.public_key, original=original,
                           media_type="image/jpeg", name="Ảnh 1.jpg")
    segments = sealed.segments(8 * 1024)
    half = len(segments) // 2
    async with connected(central_broker.device_port, bundle.username, bundle.password,
                         (("sohoa/v1/down/xa-tan-trao/#", 1),)) as device:
        server = await aiohttp_server(create_app(config))
        await ingest_ready(server.app)
        opening: list[Message] = [sealed.init(), *segments[:half]]
        for message in opening:
            await device.publish(*encode(message))
        async with asyncio.timeout(TIMEOUT):
            while True:
                inbound = await device.inbox.get()
                reply = decode(inbound.topic, inbound.payload)
                assert isinstance(reply, Ack)
                if reply.ranges == ((0, segments[half].offset),):
                    break
        await server.close()   # central stops; its session keeps queueing at the broker

        await ingest_ready((await aiohttp_server(create_app(config))).app)
        await device.publish(*encode(sealed.init()))
        async with asyncio.timeout(TIMEOUT):
            while True:
                inbound = await device.inbox.get()
                reply = decode(inbound.topic, inbound.payload)
                if isinstance(reply, Ack) and reply.state is AckState.RECEIVING:
                    # Only the missing tail is sent: what central held survived the restart.
                    assert reply.ranges[0] == (0, segments[half].offset)
                    break
        receipt = await send_and_wait_receipt(device, Sealed(sealed.device, sealed.tid, sealed.seq,
                                                             sealed.signed, sealed.ciphertext))
    assert receipt.body.sha256 == hashlib.sha256(original).hexdigest()


def receipt_is_stored() -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [RECEIPT_IS_STORED]
    return props


async def answers_until_receipt(device: MqttClient, messages: list[Message],
                                init_properties: Properties | None) -> list[Ack | Receipt]:
    """Publish a transfer (its init with ``init_properties``); the outcome acks and the receipt."""
    for message in messages:
        await device.publish(*encode(message), properties=init_properties if message is messages[0] else None)
    answers: list[Ack | Receipt] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            inbound = await device.inbox.get()
            reply = decode(inbound.topic, inbound.payload)
            if isinstance(reply, Ack) and reply.state is not AckState.RECEIVING:
                answers.append(reply)
            if isinstance(reply, Receipt):
                answers.append(reply)
                return answers


async def test_the_receipt_stands_for_stored_only_for_edges_that_say_so(
        config: CentralConfig, central_broker: Broker, central_keys: CentralKeys, enroll: Enroll,
        aiohttp_client: AiohttpClient) -> None:
    """A rollout has both releases at once: an edge whose init carries RECEIPT_IS_STORED gets the
    receipt alone; an older one (no property) still gets STORED, then the receipt; an edge rolled back
    says so with its next init. Every receipt still names exactly the bytes sent."""
    await ingest_ready((await aiohttp_client(create_app(config))).app)
    for name, declares in (("xa-moi", True), ("xa-cu", False)):
        bundle = enroll(name)
        original = secrets.token_bytes(40_000)
        sealed = seal_document(device=name, seq=1, signing_key=bundle.signing_key,
                               central_key=central_keys.encryption.public_key, original=original)
        props = receipt_is_stored() if declares else None
        async with connected(central_broker.device_port, bundle.username, bundle.password,
                             ((f"sohoa/v1/down/{name}/#", 1),)) as device:
            # No fin: central assembles once it holds every byte, and a fin could be answered twice.
            answers = await answers_until_receipt(device, [sealed.init(), *sealed.segments(16 * 1024)], props)
            states = [a.state if isinstance(a, Ack) else "receipt" for a in answers]
            assert states == (["receipt"] if declares else [AckState.STORED, "receipt"]), (name, states)
            receipt = answers[-1]
            assert isinstance(receipt, Receipt)
            body = receipt.verify(central_keys.receipt.verify_key)
            assert body.sha256 == hashlib.sha256(original).hexdigest()
            # Announced again once stored: the same receipt, the same rule. The edge that declared
            # it now announces without (rolled back to the older release): STORED comes again.
            again = await answers_until_receipt(device, [sealed.init()], None)
            assert again == [Ack(name, sealed.tid, AckState.STORED), receipt]
            if declares:
                assert await answers_until_receipt(device, [sealed.init()], receipt_is_stored()) == [receipt]


class _DiesAtOnce(IngestService):
    """A real service whose run fails the way an unexpected bug in the ingest loop would."""

    async def run(self) -> None:
        raise RuntimeError("lỗi không lường trước trong vòng nhận")


def failing_starts(failures: int) -> tuple[list[str], IngestStarter]:
    """A ``start_ingest`` seam: the first ``failures`` services die at once, later ones are real."""
    started: list[str] = []

    async def start(config: CentralConfig, metrics: Metrics) -> IngestService:
        real = await IngestService.start(config, metrics)
        if len(started) < failures:
            started.append("dies")
            return _DiesAtOnce(real.config, real.writer, real.ingestor, real.client)
        started.append("real")
        return real

    return started, start


async def test_ingest_that_dies_makes_healthz_503_and_shows_in_metrics(
        config: CentralConfig, aiohttp_client: AiohttpClient) -> None:
    _, start = failing_starts(failures=1_000)
    client = await aiohttp_client(create_app(config, start_ingest=start))
    supervisor = client.app[INGEST]
    async with asyncio.timeout(TIMEOUT):
        await supervisor.down.wait()
    # Alive (the supervisor restarts the ingest by itself), but not ready.
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 503
    body = await ready.json()
    assert body["status"] == "not ready" and body["last_error"] == "RuntimeError"
    assert body["ingest_failures"] >= 1 and body["ingest_running"] is False
    assert any("ingest stopped" in problem for problem in body["problems"])
    samples = parse_prometheus(await (await client.get("/metrics")).text())
    assert samples["sohoa_central_ingest_running"] == 0
    assert samples["sohoa_central_ingest_failures_total"] >= 1


async def test_ingest_that_dies_is_restarted_and_ingests_again(
        config: CentralConfig, central_broker: Broker, central_keys: CentralKeys, enroll: Enroll,
        aiohttp_client: AiohttpClient) -> None:
    bundle = enroll("xa-tan-trao")
    started, start = failing_starts(failures=1)
    client = await aiohttp_client(create_app(config, start_ingest=start))
    supervisor = client.app[INGEST]
    async with asyncio.timeout(TIMEOUT):
        await supervisor.down.wait()
        await supervisor.up.wait()   # restarted after the (first, ~1 s) backoff
    assert started == ["dies", "real"]
    await ingest_ready(client.app)
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json())["status"] == "ok"
    assert (await client.get("/readyz")).status == 200
    samples = parse_prometheus(await (await client.get("/metrics")).text())
    assert samples["sohoa_central_ingest_running"] == 1
    assert samples["sohoa_central_ingest_failures_total"] == 1
    sealed = seal_document(device="xa-tan-trao", seq=1, signing_key=bundle.signing_key,
                           central_key=central_keys.encryption.public_key, original=b"%PDF-1.4 restarted")
    async with connected(central_broker.device_port, bundle.username, bundle.password,
                         (("sohoa/v1/down/xa-tan-trao/#", 1),)) as device:
        receipt = await send_and_wait_receipt(device, sealed)
    assert receipt.tid == sealed.tid


async def ingest_ready(app: web.Application) -> None:
    async with asyncio.timeout(TIMEOUT):
        service = app[INGEST].service
        assert service is not None
        await service.client.ready.wait()


def parse_prometheus(text: str) -> dict[str, float]:
    return parse(text)[1]


async def test_one_circular_from_two_communes_over_mqtt(config: CentralConfig, central_broker: Broker,
                                                        central_keys: CentralKeys, enroll: Enroll,
                                                        aiohttp_client: AiohttpClient) -> None:
    """Issue 7 item 3 over the real broker: each commune's receipt names its own document, each keeps
    its name, text and capture time, and the bytes are stored once."""
    client = await aiohttp_client(create_app(config))
    await ingest_ready(client.app)
    circular = b"%PDF-1.4\n" + secrets.token_bytes(30_000) + b"\n%%EOF\n"
    sent = {
        "xa-tan-trao": ("Công văn 15 – Tân Trào.pdf", "Công văn số 15 gửi xã Tân Trào",
                        "2026-11-02T07:30:00Z"),
        "xa-minh-thanh": ("Công văn 15 – Minh Thanh.pdf", "Bản lưu tại xã Minh Thanh",
                          "2026-11-03T09:15:00Z"),
    }
    receipts = {}
    for device, (name, text, captured_at) in sent.items():
        bundle = enroll(device)
        sealed = seal_document(device=device, seq=1, signing_key=bundle.signing_key,
                               central_key=central_keys.encryption.public_key, original=circular, name=name,
                               text=text, captured_at=captured_at)
        async with connected(central_broker.device_port, bundle.username, bundle.password,
                             ((f"sohoa/v1/down/{device}/#", 1),)) as box:
            receipt = await send_and_wait_receipt(box, sealed)
        receipts[device] = receipt.verify(central_keys.receipt.verify_key)
    first, second = receipts["xa-tan-trao"], receipts["xa-minh-thanh"]
    assert first.document_id != second.document_id and (first.duplicate, second.duplicate) == (False, True)
    auth = {"Authorization": f"Bearer {config.api_token}"}
    for device, body in receipts.items():
        listed = await (await client.get("/api/documents", params={"device": device}, headers=auth)).json()
        assert [d["id"] for d in listed] == [body.document_id]
        name, text, captured_at = sent[device]
        detail = await (await client.get(f"/api/documents/{body.document_id}", headers=auth)).json()
        assert (detail["device"], detail["filename"], detail["text"], detail["captured_at"]) == (
            device, name, text, captured_at)
        found = await (await client.get("/api/documents", params={"q": text}, headers=auth)).json()
        assert [d["id"] for d in found] == [body.document_id]
        original = await client.get(f"/api/documents/{body.document_id}/original", headers=auth)
        assert await original.read() == circular
    detail = await (await client.get(f"/api/documents/{second.document_id}", headers=auth)).json()
    assert detail["same_content"] == [first.document_id]
    samples = parse_prometheus(await (await client.get("/metrics")).text())
    assert samples["sohoa_catalog_documents"] == 2 and samples["sohoa_catalog_stored_bytes"] == len(circular)
