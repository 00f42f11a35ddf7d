"""A TCP fault proxy between an edge and its broker: cut, blackhole, refuse, throttle, delay and reset the
link on command, so fault scenarios and benchmarks exercise real sockets without touching either end.

Link model (per direction, shared by every connection like one commune uplink):
- a piece of data leaves when the link is free and occupies it for ``len / rate`` seconds (a token
  bucket with no burst, so there is no start-up burst after idle);
- it arrives ``latency`` seconds after it has fully left; pieces are delivered strictly in order;
- while throttled the proxy reads at most one MSS-sized piece ahead, so backpressure reaches the
  sender through its own socket buffers instead of piling up invisibly in the proxy.
A blackhole stops reading and delivering in both directions (data waits, as TCP retransmissions would)
and holds new connections before they reach the upstream; a cut or reset ends both sides with RST.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, TypeVar

Direction = Literal["up", "down"]

# One Ethernet MSS: throttled data is paced at this grain so it trickles like packets do.
PIECE_BYTES = 1448
# Unthrottled, the proxy should not be the bottleneck.
CHUNK_BYTES = 65536
# Bounds the proxy's own buffering per connection and direction (pieces awaiting their arrival time).
QUEUE_PIECES = 1024
CONNECT_TIMEOUT_S = 10.0
# How late an asyncio timer may fire before the link counts as having gone idle.
TIMER_SLACK_S = 0.010

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """A snapshot of the proxy's counters; bytes are those actually forwarded."""

    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0  # accepted from clients, refused ones included
    active: int = 0  # currently open client connections
    cuts: int = 0
    refused: int = 0
    resets: int = 0  # connections ended by reset_after


class _Signal(Enum):
    EOF = "eof"
    RESET = "reset"


class _ResetAfterBudget(Exception):
    """The reset_after budget of a connection is spent: end it with RST."""


class _Link:
    """One direction of the shaped link."""

    def __init__(self) -> None:
        self.rate: float | None = None  # bytes per second; None is unlimited
        self.latency = 0.0
        self.free_at = 0.0

    async def pace(self, nbytes: int) -> float:
        """Wait until the link is free for this piece; return when its last byte has left."""
        now = asyncio.get_running_loop().time()
        if self.rate is None:
            return now
        # Back-to-back pieces start exactly when the previous one ended, so a timer firing late on a busy
        # machine does not slow the link down; after a real idle gap the piece starts now, never early.
        start = self.free_at if now - self.free_at < TIMER_SLACK_S else now
        # Reserve before sleeping so concurrent connections queue behind each other.
        self.free_at = start + nbytes / self.rate
        if start > now:
            await asyncio.sleep(start - now)
        return self.free_at


class _Connection:
    """One proxied client connection and, once it is open, its upstream."""

    def __init__(self, client: asyncio.StreamWriter, budgets: dict[Direction, int | None]) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.budgets = budgets
        self.task: asyncio.Task[Any] | None = asyncio.current_task()

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)

    async def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            writer.close()
            # The peer may already have reset; all we want is the transport gone.
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort with SO_LINGER 0 so the peer sees RST, not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    # Nagle plus delayed ACKs would add 40 ms stalls that belong to the proxy, not to the modelled link.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FaultProxy:
    """An asyncio TCP proxy whose link can be broken in controlled ways. Control it from its loop."""

    def __init__(
        self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.port = listen_port
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: dict[Direction, _Link] = {"up": _Link(), "down": _Link()}
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._reset_after: tuple[int, Direction] | None = None
        self._changed = asyncio.Event()
        self._bytes: dict[Direction, int] = {"up": 0, "down": 0}
        self._accepted = 0
        self._cuts = 0
        self._refused = 0
        self._resets = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._abort_all()
        # Connections accepted a moment ago may not have registered yet.
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- controls ---------------------------------------------------------------------------------

    async def cut(self) -> None:
        """Close every current connection both ways with RST; new ones are accepted as usual."""
        self._cuts += 1
        await self._abort_all()

    def blackhole(self, on: bool) -> None:
        """While on, accept connections and keep old ones but forward nothing either way."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def refuse(self, on: bool) -> None:
        """While on, new connections are reset as soon as they are accepted."""
        self._refusing = on

    def throttle(self, kbit: float | None, latency_s: float = 0.0) -> None:
        """Cap each direction at ``kbit`` kbit/s (None: unlimited) and add one-way latency."""
        if kbit is not None and kbit <= 0:
            raise ValueError(f"kbit must be positive or None, got {kbit}")
        if latency_s < 0:
            raise ValueError(f"latency must not be negative, got {latency_s}")
        for link in self._links.values():
            link.rate = None if kbit is None else kbit * 1000 / 8
            link.latency = latency_s

    def reset_after(self, nbytes: int | None, direction: Direction = "up") -> None:
        """Connections accepted from now on are reset after ``nbytes`` forwarded in ``direction``.

        The cut falls exactly after that byte, wherever it is in an MQTT packet. None switches it off.
        """
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"nbytes must not be negative, got {nbytes}")
        self._reset_after = None if nbytes is None else (nbytes, direction)

    @property
    def stats(self) -> ProxyStats:
        return ProxyStats(
            bytes_up=self._bytes["up"],
            bytes_down=self._bytes["down"],
            connections=self._accepted,
            active=len(self._connections),
            cuts=self._cuts,
            refused=self._refused,
            resets=self._resets,
        )

    async def wait_for(self, predicate: Callable[[ProxyStats], bool], timeout: float) -> ProxyStats:
        """Wait until the counters satisfy ``predicate`` (e.g. a second connection arrived)."""
        async with asyncio.timeout(timeout):
            while not predicate(stats := self.stats):
                await self._changed.wait()
        return stats

    # -- plumbing ---------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _abort_all(self) -> None:
        connections = list(self._connections)
        for connection in connections:
            connection.reset()
            if connection.task is not None:
                connection.task.cancel()
        tasks = [c.task for c in connections if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # The proxy owns each connection's task: if asyncio's stream machinery owned it, cancelling it on
        # cut() would make Python 3.11 log a spurious "Unhandled exception in client_connected_cb".
        task = asyncio.get_running_loop().create_task(self._serve(client_reader, client_writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        budgets: dict[Direction, int | None] = {"up": None, "down": None}
        if self._reset_after is not None:
            budgets[self._reset_after[1]] = self._reset_after[0]
        connection = _Connection(client_writer, budgets)
        self._connections.add(connection)
        self._accepted += 1
        self._notify()
        try:
            if self._refusing:
                self._refused += 1
                _reset(client_writer)
                return
            _no_delay(client_writer)
            # A blackholed link drops the SYN too: the upstream must not see this connection yet.
            await self._flowing.wait()
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.upstream_host, self.upstream_port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                # The closest a proxy can get to passing on "connection refused".
                _reset(client_writer)
                return
            connection.upstream = upstream_writer
            _no_delay(upstream_writer)
            await self._forward(connection, client_reader, upstream_reader, upstream_writer)
        finally:
            self._connections.discard(connection)
            await connection.close()
            self._notify()

    async def _forward(
        self,
        connection: _Connection,
        client_reader: asyncio.StreamReader,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        up: asyncio.Queue[tuple[float, bytes | _Signal]] = asyncio.Queue(QUEUE_PIECES)
        down: asyncio.Queue[tuple[float, bytes | _Signal]] = asyncio.Queue(QUEUE_PIECES)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._receive(connection, "up", client_reader, up))
                group.create_task(self._deliver("up", upstream_writer, up))
                group.create_task(self._receive(connection, "down", upstream_reader, down))
                group.create_task(self._deliver("down", connection.client, down))
        except* _ResetAfterBudget:
            self._resets += 1
            connection.reset()
        except* OSError:
            # One side broke (reset, broken pipe): pass the break on to the other side.
            connection.reset()

    async def _receive(
        self,
        connection: _Connection,
        direction: Direction,
        source: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes | _Signal]],
    ) -> None:
        link = self._links[direction]
        loop = asyncio.get_running_loop()
        while True:
            budget = connection.budgets[direction]
            if budget == 0:
                await queue.put((max(loop.time(), link.free_at) + link.latency, _Signal.RESET))
                return
            await self._flowing.wait()
            limit = PIECE_BYTES if link.rate is not None else CHUNK_BYTES
            data = await source.read(limit if budget is None else min(limit, budget))
            if not data:
                await queue.put((max(loop.time(), link.free_at) + link.latency, _Signal.EOF))
                return
            # Data read just before a blackhole began waits like data still in flight.
            await self._flowing.wait()
            left_at = await link.pace(len(data))
            await queue.put((left_at + link.latency, data))
            if budget is not None:
                connection.budgets[direction] = budget - len(data)

    async def _deliver(
        self,
        direction: Direction,
        destination: asyncio.StreamWriter,
        queue: asyncio.Queue[tuple[float, bytes | _Signal]],
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, item = await queue.get()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._flowing.wait()
            if item is _Signal.RESET:
                raise _ResetAfterBudget
            if item is _Signal.EOF:
                if destination.can_write_eof():
                    with contextlib.suppress(OSError):
                        destination.write_eof()
                return
            destination.write(item)
            self._bytes[direction] += len(item)
            await destination.drain()


class ThreadedProxy:
    """A FaultProxy on its own loop in a background thread, for synchronous tests and scripts.

    Every control returns once it is in effect on the proxy's loop.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self._proxy = FaultProxy(
            upstream_host, upstream_port, listen_host=listen_host, listen_port=listen_port
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    @property
    def port(self) -> int:
        return self._proxy.port

    def start(self) -> None:
        self._thread.start()
        self._run(self._proxy.start())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._run(self._proxy.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> ThreadedProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cut(self) -> None:
        self._run(self._proxy.cut())

    def blackhole(self, on: bool) -> None:
        self._call(self._proxy.blackhole, on)

    def refuse(self, on: bool) -> None:
        self._call(self._proxy.refuse, on)

    def throttle(self, kbit: float | None, latency_s: float = 0.0) -> None:
        self._call(self._proxy.throttle, kbit, latency_s)

    def reset_after(self, nbytes: int | None, direction: Direction = "up") -> None:
        self._call(self._proxy.reset_after, nbytes, direction)

    @property
    def stats(self) -> ProxyStats:
        return self._call(lambda: self._proxy.stats)

    def wait_for(self, predicate: Callable[[ProxyStats], bool], timeout: float) -> ProxyStats:
        return self._run(self._proxy.wait_for(predicate, timeout), timeout=timeout + 5)

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        async def on_loop() -> _T:
            return function(*args)

        return self._run(on_loop())
