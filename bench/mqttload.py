"""A load generator for the benchmarks: many MQTT v5 devices in one asyncio process.

paho runs a thread per client; a thousand of them would measure the load generator, not the broker
or central. This speaks just enough MQTT v5 on raw asyncio streams (CONNECT, PUBLISH QoS 1 with a
window of PUBACKs, SUBSCRIBE, PUBACK for what it receives) — for benchmarks only, never the product.

Run as a child process: ``python -m bench.mqttload PLAN.pickle`` where the plan is a pickled
``Plan``; it prints one JSON line with its timings when every device is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9


@dataclass(frozen=True, slots=True)
class DevicePlan:
    client_id: str
    username: str
    password: str
    messages: tuple[tuple[str, bytes], ...]
    expect: int = 0                      # messages to receive on ``subscribe`` before it is done
    subscribe: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    port: int
    devices: tuple[DevicePlan, ...]
    window: int = 8
    connect_concurrency: int = 64
    start_file: str = ""                 # wait for this file to exist before publishing (a start line)
    expect_topic_part: str = "/receipt"  # what counts towards ``expect``
    # MQTT v5 user properties on every init (the edge's RECEIPT_IS_STORED, as the edge sends it)
    init_properties: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Result:
    connected_s: float = 0.0
    first_publish: float = 0.0
    last_puback: float = 0.0
    last_expected: float = 0.0
    received: int = 0
    errors: list[str] = field(default_factory=list)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    flags = 0x02 | 0x80 | 0x40   # clean start, username, password
    variable = mqtt_string("MQTT") + bytes([5, flags]) + (60).to_bytes(2, "big") + b"\x00"
    payload = mqtt_string(client_id) + mqtt_string(username) + mqtt_string(password)
    body = variable + payload
    return bytes([CONNECT << 4]) + varint(len(body)) + body


def user_properties(pairs: tuple[tuple[str, str], ...]) -> bytes:
    """Encoded PUBLISH properties: one User Property (0x26) per pair."""
    return b"".join(b"\x26" + mqtt_string(key) + mqtt_string(value) for key, value in pairs)


def publish_packet(topic: str, payload: bytes, packet_id: int, properties: bytes = b"") -> bytes:
    head = mqtt_string(topic) + packet_id.to_bytes(2, "big") + varint(len(properties)) + properties
    return bytes([(PUBLISH << 4) | 0x02]) + varint(len(head) + len(payload)) + head + payload


def subscribe_packet(topic: str, packet_id: int) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"\x00" + mqtt_string(topic) + bytes([1])
    return bytes([(SUBSCRIBE << 4) | 0x02]) + varint(len(body)) + body


def puback_packet(packet_id: int) -> bytes:
    return bytes([PUBACK << 4, 2]) + packet_id.to_bytes(2, "big")


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first >> 4, first & 0x0F, await reader.readexactly(length)


async def run_device(plan: Plan, device: DevicePlan, result: Result, connect_gate: asyncio.Semaphore,
                     connected: asyncio.Event, start: asyncio.Event, done_connecting: list[int]) -> None:
    async with connect_gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", plan.port)
        writer.write(connect_packet(device.client_id, device.username, device.password))
        kind, _, body = await _read_packet(reader)
        if kind != CONNACK or body[1] != 0:
            raise ConnectionError(f"{device.client_id}: CONNACK {body[:2].hex()}")
        if device.subscribe:
            writer.write(subscribe_packet(device.subscribe, 1))
            kind, _, body = await _read_packet(reader)
            if kind != SUBACK:
                raise ConnectionError(f"{device.client_id}: no SUBACK")
    done_connecting[0] += 1
    if done_connecting[0] == len(plan.devices):
        connected.set()
    await start.wait()
    window = asyncio.Semaphore(plan.window)
    pending: set[int] = set()
    expected = 0
    all_sent = asyncio.Event()
    all_received = asyncio.Event()
    if device.expect == 0:
        all_received.set()

    async def read_loop() -> None:
        nonlocal expected
        while True:
            kind, flags, body = await _read_packet(reader)
            if kind == PUBACK:
                packet_id = int.from_bytes(body[:2], "big")
                if len(body) > 2 and body[2] >= 0x80:
                    result.errors.append(f"{device.client_id}: PUBACK 0x{body[2]:02x}")
                pending.discard(packet_id)
                window.release()
                result.last_puback = time.monotonic()
                if all_sent.is_set() and not pending and all_received.is_set():
                    return
            elif kind == PUBLISH:
                topic_len = int.from_bytes(body[:2], "big")
                topic = body[2:2 + topic_len].decode()
                qos = (flags >> 1) & 3
                if qos:
                    writer.write(puback_packet(int.from_bytes(body[2 + topic_len:4 + topic_len], "big")))
                result.received += 1
                if plan.expect_topic_part in topic:
                    expected += 1
                    if expected >= device.expect:
                        result.last_expected = time.monotonic()
                        all_received.set()
                        if all_sent.is_set() and not pending:
                            return

    reading = asyncio.create_task(read_loop())
    packet_id = 1
    init_properties = user_properties(plan.init_properties)
    for topic, payload in device.messages:
        await window.acquire()
        if reading.done():
            break
        if not result.first_publish:
            result.first_publish = time.monotonic()
        pending.add(packet_id)
        properties = init_properties if topic.endswith("/init") else b""
        writer.write(publish_packet(topic, payload, packet_id, properties))
        packet_id = packet_id % 65000 + 1
        await writer.drain()
    all_sent.set()
    if not pending and all_received.is_set():
        reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    writer.close()


async def run_plan(plan: Plan) -> Result:
    result = Result()
    gate = asyncio.Semaphore(plan.connect_concurrency)
    connected, start = asyncio.Event(), asyncio.Event()
    counter = [0]
    started = time.monotonic()
    tasks = [asyncio.create_task(run_device(plan, d, result, gate, connected, start, counter))
             for d in plan.devices]
    await connected.wait()
    result.connected_s = time.monotonic() - started
    print(json.dumps({"connected": True}), flush=True)
    if plan.start_file:
        # The parent touches the file once every load process is connected (a start line).
        while not Path(plan.start_file).exists():  # noqa: ASYNC110, ASYNC240 - another process signals
            await asyncio.sleep(0.01)
    start.set()
    await asyncio.gather(*tasks)
    return result


def main() -> None:
    plan: Plan = pickle.loads(Path(sys.argv[1]).read_bytes())
    result = asyncio.run(run_plan(plan))
    print(json.dumps({"connected_s": result.connected_s, "first_publish": result.first_publish,
                      "last_puback": result.last_puback, "last_expected": result.last_expected,
                      "received": result.received, "errors": result.errors[:20]}), flush=True)


if __name__ == "__main__":
    main()
