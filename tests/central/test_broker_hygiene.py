"""Broker hygiene on the generated config (issue 7 items 5 and 6), with the real Mosquitto.

A device can only ever be its own client id (it cannot kick central or another box), it cannot log
in on central's listener, and it cannot leave retained bytes at the broker.
"""

from __future__ import annotations

import time
import uuid

import psutil

from central.admin.broker_config import MAX_PACKET_SIZE, MAX_QUEUED_BYTES, MAX_QUEUED_MESSAGES
from central.config import CentralConfig
from tests.central import rawmqtt
from tests.central.conftest import Enroll
from tests.support.broker import Broker

ATTACK_S = 20.0
FLOOD = 300
MIB = 1024 * 1024


def test_no_device_can_take_over_central_or_another_box(config: CentralConfig, central_broker: Broker,
                                                        enroll: Enroll) -> None:
    attacker, victim = enroll("xa-ke-gian"), enroll("xa-tan-trao")
    central = rawmqtt.connect(central_broker.port, "central", config.broker.password,
                              client_id=config.broker.client_id)
    box = rawmqtt.connect(central_broker.device_port, victim.username, victim.password,
                          client_id=victim.device_id)
    assert central.connected.is_set() and box.connected.is_set()
    accepted = refused = rounds = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < ATTACK_S:
            rounds += 1
            # On the device listener the broker replaces the asked-for id by the username: the
            # attacker gets in, as itself, and only ever kicks its own previous session.
            for target in (config.broker.client_id, victim.device_id):
                attack = rawmqtt.connect(central_broker.device_port, attacker.username, attacker.password,
                                         client_id=target)
                accepted += attack.connected.is_set()
                rawmqtt.close(attack)
            # Central's listener knows only central's account.
            attack = rawmqtt.connect(central_broker.port, attacker.username, attacker.password,
                                     client_id=config.broker.client_id)
            refused += attack.connack is not None and attack.connack.is_failure
            rawmqtt.close(attack)
        ended = time.monotonic()
        assert not central.disconnected.is_set() and not box.disconnected.is_set()
        central_up = ((central.disconnected_at or ended) - started) / (ended - started)
        box_up = ((box.disconnected_at or ended) - started) / (ended - started)
    finally:
        rawmqtt.close(central)
        rawmqtt.close(box)
    print(f"\n{rounds} rounds of attacks in {ended - started:.1f} s: {accepted} logins as itself on the "
          f"device listener, {refused}/{rounds} refused on central's; connected: central "
          f"{central_up:.0%}, victim box {box_up:.0%}")
    assert accepted == 2 * rounds and refused == rounds
    # The broker's own account of it: every attacker login ran under the attacker's id.
    log = (config.paths.broker_dir / "mosquitto.log").read_text(errors="replace")
    assert log.count(f" as {attacker.device_id} ") >= 2 * rounds
    assert log.count(f" as {config.broker.client_id} ") == 1 and log.count(f" as {victim.device_id} ") == 1
    assert central_up == box_up == 1.0


def test_retained_flood_is_refused_and_leaves_nothing(config: CentralConfig, central_broker: Broker,
                                                      enroll: Enroll) -> None:
    device = enroll("xa-tan-trao")
    assert central_broker.proc is not None
    broker = psutil.Process(central_broker.proc.pid)
    database = config.paths.broker_dir / "mosquitto.db"
    rss_before = broker.memory_info().rss
    payload = bytes(MIB)
    reasons: set[str] = set()
    puback = 0
    started = time.monotonic()
    for n in range(FLOOD):
        client = rawmqtt.connect(central_broker.device_port, device.username, device.password)
        assert client.connected.is_set()
        topic = f"sohoa/v1/up/xa-tan-trao/tx/{uuid.uuid4().hex}/seg/{n * MIB}"
        client.mqtt.publish(topic, payload, qos=1, retain=True)
        assert client.disconnected.wait(rawmqtt.TIMEOUT), "a retained publish was not refused"
        reasons.add(str(client.disconnect_reason))
        puback += len(client.puback)
        rawmqtt.close(client)
    flood_s = time.monotonic() - started
    rss_after = broker.memory_info().rss
    # A last will that asks to be retained is refused at CONNECT (an edge older than issue 7).
    old_edge = rawmqtt.RawClient(device.device_id)
    old_edge.mqtt.username_pw_set(device.username, device.password)
    old_edge.mqtt.will_set("sohoa/v1/up/xa-tan-trao/status", b'{"online": false}', qos=1, retain=True)
    old_edge.mqtt.connect("127.0.0.1", central_broker.device_port)
    old_edge.mqtt.loop_start()
    assert old_edge.answered.wait(rawmqtt.TIMEOUT)
    rawmqtt.close(old_edge)
    assert old_edge.connack is not None and old_edge.connack.value == 0x9A   # Retain not supported

    # Whatever a fresh subscriber gets before a live marker would have been retained: nothing.
    watcher = rawmqtt.connect(central_broker.port, "central", config.broker.password,
                              client_id="audit-retained")
    sender = rawmqtt.connect(central_broker.device_port, device.username, device.password)
    try:
        _, mid = watcher.mqtt.subscribe("sohoa/v1/up/#", qos=1)
        assert mid is not None
        watcher.wait_acks(set(), {mid})
        sender.wait_acks({sender.mqtt.publish("sohoa/v1/up/xa-tan-trao/status", b"marker", qos=1).mid})
        watcher.wait_message(b"marker")
    finally:
        rawmqtt.close(sender)
        rawmqtt.close(watcher)
    retained_bytes = sum(len(p) for t, p in watcher.messages if t in watcher.retained)
    central_broker.stop()   # a clean stop writes mosquitto.db
    db_size = database.stat().st_size
    central_broker.start()
    print(f"\n{FLOOD} x 1 MiB retained publishes in {flood_s:.1f} s: {puback} acknowledged, every one "
          f"refused ({', '.join(sorted(reasons))}); broker RSS {rss_before / MIB:.1f} → "
          f"{rss_after / MIB:.1f} MiB; mosquitto.db {db_size} bytes after; retained messages left "
          f"{len(watcher.retained)} ({retained_bytes} bytes)")
    assert puback == 0 and reasons == {"Retain not supported"}
    assert watcher.retained == [] and retained_bytes == 0
    assert rss_after - rss_before < 32 * MIB      # not 300 MiB: nothing was kept
    assert db_size < MIB


def test_queue_bounds_in_the_generated_config(config: CentralConfig) -> None:
    # The bounds, their reasoning and the measured figures: central/admin/broker_config.py,
    # docs/THREAT_MODEL.md §2 (python -m bench.broker_queue).
    conf = config.paths.mosquitto_conf.read_text()
    for line in (f"max_queued_messages {MAX_QUEUED_MESSAGES}", f"max_queued_bytes {MAX_QUEUED_BYTES}",
                 f"max_packet_size {MAX_PACKET_SIZE}", "retain_available false",
                 "per_listener_settings true"):
        assert f"\n{line}\n" in conf, line
    devices = conf[conf.index(f"\nlistener {config.broker.device_address.port}"):]
    assert "use_username_as_clientid true" in devices
    central = conf[conf.index(f"\nlistener {config.broker.address.port} 127.0.0.1"):conf.index(devices)]
    assert str(config.paths.central_passwd) in central and "use_username_as_clientid" not in central
    assert config.paths.central_passwd.read_text().startswith("central:")
    assert "central" not in config.paths.mosquitto_passwd.read_text()
