"""How many devices one Mosquitto node carries, with the product's own broker configuration.

    .venv/bin/python -m bench.broker_devices [--devices 10000] [--quick] [--tls] [--json] [--record]

A central home is made by the real generator (``sohoa central init`` into a temporary directory, then
``sohoa central enroll --from devices.csv --out-dir DIR``), so the password file (``$7$`` PBKDF2 per
device), the ACL patterns on ``%u``, the two listeners and every limit are what production uses;
``mosquitto -c <generated conf>`` runs on free loopback ports under ``prlimit --nofile`` (this process
raises its own ``RLIMIT_NOFILE`` to the hard limit too: one descriptor per device on each side).
``--tls`` makes the device listener TLS (``--device-broker mqtts://``), as the Ansible role deploys it.

The devices run in one child process (``--fleet``) speaking MQTT v5 on raw asyncio protocols: paho
keeps a thread and a socket pair per client, so 10,000 of them would measure the load generator.
Each device does what ``edge/uplink.py`` does on every connection: CONNECT with its own credentials
(clean_start false, session expiry and keepalive as ``edge/mqtt.py``, the offline status as last
will), SUBSCRIBE to its down topic, PUBLISH its online status (QoS 1), PINGREQ every keepalive, and
after a lost connection the edge's jittered exponential backoff (0.5–1 s first, doubling).

Phases, every figure with its baseline in the same run:
  1. broker with 0 devices: RSS and CPU (the baseline);
  2. 100 devices carry load L (below) to central's account: messages/s and MB/s received;
  3. all N connect, 256 CONNECTs in flight at most: devices/s and time to all connected;
  4. N connected and idle (keepalive only) for 60 s: broker RSS (KiB per device) and CPU;
  5. N devices carry the same load L: received messages/s and MB/s ÷ phase 2, broker CPU %;
  6. broker restart (SIGTERM, which saves ``mosquitto.db``, then start): time until all N are back
     (session present) with the edge's backoff and no gate — what a central-host reboot does.

Load L: every one of N devices sends a status (``protocol.messages.Status``, QoS 1) every
``status_interval / compress`` seconds (the edge's 30 s, 10× compressed by default), and 2 % of them
send 32 KiB segments at a 256 kbit/s link's pace; with 100 devices, the same messages are spread over
100 connections. The receiver is a counting subscriber on central's listener with central's account,
client id and shared subscription (``$share/central/sohoa/v1/up/#``, receive maximum 64).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import random
import resource
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.mqttload import mqtt_string, puback_packet, publish_packet, subscribe_packet, varint
from central.config import load_config
from central.paths import CentralPaths
from edge.config import UplinkConfig
from edge.mqtt import DEFAULT_KEEPALIVE, DEFAULT_SESSION_EXPIRY
from protocol.messages import Segment, Status, encode
from protocol.topics import CENTRAL_SHARED_FILTER, device_down_filter
from sohoa.localbroker import free_port, mosquitto_binary, wait_for_ports

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
CONNECT_GATE = 256            # CONNECTs in flight during the initial connect (phase 3)
CONNECT_TIMEOUT = 15.0        # edge/mqtt.py's connect_timeout
BACKOFF_INITIAL, BACKOFF_MAX = 1.0, 300.0   # edge/uplink.py's defaults
SEGMENT = UplinkConfig().segment_size
LINK_BYTES_S = 256_000 / 8    # a commune's 256 kbit/s uplink
WINDOW = 64                   # unacked publishes per device before the generator holds back
RECEIVE_MAXIMUM = 64          # central/ingest/mqtt.py's MqttSettings.receive_maximum

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 14


# -- MQTT v5 packets (only what a device and a counting subscriber need; the rest is bench.mqttload's) --
def _props(body: bytes) -> bytes:
    return varint(len(body)) + body


def connect_packet(client_id: str, username: str, password: str, *, clean_start: bool, keepalive: int,
                   session_expiry: int, receive_maximum: int | None = None,
                   will: tuple[str, bytes] | None = None) -> bytes:
    flags = 0x80 | 0x40 | (0x02 if clean_start else 0)
    props = b"\x11" + session_expiry.to_bytes(4, "big")                 # Session Expiry Interval
    if receive_maximum is not None:
        props += b"\x21" + receive_maximum.to_bytes(2, "big")           # Receive Maximum
    payload = mqtt_string(client_id)
    if will is not None:
        flags |= 0x04 | 0x08                                            # will, QoS 1, not retained
        payload += _props(b"") + mqtt_string(will[0]) + mqtt_string(will[1])
    payload += mqtt_string(username) + mqtt_string(password)
    body = mqtt_string("MQTT") + bytes([5, flags]) + keepalive.to_bytes(2, "big") + _props(props) + payload
    return bytes([CONNECT << 4]) + varint(len(body)) + body


PINGREQ_PACKET = bytes([PINGREQ << 4, 0])
DISCONNECT_PACKET = bytes([DISCONNECT << 4, 0])


class MqttProtocol(asyncio.Protocol):
    """Splits the byte stream into packets and hands each to ``packet``; subclasses react."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.connack: asyncio.Future[tuple[bool, int]] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
            self.connack.exception()   # a waiter that timed out is gone: not "never retrieved"

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos = 0
        while len(buf) - pos >= 2:
            length, shift, i, complete = 0, 0, pos + 1, False
            while i < len(buf) and i - pos <= 4:
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    complete = True
                    break
            if not complete or len(buf) - i < length:
                break
            self.packet(buf[pos] >> 4, buf[pos] & 0x0F, bytes(buf[i:i + length]))
            pos = i + length
        del buf[:pos]

    def packet(self, kind: int, flags: int, body: bytes) -> None:
        if kind == CONNACK and not self.connack.done():
            self.connack.set_result((bool(body[0] & 1), body[1]))

    def send(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True


# -- the fleet (child process) ---------------------------------------------------------------------
class Device(MqttProtocol):
    def __init__(self, fleet: Fleet, index: int) -> None:
        super().__init__()
        self.fleet = fleet
        self.index = index
        self.suback: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def packet(self, kind: int, flags: int, body: bytes) -> None:
        if kind == PUBACK:
            self.fleet.on_puback(self, body)
        elif kind == SUBACK:
            if not self.suback.done():
                self.suback.set_result(body[3 + body[2]] if len(body) > 3 else 0)
        elif kind == PUBLISH:
            topic_len = int.from_bytes(body[:2], "big")
            if (flags >> 1) & 3:
                self.send(puback_packet(int.from_bytes(body[2 + topic_len:4 + topic_len], "big")))
        elif kind == DISCONNECT:
            reason = body[0] if body else 0
            self.fleet.errors.append(f"{self.fleet.ids[self.index]}: DISCONNECT 0x{reason:02x}")
        else:
            super().packet(kind, flags, body)


@dataclass
class Fleet:
    port: int
    ids: list[str]
    passwords: list[str]
    ssl_context: ssl.SSLContext | None
    gate: asyncio.Semaphore | None = None
    live: list[Device | None] = field(default_factory=list)
    next_id: list[int] = field(default_factory=list)
    inflight: list[int] = field(default_factory=list)
    wanted: int = 0
    ready: int = 0
    sessions_present: int = 0
    connect_failures: int = 0
    lost: int = 0
    pubacks: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    ready_changed: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.live = [None] * n
        self.next_id = [1] * n
        self.inflight = [0] * n

    def on_puback(self, device: Device, body: bytes) -> None:
        self.pubacks += 1
        self.inflight[device.index] = max(0, self.inflight[device.index] - 1)
        if len(body) > 2 and body[2] >= 0x80:
            self.refused += 1

    def publish(self, index: int, topic: str, payload: bytes) -> bool:
        device = self.live[index]
        if device is None or self.inflight[index] >= WINDOW:
            return False
        packet_id = self.next_id[index]
        self.next_id[index] = packet_id % 65535 + 1
        if not device.send(publish_packet(topic, payload, packet_id)):
            return False
        self.inflight[index] += 1
        return True

    async def _session(self, index: int) -> Device:
        loop = asyncio.get_running_loop()
        device_id = self.ids[index]
        device = Device(self, index)
        await loop.create_connection(lambda: device, "127.0.0.1", self.port, ssl=self.ssl_context,
                                     server_hostname="127.0.0.1" if self.ssl_context else None)
        will = encode(Status(device_id, online=False))
        device.send(connect_packet(device_id, device_id, self.passwords[index], clean_start=False,
                                   keepalive=DEFAULT_KEEPALIVE, session_expiry=DEFAULT_SESSION_EXPIRY,
                                   will=will))
        present, reason = await device.connack
        if reason:
            raise ConnectionError(f"{device_id}: CONNACK 0x{reason:02x}")
        if present:
            self.sessions_present += 1
        device.send(subscribe_packet(device_down_filter(device_id), 1))
        if (granted := await device.suback) > 1:
            raise ConnectionError(f"{device_id}: SUBACK 0x{granted:02x}")
        return device

    async def keep(self, index: int) -> None:
        """One edge's connection loop: connect, subscribe, say online; on loss, jittered backoff."""
        delay = BACKOFF_INITIAL
        while not self.stopping:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    if self.gate is not None:
                        async with self.gate:
                            device = await self._session(index)
                    else:
                        device = await self._session(index)
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.connect_failures += 1
                if len(self.errors) < 50 and not isinstance(exc, ConnectionRefusedError | TimeoutError):
                    self.errors.append(f"{self.ids[index]}: {type(exc).__name__}: {exc}")
            else:
                delay = BACKOFF_INITIAL
                self.live[index] = device
                self.inflight[index] = 0
                self.ready += 1
                self.ready_changed.set()
                self.publish(index, *encode(status_message(self.ids[index])))
                await device.closed
                self.live[index] = None
                self.lost += 1
                self.ready -= 1
                self.ready_changed.set()
                if self.stopping:
                    return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter, as the edge
            delay = min(delay * 2, BACKOFF_MAX)

    async def wait_ready(self, count: int, limit_s: float) -> None:
        async with asyncio.timeout(limit_s):
            while self.ready < count:
                self.ready_changed.clear()
                await self.ready_changed.wait()

    async def pinger(self) -> None:
        """A PINGREQ per connected device every keepalive, spread evenly over the interval."""
        tick = 0.1
        slots = int(DEFAULT_KEEPALIVE / tick)
        n = 0
        while True:
            await asyncio.sleep(tick)
            for index in range(n % slots, len(self.ids), slots):
                device = self.live[index]
                if device is not None:
                    device.send(PINGREQ_PACKET)
            n += 1


def status_message(device_id: str) -> Status:
    """A status with every field an edge fills in (``edge/uplink.py`` ``_publish_status``)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    return Status(device_id, online=True, queue_docs=3, queue_bytes=1_482_113, oldest_age_s=412.5,
                  failed_docs=0, last_receipt_at=now, disk_free_bytes=48_213_442_560,
                  version="sohoa 0.9.0 (tesseract 5.3.0)", last_error=None, alarms=(), updated_at=now)


async def run_load(fleet: Fleet, count: int, seconds: float, status_period: float,
                   seg_senders: int) -> dict[str, Any]:
    """Load L for ``seconds``: N virtual devices' statuses and ``seg_senders`` segment streams,
    carried by the first ``count`` connections (virtual device v on connection v % count)."""
    virtual = len(fleet.ids)
    seg_interval = SEGMENT / LINK_BYTES_S
    data = secrets.token_bytes(SEGMENT)
    tids = [secrets.token_hex(16) for _ in range(max(seg_senders, 1))]
    offsets = [0] * max(seg_senders, 1)
    sent = {"status": 0, "segment": 0, "bytes": 0, "held_back": 0}
    status_cursor = seg_cursor = 0
    pubacks_before = fleet.pubacks
    started = time.monotonic()
    tick = 0.01
    while (now := time.monotonic()) - started < seconds:
        elapsed = now - started
        status_due = int(elapsed * virtual / status_period)
        while status_cursor < status_due:
            index = (status_cursor % virtual) % count
            topic, payload = encode(status_message(fleet.ids[index]))
            if fleet.publish(index, topic, payload):
                sent["status"] += 1
                sent["bytes"] += len(payload)
            else:
                sent["held_back"] += 1
            status_cursor += 1
        seg_due = int(elapsed * seg_senders / seg_interval) if seg_senders else 0
        while seg_cursor < seg_due:
            stream = seg_cursor % seg_senders
            index = stream % count
            topic, payload = encode(Segment(fleet.ids[index], tids[stream], offsets[stream], data))
            if fleet.publish(index, topic, payload):
                offsets[stream] += SEGMENT
                sent["segment"] += 1
                sent["bytes"] += len(payload)
            else:
                sent["held_back"] += 1
            seg_cursor += 1
        await asyncio.sleep(tick)
    stopped = time.monotonic()
    total = sent["status"] + sent["segment"]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            while fleet.pubacks - pubacks_before < total:  # noqa: ASYNC110 - a counter, polled
                await asyncio.sleep(0.05)
    return {**sent, "messages": total, "started": started, "stopped": stopped,
            "pubacks": fleet.pubacks - pubacks_before, "last_puback": time.monotonic()}


async def fleet_main(port: int, accounts: list[tuple[str, str]], ca: str | None) -> None:
    soft, hard = raise_nofile()
    context = None
    if ca:
        context = ssl.create_default_context(cadata=ca)
    fleet = Fleet(port, [a[0] for a in accounts], [a[1] for a in accounts], context)
    pinger = asyncio.create_task(fleet.pinger())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"fleet": "ready", "nofile": [soft, hard]})
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "connect":
            count = cmd["count"]
            fleet.gate = asyncio.Semaphore(CONNECT_GATE)
            started = time.monotonic()
            failures = fleet.connect_failures
            fleet.tasks += [asyncio.create_task(fleet.keep(i)) for i in range(fleet.wanted, count)]
            fleet.wanted = count
            try:
                await fleet.wait_ready(count, cmd["within"])
            except TimeoutError:
                reply({"error": f"only {fleet.ready} of {count} connected", "errors": fleet.errors[:10]})
                continue
            fleet.gate = None
            reply({"connected": fleet.ready, "started": started, "done": time.monotonic(),
                   "connect_failures": fleet.connect_failures - failures, "errors": fleet.errors[:10]})
        elif op == "disconnect_all":
            # A clean DISCONNECT (no will) by every device; sessions stay on the broker (expiry).
            fleet.stopping = True
            for device in fleet.live:
                if device is not None and device.transport is not None:
                    device.send(DISCONNECT_PACKET)
                    device.transport.close()
            await asyncio.gather(*fleet.tasks, return_exceptions=True)
            fleet.tasks.clear()
            fleet.wanted = 0
            fleet.stopping = False
            reply({"connected": fleet.ready})
        elif op == "load":
            reply(await run_load(fleet, cmd["count"], cmd["seconds"], cmd["status_period"],
                                 cmd["seg_senders"]))
        elif op == "arm_reconnect":
            fleet.sessions_present = 0
            fleet.lost = 0
            fleet.connect_failures = 0
            reply({"armed": fleet.ready})
        elif op == "wait_reconnect":
            count = fleet.wanted
            try:
                async with asyncio.timeout(cmd["within"]):
                    while fleet.lost < count:  # noqa: ASYNC110 - a counter, polled
                        await asyncio.sleep(0.05)
                all_lost = time.monotonic()
                await fleet.wait_ready(count, cmd["within"])
            except TimeoutError:
                reply({"error": f"lost {fleet.lost}, back {fleet.ready} of {count}",
                       "errors": fleet.errors[:10]})
                continue
            reply({"all_lost": all_lost, "done": time.monotonic(), "sessions_present": fleet.sessions_present,
                   "connect_failures": fleet.connect_failures, "errors": fleet.errors[:10]})
        elif op == "status":
            reply({"ready": fleet.ready, "errors": fleet.errors[:10], "refused": fleet.refused})
        elif op == "quit":
            break
    pinger.cancel()
    fleet.stopping = True
    for task in fleet.tasks:
        task.cancel()
    reply({"bye": True})


# -- the counting subscriber (central's account) and the orchestration --------------------------------
class Counter(MqttProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.messages = 0
        self.bytes = 0
        self.last = 0.0
        self.suback: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pinger: asyncio.Task[None] | None = None

    async def keepalive(self) -> None:
        # Without it the broker drops central after 1.5 keepalives of silence (an idle phase).
        while self.send(PINGREQ_PACKET):  # noqa: ASYNC110 - a timer, not a wait for a condition
            await asyncio.sleep(DEFAULT_KEEPALIVE / 2)

    def packet(self, kind: int, flags: int, body: bytes) -> None:
        if kind == PUBLISH:
            topic_len = int.from_bytes(body[:2], "big")
            pos = 2 + topic_len
            if (flags >> 1) & 3:
                self.send(puback_packet(int.from_bytes(body[pos:pos + 2], "big")))
                pos += 2
            props_len, shift = 0, 0
            while True:
                byte = body[pos]
                pos += 1
                props_len |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            self.messages += 1
            self.bytes += len(body) - pos - props_len
            self.last = time.monotonic()
        elif kind == SUBACK:
            if not self.suback.done():
                self.suback.set_result(body[3 + body[2]] if len(body) > 3 else 0)
        else:
            super().packet(kind, flags, body)


async def connect_counter(port: int, client_id: str, password: str) -> Counter:
    loop = asyncio.get_running_loop()
    counter = Counter()
    await loop.create_connection(lambda: counter, "127.0.0.1", port)
    counter.send(connect_packet(client_id, "central", password, clean_start=True, keepalive=DEFAULT_KEEPALIVE,
                                session_expiry=0, receive_maximum=RECEIVE_MAXIMUM))
    async with asyncio.timeout(10):
        _, reason = await counter.connack
        if reason:
            raise ConnectionError(f"central's CONNACK 0x{reason:02x}")
        counter.send(subscribe_packet(CENTRAL_SHARED_FILTER, 1))
        if (granted := await counter.suback) > 1:
            raise ConnectionError(f"central's SUBACK 0x{granted:02x}")
    counter.pinger = asyncio.create_task(counter.keepalive())
    return counter


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (a process may do that without privileges)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class BrokerProcess:
    config: Path
    nofile: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start under ``prlimit --nofile``; return the seconds until every listener accepts."""
        started = time.monotonic()
        with self.log.open("ab") as logf:
            argv = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", mosquitto_binary(),
                    "-c", str(self.config)]
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        wait_for_ports(self.config, timeout=120, proc=self.proc)
        return time.monotonic() - started

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 120) -> float:
        started = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return time.monotonic() - started

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def nofile_limit(self) -> int:
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        return 0

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_pct(broker: BrokerProcess, cpu0: float, wall0: float) -> float:
    return round(100 * (broker.cpu_s() - cpu0) / (time.monotonic() - wall0), 2)


@contextlib.contextmanager
def temporary_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sohoa-bench-broker-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_home(root: Path, devices: int, *, tls: bool) -> tuple[Path, list[tuple[str, str]], float]:
    """``sohoa central init`` + ``sohoa central enroll --from devices.csv``; (home, accounts, enrol s)."""
    home = root / "central"
    broker_port, device_port, http_port = free_port(), free_port(), free_port()
    scheme = "mqtts" if tls else "mqtt"
    sohoa = [sys.executable, "-m", "sohoa.cli", "central"]
    subprocess.run([*sohoa, "init", "--home", str(home), "--broker", f"mqtt://127.0.0.1:{broker_port}",
                    "--device-broker", f"{scheme}://127.0.0.1:{device_port}",
                    "--http", f"127.0.0.1:{http_port}"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=120)
    ids = [f"xa-{i:05d}" for i in range(devices)]
    table = root / "devices.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["device_id", "commune"])
        writer.writerows([device_id, f"Xã {i}"] for i, device_id in enumerate(ids))
    started = time.monotonic()
    subprocess.run([*sohoa, "enroll", "--from", str(table), "--out-dir", str(root / "bundles"), "--home",
                    str(home)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=1800)
    enrol_s = time.monotonic() - started
    accounts = []
    for device_id in ids:
        bundle = tomllib.loads((root / "bundles" / f"{device_id}.toml").read_text(encoding="utf-8"))
        accounts.append((bundle["broker"]["username"], bundle["broker"]["password"]))
    return home, accounts, enrol_s


class FleetProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    async def ask(self, limit_s: float, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.read(limit_s)

    async def read(self, limit_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(limit_s):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the device fleet exited")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"fleet: {answer['error']} {answer.get('errors')}")
        return answer


async def measure_load(broker: BrokerProcess, fleet: FleetProcess, counter: Counter, *, count: int,
                       seconds: float, status_period: float, seg_senders: int) -> dict[str, Any]:
    if counter.closed.done():
        raise RuntimeError("central's counting subscriber lost its connection")
    await asyncio.sleep(2)    # online statuses of the last connects arrive before the count starts
    messages, received = counter.messages, counter.bytes
    cpu_before, wall_before, fleet_before = broker.cpu_s(), time.monotonic(), fleet.cpu_s()
    sent = await fleet.ask(seconds + 120, op="load", count=count, seconds=seconds,
                           status_period=status_period, seg_senders=seg_senders)
    with contextlib.suppress(TimeoutError):    # let the subscriber drain what the broker still holds
        async with asyncio.timeout(60):
            while counter.messages - messages < sent["messages"]:  # noqa: ASYNC110 - a counter, polled
                await asyncio.sleep(0.05)
    cpu, wall = broker.cpu_s() - cpu_before, time.monotonic() - wall_before
    fleet_cpu = fleet.cpu_s() - fleet_before
    got, got_bytes = counter.messages - messages, counter.bytes - received
    span = max(counter.last, sent["stopped"]) - sent["started"]
    offered = sent["messages"] / (sent["stopped"] - sent["started"])
    return {"connections": count, "offered_msg_s": round(offered, 1),
            "sent": sent["messages"], "segments": sent["segment"], "held_back": sent["held_back"],
            "pubacks": sent["pubacks"], "received": got, "received_msg_s": round(got / span, 1),
            "received_MB_s": round(got_bytes / span / MB, 3),
            "delivered": round(got / max(sent["messages"], 1), 4),
            "drain_after_stop_s": round(max(0.0, counter.last - sent["stopped"]), 2),
            "broker_cpu_pct": round(100 * cpu / wall, 1), "fleet_cpu_pct": round(100 * fleet_cpu / wall, 1),
            "broker_cpu_us_per_msg": round(1e6 * cpu / max(got, 1), 1)}


async def measure(devices: int, *, quick: bool, tls: bool) -> dict[str, Any]:
    load_before = [round(x, 2) for x in os.getloadavg()]
    soft, hard = raise_nofile()
    nofile = hard    # raising the hard limit needs CAP_SYS_RESOURCE; the broker gets the same limit
    if devices + 256 > hard:
        raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} is below {devices} devices + headroom")
    idle_s = 20.0 if quick else 60.0
    load_s = 15.0 if quick else 40.0
    compress = 10.0
    status_period = UplinkConfig().status_interval / compress
    seg_senders = max(1, devices // 50)
    baseline_devices = min(100, devices)
    figures: dict[str, Any] = {"devices": devices, "tls": tls, "cores": os.cpu_count(),
                               "load_before": load_before, "bench_nofile": [soft, hard],
                               "keepalive_s": DEFAULT_KEEPALIVE,
                               "load": {"status_every_s": status_period, "compressed": compress,
                                        "status_msg_s": round(devices / status_period, 1),
                                        "segment_streams": seg_senders, "segment_bytes": SEGMENT,
                                        "segment_MB_s": round(seg_senders * LINK_BYTES_S / MB, 3),
                                        "seconds": load_s}}
    with temporary_root() as root:
        home, accounts, enrol_s = make_home(root, devices, tls=tls)
        figures["enrol_s_per_device_ms"] = round(1000 * enrol_s / devices, 2)
        config = load_config(home)
        paths = CentralPaths(home)
        creds = root / "fleet.json"
        creds.write_text(json.dumps(accounts))
        creds.chmod(0o600)
        broker = BrokerProcess(paths.mosquitto_conf, nofile, root / "broker-run.log")
        device_port = config.broker.device_address.port
        proc = None
        try:
            figures["broker_start_s"] = round(broker.start(), 2)
            figures["broker_nofile"] = broker.nofile_limit()
            await asyncio.sleep(3)
            cpu0, wall0 = broker.cpu_s(), time.monotonic()
            await asyncio.sleep(10)
            figures["idle_0"] = {"rss_kib": broker.rss_kib(), "cpu_pct": cpu_pct(broker, cpu0, wall0)}
            counter = await connect_counter(config.broker.address.port, config.broker.client_id,
                                            config.broker.password)
            ca_arg = ["--ca", str(paths.tls_ca)] if tls else []
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.broker_devices", "--fleet", str(device_port), str(creds),
                *ca_arg, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT)
            fleet = FleetProcess(proc)
            figures["fleet_nofile"] = (await fleet.read(60))["nofile"]

            print(f"phase 2: {baseline_devices} devices carry the load…", file=sys.stderr, flush=True)
            await fleet.ask(300, op="connect", count=baseline_devices, within=240)
            figures["load_baseline"] = await measure_load(broker, fleet, counter, count=baseline_devices,
                                                          seconds=load_s, status_period=status_period,
                                                          seg_senders=seg_senders)
            await fleet.ask(120, op="disconnect_all")

            print(f"phase 3: {devices} devices connect…", file=sys.stderr, flush=True)
            cpu0, fleet0 = broker.cpu_s(), fleet.cpu_s()
            answer = await fleet.ask(1000, op="connect", count=devices, within=900)
            took = answer["done"] - answer["started"]
            broker_cpu, fleet_cpu = broker.cpu_s() - cpu0, fleet.cpu_s() - fleet0
            figures["connect"] = {"seconds": round(took, 2), "devices_s": round(devices / took, 1),
                                  "in_flight": CONNECT_GATE, "failures": answer["connect_failures"],
                                  "broker_cpu_ms_per_device": round(1000 * broker_cpu / devices, 3),
                                  "fleet_cpu_ms_per_device": round(1000 * fleet_cpu / devices, 3),
                                  "note": "CONNECT+CONNACK+SUBSCRIBE+SUBACK, then an online status"}

            print(f"phase 4: idle {idle_s:.0f} s…", file=sys.stderr, flush=True)
            await asyncio.sleep(5)   # the online statuses and the connect burst settle
            cpu0, wall0 = broker.cpu_s(), time.monotonic()
            await asyncio.sleep(idle_s)
            rss = broker.rss_kib()
            figures["idle_n"] = {"rss_kib": rss, "seconds": idle_s,
                                 "cpu_pct": cpu_pct(broker, cpu0, wall0),
                                 "kib_per_device": round((rss - figures["idle_0"]["rss_kib"]) / devices, 2)}

            print(f"phase 5: {devices} devices carry the load…", file=sys.stderr, flush=True)
            figures["load_n"] = await measure_load(broker, fleet, counter, count=devices, seconds=load_s,
                                                   status_period=status_period, seg_senders=seg_senders)
            base, full = figures["load_baseline"], figures["load_n"]
            figures["received_msg_s_ratio"] = round(full["received_msg_s"] / base["received_msg_s"], 3)
            figures["received_MB_s_ratio"] = round(full["received_MB_s"] / base["received_MB_s"], 3)
            figures["broker_cpu_per_msg_ratio"] = round(
                full["broker_cpu_us_per_msg"] / base["broker_cpu_us_per_msg"], 2)

            print("phase 6: broker restart…", file=sys.stderr, flush=True)
            if counter.transport is not None:
                counter.send(DISCONNECT_PACKET)
                counter.transport.close()
            await fleet.ask(30, op="arm_reconnect")
            assert proc.stdin is not None
            proc.stdin.write((json.dumps({"op": "wait_reconnect", "within": 900}) + "\n").encode())
            await proc.stdin.drain()
            db = paths.broker_dir / "mosquitto.db"
            stop_s = broker.stop()
            db_bytes = db.stat().st_size if db.exists() else 0
            restarted, fleet0 = time.monotonic(), fleet.cpu_s()
            start_s = broker.start()
            cpu0 = broker.cpu_s()
            answer = await fleet.read(1000)
            broker_cpu, fleet_cpu = broker.cpu_s() - cpu0, fleet.cpu_s() - fleet0
            figures["restart"] = {"stop_s": round(stop_s, 2), "start_s": round(start_s, 2),
                                  "mosquitto_db_bytes": db_bytes,
                                  "all_back_after_start_s": round(answer["done"] - restarted, 2),
                                  "all_back_after_sigterm_s": round(answer["done"] - restarted + stop_s, 2),
                                  "sessions_present": answer["sessions_present"],
                                  "failed_attempts": answer["connect_failures"],
                                  "rss_kib_after": broker.rss_kib(),
                                  "broker_cpu_pct": round(100 * broker_cpu / (answer["done"] - restarted), 1),
                                  "fleet_cpu_pct": round(100 * fleet_cpu / (answer["done"] - restarted), 1)}
            figures["errors"] = (await fleet.ask(30, op="status"))["errors"]
            await fleet.ask(60, op="quit")
        finally:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            broker.stop()
    figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return figures


def figure(devices: int = 10_000, *, quick: bool = False, tls: bool = False) -> dict[str, Any]:
    """The ``broker_10k`` entry of ``bench/results.json``."""
    figures = asyncio.run(measure(devices, quick=quick, tls=tls))
    return {"value": figures["received_msg_s_ratio"],
            "baseline": f"the same status+segment load carried by 100 devices instead of {devices:,}, "
                        "same broker and run", "details": figures}


def table(f: dict[str, Any]) -> str:
    base, full, restart, n = f["load_baseline"], f["load_n"], f["restart"], f"{f['devices']:,}"
    lines = [
        f"devices: {f['devices']:,} ({'TLS' if f['tls'] else 'plain'} device listener); cores {f['cores']}; "
        f"load average before/after {f['load_before']} / {f['load_after']}",
        f"RLIMIT_NOFILE: bench {f['bench_nofile']}, fleet {f['fleet_nofile']}, broker {f['broker_nofile']}",
        f"enrolment: {f['enrol_s_per_device_ms']} ms per device (central enroll --from)",
        f"connect: {f['connect']['devices_s']} devices/s, all {n} in {f['connect']['seconds']} s "
        f"({f['connect']['in_flight']} in flight, {f['connect']['failures']} failed attempts; CPU ms per "
        f"device: broker {f['connect']['broker_cpu_ms_per_device']}, "
        f"fleet {f['connect']['fleet_cpu_ms_per_device']})",
        f"broker RSS: {f['idle_0']['rss_kib']} KiB with 0 → {f['idle_n']['rss_kib']} KiB with {n} "
        f"= {f['idle_n']['kib_per_device']} KiB per device",
        f"broker CPU idle: {f['idle_0']['cpu_pct']} % with 0, {f['idle_n']['cpu_pct']} % with {n} "
        f"(keepalive {f['keepalive_s']} s, {f['idle_n']['seconds']:.0f} s)",
        "",
        "| load | connections | offered msg/s | received msg/s | received MB/s | delivered | broker CPU % | "
        "broker µs/msg | fleet CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in (("baseline", base), ("full", full)):
        lines.append(f"| {name} | {row['connections']:,} | {row['offered_msg_s']} | "
                     f"{row['received_msg_s']} | {row['received_MB_s']} | {row['delivered']} | "
                     f"{row['broker_cpu_pct']} | {row['broker_cpu_us_per_msg']} | {row['fleet_cpu_pct']} |")
    lines += ["",
              f"ratio {n} ÷ 100 devices: msg/s {f['received_msg_s_ratio']}, MB/s "
              f"{f['received_MB_s_ratio']}, broker CPU per message {f['broker_cpu_per_msg_ratio']}",
              f"restart: SIGTERM→exit {restart['stop_s']} s (mosquitto.db "
              f"{restart['mosquitto_db_bytes']:,} B), start {restart['start_s']} s, all {n} back "
              f"{restart['all_back_after_start_s']} s after start ({restart['sessions_present']:,} sessions "
              f"present, {restart['failed_attempts']} failed attempts; broker CPU "
              f"{restart['broker_cpu_pct']} %, fleet CPU {restart['fleet_cpu_pct']} %), "
              f"RSS {restart['rss_kib_after']} KiB",
              f"errors: {f['errors'] or 'none'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="shorter idle and load phases")
    parser.add_argument("--tls", action="store_true", help="TLS on the device listener (as deployed)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--record", action="store_true",
                        help="store the run as the broker_10k figure in bench/results.json")
    parser.add_argument("--fleet", nargs=2, metavar=("PORT", "CREDS"), help=argparse.SUPPRESS)
    parser.add_argument("--ca", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fleet:
        ca = args.ca.read_text() if args.ca else None
        asyncio.run(fleet_main(int(args.fleet[0]), json.loads(Path(args.fleet[1]).read_text()), ca))
        return 0
    if args.devices < 100:
        parser.error("--devices: at least 100 (the baseline is 100 devices)")
    result = figure(args.devices, quick=args.quick, tls=args.tls)
    print(table(result["details"]))
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    if args.record:
        from bench.__main__ import RESULTS  # noqa: PLC0415

        stored = json.loads(RESULTS.read_text())
        stored["figures"]["broker_10k"] = result
        RESULTS.write_text(json.dumps(stored, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
