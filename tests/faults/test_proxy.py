"""The fault proxy does exactly what each control says, on real loopback sockets and a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.faults.proxy import FaultProxy, ThreadedProxy
from tests.support.broker import Broker

pytestmark = pytest.mark.timeout(30)


@dataclass
class Upstream:
    """A loopback server that echoes or swallows bytes and records what happened to each connection."""

    echo: bool
    port: int = 0
    accepted: int = 0
    received: bytearray = field(default_factory=bytearray)
    first_byte_at: float | None = None
    ended: list[str] = field(default_factory=list)  # "eof" or "reset", one per finished connection
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._notify()
        how = "eof"
        try:
            while data := await reader.read(65536):
                if self.first_byte_at is None:
                    self.first_byte_at = asyncio.get_running_loop().time()
                self.received += data
                self._notify()
                if self.echo:
                    writer.write(data)
                    await writer.drain()
        except ConnectionResetError:
            how = "reset"
        finally:
            self.ended.append(how)
            self._notify()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def until(self, predicate: object, timeout: float = 10.0) -> None:
        assert callable(predicate)
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.changed.wait()


@contextlib.asynccontextmanager
async def upstream_server(echo: bool) -> AsyncIterator[Upstream]:
    upstream = Upstream(echo=echo)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = int(server.sockets[0].getsockname()[1])
    try:
        yield upstream
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[Upstream]:
    async with upstream_server(echo=True) as upstream:
        yield upstream


@pytest.fixture
async def sink() -> AsyncIterator[Upstream]:
    async with upstream_server(echo=False) as upstream:
        yield upstream


@contextlib.asynccontextmanager
async def proxied(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", upstream.port) as proxy:
        yield proxy


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float = 10.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.readexactly(n)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    """True once the peer closed (EOF or RST), draining whatever arrives first."""
    async with asyncio.timeout(timeout):
        try:
            while await reader.read(65536):
                pass
        except ConnectionResetError:
            pass
    return True


async def test_forwards_bytes_exactly_both_ways(echo: Upstream) -> None:
    payload = os.urandom(1 << 20)
    async with proxied(echo) as proxy:
        reader, writer = await connect(proxy)

        async def send() -> None:
            for start in range(0, len(payload), 7000):  # odd chunking on purpose
                writer.write(payload[start : start + 7000])
                await writer.drain()

        sending = asyncio.create_task(send())
        assert await read_exactly(reader, len(payload)) == payload
        await sending
        writer.write_eof()
        assert await reader.read() == b""  # the echo server's FIN is passed back
        writer.close()
        stats = await proxy.wait_for(lambda s: s.active == 0, timeout=5)
    assert stats.bytes_up == stats.bytes_down == len(payload)
    assert stats.connections == 1
    assert echo.ended == ["eof"]


async def test_cut_closes_both_sides_and_accepts_new_connections(echo: Upstream) -> None:
    async with proxied(echo) as proxy:
        reader, writer = await connect(proxy)
        writer.write(b"hello")
        assert await read_exactly(reader, 5) == b"hello"
        await proxy.cut()
        assert await closed_by_peer(reader)
        await echo.until(lambda: len(echo.ended) == 1)
        assert echo.ended == ["reset"]  # SO_LINGER 0: the broker side sees RST, not FIN
        writer.close()

        reader, writer = await connect(proxy)
        writer.write("Công văn số 5".encode())
        assert (await read_exactly(reader, len("Công văn số 5".encode()))).decode() == "Công văn số 5"
        writer.close()
        assert proxy.stats.cuts == 1
        assert proxy.stats.connections == 2


async def test_blackhole_stalls_then_resumes(echo: Upstream) -> None:
    async with proxied(echo) as proxy:
        reader, writer = await connect(proxy)
        writer.write(b"a")
        assert await read_exactly(reader, 1) == b"a"

        proxy.blackhole(True)
        writer.write(b"b")
        late_reader, late_writer = await connect(proxy)  # accepted, but held away from the upstream
        late_writer.write(b"late")
        with pytest.raises(TimeoutError):
            await read_exactly(reader, 1, timeout=0.5)
        assert echo.received == b"a"
        assert echo.accepted == 1
        assert proxy.stats.active == 2

        proxy.blackhole(False)
        assert await read_exactly(reader, 1) == b"b"
        assert await read_exactly(late_reader, 4) == b"late"
        assert echo.accepted == 2
        writer.close()
        late_writer.close()


async def test_refuse_resets_new_connections_only(echo: Upstream) -> None:
    async with proxied(echo) as proxy:
        reader, writer = await connect(proxy)
        proxy.refuse(True)
        refused_reader, refused_writer = await connect(proxy)
        assert await closed_by_peer(refused_reader)
        refused_writer.close()
        writer.write(b"still here")  # the connection made before refuse keeps working
        assert await read_exactly(reader, 10) == b"still here"

        proxy.refuse(False)
        again_reader, again_writer = await connect(proxy)
        again_writer.write(b"x")
        assert await read_exactly(again_reader, 1) == b"x"
        writer.close()
        again_writer.close()
        assert proxy.stats.refused == 1
        assert echo.accepted == 2


async def test_throttle_holds_the_nominal_rate(sink: Upstream) -> None:
    kbit = 64.0
    nominal = kbit * 1000 / 8  # 8000 B/s
    window = 2.5
    async with proxied(sink) as proxy:
        proxy.throttle(kbit)
        _, writer = await connect(proxy)
        block = os.urandom(16384)

        async def flood() -> None:
            while True:
                writer.write(block)
                await writer.drain()

        flooding = asyncio.create_task(flood())
        await sink.until(lambda: sink.first_byte_at is not None)
        assert sink.first_byte_at is not None
        start_bytes, start = len(sink.received), asyncio.get_running_loop().time()
        await asyncio.sleep(window)  # the measurement interval itself, not a synchronisation
        rate = (len(sink.received) - start_bytes) / (asyncio.get_running_loop().time() - start)
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await flooding
        writer.close()
    assert 0.75 * nominal <= rate <= 1.25 * nominal, f"{rate:.0f} B/s against {nominal:.0f} B/s"


async def test_latency_is_added_each_way_and_keeps_order(echo: Upstream) -> None:
    one_way = 0.2
    async with proxied(echo) as proxy:
        proxy.throttle(None, latency_s=one_way)
        reader, writer = await connect(proxy)
        loop = asyncio.get_running_loop()
        started = loop.time()
        messages = [f"{i:04d}".encode() for i in range(50)]
        for message in messages:
            writer.write(message)
            await writer.drain()
        assert await read_exactly(reader, 200) == b"".join(messages)
        elapsed = loop.time() - started
        writer.close()
    assert 2 * one_way <= elapsed < 2 * one_way + 1.0


async def test_reset_after_resets_mid_stream(sink: Upstream) -> None:
    limit = 10_000
    async with proxied(sink) as proxy:
        proxy.reset_after(limit, "up")
        for _ in range(2):  # it keeps applying to every new connection until switched off
            reader, writer = await connect(proxy)
            with contextlib.suppress(ConnectionError):
                writer.write(os.urandom(50_000))
                await writer.drain()
            assert await closed_by_peer(reader)
            writer.close()
        await sink.until(lambda: len(sink.ended) == 2)
        assert sink.ended == ["reset", "reset"]
        assert len(sink.received) == 2 * limit
        assert proxy.stats.resets == 2

        proxy.reset_after(None)
        reader, writer = await connect(proxy)
        writer.write(os.urandom(50_000))
        await writer.drain()
        await sink.until(lambda: len(sink.received) == 2 * limit + 50_000)
        writer.close()


async def test_reset_after_downstream(echo: Upstream) -> None:
    async with proxied(echo) as proxy:
        proxy.reset_after(3, "down")
        reader, writer = await connect(proxy)
        writer.write(b"abcdef")
        assert await read_exactly(reader, 3) == b"abc"
        assert await closed_by_peer(reader)
        writer.close()


def test_threaded_proxy_with_paho_reconnects_after_cut(mosquitto: Broker) -> None:
    topic = "sohoa/v1/up/xa-tan-trao/status"
    connects = threading.Semaphore(0)
    delivered: list[bytes] = []
    got_message = threading.Event()

    def on_connect(client: mqtt.Client, userdata: object, *details: object) -> None:
        connects.release()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        delivered.append(bytes(message.payload))
        got_message.set()

    # The observer talks to the broker directly, so only the edge's path goes through the proxy.
    observer = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="observer", protocol=mqtt.MQTTv5)
    observer.on_message = on_message
    observer.connect("127.0.0.1", mosquitto.port)
    observer.subscribe(topic, qos=1)
    observer.loop_start()

    with ThreadedProxy("127.0.0.1", mosquitto.port) as proxy:
        edge = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-faults", protocol=mqtt.MQTTv5)
        edge.reconnect_delay_set(min_delay=1, max_delay=2)
        edge.on_connect = on_connect
        edge.connect("127.0.0.1", proxy.port, keepalive=10, clean_start=True)
        edge.loop_start()
        try:
            assert connects.acquire(timeout=10)
            proxy.cut()
            assert connects.acquire(timeout=15), "paho did not reconnect through the proxy"
            info = edge.publish(topic, "trực tuyến".encode(), qos=1)
            info.wait_for_publish(timeout=10)
            assert info.is_published()
            assert got_message.wait(timeout=10)
            assert delivered == ["trực tuyến".encode()]
            stats = proxy.stats
            assert stats.cuts == 1
            assert stats.connections == 2
        finally:
            edge.disconnect()
            edge.loop_stop()
            observer.disconnect()
            observer.loop_stop()


def test_threaded_proxy_works_without_an_event_loop() -> None:
    """Controls and stats work from a plain thread; an unreachable upstream resets the client."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # bound but not listening: connecting is refused
        proxy = ThreadedProxy("127.0.0.1", dead_port)
        proxy.start()
        try:
            proxy.throttle(256, 0.25)
            proxy.blackhole(True)
            proxy.blackhole(False)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock, \
                    contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
            stats = proxy.wait_for(lambda s: s.connections == 1 and s.active == 0, timeout=5)
            assert stats.bytes_up == 0
        finally:
            proxy.stop()
            proxy.stop()  # idempotent
