"""Clone detection (issue 7 item 9, central side): two boxes with one identity reuse sequence numbers.

A correctly signed init whose (device, seq) another transfer holds cannot come from an honest box (one
sequence number per outbox row, one transfer id per row): it is refused as ``SequenceReusedError`` and
the device is flagged ``possible_clone`` until an admin clears it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpClient

from central import catalog
from central.admin import commands
from central.config import CentralConfig
from central.errors import ReplayError, SequenceReusedError
from central.http.app import create_app
from central.keys import CentralKeys
from protocol.messages import Ack, AckState, Receipt, decode, encode
from tests.central.builders import seal_document, wire
from tests.central.conftest import Enroll
from tests.central.test_broker import TIMEOUT, connected
from tests.central.test_ingest import acks, make_ingestor
from tests.central.test_service import ingest_ready, send_and_wait_receipt
from tests.support.broker import Broker


def test_a_reused_sequence_number_flags_a_possible_clone(config: CentralConfig, central_keys: CentralKeys,
                                                         enroll: Enroll,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    box = enroll("xa-tan-trao")
    ingestor = make_ingestor(config, central_keys)

    def sealed(seq: int, name: str) -> list[tuple[str, bytes]]:
        return wire(seal_document(device="xa-tan-trao", seq=seq, signing_key=box.signing_key,
                                  central_key=central_keys.encryption.public_key,
                                  original=b"%PDF-1.4\n" + secrets.token_bytes(2000), name=name).messages())

    original = sealed(1, "Sổ hộ khẩu – hộp gốc.pdf")
    ingestor.handle_batch(original)
    clone = sealed(1, "Giấy khai sinh – hộp nhân bản.pdf")   # the other box's outbox also starts at 1
    clone_tid = decode(*clone[0]).tid
    with caplog.at_level(logging.WARNING, logger="sohoa.central.ingest"):
        replies = ingestor.handle_batch(clone)
        again = ingestor.handle_batch(clone[:1])   # it retries its init
    for reply in (acks(replies, clone_tid)[0], acks(again, clone_tid)[0]):
        assert (reply.state, reply.error_class) == (AckState.REJECTED, "SequenceReusedError")
        assert "two boxes" in (reply.error or "")
    assert issubclass(SequenceReusedError, ReplayError)
    assert "enroll one of them under a new id" in SequenceReusedError.hint
    assert any("possible clone of device xa-tan-trao" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)

    conn = catalog.connect(config.paths.catalog, readonly=True)
    (row,) = catalog.list_devices(conn)
    flag = row["possible_clone"]
    assert row["problem"] == "possible clone" and flag["count"] == 1 and flag["seq"] == 1
    assert flag["tids"] == [decode(*original[0]).tid, clone_tid]
    events = conn.execute("SELECT event, tid, detail FROM fixity WHERE event = 'possible_clone'").fetchall()
    # One event per refused transfer, not one per retry of its init.
    assert [(e["tid"], json.loads(e["detail"])["seq"]) for e in events] == [(clone_tid, 1)]
    assert catalog.totals(conn).documents == 1
    summary = catalog.fleet_summary(conn, today_since="2000-01-01T00:00:00.000Z")
    assert summary["devices"]["possible_clone"] == 1

    # A second colliding transfer counts; clearing (audited) ends the flag; a new collision raises it.
    ingestor.handle_batch(sealed(1, "Tờ trình – hộp nhân bản.pdf")[:1])
    assert catalog.possible_clone(conn, "xa-tan-trao")["count"] == 2   # type: ignore[index]
    cleared = commands.clear_clone(config.home, "xa-tan-trao", actor="admin-test")
    assert cleared.was_flagged and cleared.suspicion and cleared.suspicion["count"] == 2
    assert catalog.list_devices(conn)[0]["possible_clone"] is None
    assert catalog.list_devices(conn)[0]["problem"] != "possible clone"
    audit = conn.execute("SELECT actor, action, target FROM audit WHERE action = 'clear_clone'").fetchall()
    assert [tuple(a) for a in audit] == [("admin-test", "clear_clone", "xa-tan-trao")]
    assert not commands.clear_clone(config.home, "xa-tan-trao").was_flagged
    ingestor.handle_batch(sealed(2, "Công văn – hộp gốc.pdf"))          # the original box carries on
    assert catalog.possible_clone(conn, "xa-tan-trao") is None
    ingestor.handle_batch(sealed(2, "Công văn – hộp nhân bản.pdf")[:1])  # the clone collides again
    assert catalog.possible_clone(conn, "xa-tan-trao")["count"] == 1   # type: ignore[index]


async def test_a_cloned_box_over_the_broker_is_refused_and_shown(
        config: CentralConfig, central_broker: Broker, central_keys: CentralKeys, enroll: Enroll,
        aiohttp_client: AiohttpClient) -> None:
    """The same bundle on two boxes, one after the other on the real broker (on the device listener
    both are the same client id, so they could only ever take turns)."""
    bundle = enroll("xa-tan-trao")
    client: TestClient = await aiohttp_client(create_app(config))  # type: ignore[type-arg]
    await ingest_ready(client.app)
    central_key = central_keys.encryption.public_key
    key = bundle.signing_key
    first = seal_document(device="xa-tan-trao", seq=1, signing_key=key, central_key=central_key,
                          original="%PDF-1.4 hộp một".encode())
    second = seal_document(device="xa-tan-trao", seq=1, signing_key=key, central_key=central_key,
                           original="%PDF-1.4 hộp hai".encode())
    subscriptions = (("sohoa/v1/down/xa-tan-trao/#", 1),)
    port = central_broker.device_port
    async with connected(port, bundle.username, bundle.password, subscriptions) as box:
        receipt = await send_and_wait_receipt(box, first)
    assert isinstance(receipt, Receipt)
    async with connected(port, bundle.username, bundle.password, subscriptions) as twin:
        await twin.publish(*encode(second.init()))
        async with asyncio.timeout(TIMEOUT):
            while True:
                inbound = await twin.inbox.get()
                ack = decode(inbound.topic, inbound.payload)
                if isinstance(ack, Ack) and ack.tid == second.tid:
                    break
    assert (ack.state, ack.error_class) == (AckState.REJECTED, "SequenceReusedError")
    auth = {"Authorization": f"Bearer {config.api_token}"}
    devices = await (await client.get("/api/devices", params={"sort": "problems"}, headers=auth)).json()
    assert devices[0]["problem"] == "possible clone"
    assert devices[0]["possible_clone"]["tids"] == [first.tid, second.tid]
    fleet = await (await client.get("/api/fleet", headers=auth)).json()
    assert fleet["devices"]["possible_clone"] == 1
    page = await client.get("/", headers=auth)   # the dashboard draws the flag as a badge
    assert page.status == 200
    # Drawn by the page's script from the string tables (tests/browser sees it drawn in Chromium).
    strings = await (await client.get("/static/i18n/en.json")).json()
    assert strings["clone_badge"] == "POSSIBLE CLONE"
    cleared = await client.post("/api/devices/xa-tan-trao/clear-clone", headers=auth)
    assert cleared.status == 200 and (await cleared.json())["was_flagged"] is True
    devices = await (await client.get("/api/devices", headers=auth)).json()
    assert devices[0]["possible_clone"] is None
    unknown = await client.post("/api/devices/xa-khong-co/clear-clone", headers=auth)
    assert unknown.status == 404
