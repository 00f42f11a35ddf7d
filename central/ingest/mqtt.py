"""The only module on central that touches paho: an asyncio face over paho's MQTT v5 client.

paho runs its network loop on a private thread; every callback hands its event to the asyncio loop
with ``call_soon_threadsafe``. Publishes and subscribes are futures keyed by message id and are
always removed (resolved, or failed when the connection drops). Incoming QoS 1 messages are
acknowledged only when the caller says so (``ack``), i.e. after central stored them durably.
Reconnects use jittered exponential backoff; the session survives them (clean_start=False).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("sohoa.central.mqtt")


@dataclass(frozen=True, slots=True)
class MqttSettings:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    client_id: str
    session_expiry_s: int = 7 * 24 * 3600
    subscriptions: tuple[tuple[str, int], ...] = ()
    receive_maximum: int = 64      # bounds how many unacked messages the broker pushes at us
    keepalive_s: int = 30
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    user_properties: tuple[tuple[str, str], ...] = ()   # MQTT v5 user properties, in order


class PublishError(ConnectionError):
    """A publish was refused by the broker or lost with the connection."""


class MqttClient:
    def __init__(self, settings: MqttSettings, *, manual_ack: bool = True) -> None:
        self.settings = settings
        self.inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.ready = asyncio.Event()      # connected and the configured subscriptions acknowledged
        self._loop = asyncio.get_running_loop()
        self._manual_ack = manual_ack
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._arrived: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self._arrived_lock = threading.Lock()
        self._wakeup_pending = False
        self._early: dict[int, Any] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mqtt-{settings.client_id}")
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id,
                             protocol=paho.MQTTv5, reconnect_on_failure=False, manual_ack=manual_ack)
        client.username_pw_set(settings.username, settings.password)
        client.max_inflight_messages_set(32)
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_message = self._cb_message
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        self._client = client

    # -- paho thread → loop ---------------------------------------------------------------------
    def _cb_connect(self, client: paho.Client, _userdata: Any, flags: Any, reason: ReasonCode,
                    _props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused connection: %s", reason)
            return
        # Subscribing on every connect is idempotent and covers a broker that lost its sessions.
        mid = None
        if self.settings.subscriptions:
            _, mid = client.subscribe(list(self.settings.subscriptions))
        # Queued before the SUBACK's callback, so _on_connected registers the future first.
        self._loop.call_soon_threadsafe(self._on_connected, bool(flags.session_present), mid)

    def _cb_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode,
                       _props: Any) -> None:
        self._loop.call_soon_threadsafe(self._on_disconnected, str(reason))

    def _cb_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        user = getattr(message.properties, "UserProperty", None)
        inbound = Inbound(message.topic, bytes(message.payload), message.qos, bool(message.retain),
                          message.mid, tuple(user) if user else ())
        self._post(self.inbox.put_nowait, inbound)

    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop. One wakeup per burst, not per event: the loop drains
        everything posted meanwhile (a self-pipe write per message cost more than the message)."""
        with self._arrived_lock:
            self._arrived.append((fn, args))
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        self._loop.call_soon_threadsafe(self._drain_arrived)

    def _drain_arrived(self) -> None:
        with self._arrived_lock:
            arrived, self._arrived = self._arrived, []
            self._wakeup_pending = False
        for fn, args in arrived:
            fn(*args)

    def _cb_publish(self, _client: paho.Client, _userdata: Any, mid: int, reason: ReasonCode,
                    _props: Any) -> None:
        self._post(self._resolve_publish, mid, reason)

    def _cb_subscribe(self, _client: paho.Client, _userdata: Any, mid: int, reasons: list[ReasonCode],
                      _props: Any) -> None:
        self._loop.call_soon_threadsafe(self._resolve, mid, list(reasons))

    # -- loop side ------------------------------------------------------------------------------
    def _on_connected(self, session_present: bool, subscribe_mid: int | None) -> None:
        log.info("connected to %s:%d (session %s)", self.settings.host, self.settings.port,
                 "resumed" if session_present else "new")
        self.connected.set()
        if subscribe_mid is None:
            self.ready.set()
            return
        self._track(subscribe_mid).add_done_callback(self._on_subscribed)

    def _on_subscribed(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return   # the connection dropped first; the next connect subscribes again
        refused = [str(r) for r in future.result() if r.is_failure]
        if refused:
            log.error("broker refused subscriptions: %s", ", ".join(refused))
        else:
            log.info("subscriptions acknowledged as %s", self.settings.client_id)
        self.ready.set()

    def _on_disconnected(self, reason: str, *, expected: bool = False) -> None:
        if self.connected.is_set():
            log.log(logging.INFO if expected else logging.WARNING, "disconnected from broker: %s", reason)
        self.connected.clear()
        self.ready.clear()
        pending, self._pending = self._pending, {}
        self._early.clear()
        for future in pending.values():
            if not future.done():
                future.set_exception(PublishError(f"connection lost before the broker answered ({reason})"))

    def _resolve(self, mid: int, result: Any) -> None:
        future = self._pending.pop(mid, None)
        if future is None:
            self._early[mid] = result   # answered before we registered the future
            return
        if not future.done():
            future.set_result(result)

    def _resolve_publish(self, mid: int, reason: ReasonCode) -> None:
        if not reason.is_failure:
            self._resolve(mid, None)
            return
        refused = PublishError(f"broker refused publish {mid}: {reason} (0x{reason.value:02x})")
        future = self._pending.pop(mid, None)
        if future is None:
            self._early[mid] = refused
        elif not future.done():
            future.set_exception(refused)

    def _track(self, mid: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        if mid in self._early:
            early = self._early.pop(mid)
            if isinstance(early, PublishError):
                future.set_exception(early)
            else:
                future.set_result(early)
        else:
            self._pending[mid] = future
        return future

    # -- public API -----------------------------------------------------------------------------
    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      properties: Properties | None = None) -> None:
        """Publish and wait for the broker's PUBACK; raise PublishError on refusal (e.g. 0x87)."""
        answer = self.start_publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if answer is None:
            return
        try:
            await answer
        except PublishError as exc:
            raise PublishError(f"{exc} to {topic}") from None

    def start_publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      properties: Properties | None = None) -> asyncio.Future[None] | None:
        """Hand a message to paho and return at once. QoS 1: a future done at the broker's PUBACK,
        failed with PublishError if the broker refuses it (e.g. 0x87) or the connection drops first;
        QoS 0: None.

        No task, timeout or lock per message: a future in the pending map, which a disconnect always
        empties, is all a reply needs (central's replies are most of what it publishes).
        """
        if not self.connected.is_set():
            raise PublishError("not connected to the broker")
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish failed: {paho.error_string(info.rc)}")
        if qos == 0:
            return None
        answer: asyncio.Future[None] = self._track(info.mid)
        return answer

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 0) -> None:
        """Hand a QoS 0 message to paho and return (no PUBACK exists to wait for)."""
        if qos != 0:
            raise ValueError("publish_nowait is for QoS 0; use start_publish or publish for QoS 1")
        self.start_publish(topic, payload, qos=0)

    async def subscribe(self, topic: str, qos: int = 1) -> list[ReasonCode]:
        """Subscribe now; return the granted reason codes (0x87 means not authorised)."""
        if not self.connected.is_set():
            raise PublishError("not connected to the broker")
        result, mid = self._client.subscribe(topic, qos)
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            raise PublishError(f"subscribe failed: {paho.error_string(result)}")
        reasons: list[ReasonCode] = await self._track(mid)
        return reasons

    def ack(self, message: Inbound) -> None:
        """Acknowledge a QoS 1 message: call only once it is durably handled."""
        if self._manual_ack and message.qos > 0 and self.connected.is_set():
            self._client.ack(message.mid, message.qos)

    async def run(self) -> None:
        """Stay connected until cancelled, reconnecting with jittered exponential backoff."""
        attempt = 0
        try:
            while True:
                try:
                    await self._loop.run_in_executor(self._executor, self._connect)
                    await self._loop.run_in_executor(self._executor, self._client.loop_forever)
                except OSError as exc:
                    log.warning("cannot reach broker %s:%d: %s", self.settings.host, self.settings.port, exc)
                was_connected = self.connected.is_set()
                self._on_disconnected("network loop ended")
                attempt = 0 if was_connected else attempt + 1
                await asyncio.sleep(self._backoff(attempt))
        finally:
            # A stopped worker ends its session: the broker would otherwise keep handing it a share
            # of the shared subscription's messages, queued for nobody, for session_expiry_s (a
            # worker scaled down black-holed part of every box's segments for 7 days). What was
            # queued or unacknowledged goes with it; the boxes send it again (custody stays with
            # them until the receipt). A crash keeps the session, so a restart picks its queue up.
            goodbye = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            goodbye.SessionExpiryInterval = 0
            self._client.disconnect(properties=goodbye)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._on_disconnected("client stopped", expected=True)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2 ** min(attempt, 16))
        # "Equal jitter": never hammer at once after a broker restart, never wait more than the cap.
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 - not cryptographic

    def _connect(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = self.settings.receive_maximum
        self._client.connect(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s,
                             clean_start=False, properties=props)
