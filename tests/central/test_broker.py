"""The generated Mosquitto config on a real broker: auth, per-device ACL, live enrollment."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from central.admin.broker_config import check_password, hash_password
from central.config import CentralConfig
from central.ingest.mqtt import MqttClient, MqttSettings, PublishError
from tests.central.conftest import Enroll
from tests.support.broker import Broker

TIMEOUT = 15


@contextlib.asynccontextmanager
async def connected(port: int, username: str, password: str,
                    subscriptions: tuple[tuple[str, int], ...] = ()) -> AsyncIterator[MqttClient]:
    client = MqttClient(MqttSettings(host="127.0.0.1", port=port, username=username, password=password,
                                     client_id=f"test-{username}", subscriptions=subscriptions,
                                     backoff_initial_s=0.1, backoff_max_s=1.0), manual_ack=False)
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(TIMEOUT):
            await client.connected.wait()
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_password_hash_matches_mosquitto_passwd_format() -> None:
    # Produced by `mosquitto_passwd -b file u p` (2.0.11).
    line = ("$7$101$Y18pVEBzZrvl18+T$zZNUn4klcsN+QaEBjSbmToKmuehmQFwAMKGUU2vJMOgK43YDD+zL42nPtPf2PNMfVkCB"
            "rloYK0n2KYoSobWPjg==")
    assert check_password("p", line) and not check_password("q", line)
    assert check_password("mật khẩu", hash_password("mật khẩu"))


async def test_generated_config_runs_and_central_can_connect(config: CentralConfig,
                                                             central_broker: Broker) -> None:
    assert central_broker.proc is not None and central_broker.proc.poll() is None
    pid = int(config.paths.mosquitto_pid.read_text())
    assert pid == central_broker.proc.pid
    async with connected(central_broker.port, "central", config.broker.password) as central:
        reasons = await central.subscribe("$share/central/sohoa/v1/up/#", 1)
        assert [r.value for r in reasons] == [1]
        with pytest.raises(PublishError, match="0x87"):   # central never writes up topics
            await central.publish("sohoa/v1/up/xa-tan-trao/status", b"{}")


async def test_enroll_on_a_running_broker_without_restart(config: CentralConfig, central_broker: Broker,
                                                          enroll: Enroll) -> None:
    assert central_broker.proc is not None
    pid_before = central_broker.proc.pid
    one = enroll("xa-tan-trao")
    two = enroll("xa-minh-thanh")
    async with (
        connected(central_broker.device_port, one.username, one.password) as device_one,
        connected(central_broker.device_port, two.username, two.password,
                  (("sohoa/v1/down/xa-minh-thanh/#", 1),)) as device_two,
        connected(central_broker.port, "central", config.broker.password) as central,
    ):
        assert central_broker.proc.pid == pid_before and central_broker.proc.poll() is None
        await device_one.publish("sohoa/v1/up/xa-tan-trao/status", b"{}")
        with pytest.raises(PublishError, match="0x87"):
            await device_one.publish("sohoa/v1/up/xa-minh-thanh/status", b"{}")
        with pytest.raises(PublishError, match="0x87"):
            await device_one.publish("sohoa/v1/down/xa-tan-trao/ack", b"{}")

        # Mosquitto 2.0 grants the subscription and enforces the read ACL at delivery (below).
        await device_one.subscribe("sohoa/v1/down/xa-minh-thanh/#", 1)
        assert [r.value for r in await device_one.subscribe("sohoa/v1/down/xa-tan-trao/#", 1)] == [1]

        await central.publish("sohoa/v1/down/xa-minh-thanh/ack", b"for two")
        async with asyncio.timeout(TIMEOUT):
            message = await device_two.inbox.get()
        assert (message.topic, message.payload) == ("sohoa/v1/down/xa-minh-thanh/ack", b"for two")
        await central.publish("sohoa/v1/down/xa-tan-trao/ack", b"for one")
        async with asyncio.timeout(TIMEOUT):
            mine = await device_one.inbox.get()
        # "for two" was published first: had the ACL let it through, it would have arrived first.
        assert mine.payload == b"for one" and device_one.inbox.empty()


async def test_wrong_password_is_refused(central_broker: Broker, enroll: Enroll) -> None:
    enroll("xa-tan-trao")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2):
            async with connected(central_broker.device_port, "xa-tan-trao", "not-the-password"):
                pass
