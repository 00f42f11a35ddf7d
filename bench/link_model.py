"""Measure how much of a slow, long link MQTT QoS 1 uploads use, through our own fault proxy.

Checks DESIGN §2's sizing claim (segments >= 8 KiB use ~95 % of a 256 kbit/s link; a window of 4 or
more fills it at 0.5 s RTT) against a real Mosquitto and paho-mqtt (MQTT v5). The baseline is not the
nominal rate but a raw TCP bulk transfer through the same proxy, measured in the same run.

    .venv/bin/python -m bench.link_model [--quick] [--seconds 8] [--kbit 256] [--latency 0.25]

The proxy models bandwidth and delay only: no per-packet IP/TCP header cost and no loss, so small
payloads look better here than on a real link (the ~80 % in DESIGN §2 includes 52 B per TCP segment).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.faults.proxy import ThreadedProxy
from tests.support.broker import free_port, running_broker

SIZES = (512, 8 * 1024, 32 * 1024, 64 * 1024)
# 32 is not a proposed setting: it is the window at which even 512 B payloads no longer wait on the
# RTT, so that row isolates the per-message overhead DESIGN §2 talks about.
WINDOWS = (1, 4, 8, 32)
QUICK_SIZES = (512, 8 * 1024, 32 * 1024)
QUICK_WINDOWS = (1, 4)
# Looks like a real segment topic so the per-message header overhead is realistic.
TOPIC = "sohoa/v1/up/xa-tan-trao/tx/01JD5Q3ZK8M2V7W9X4Y6B1C3E5/seg/{offset}"


@dataclass(frozen=True, slots=True)
class Link:
    kbit: float
    latency_s: float

    @property
    def rate(self) -> float:
        return self.kbit * 1000 / 8

    @property
    def rtt(self) -> float:
        return 2 * self.latency_s


@dataclass(frozen=True, slots=True)
class Run:
    size: int
    window: int
    acks: int
    goodput: float  # payload bytes per second, steady state (first ack to last ack)

    def model(self, link: Link) -> float:
        """Expected goodput: the link is full, or the window runs dry waiting a round trip."""
        topic = len(TOPIC.format(offset=10**6))
        body = 2 + topic + 2 + 1 + self.size  # topic length, topic, packet id, properties length
        wire = 1 + _varint_len(body) + body
        per_message = wire / link.rate
        link_bound = link.rate * self.size / wire
        window_bound = self.window * self.size / (per_message + link.rtt)
        return min(link_bound, window_bound)


def broker_config(directory: Path, port: int) -> Path:
    """Anonymous and in memory like the test broker, with a Receive Maximum above the largest window.

    Mosquitto announces ``max_inflight_messages`` (default 20) as its MQTT v5 Receive Maximum, and
    paho 2.2 does not clamp its own in-flight limit to it: a window above 20 would get disconnected.
    """
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_packet_size 1100000\n"
        f"max_inflight_messages {max(WINDOWS) * 2}\n"
    )
    return conf


def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


@contextlib.contextmanager
def sink_server() -> Iterator[tuple[int, list[tuple[float, int]]]]:
    """A TCP server that swallows bytes and logs (arrival time, cumulative bytes)."""
    listener = socket.create_server(("127.0.0.1", 0))
    arrivals: list[tuple[float, int]] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.2)
                total = 0
                while not stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    total += len(data)
                    arrivals.append((time.monotonic(), total))

    thread = threading.Thread(target=serve, name="sink", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], arrivals
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def measure_raw(link: Link, seconds: float) -> float:
    """Bytes per second a bulk TCP stream gets through the throttled proxy (steady state)."""
    with sink_server() as (port, arrivals), ThreadedProxy("127.0.0.1", port) as proxy:
        proxy.throttle(link.kbit, link.latency_s)
        stop = threading.Event()

        def flood() -> None:
            block = bytes(16384)
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.settimeout(0.2)
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        sock.send(block)

        sender = threading.Thread(target=flood, name="flood", daemon=True)
        sender.start()
        time.sleep(seconds + link.latency_s)
        stop.set()
        sender.join(timeout=5)
    if len(arrivals) < 2:
        raise RuntimeError("the raw transfer through the proxy delivered nothing")
    (t0, b0), (t1, b1) = arrivals[0], arrivals[-1]
    return (b1 - b0) / (t1 - t0)


def measure_mqtt(broker_port: int, link: Link, size: int, window: int, seconds: float) -> Run:
    """Publish QoS 1 payloads of ``size`` with ``window`` unacknowledged at most, for ``seconds``."""
    with ThreadedProxy("127.0.0.1", broker_port) as proxy:
        proxy.throttle(link.kbit, link.latency_s)
        connected = threading.Event()
        lock = threading.Lock()
        acked: list[float] = []
        payload = bytes(size)
        deadline = [float("inf")]
        offset = [0]

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{size}-{window}",
                             protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(window)
        client.max_queued_messages_set(0)

        def publish_next() -> None:
            with lock:
                topic = TOPIC.format(offset=offset[0])
                offset[0] += size
            client.publish(topic, payload, qos=1)

        def on_connect(client: mqtt.Client, userdata: object, *details: object) -> None:
            connected.set()

        def on_publish(client: mqtt.Client, userdata: object, *details: object) -> None:
            now = time.monotonic()
            if now < deadline[0]:
                acked.append(now)
                publish_next()  # keep exactly `window` in flight

        client.on_connect = on_connect
        client.on_publish = on_publish
        client.connect("127.0.0.1", proxy.port, keepalive=60)
        client.loop_start()
        try:
            if not connected.wait(timeout=15):
                raise RuntimeError("paho did not connect through the proxy")
            deadline[0] = time.monotonic() + seconds
            for _ in range(window):
                publish_next()
            time.sleep(seconds)
        finally:
            client.disconnect()
            client.loop_stop()
    if len(acked) >= 2:
        goodput = size * (len(acked) - 1) / (acked[-1] - acked[0])
    else:
        goodput = size * len(acked) / seconds  # too few acks for a steady state: a lower bound
    return Run(size=size, window=window, acks=len(acked), goodput=goodput)


def table(runs: Sequence[Run], link: Link, raw: float) -> str:
    lines = [
        f"Link: {link.kbit:g} kbit/s nominal = {link.rate:.0f} B/s, one-way latency {link.latency_s:g} s "
        f"(RTT {link.rtt:g} s). Raw TCP bulk through the proxy: {raw:.0f} B/s "
        f"({100 * raw / link.rate:.1f} % of nominal).",
        "",
        "| payload | window | acks | goodput B/s | / measured link | / nominal | model |",
        "|--------:|-------:|-----:|------------:|----------------:|----------:|------:|",
    ]
    for run in runs:
        size = f"{run.size // 1024} KiB" if run.size >= 1024 else f"{run.size} B"
        lines.append(
            f"| {size} | {run.window} | {run.acks} | {run.goodput:.0f} | {100 * run.goodput / raw:.1f} % "
            f"| {100 * run.goodput / link.rate:.1f} % | {100 * run.model(link) / link.rate:.1f} % |"
        )
    lines += ["", "model: min(link full minus MQTT header bytes, window × payload / (serialisation + RTT))."]
    return "\n".join(lines)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 sizes x 2 windows, 4 s each (~35 s)")
    parser.add_argument("--windows", type=_int_list, default=None, help="comma-separated, e.g. 1,4,8")
    parser.add_argument("--sizes", type=_int_list, default=None, help="payload bytes, e.g. 512,8192")
    parser.add_argument("--seconds", type=float, default=None, help="length of each run (default 8, quick 4)")
    parser.add_argument("--kbit", type=float, default=256.0, help="link rate per direction")
    parser.add_argument("--latency", type=float, default=0.25, help="one-way added latency in seconds")
    args = parser.parse_args(argv)
    seconds = args.seconds or (4.0 if args.quick else 8.0)
    sizes, windows = (QUICK_SIZES, QUICK_WINDOWS) if args.quick else (SIZES, WINDOWS)
    sizes, windows = args.sizes or sizes, args.windows or windows
    if max(windows) > 2 * max(WINDOWS):
        parser.error(f"windows above {2 * max(WINDOWS)} exceed the benchmark broker's Receive Maximum")
    link = Link(kbit=args.kbit, latency_s=args.latency)

    raw = measure_raw(link, seconds)
    print(f"raw TCP through the proxy: {raw:.0f} B/s", file=sys.stderr)
    runs = []
    with tempfile.TemporaryDirectory(prefix="sohoa-bench-") as tmp:
        port = free_port()
        directory = Path(tmp)
        with running_broker(broker_config(directory, port), port, directory / "mosquitto.log"):
            for size in sizes:
                for window in windows:
                    run = measure_mqtt(port, link, size, window, seconds)
                    print(f"  {size} B x {window}: {run.goodput:.0f} B/s ({run.acks} acks)", file=sys.stderr)
                    runs.append(run)
    print(table(runs, link, raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
