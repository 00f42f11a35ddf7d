"""An asyncio MQTT v5 client over paho-mqtt 2.x: the only edge module that imports paho.

Modelled on aiomqtt 2.5: paho's socket callbacks register its socket with the asyncio loop
(``add_reader``/``add_writer``), so there is no network thread, no lock contention, and an idle or
offline box does not wake up at all (a ``loop_start`` thread polls every second even when idle,
and its own reconnect logic would fight our backoff and outbox). Only the blocking TCP/TLS connect
runs in an executor thread, as in aiomqtt.

Every paho callback only hands its result to the loop with ``call_soon_threadsafe``; that keeps the
code correct whichever thread paho calls from and never re-enters paho from inside its callbacks.
Futures for PUBACK/SUBACK are keyed by message id and are always failed with
:class:`ConnectionLost` when the connection goes. A v5 PUBACK with a reason code >= 0x80 (0x87 Not
authorized from an ACL) raises :class:`PublishRefused`: MQTT 3.1.1 would have reported success.

One :class:`MqttClient` is one connection: reconnecting means a new client. paho's in-memory
session is deliberately thrown away; the outbox is the source of truth and every resend is
idempotent. The broker-side session (``clean_start=False`` + session expiry) is kept, so acks and
receipts published while the box was offline are still delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("sohoa.edge.mqtt")

DEFAULT_KEEPALIVE = 30
DEFAULT_SESSION_EXPIRY = 7 * 24 * 3600
_MISC_INTERVAL = 1.0


class MqttError(Exception):
    """Base of every error this module raises."""

    hint = "check the broker URL, the network and the broker's log"


class ConnectError(MqttError):
    """The broker could not be reached or refused the CONNECT (``reason_code`` if it answered)."""

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code

    @property
    def hint(self) -> str:  # type: ignore[override]
        if self.reason_code in (0x86, 0x87, 0x8C):
            return "the broker refused the credentials: check username/password in the device config"
        return MqttError.hint


class ConnectionLost(MqttError):
    """The connection went away while an operation was waiting for the broker.

    ``reason_code`` is the broker's v5 DISCONNECT reason when it sent one (0x8E: another client
    connected with our client id and took the session over).
    """

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class PublishRefused(MqttError):
    """The broker answered a QoS 1 publish with a v5 failure reason code (e.g. 0x87)."""

    hint = "the broker ACL does not allow this device to publish there: check the broker config"

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        super().__init__(f"publish to {topic} refused: 0x{reason_code:02X} {reason}")
        self.topic = topic
        self.reason_code = reason_code
        self.reason = reason


class SubscribeRefused(MqttError):
    """The broker refused a subscription (v5 SUBACK failure code)."""

    def __init__(self, topic_filter: str, reason_code: int, reason: str) -> None:
        super().__init__(f"subscribe to {topic_filter} refused: 0x{reason_code:02X} {reason}")
        self.topic_filter = topic_filter
        self.reason_code = reason_code


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker url {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
        if parts.username or parts.password or parts.path not in ("", "/"):
            raise ValueError(f"broker url {url!r} must not carry credentials or a path")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False   # the broker refuses retain (central/admin/broker_config.py): nothing is retained


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes = field(repr=False)
    retain: bool = False


def _code(reason: ReasonCode | int) -> int:
    return reason.value if isinstance(reason, ReasonCode) else int(reason)


class MqttClient:
    """One MQTT v5 connection. ``await connect()``, then publish/subscribe; read ``messages``."""

    def __init__(self, url: str, *, client_id: str, username: str | None = None,
                 password: str | None = None, ca_file: Path | None = None, will: Will | None = None,
                 keepalive: int = DEFAULT_KEEPALIVE, session_expiry: int = DEFAULT_SESSION_EXPIRY,
                 clean_start: bool = False, max_inflight: int = 64,
                 connect_timeout: float = 15.0) -> None:
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._session_expiry = session_expiry
        self._clean_start = clean_start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._pending_pub: dict[int, tuple[asyncio.Future[None], str]] = {}
        self._pending_sub: dict[int, tuple[asyncio.Future[None], str]] = {}
        self._connack: asyncio.Future[bool] | None = None
        self._closed: asyncio.Future[MqttError] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._sock: Any = None
        self._fd = -1   # the selector is keyed by fd: a closed socket object reports fileno() -1
        self._connected = False

        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.max_inflight_messages_set(max_inflight)
        client.connect_timeout = 10.0
        if username is not None:
            client.username_pw_set(username, password)
        if self.address.tls:
            client.tls_set(ca_certs=str(ca_file) if ca_file else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        client.on_message = self._cb_message
        self._client = client

    # -- public API --------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> bool:
        """Connect and wait for CONNACK; return whether the broker resumed a session."""
        loop = self._loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._closed = loop.create_future()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry
        host, port = self.address.host, self.address.port
        self._loop_thread = threading.get_ident()
        # The blocking part (DNS, TCP, TLS handshake, writing CONNECT) runs in a thread, like
        # aiomqtt; the socket callbacks are installed only afterwards, on the loop thread.
        opening = loop.run_in_executor(None, lambda: self._client.connect(
            host, port, keepalive=self._keepalive, clean_start=self._clean_start, properties=props))
        try:
            async with asyncio.timeout(self._connect_timeout):
                await asyncio.shield(opening)
                self._attach()
                session_present = await self._connack
        except (OSError, TimeoutError) as exc:
            self._teardown(ConnectionLost(f"connect to {host}:{port} failed"))
            raise ConnectError(f"cannot connect to {host}:{port}: {exc or type(exc).__name__}") from exc
        except BaseException:
            self._teardown(ConnectionLost("connect cancelled"))
            raise
        finally:
            if not opening.done():
                # The thread cannot be interrupted: close whatever socket it ends up opening.
                opening.add_done_callback(lambda _: self._close_paho_socket())
        self._connected = True
        return session_present

    def start_publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      user_properties: tuple[tuple[str, str], ...] = ()) -> asyncio.Future[None]:
        """Queue a publish; the future completes on PUBACK (QoS 1) or when written (QoS 0)."""
        loop = self._require_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._connected:
            future.set_exception(ConnectionLost("not connected"))
            return future
        props = None
        if user_properties:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = list(user_properties)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            future.set_exception(ConnectionLost(f"publish failed: {paho.error_string(info.rc)}"))
            return future
        if qos == 0:
            future.set_result(None)
        else:
            self._pending_pub[info.mid] = (future, topic)
        return future

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        await self.start_publish(topic, payload, qos=qos, retain=retain)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        loop = self._require_loop()
        if not self._connected:
            raise ConnectionLost("not connected")
        result, mid = self._client.subscribe(topic_filter, qos=qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionLost(f"subscribe failed: {paho.error_string(result)}")
        future: asyncio.Future[None] = loop.create_future()
        self._pending_sub[mid] = (future, topic_filter)
        await future

    async def wait_closed(self) -> MqttError:
        """Wait until the connection is gone; return why."""
        assert self._closed is not None, "connect() first"
        return await asyncio.shield(self._closed)

    async def disconnect(self, *, with_will: bool = False) -> None:
        """Send DISCONNECT and release everything. Safe to call more than once.

        ``with_will`` sends v5 reason 0x04 so the broker still publishes the last will: a box that
        shuts down cleanly is just as offline as one that lost power.
        """
        if self._connected:
            reason = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message") if with_will else None
            with contextlib.suppress(Exception):
                self._client.disconnect(reasoncode=reason)
                self._flush()
        self._teardown(ConnectionLost("disconnected by us"))

    # -- loop integration --------------------------------------------------------------------------
    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise ConnectionLost("not connected")
        return self._loop

    def _attach(self) -> None:
        loop = self._require_loop()
        sock = self._client.socket()
        if sock is None:
            raise ConnectionLost("socket closed during connect")
        self._sock, self._fd = sock, sock.fileno()
        self._client.on_socket_close = self._cb_socket_close
        self._client.on_socket_register_write = self._cb_register_write
        self._client.on_socket_unregister_write = self._cb_unregister_write
        loop.add_reader(self._fd, self._on_readable)
        if self._client.want_write():
            loop.add_writer(self._fd, self._on_writable)
        self._misc = loop.create_task(self._misc_loop(), name=f"mqtt-misc-{self.client_id}")

    def _on_readable(self) -> None:
        try:
            self._client.loop_read()
            # TLS may hold decrypted bytes the socket no longer signals as readable.
            sock = self._sock
            if isinstance(sock, ssl.SSLSocket) and sock.pending() and self._loop is not None:
                self._loop.call_soon(self._on_readable)
        except OSError as exc:
            self._teardown(ConnectionLost(f"read failed: {exc}"))

    def _on_writable(self) -> None:
        try:
            self._client.loop_write()
        except OSError as exc:
            self._teardown(ConnectionLost(f"write failed: {exc}"))

    def _flush(self) -> None:
        with contextlib.suppress(OSError):
            self._client.loop_write()

    async def _misc_loop(self) -> None:
        # Keepalive pings and PINGRESP timeouts: one cheap wake-up per second while connected only.
        while True:
            await asyncio.sleep(_MISC_INTERVAL)
            if self._client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    def _detach_socket(self, sock: Any) -> None:
        loop = self._loop
        if loop is None or sock is None or sock is not self._sock:
            return
        if not loop.is_closed():
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
        self._sock, self._fd = None, -1

    def _teardown(self, reason: MqttError) -> None:
        """Connection gone (or never made): fail every waiter, stop watching the socket."""
        self._connected = False
        if self._sock is not None:
            self._detach_socket(self._sock)
        self._close_paho_socket()
        if self._misc is not None and not self._misc.done():
            with contextlib.suppress(RuntimeError):
                self._misc.cancel()
        for future, _ in [*self._pending_pub.values(), *self._pending_sub.values()]:
            if not future.done():
                future.set_exception(reason)
                # Waiters that were abandoned must not warn "exception never retrieved".
                future.exception()
        self._pending_pub.clear()
        self._pending_sub.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(reason)
            self._connack.exception()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(reason)

    def _close_paho_socket(self) -> None:
        self._client.on_socket_close = None
        self._client.on_socket_register_write = None
        self._client.on_socket_unregister_write = None
        with contextlib.suppress(Exception):
            self._client._sock_close()  # paho has no public "drop the socket"

    def _to_loop(self, func: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(func, *args)

    # -- paho callbacks: hand over to the loop, nothing else ---------------------------------------
    def _cb_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        loop = self._loop
        # Must act before paho closes the fd, so synchronously when we are on the loop thread.
        if loop is not None and threading.get_ident() == self._loop_thread:
            self._detach_socket(sock)
        else:
            self._to_loop(self._detach_socket, sock)

    def _cb_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._to_loop(self._add_writer, sock)

    def _cb_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._to_loop(self._remove_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        if sock is self._sock and self._loop is not None:
            self._loop.add_writer(self._fd, self._on_writable)

    def _remove_writer(self, sock: Any) -> None:
        if sock is self._sock and self._loop is not None:
            self._loop.remove_writer(self._fd)

    def _cb_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        self._to_loop(self._on_connack, _code(reason), str(reason), bool(flags.session_present))

    def _on_connack(self, code: int, text: str, session_present: bool) -> None:
        if self._connack is None or self._connack.done():
            return
        if code >= 0x80:
            error = ConnectError(f"broker refused the connection: 0x{code:02X} {text}", reason_code=code)
            self._connack.set_exception(error)
            self._teardown(error)
        else:
            self._connack.set_result(session_present)

    def _cb_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        self._to_loop(self._teardown, ConnectionLost(f"connection lost: {reason}", reason_code=_code(reason)))

    def _cb_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        self._to_loop(self._on_puback, mid, _code(reason), str(reason))

    def _on_puback(self, mid: int, code: int, text: str) -> None:
        entry = self._pending_pub.pop(mid, None)
        if entry is None or entry[0].done():
            return
        future, topic = entry
        if code >= 0x80:
            future.set_exception(PublishRefused(topic, code, text))
        else:
            future.set_result(None)

    def _cb_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Any) -> None:
        self._to_loop(self._on_suback, mid, [(_code(r), str(r)) for r in reasons])

    def _on_suback(self, mid: int, codes: list[tuple[int, str]]) -> None:
        entry = self._pending_sub.pop(mid, None)
        if entry is None or entry[0].done():
            return
        future, topic_filter = entry
        failed = [(c, t) for c, t in codes if c >= 0x80]
        if failed:
            future.set_exception(SubscribeRefused(topic_filter, *failed[0]))
        else:
            future.set_result(None)

    def _cb_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._to_loop(self.messages.put_nowait, Message(message.topic, bytes(message.payload),
                                                        bool(message.retain)))
