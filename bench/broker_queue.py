"""What one enrolled device can make Mosquitto queue for central's persistent session while central is down.

Mosquitto has no per-publisher bound: a device's publishes to its own up topics land in central's
session queue, bounded only by the global ``max_queued_messages`` / ``max_queued_bytes``. This runs the
generated broker config (two listeners, the device's own account) and pushes QoS 1 messages as fast as
the broker acknowledges them while central is away, then reconnects central and counts what it gets.
The baseline is the same run with the limits this project used before issue 7 (1,000,000 messages,
8 GiB), measured in the same run.

    .venv/bin/python -m bench.broker_queue [--push-mib 1536] [--small 200000]

Figures go to docs/THREAT_MODEL.md §2. It takes about a minute and ~2 GiB of RAM at the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from central.admin import commands
from central.admin.broker_config import MAX_QUEUED_BYTES, MAX_QUEUED_MESSAGES
from central.config import load_config
from tests.support.broker import Broker, free_port, running_broker

DEVICE = "xa-ngap-lut"
OLD_LIMITS = (1_000_000, 8 * 1024 * 1024 * 1024)
MIB = 1024 * 1024
WINDOW = 64


@dataclass(frozen=True, slots=True)
class Result:
    label: str
    pushed_messages: int
    pushed_bytes: int
    seconds: float
    rss_before: int
    rss_after_push: int
    delivered_messages: int
    delivered_bytes: int

    def describe(self) -> str:
        grew = (self.rss_after_push - self.rss_before) / MIB
        return (f"{self.label}: pushed {self.pushed_messages} msgs / {self.pushed_bytes / MIB:.1f} MiB in "
                f"{self.seconds:.1f} s ({self.pushed_messages / self.seconds:.0f} msg/s); broker RSS "
                f"{self.rss_before / MIB:.0f} → {self.rss_after_push / MIB:.0f} MiB (+{grew:.0f}); "
                f"central then received {self.delivered_messages} msgs / "
                f"{self.delivered_bytes / MIB:.1f} MiB")


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.acked = 0
        self.received = 0
        self.received_bytes = 0
        self.last_message = time.monotonic()
        self.subscribed = threading.Event()
        self.connected = threading.Event()

    def on_connect(self, *_args: object) -> None:
        self.connected.set()

    def on_subscribe(self, *_args: object) -> None:
        self.subscribed.set()

    def on_publish(self, *_args: object) -> None:
        with self.lock:
            self.acked += 1
            self.lock.notify_all()

    def on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.received += 1
            self.received_bytes += len(message.payload)
            self.last_message = time.monotonic()


def _client(client_id: str, port: int, username: str, password: str, counter: _Counter, *,
            persistent: bool) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    client.max_inflight_messages_set(WINDOW)
    client.on_connect = counter.on_connect
    client.on_subscribe = counter.on_subscribe
    client.on_publish = counter.on_publish
    client.on_message = counter.on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if persistent:
        props.SessionExpiryInterval = 7 * 24 * 3600
    client.connect("127.0.0.1", port, keepalive=60, clean_start=not persistent, properties=props)
    client.loop_start()
    if not counter.connected.wait(10):
        raise TimeoutError(f"{client_id} got no CONNACK")
    return client


def _rss(broker: Broker) -> int:
    assert broker.proc is not None
    return int(psutil.Process(broker.proc.pid).memory_info().rss)


@contextlib.contextmanager
def _deployment(root: Path, limits: tuple[int, int] | None) -> Iterator[tuple[Broker, str, str]]:
    home = root / "central"
    port = free_port()
    commands.init(home, broker_url=f"mqtt://127.0.0.1:{port}", http=f"127.0.0.1:{free_port()}",
                  device_url=f"mqtt://127.0.0.1:{free_port()}")
    conf = home / "mosquitto.conf"
    if limits is not None:
        text = re.sub(r"(?m)^max_queued_messages \d+$", f"max_queued_messages {limits[0]}", conf.read_text())
        conf.write_text(re.sub(r"(?m)^max_queued_bytes \d+$", f"max_queued_bytes {limits[1]}", text))
    with running_broker(conf, port, root / "broker.log") as broker:
        commands.enroll(home, DEVICE, root / "bundle.toml")
        bundle = tomllib.loads((root / "bundle.toml").read_text())
        yield broker, load_config(home).broker.password, bundle["broker"]["password"]


def run(label: str, *, count: int, payload: int, limits: tuple[int, int] | None) -> Result:
    with tempfile.TemporaryDirectory(prefix="sohoa-queue-") as tmp, \
            _deployment(Path(tmp), limits) as (broker, central_password, device_password):
        # Central subscribes once with a persistent session, then goes away.
        central_counter = _Counter()
        central = _client("sohoa-central", broker.port, "central", central_password, central_counter,
                          persistent=True)
        central.subscribe("$share/central/sohoa/v1/up/#", qos=1)
        if not central_counter.subscribed.wait(10):
            raise TimeoutError("central got no SUBACK")
        central.disconnect()
        central.loop_stop()
        rss_before = _rss(broker)

        counter = _Counter()
        device = _client(DEVICE, broker.device_port, DEVICE, device_password, counter, persistent=False)
        body = bytes(payload)
        started = time.monotonic()
        for n in range(count):
            with counter.lock:
                counter.lock.wait_for(lambda n=n: n - counter.acked < WINDOW, timeout=30)
            device.publish(f"sohoa/v1/up/{DEVICE}/tx/{'0' * 32}/seg/{n * payload}", body, qos=1)
        with counter.lock:
            counter.lock.wait_for(lambda: counter.acked >= count, timeout=60)
        seconds = time.monotonic() - started
        device.disconnect()
        device.loop_stop()
        rss_after = _rss(broker)

        central_counter = _Counter()
        central = _client("sohoa-central", broker.port, "central", central_password, central_counter,
                          persistent=True)
        while True:
            time.sleep(0.5)
            with central_counter.lock:
                if time.monotonic() - central_counter.last_message > 3:
                    break
        central.disconnect()
        central.loop_stop()
        return Result(label, count, count * payload, seconds, rss_before, rss_after,
                      central_counter.received, central_counter.received_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--push-mib", type=int, default=1536,
                        help="MiB of 1 MiB messages (default %(default)s)")
    parser.add_argument("--small", type=int, default=200_000, help="100-byte messages (default %(default)s)")
    args = parser.parse_args(argv)
    current = (MAX_QUEUED_MESSAGES, MAX_QUEUED_BYTES)
    for label, limits in ((f"before issue 7 {OLD_LIMITS}", OLD_LIMITS), (f"generated {current}", None)):
        print(run(f"{label}, 1 MiB", count=args.push_mib, payload=MIB, limits=limits).describe(), flush=True)
        print(run(f"{label}, 100 B", count=args.small, payload=100, limits=limits).describe(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
