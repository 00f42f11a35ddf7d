"""Cross-device isolation on the generated broker config: every device attacks every other one."""

from __future__ import annotations

import time

from central.config import CentralConfig
from tests.central import rawmqtt
from tests.central.conftest import Enroll
from tests.support.broker import Broker

DEVICES = 20
TID = "0" * 32


def _attack_topics(victim: str) -> list[str]:
    return [f"sohoa/v1/up/{victim}/status", f"sohoa/v1/up/{victim}/tx/{TID}/init",
            f"sohoa/v1/up/{victim}/tx/{TID}/seg/0", f"sohoa/v1/down/{victim}/ack",
            f"sohoa/v1/down/{victim}/receipt"]


def test_twenty_devices_cannot_reach_each_other(config: CentralConfig, central_broker: Broker,
                                                enroll: Enroll) -> None:
    started = time.monotonic()
    bundles = [enroll(f"xa-{n:02d}") for n in range(DEVICES)]
    ids = [b.device_id for b in bundles]
    clients = [rawmqtt.connect(central_broker.device_port, b.username, b.password) for b in bundles]
    central = rawmqtt.connect(central_broker.port, "central", config.broker.password)
    try:
        assert all(c.connected.is_set() for c in clients) and central.connected.is_set()
        # Each device subscribes to everything of every other device, and to the wildcards.
        for me, client in zip(ids, clients, strict=True):
            filters = [(f"sohoa/v1/{way}/{other}/#", 1) for other in ids if other != me
                       for way in ("up", "down")]
            filters += [("sohoa/v1/#", 1), ("#", 1), ("sohoa/v1/up/+/status", 1)]
            _, mid = client.mqtt.subscribe(filters)
            assert mid is not None
            client.wait_acks(set(), {mid})
        # Then publishes on every topic of every other device, plus legitimately on its own.
        refused = attempted = 0
        for me, client in zip(ids, clients, strict=True):
            mids = set()
            for other in ids:
                if other == me:
                    continue
                for topic in _attack_topics(other):
                    mids.add(client.mqtt.publish(topic, f"from {me}".encode(), qos=1).mid)
            attempted += len(mids)
            own = client.mqtt.publish(f"sohoa/v1/up/{me}/tx/{TID}/seg/0", f"own {me}".encode(), qos=1).mid
            client.wait_acks(mids | {own})
            refused += sum(1 for mid in mids if client.puback[mid] == 0x87)
            assert client.puback[own] == 0
        # A barrier: central writes to each device's down topic after every attack was answered.
        barrier = {central.mqtt.publish(f"sohoa/v1/down/{d}/ack", f"barrier {d}".encode(), qos=1).mid
                   for d in ids}
        central.wait_acks(barrier)
        for me, client in zip(ids, clients, strict=True):
            client.wait_message(f"barrier {me}".encode())
        crossed = []
        for me, client in zip(ids, clients, strict=True):
            with client.lock:
                received = list(client.messages)
            # Only what concerns the device itself may arrive: its own echo and its own barrier.
            crossed += [(me, t) for t, _ in received if f"/{me}/" not in t]
            assert (f"sohoa/v1/down/{me}/ack", f"barrier {me}".encode()) in received
    finally:
        for client in [*clients, central]:
            rawmqtt.close(client)
    elapsed = time.monotonic() - started
    print(f"{DEVICES} devices, {attempted} cross-device publishes: {refused} refused with 0x87, "
          f"{len(crossed)} delivered across devices, {elapsed:.1f} s")
    assert crossed == []
    assert refused == attempted == DEVICES * (DEVICES - 1) * len(_attack_topics("x"))
