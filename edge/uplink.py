"""The uplink: send packaged envelopes to central over MQTT v5 and record central's signed receipts.

Sequence per connection: connect (jittered exponential backoff) → subscribe to the device's down
topics → publish the online status (the last will says offline; nothing is retained) → resume
every active transfer from central's ack → pull more documents from the outbox as transfers finish.

What to send and when is decided by :class:`protocol.transfer.TransferSender`; this module only
reads segments from the envelope file by offset, publishes, feeds acks back in and sleeps until the
earliest deadline — never a busy loop, offline or idle. Notices (a document's sealed text and
metadata, ``protocol.notice``) go first on every pass, whatever ``max_active`` and whichever big
transfers hold the slots, and are re-sent until central answers; that answer (``Noted``) is recorded
and never lets custody act. The uplink only records facts: a
receipt that verifies against central's key and names exactly the packaged content is recorded
durably (``mark_delivered`` with synchronous=FULL, with the receipted sha256), a refusal is recorded
as ``failed`` with its reason; ``on_settled`` then wakes custody, which alone touches the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import os
import random
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from edge.mqtt import ConnectError, ConnectionLost, Message, MqttClient, MqttError, PublishRefused, Will
from edge.outbox import SENDABLE_STATES, Doc, DocState, Outbox, OutboxError
from protocol.envelope import SignedHeader
from protocol.errors import ProtocolError, ReceiptError
from protocol.messages import (
    RECEIPT_IS_STORED,
    Ack,
    AckState,
    Fin,
    Init,
    Noted,
    NoticeState,
    Receipt,
    Segment,
    Status,
    decode,
    encode,
)
from protocol.topics import Kind, Topic, device_down_filter
from protocol.transfer import SenderState, SendFin, SendInit, SendSegment, TransferSender

log = logging.getLogger("sohoa.edge.uplink")

_STATUS_COALESCE = 0.5   # a burst of receipts yields one status publish, not one each
# Central's error classes that mean "another box signs with this box's key" (central.errors).
IDENTITY_CLASH_ERRORS = frozenset({"SequenceReusedError"})
# CONNACK reasons that say the account itself is refused (revoked, wrong password), not the link.
ACCESS_REFUSED_CODES = frozenset({0x86, 0x87, 0x8C})
SESSION_TAKEN_OVER = 0x8E
# Notices out at once (sent, not answered): enough to keep central busy, few enough that a backlog
# of thousands is never read into memory or handed to paho in one go.
NOTICES_OUT = 16


class TokenBucket:
    """Caps payload bytes per second, with a burst of ``burst`` bytes."""

    def __init__(self, rate_bytes: float, burst: float, now: float) -> None:
        self.rate = rate_bytes
        self.burst = burst
        self.tokens = burst
        self._at = now

    def refill(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        return self.tokens

    def take(self, nbytes: int) -> None:
        # May go negative: a segment is never split, the debt is paid by waiting longer.
        self.tokens -= nbytes

    def ready_at(self, now: float) -> float:
        return now if self.tokens > 0 else now + (-self.tokens + 1) / self.rate


@dataclass(slots=True)
class _Transfer:
    doc: Doc
    sender: TransferSender
    init: Init
    fd: int
    sent: set[int] = field(default_factory=set)   # segment offsets published at least once

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Uplink:
    """Drives transfers for one device; ``run()`` until cancelled."""

    def __init__(self, *, device_id: str, broker_url: str, username: str, password: str,
                 outbox: Outbox, receipt_key: nacl.signing.VerifyKey, segment_size: int = 32768,
                 window: int = 8, rate_kbit: float | None = None, max_active: int = 2,
                 resend_after: float = 30.0,
                 on_settled: Callable[[], None] | None = None,
                 status: Callable[[], Awaitable[Status]] | None = None,
                 status_interval: float = 30.0, ca_file: Path | None = None,
                 backoff_initial: float = 1.0, backoff_max: float = 300.0) -> None:
        if window <= 0 or max_active <= 0 or segment_size <= 0:
            raise ValueError("window, max_active and segment_size must be positive")
        self._device = device_id
        self._broker_url = broker_url
        self._username = username
        self._password = password
        self._outbox = outbox
        self._receipt_key = receipt_key
        self._segment_size = segment_size
        self._window = window
        self._rate_bytes = rate_kbit * 1000 / 8 if rate_kbit else None
        self._max_active = max_active
        self._resend_after = resend_after
        self._on_settled = on_settled
        self._status = status
        self._status_interval = status_interval
        self._ca_file = ca_file
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._active: dict[str, _Transfer] = {}
        self._notices: dict[str, float | None] = {}   # tid → when sent on this connection (None: not yet)
        self._notice_fill = True
        self._kick = asyncio.Event()
        self._status_kick = asyncio.Event()
        self._fill_needed = True
        self._refused: PublishRefused | None = None
        self._connected = False
        self._bucket: TokenBucket | None = None
        self._turn = 0
        self.bytes_on_wire = 0          # payload bytes published (init, segments, fin, status)
        self.segment_bytes = 0          # of which ciphertext segments (re-sends included)
        self.resent_bytes = 0           # of which segments sent before (same transfer, same offset)
        self.notice_bytes = 0           # of which notices (bytes_on_wire counts them too)
        self.noticed = 0                # notices central answered "catalogued"
        self.delivered = 0
        self.rejected = 0
        self.connects = 0
        self.last_error: str | None = None
        # Central refused a sequence number another box with our identity already used, or the
        # broker handed our session to another client with our id: a cloned memory card.
        self.identity_clash = False
        self.access_refused = False   # the broker refuses our account (CONNACK 0x86/0x87/0x8C)
        # Central defers our new transfers (per-device quota) until about this loop time; cleared as
        # soon as central takes a transfer's bytes again. What the clerk is told (edge.alarms).
        self._deferred_until: float | None = None

    # -- public --------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    def wake(self) -> None:
        """A new document was packaged: look at the outbox again."""
        self._fill_needed = True
        self._notice_fill = True
        self._kick.set()

    def request_status(self) -> None:
        self._status_kick.set()

    def set_rate(self, rate_kbit: float | None) -> None:
        """Change the link cap in place (SIGHUP reload); 0 or None: uncapped."""
        self._rate_bytes = rate_kbit * 1000 / 8 if rate_kbit else None
        if self._rate_bytes is None:
            self._bucket = None
        elif self._bucket is not None:
            self._bucket.rate = self._rate_bytes
            self._bucket.burst = max(self._rate_bytes / 4, 2 * self._segment_size)
        elif self._connected:
            self._bucket = TokenBucket(self._rate_bytes, max(self._rate_bytes / 4, 2 * self._segment_size),
                                       asyncio.get_running_loop().time())
        self._kick.set()

    async def run(self) -> None:
        delay = self._backoff_initial
        try:
            while True:
                client = self._new_client()
                try:
                    await client.connect()
                except ConnectError as exc:
                    self.last_error = str(exc)
                    self.access_refused = exc.reason_code in ACCESS_REFUSED_CODES
                    log.warning("cannot reach the broker at %s: %s (retry in ≤%.0f s)",
                                self._broker_url, exc, delay)
                else:
                    self.connects += 1
                    self.access_refused = False
                    delay = self._backoff_initial
                    log.info("connected to %s as %s", self._broker_url, self._device)
                    try:
                        await self._session(client)
                    except* MqttError as group:
                        self.last_error = str(group.exceptions[0])
                        log.warning("uplink connection ended: %s", group.exceptions[0])
                        if any(isinstance(e, ConnectionLost) and e.reason_code == SESSION_TAKEN_OVER
                               for e in group.exceptions):
                            self.identity_clash = True
                    except* sqlite3.OperationalError as group:
                        # The outbox cannot record progress (disk full): drop the connection and
                        # resume from central's ack later rather than take the service down.
                        self.last_error = f"outbox: {group.exceptions[0]}"
                        log.warning("uplink paused, the outbox cannot be written: %s", group.exceptions[0])
                    finally:
                        self._connected = False
                        for transfer in self._active.values():
                            transfer.sender.disconnected()
                        await client.disconnect(with_will=True)
                        await self._drain(client)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311  # jitter, not crypto
                delay = min(delay * 2, self._backoff_max)
        finally:
            self._connected = False
            for transfer in self._active.values():
                transfer.close()
            self._active.clear()

    # -- one connection ------------------------------------------------------------------------
    def _new_client(self) -> MqttClient:
        topic, payload = encode(Status(self._device, online=False))
        return MqttClient(self._broker_url, client_id=self._device, username=self._username,
                          password=self._password, ca_file=self._ca_file,
                          # Not retained: the broker refuses retain (retain_available false) and
                          # central judges liveness by how recently the box spoke.
                          will=Will(topic, payload, qos=1, retain=False))

    async def _session(self, client: MqttClient) -> None:
        await client.subscribe(device_down_filter(self._device), qos=1)
        self._refused = None
        self._connected = True
        await self._publish_status(client)
        loop = asyncio.get_running_loop()
        if self._rate_bytes:
            # A quarter second of burst (at least two segments): enough to keep the pipe full
            # without letting a reconnect blast a slow link.
            self._bucket = TokenBucket(self._rate_bytes, max(self._rate_bytes / 4, 2 * self._segment_size),
                                       loop.time())
        for transfer in self._active.values():
            transfer.sender.connected()
        self._fill_needed = True
        # Whatever was published before the cut may be lost: every unanswered notice goes again.
        self._notices.clear()
        self._notice_fill = True
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch(client), name="uplink-watch")
            group.create_task(self._receive(client), name="uplink-receive")
            group.create_task(self._pump(client), name="uplink-pump")
            group.create_task(self._status_loop(client), name="uplink-status")

    async def _watch(self, client: MqttClient) -> None:
        raise await client.wait_closed()

    async def _receive(self, client: MqttClient) -> None:
        while True:
            message = await client.messages.get()
            await self._handle(message)
            self._kick.set()

    async def _drain(self, client: MqttClient) -> None:
        """Receipts that arrived just before the cut are still good: record them."""
        while not client.messages.empty():
            await self._handle(client.messages.get_nowait())

    async def _status_loop(self, client: MqttClient) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._status_interval):
                    await self._status_kick.wait()
                await asyncio.sleep(_STATUS_COALESCE)
            self._status_kick.clear()
            await self._publish_status(client)

    async def _publish_status(self, client: MqttClient) -> None:
        if self._status is not None:
            status = dataclasses.replace(await self._status(), online=True)
        else:
            stats = await self._outbox.stats()
            last = (dt.datetime.fromtimestamp(stats.last_receipt_at, dt.UTC).isoformat(timespec="seconds")
                    if stats.last_receipt_at else None)
            status = Status(self._device, online=True, queue_docs=stats.queued_docs,
                            queue_bytes=stats.queued_bytes, oldest_age_s=round(stats.oldest_age_s, 1),
                            failed_docs=stats.failed, last_receipt_at=last, last_error=self.last_error,
                            updated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        topic, payload = encode(status)
        self.bytes_on_wire += len(payload)
        await client.publish(topic, payload, qos=1, retain=False)

    # -- sending -------------------------------------------------------------------------------
    async def _pump(self, client: MqttClient) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._kick.clear()
            if self._refused is not None:
                raise self._refused
            if self._fill_needed:
                await self._fill()
            now = loop.time()
            await self._send_notices(client, now)
            await self._send_due(client, now)
            timeout = self._sleep_for(loop.time())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the event being set, and the TaskGroup would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._kick.wait()

    async def _fill(self) -> None:
        self._fill_needed = False
        if len(self._active) >= self._max_active:
            return
        # Only the first page: the backlog is never loaded, and active rows sort first anyway.
        for doc in await self._outbox.sendable(limit=self._max_active + len(self._active)):
            if len(self._active) >= self._max_active:
                break
            if doc.tid not in self._active:
                await self._activate(doc)

    async def _send_notices(self, client: MqttClient, now: float) -> None:
        """Publish notices due now, ahead of any segment (they pay into the token bucket, so the
        segments behind them wait instead)."""
        if not self._connected:
            return
        if self._notice_fill:
            self._notice_fill = False
            listed = [doc.tid for doc in await self._outbox.notices_to_send(limit=NOTICES_OUT)]
            self._notices = {tid: self._notices.get(tid) for tid in listed}
        for tid, sent_at in list(self._notices.items()):
            if sent_at is not None and now < sent_at + self._resend_after:
                continue
            payload = await self._outbox.notice_payload(tid)
            if payload is None:   # answered or delivered meanwhile
                self._notices.pop(tid, None)
                continue
            self._notices[tid] = now
            self.notice_bytes += len(payload)
            self._publish(client, str(Topic(Kind.NOTICE, self._device, tid)), payload)
            if sent_at is None:
                await self._outbox.notice_sent(tid)
                log.info("notice for %s sent (%d bytes)", tid, len(payload))

    def _open_envelope(self, doc: Doc) -> tuple[Init, int]:
        """The init message and an open fd for a row; raises if the row or file is unusable."""
        if (doc.envelope_path is None or doc.signed_header is None or not doc.ciphertext_size
                or not doc.segment_size):
            raise OutboxError("row has no envelope", tid=doc.tid)
        init = Init(self._device, doc.tid, SignedHeader.decode(doc.signed_header))
        if init.signed_header.header.ciphertext_size != doc.ciphertext_size:
            raise OutboxError("signed header and outbox row disagree on the size", tid=doc.tid)
        return init, os.open(doc.envelope_path, os.O_RDONLY)

    async def _activate(self, doc: Doc) -> None:
        try:
            init, fd = self._open_envelope(doc)
        except (OSError, ProtocolError, OutboxError) as exc:
            await self._give_up(doc, f"envelope unusable: {exc}")
            return
        assert doc.ciphertext_size and doc.segment_size
        sender = TransferSender(doc.tid, doc.ciphertext_size, segment_size=doc.segment_size,
                                window=self._window, resend_after=self._resend_after,
                                fresh=doc.state is DocState.PACKAGED)
        transfer = _Transfer(doc, sender, init, fd)
        try:
            await self._outbox.mark_sending(doc.tid)
        except OutboxError:
            # Rejected or delivered by a message handled while this page was being read.
            transfer.close()
            return
        except BaseException:
            transfer.close()
            raise
        self._active[doc.tid] = transfer
        if self._connected:
            sender.connected()
        log.info("sending %s (seq %d, %d bytes%s)", doc.tid, doc.seq, doc.ciphertext_size,
                 "" if doc.state is DocState.PACKAGED else ", resuming")

    async def _send_due(self, client: MqttClient, now: float) -> None:
        transfers = list(self._active.values())
        if not transfers or not self._connected:
            return
        # One window shared by all active transfers; the token bucket further limits new segments.
        budget = max(0, self._window - sum(t.sender.in_flight for t in transfers))
        if self._bucket is not None:
            tokens = self._bucket.refill(now)
            budget = 0 if tokens <= 0 else min(budget, math.ceil(tokens / self._segment_size))
        self._turn = (self._turn + 1) % len(transfers)
        for transfer in transfers[self._turn:] + transfers[:self._turn]:
            if transfer.doc.tid not in self._active:
                continue
            for action in transfer.sender.poll(now, budget):
                if isinstance(action, SendSegment):
                    budget -= 1
                if not await self._send(client, transfer, action):
                    break

    async def _send(self, client: MqttClient, transfer: _Transfer,
                    action: SendInit | SendSegment | SendFin) -> bool:
        tid = transfer.doc.tid
        if isinstance(action, SendInit):
            # This box takes a receipt as its STORED ack: central may skip sending STORED.
            self._publish(client, *encode(transfer.init), user_properties=(RECEIPT_IS_STORED,))
            return True
        if isinstance(action, SendFin):
            header = transfer.init.signed_header.header
            topic, payload = encode(Fin(self._device, tid, header.ciphertext_size, header.ciphertext_sha256))
        else:
            try:
                data = os.pread(transfer.fd, action.length, action.offset)
            except OSError as exc:
                # A bad sector must not become a crash loop: the original is still held, so the
                # document goes to failed/ with the reason rather than take the service down.
                self._drop(tid)
                await self._give_up(transfer.doc, f"envelope unreadable: {exc}")
                return False
            if len(data) != action.length:
                self._drop(tid)
                await self._give_up(transfer.doc, f"envelope file is shorter than its signed size "
                                                  f"(read {len(data)} of {action.length} at {action.offset})")
                return False
            topic, payload = encode(Segment(self._device, tid, action.offset, data))
            self.segment_bytes += len(data)
            if action.offset in transfer.sent:
                self.resent_bytes += len(data)   # what a cut, a reset or a lost ack cost
            transfer.sent.add(action.offset)
        self._publish(client, topic, payload)
        return True

    def _publish(self, client: MqttClient, topic: str, payload: bytes, *,
                 user_properties: tuple[tuple[str, str], ...] = ()) -> None:
        self.bytes_on_wire += len(payload)
        if self._bucket is not None:
            self._bucket.take(len(payload))
        future = client.start_publish(topic, payload, qos=1, user_properties=user_properties)
        future.add_done_callback(self._published)

    def _published(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, PublishRefused) and self._refused is None:
            # The ACL refuses our own topics: a configuration fault; reconnect with backoff.
            self._refused = exc
            self._kick.set()

    def _sleep_for(self, now: float) -> float | None:
        deadlines = [d for t in self._active.values() if (d := t.sender.next_deadline()) is not None]
        deadlines += [sent + self._resend_after for sent in self._notices.values() if sent is not None]
        if self._notice_fill or any(sent is None for sent in self._notices.values()):
            return 0
        if self._bucket is not None and self._bucket.tokens <= 0 and any(
                t.sender.state is SenderState.SENDING for t in self._active.values()):
            deadlines.append(self._bucket.ready_at(now))
        if self._fill_needed:
            return 0
        return max(0.0, min(deadlines) - now) if deadlines else None

    # -- receiving -----------------------------------------------------------------------------
    async def _handle(self, message: Message) -> None:
        try:
            decoded = decode(message.topic, message.payload)
        except ProtocolError as exc:
            log.warning("ignoring a malformed message on %s: %s", message.topic, exc)
            return
        if isinstance(decoded, Ack) and decoded.device == self._device:
            await self._on_ack(decoded)
        elif isinstance(decoded, Receipt) and decoded.device == self._device:
            await self._on_receipt(decoded)
        elif isinstance(decoded, Noted) and decoded.device == self._device:
            await self._on_noted(decoded)

    async def _on_noted(self, noted: Noted) -> None:
        """Central's answer to a notice: stop sending it. Custody waits for the receipt regardless."""
        catalogued = noted.state is NoticeState.CATALOGUED
        await self._outbox.notice_answered(noted.tid, catalogued=catalogued)
        self._notices.pop(noted.tid, None)
        self._notice_fill = True   # room for the next ones
        self._kick.set()
        if catalogued:
            self.noticed += 1
            log.info("notice for %s catalogued at central (document %s)", noted.tid, noted.document_id)
        else:
            log.info("notice for %s refused by central (%s: %s); the document travels whole",
                     noted.tid, noted.error_class, noted.error)

    @property
    def deferred(self) -> bool:
        """Central is pacing this box (quota): its scans wait here, nothing is wrong with them."""
        until = self._deferred_until
        return until is not None and asyncio.get_running_loop().time() < until

    async def _on_ack(self, ack: Ack) -> None:
        if ack.state in (AckState.RECEIVING, AckState.STORED):
            self._deferred_until = None   # central takes our bytes again
        transfer = self._active.get(ack.tid)
        reason = "central refused it: " + (f"{ack.error_class}: {ack.error}" if ack.error_class
                                            else ack.error or "no reason given")
        code = "central_refused"
        if ack.state is AckState.REJECTED and ack.error_class in IDENTITY_CLASH_ERRORS:
            code = "identity_clash"
            self.identity_clash = True
        if transfer is None:
            if ack.state is AckState.REJECTED:
                doc = await self._outbox.get(ack.tid)
                if doc is not None and doc.state in SENDABLE_STATES:
                    await self._reject(doc, reason, code)
            return
        transfer.sender.on_ack(ack)
        if ack.state is AckState.DEFERRED:
            # Until a little after the sender announces again: a further deferral extends it.
            wait = max(float(ack.retry_after or 0), self._resend_after)
            self._deferred_until = asyncio.get_running_loop().time() + wait + self._resend_after
            # Central's per-device quota: not a failure, the document stays queued; the sender
            # announces it again after retry_after. An honest box should never see this often.
            log.info("central deferred %s (%s: %s); announcing it again in %s s", ack.tid, ack.error_class,
                     ack.error, ack.retry_after if ack.retry_after is not None else "a while")
            return
        if transfer.sender.state is SenderState.REJECTED:
            self._drop(ack.tid)
            await self._reject(transfer.doc, reason, code)

    async def _on_receipt(self, receipt: Receipt) -> None:
        try:
            body = receipt.verify(self._receipt_key)
        except ReceiptError:
            log.warning("ignoring a receipt for %s: central's signature does not verify", receipt.tid)
            return
        transfer = self._active.get(body.tid)
        doc = transfer.doc if transfer else await self._outbox.get(body.tid)
        if doc is None or doc.state not in SENDABLE_STATES:
            log.debug("receipt for %s: nothing to do (%s)", body.tid, doc.state.value if doc else "unknown")
            if doc is not None and doc.state is DocState.DELIVERED:
                self._drop(body.tid)
            return
        if body.sha256 != doc.sha256:
            log.error("receipt for %s names content %s… but the original is %s…; not forgetting it",
                      doc.tid, body.sha256[:12], doc.sha256[:12])
            return
        # Shielded: once central's receipt arrived, recording it must not be cut short by a
        # connection that drops in the same instant.
        await asyncio.shield(self._deliver(doc, body.document_id, body.duplicate, body.sha256))

    async def _deliver(self, doc: Doc, document_id: int, duplicate: bool, sha256: str) -> None:
        try:
            await self._outbox.mark_delivered(doc.tid, central_document_id=document_id, duplicate=duplicate,
                                              receipt_sha256=sha256)
        except OutboxError as exc:
            log.warning("receipt for %s not recorded: %s", doc.tid, exc)
            self._drop(doc.tid)
            return
        transfer = self._drop(doc.tid)
        if transfer is not None:
            transfer.sender.on_receipt()
        self.delivered += 1
        log.info("delivered %s (central document %d%s)", doc.tid, document_id,
                 ", central already had it" if duplicate else "")
        self._status_kick.set()
        if self._on_settled is not None:
            self._on_settled()

    def _drop(self, tid: str) -> _Transfer | None:
        transfer = self._active.pop(tid, None)
        if transfer is not None:
            transfer.close()
            self._fill_needed = True
            self._kick.set()
        return transfer

    async def _reject(self, doc: Doc, reason: str, code: str) -> None:
        self.rejected += 1
        await self._give_up(doc, reason, code)

    async def _give_up(self, doc: Doc, reason: str, code: str = "envelope_unreadable") -> None:
        log.warning("giving up on %s (%s): %s", doc.name, doc.tid, reason)
        self._drop(doc.tid)
        try:
            await self._outbox.mark_failed(doc.tid, reason, code)
        except OutboxError as exc:   # delivered meanwhile: the receipt wins
            log.warning("not marking %s failed: %s", doc.tid, exc)
            return
        self.last_error = reason
        self._status_kick.set()
        if self._on_settled is not None:
            self._on_settled()
