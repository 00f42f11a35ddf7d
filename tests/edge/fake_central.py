"""A small in-test central: real paho against the real broker, the real protocol state machines.

It verifies init signatures with the device's key, keeps segments in memory, acks the ranges it
holds, and on fin verifies the whole ciphertext (protocol.envelope) before publishing a signed
receipt. The "package" inside the test envelopes is the original bytes themselves, so the
receipt's sha256 is the sha256 of the decrypted plaintext. Knobs let tests reject a transfer or
sign a receipt with the wrong key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.public
import nacl.signing
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol.envelope import EnvelopeOpener, SignedHeader, verify_ciphertext
from protocol.errors import ProtocolError
from protocol.messages import (
    RECEIPT_IS_STORED,
    Ack,
    AckState,
    Fin,
    Init,
    Receipt,
    ReceiptBody,
    Segment,
    Status,
    decode,
    encode,
)
from protocol.transfer import SegmentVerdict, TransferReceiver
from tests.support.broker import Broker


@dataclass
class _Held:
    signed: SignedHeader
    receiver: TransferReceiver
    data: dict[int, bytes] = field(default_factory=dict)
    plaintext: bytes | None = None
    document_id: int | None = None


class FakeCentral:
    def __init__(self, broker: Broker, *, device_keys: dict[str, nacl.signing.VerifyKey],
                 central_key: nacl.public.PrivateKey, receipt_key: nacl.signing.SigningKey) -> None:
        self.device_keys = device_keys
        self.central_key = central_key
        self.receipt_key = receipt_key
        self.reject: set[str] = set()              # tids to refuse at init
        self.bad_receipt_once: set[str] = set()    # tids whose first receipt carries a bad signature
        # Like central since the receipt stood for STORED: no STORED ack before a receipt to a device
        # whose init said RECEIPT_IS_STORED (False: like an older central, which always sends both).
        self.receipt_is_stored = False
        self.declared: dict[str, bool] = {}        # device → did its latest init carry RECEIPT_IS_STORED
        self.sent_stored = 0                       # STORED acks published
        self.transfers: dict[str, _Held] = {}
        self.assembled: Counter[str] = Counter()   # how many times each tid was assembled+stored
        self.fins: Counter[str] = Counter()
        self.segment_bytes = 0                     # every segment byte received, repeats included
        self.statuses: list[Status] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._next_id = 1
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fake-central",
                                   protocol=MQTTProtocolVersion.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 1)
        self._broker = broker
        self._subscribed = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FakeCentral:
        self._client.connect("127.0.0.1", self._broker.port, keepalive=5)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("fake central did not subscribe")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def wait_for(self, predicate: Callable[[FakeCentral], bool], timeout: float = 20.0) -> bool:
        """Block (call through asyncio.to_thread) until ``predicate(self)`` holds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def held_bytes(self) -> int:
        with self._cond:
            return sum(t.receiver.ranges.total() for t in self.transfers.values())

    # -- paho callbacks (paho's thread) -------------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        client.subscribe("sohoa/v1/up/#", qos=1)
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            msg = decode(message.topic, bytes(message.payload))
            with self._cond:
                if isinstance(msg, Init):
                    user = getattr(message.properties, "UserProperty", None) or []
                    self.declared[msg.device] = RECEIPT_IS_STORED in user
                    self._init(msg)
                elif isinstance(msg, Segment):
                    self._segment(msg)
                elif isinstance(msg, Fin):
                    self._fin(msg)
                elif isinstance(msg, Status):
                    self.statuses.append(msg)
                self._cond.notify_all()
        except ProtocolError as exc:
            with self._cond:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._cond.notify_all()

    def _send(self, msg: Ack | Receipt) -> None:
        if isinstance(msg, Ack) and msg.state is AckState.STORED:
            self.sent_stored += 1
        topic, payload = encode(msg)
        self._client.publish(topic, payload, qos=1)

    def _init(self, msg: Init) -> None:
        held = self.transfers.get(msg.tid)
        if held is None:
            key = self.device_keys.get(msg.device)
            if key is None or msg.tid in self.reject:
                self._send(Ack(msg.device, msg.tid, AckState.REJECTED, error="device or transfer refused",
                               error_class="Refused"))
                return
            msg.signed_header.verify(key)   # SignatureError → ProtocolError → recorded
            held = _Held(msg.signed_header, TransferReceiver(msg.signed_header.header))
            self.transfers[msg.tid] = held
        self._ack(msg.device, held)

    def _ack(self, device: str, held: _Held) -> None:
        if held.plaintext is not None:
            self._send(Ack(device, held.receiver.tid, AckState.STORED))
        else:
            self._send(held.receiver.ack())

    def _segment(self, msg: Segment) -> None:
        self.segment_bytes += len(msg.data)
        held = self.transfers.get(msg.tid)
        if held is None:
            self._send(Ack(msg.device, msg.tid, AckState.UNKNOWN))
            return
        if held.receiver.on_segment(msg) is SegmentVerdict.ACCEPT:
            held.data[msg.offset] = msg.data     # "durable": memory outlives the broker restarts
            held.receiver.committed(msg.offset)
        self._ack(msg.device, held)

    def _fin(self, msg: Fin) -> None:
        self.fins[msg.tid] += 1
        held = self.transfers.get(msg.tid)
        if held is None:
            self._send(Ack(msg.device, msg.tid, AckState.UNKNOWN))
            return
        if held.plaintext is None:
            if not held.receiver.complete:
                self._send(held.receiver.ack())
                return
            ciphertext = b"".join(held.data[o] for o in sorted(held.data))
            verified = verify_ciphertext(held.signed, self.device_keys[msg.device], size=len(ciphertext),
                                         sha256=hashlib.sha256(ciphertext).digest())
            out = bytearray()
            opener = EnvelopeOpener(verified, self.central_key, max_plaintext=64 << 20, sink=out.extend)
            opener.update(ciphertext)
            opener.finish()
            held.plaintext = bytes(out)
            held.document_id = self._next_id
            self._next_id += 1
            self.assembled[msg.tid] += 1
        if not (self.receipt_is_stored and self.declared.get(msg.device)):
            self._send(Ack(msg.device, msg.tid, AckState.STORED))
        assert held.plaintext is not None and held.document_id is not None
        body = ReceiptBody(device=msg.device, tid=msg.tid, sha256=hashlib.sha256(held.plaintext).hexdigest(),
                           stored_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           document_id=held.document_id)
        if msg.tid in self.bad_receipt_once:
            self.bad_receipt_once.discard(msg.tid)
            self._send(Receipt.sign(body, nacl.signing.SigningKey.generate()))
        else:
            self._send(Receipt.sign(body, self.receipt_key))
