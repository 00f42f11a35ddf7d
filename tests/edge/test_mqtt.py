"""edge.mqtt against a real Mosquitto: round trip, v5 refusals, lost connections, last will."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.mqtt import ConnectError, ConnectionLost, MqttClient, PublishRefused, Will
from tests.support.broker import Broker, free_port, running_broker

TIMEOUT = 10


def acl_broker_config(directory: Path, port: int) -> Path:
    """A broker like production's: per-device users, ACL on the device's own topics."""
    passwd = directory / "passwd"
    for index, (user, password) in enumerate([("dev-1", "mật-khẩu-1"), ("central", "c-secret")]):
        subprocess.run(["mosquitto_passwd", "-b", *([] if index else ["-c"]), str(passwd), user, password],
                       check=True, capture_output=True)
    passwd.chmod(0o600)
    acl = directory / "acl"
    acl.write_text(
        "user central\n"
        "topic readwrite sohoa/v1/#\n"
        "pattern write sohoa/v1/up/%u/status\n"
        "pattern read sohoa/v1/down/%u/#\n")
    acl.chmod(0o600)
    conf = directory / "mosquitto.conf"
    # `user root` only matters when tests run as root: mosquitto would drop to `mosquitto`, which
    # cannot read these 0600 files in a 0700 tmp dir. As any other user the option is ignored.
    conf.write_text(f"listener {port} 127.0.0.1\nuser root\nallow_anonymous false\npassword_file {passwd}\n"
                    f"acl_file {acl}\npersistence false\n")
    return conf


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    port = free_port()
    directory = tmp_path / "acl-broker"
    directory.mkdir()
    with running_broker(acl_broker_config(directory, port), port, directory / "mosquitto.log") as broker:
        yield broker


async def test_round_trip_and_subscribe(mosquitto: Broker) -> None:
    a = MqttClient(mosquitto.url, client_id="a")
    b = MqttClient(mosquitto.url, client_id="b")
    async with asyncio.timeout(TIMEOUT):
        assert await a.connect() is False
        await b.connect()
        await b.subscribe("sohoa/v1/down/a/#")
        await a.publish("sohoa/v1/down/a/ack", "Quyết định".encode())
        message = await b.messages.get()
        assert message.topic == "sohoa/v1/down/a/ack" and message.payload.decode() == "Quyết định"
        # Many publishes in flight at once, all PUBACKed.
        await asyncio.gather(*(a.start_publish(f"x/{n}", b"y" * 40000) for n in range(50)))
        await a.disconnect()
        await b.disconnect()
        await a.disconnect()   # idempotent


async def test_acl_denied_publish_raises_0x87(acl_broker: Broker) -> None:
    client = MqttClient(acl_broker.url, client_id="dev-1", username="dev-1", password="mật-khẩu-1")
    async with asyncio.timeout(TIMEOUT):
        await client.connect()
        await client.publish("sohoa/v1/up/dev-1/status", b"{}")
        with pytest.raises(PublishRefused) as refused:
            await client.publish("sohoa/v1/up/dev-2/status", b"{}")
        assert refused.value.reason_code == 0x87
        assert "0x87" in str(refused.value)
        assert client.connected   # a refusal is per message, not a disconnect
        await client.disconnect()


async def test_bad_password_is_a_connect_error(acl_broker: Broker) -> None:
    client = MqttClient(acl_broker.url, client_id="dev-1", username="dev-1", password="wrong")
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(ConnectError) as refused:
            await client.connect()
    assert refused.value.reason_code in (0x86, 0x87)
    assert "credentials" in refused.value.hint


async def test_unreachable_broker_is_a_connect_error() -> None:
    client = MqttClient(f"mqtt://127.0.0.1:{free_port()}", client_id="nobody")
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(ConnectError):
            await client.connect()


async def test_broker_death_fails_pending_and_fires_the_will(tmp_path: Path, mosquitto: Broker) -> None:
    watcher = MqttClient(mosquitto.url, client_id="watcher")
    device = MqttClient(mosquitto.url, client_id="dev-1",
                        will=Will("sohoa/v1/up/dev-1/status", b'{"online":false}'))
    async with asyncio.timeout(TIMEOUT):
        await watcher.connect()
        await watcher.subscribe("sohoa/v1/up/#")
        await device.connect()
        # An abrupt end of the device's connection makes the broker publish its will (retained).
        device._client.socket().shutdown(socket.SHUT_RDWR)   # type: ignore[union-attr]
        message = await watcher.messages.get()
        assert message.payload == b'{"online":false}'
        await device.disconnect()
        # A clean shutdown can still announce "offline": DISCONNECT with reason 0x04.
        again = MqttClient(mosquitto.url, client_id="dev-1",
                           will=Will("sohoa/v1/up/dev-1/status", b'{"online":"bye"}'))
        await again.connect()
        await again.disconnect(with_will=True)
        message = await watcher.messages.get()
        assert message.payload == b'{"online":"bye"}'
        mosquitto.kill()
        reason = await watcher.wait_closed()
        assert isinstance(reason, ConnectionLost)
        assert not watcher.connected
        with pytest.raises(ConnectionLost):
            await watcher.publish("x", b"y")


async def test_pending_publish_fails_on_connection_loss(mosquitto: Broker) -> None:
    client = MqttClient(mosquitto.url, client_id="dev-1", max_inflight=1000)
    async with asyncio.timeout(TIMEOUT):
        await client.connect()
        futures = [client.start_publish(f"t/{n}", b"z" * 60000) for n in range(200)]
        mosquitto.kill()
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert any(isinstance(r, ConnectionLost) for r in results)
        assert all(r is None or isinstance(r, ConnectionLost) for r in results)
        assert client._pending_pub == {}


def _tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 (openssl CLI, as central init does)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr",
                                                           "server.crt"))

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=sohoa test CA", "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(key), "-out", str(csr))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return ca, cert, key


async def test_mqtts_with_a_private_ca(tmp_path: Path) -> None:
    ca, cert, key = _tls_material(tmp_path)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nuser root\nallow_anonymous true\npersistence false\n"
                    f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n")
    with running_broker(conf, port, tmp_path / "mosquitto.log"):
        url = f"mqtts://127.0.0.1:{port}"
        a = MqttClient(url, client_id="tls-a", ca_file=ca)
        b = MqttClient(url, client_id="tls-b", ca_file=ca)
        async with asyncio.timeout(TIMEOUT):
            await a.connect()
            await b.connect()
            await b.subscribe("t/#")
            payloads = [bytes([n]) * 30000 for n in range(20)]
            await asyncio.gather(*(a.start_publish(f"t/{n}", p) for n, p in enumerate(payloads)))
            got = [await b.messages.get() for _ in payloads]
            assert sorted(m.payload for m in got) == sorted(payloads)
            await a.disconnect()
            await b.disconnect()
        # Without our CA the server certificate does not verify.
        stranger = MqttClient(url, client_id="tls-c")
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(ConnectError):
                await stranger.connect()
