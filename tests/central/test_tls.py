"""TLS on the device listener: generated CA + server cert, bundles carry the CA, plain is refused."""

from __future__ import annotations

import ssl
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from central.admin import commands, tls
from central.admin.broker_config import MAX_PACKET_SIZE
from central.config import CentralConfig, load_config
from central.errors import ConfigError
from protocol.messages import MAX_SEGMENT
from tests.central import rawmqtt
from tests.support.broker import Broker, free_port, running_broker


@pytest.fixture
def tls_home(tmp_path: Path) -> CentralConfig:
    home = tmp_path / "tls-home"
    commands.init(home, broker_url=f"mqtt://127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}",
                  device_url=f"mqtts://127.0.0.1:{free_port()}")
    return load_config(home)


@pytest.fixture
def tls_broker(tls_home: CentralConfig) -> Iterator[Broker]:
    paths = tls_home.paths
    with running_broker(paths.mosquitto_conf, tls_home.broker.address.port,
                        paths.broker_dir / "mosquitto.stdout") as broker:
        yield broker


def device_port(config: CentralConfig) -> int:
    return int(config.broker.device_url.rsplit(":", 1)[1])


def test_devices_connect_over_tls_with_the_bundle_ca_only(tls_home: CentralConfig, tls_broker: Broker,
                                                          tmp_path: Path) -> None:
    paths = tls_home.paths
    for secret in (paths.tls_key, paths.tls_ca_key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.tls_dir.stat().st_mode) == 0o700
    out = tmp_path / "xa.bundle.toml"
    commands.enroll(tls_home.home, "xa-tan-trao", out)
    bundle = tomllib.loads(out.read_text())
    assert bundle["broker"]["url"] == tls_home.broker.device_url
    assert bundle["broker"]["url"].startswith("mqtts://")
    assert bundle["broker"]["ca_cert"].startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in out.read_text()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(bundle["broker"]["ca_cert"])
    user, password = bundle["broker"]["username"], bundle["broker"]["password"]
    port = device_port(tls_home)

    device = rawmqtt.connect(port, user, password, ca_file=str(ca_file))
    try:
        assert device.connected.is_set()
        # The broker advertises its packet cap: one protocol segment plus headroom, no more.
        advertised = device.connack_properties.MaximumPacketSize
        assert MAX_SEGMENT < advertised == MAX_PACKET_SIZE < 2 * MAX_SEGMENT
        mid = device.mqtt.publish("sohoa/v1/up/xa-tan-trao/status", b"{}", qos=1).mid
        device.wait_acks({mid})
        assert device.puback[mid] < 0x80   # success, or 0x10 "no matching subscribers"
    finally:
        rawmqtt.close(device)

    # Plain MQTT on the device port: the TLS handshake never completes, no CONNACK.
    with pytest.raises(TimeoutError):
        plain = rawmqtt.connect(port, user, password, wait=False)
        try:
            if not plain.answered.wait(2):
                raise TimeoutError
        finally:
            rawmqtt.close(plain)

    # A broker certificate from another CA (a man in the middle) is refused by the device.
    other = tmp_path / "other"
    other.mkdir()
    commands.init(other, broker_url=f"mqtt://127.0.0.1:{free_port()}", http="127.0.0.1:0",
                  device_url="mqtts://127.0.0.1:8883")
    with pytest.raises(ssl.SSLCertVerificationError):
        rawmqtt.connect(port, user, password, ca_file=str(other / "tls" / "ca.pem"))


def test_central_uses_the_loopback_plain_listener(tls_home: CentralConfig, tls_broker: Broker) -> None:
    central = rawmqtt.connect(tls_home.broker.address.port, "central", tls_home.broker.password)
    rawmqtt.close(central)
    assert central.connected.is_set()


def test_operator_certificates_and_bad_combinations(tls_home: CentralConfig, tmp_path: Path) -> None:
    paths = tls_home.paths
    mine = tls.OperatorCerts(paths.tls_cert, paths.tls_key, paths.tls_ca)
    home = tmp_path / "operator-certs"
    commands.init(home, broker_url="mqtt://127.0.0.1:1883", http="127.0.0.1:8080",
                  device_url="mqtts://127.0.0.1:8883", tls_certs=mine)
    assert (home / "tls" / "server.pem").read_bytes() == paths.tls_cert.read_bytes()
    assert not (home / "tls" / "ca.key").exists()   # nothing generated
    with pytest.raises(ConfigError, match="loopback"):
        commands.init(tmp_path / "a", broker_url="mqtt://0.0.0.0:1883", device_url="mqtts://10.0.0.5:8883")
    with pytest.raises(ConfigError, match="not mqtts"):
        commands.init(tmp_path / "b", tls_certs=mine)
    with pytest.raises(ConfigError, match="PEM"):
        commands.init(tmp_path / "c", device_url="mqtts://127.0.0.1:8883",
                      tls_certs=tls.OperatorCerts(paths.tls_cert, paths.mosquitto_acl, paths.tls_ca))


def test_plaintext_device_link_off_loopback_is_refused_unless_asked_for(tmp_path: Path) -> None:
    # Security is default-on: a forgotten --device-broker must not put passwords on the wire.
    with pytest.raises(ConfigError, match="without TLS"):
        commands.init(tmp_path / "a", broker_url="mqtt://0.0.0.0:1883")
    with pytest.raises(ConfigError, match="without TLS"):
        commands.init(tmp_path / "b", device_url="mqtt://10.0.0.5:1883")
    commands.init(tmp_path / "c", broker_url="mqtt://0.0.0.0:1883", allow_plaintext=True)
    commands.init(tmp_path / "d", broker_url="mqtt://127.0.0.1:1883")   # the local demo and tests
    # Without --device-broker devices get their own listener on the next port, in the bundle too.
    config = load_config(tmp_path / "d")
    assert (config.broker.url, config.broker.device_url) == ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1884")
    commands.enroll(tmp_path / "d", "xa-tan-trao", tmp_path / "d.bundle")
    assert tomllib.loads((tmp_path / "d.bundle").read_text())["broker"]["url"] == "mqtt://127.0.0.1:1884"
    with pytest.raises(ConfigError, match="central's port"):
        commands.init(tmp_path / "e", broker_url="mqtt://127.0.0.1:1883", device_url="mqtt://127.0.0.1:1883")
