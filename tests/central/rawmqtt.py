"""A bare paho MQTT v5 client for broker-policy tests: records CONNACKs, disconnects, PUBACK codes.

Tests about what the broker allows (revocation, isolation, TLS) need to see reason codes and
disconnects as they happen, without central.ingest.mqtt's reconnect loop hiding them.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

TIMEOUT = 15.0


@dataclass
class RawClient:
    """One connection; every callback result is recorded under a lock."""

    client_id: str
    connack: ReasonCode | None = None
    connack_properties: Any = None
    connected: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)      # CONNACK of any kind
    disconnected: threading.Event = field(default_factory=threading.Event)
    disconnect_reason: str | None = None
    disconnected_at: float | None = None     # time.monotonic() of the first disconnect
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)   # topics of messages delivered as retained
    puback: dict[int, int] = field(default_factory=dict)     # mid → reason code value
    suback: dict[int, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: threading.Condition = field(init=False)
    mqtt: paho.Client = field(init=False)

    def __post_init__(self) -> None:
        self.acked = threading.Condition(self.lock)
        # No reconnect: a test wants to see a disconnect, and loop_stop() must not wait out paho's
        # reconnect delay (up to two minutes) after the broker cut the connection.
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5,
                             reconnect_on_failure=False)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self.mqtt = client

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, props: Any) -> None:
        self.connack = reason
        self.connack_properties = props
        if not reason.is_failure:
            self.connected.set()
        self.answered.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()
        self.disconnect_reason = str(reason)
        self.disconnected.set()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self.acked:
            self.messages.append((message.topic, bytes(message.payload)))
            if message.retain:
                self.retained.append(message.topic)
            self.acked.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self.acked:
            self.puback[mid] = reason.value
            self.acked.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self.acked:
            self.suback[mid] = [r.value for r in reasons]
            self.acked.notify_all()

    def wait_acks(self, pub_mids: set[int], sub_mids: frozenset[int] | set[int] = frozenset(),
                  timeout: float = TIMEOUT) -> None:
        def done() -> bool:
            return pub_mids <= self.puback.keys() and sub_mids <= self.suback.keys()

        with self.acked:
            if not self.acked.wait_for(done, timeout):
                raise TimeoutError(f"{self.client_id}: broker did not answer in {timeout} s")


    def wait_message(self, payload: bytes, timeout: float = TIMEOUT) -> None:
        with self.acked:
            if not self.acked.wait_for(lambda: any(p == payload for _, p in self.messages), timeout):
                raise TimeoutError(f"{self.client_id}: {payload!r} did not arrive in {timeout} s")


def connect(port: int, username: str, password: str, *, client_id: str | None = None,
            ca_file: str | None = None, host: str = "127.0.0.1", wait: bool = True) -> RawClient:
    raw = RawClient(client_id or f"raw-{username}")
    raw.mqtt.username_pw_set(username, password)
    if ca_file is not None:
        raw.mqtt.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    raw.mqtt.connect(host, port, keepalive=30)
    raw.mqtt.loop_start()
    if wait and not raw.answered.wait(TIMEOUT):
        close(raw)
        raise TimeoutError(f"no CONNACK for {username} within {TIMEOUT} s")
    return raw


def close(raw: RawClient) -> None:
    raw.mqtt.disconnect()
    raw.mqtt.loop_stop()
