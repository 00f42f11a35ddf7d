"""Every message round-trips; every truncation and every arbitrary input is a ProtocolError, nothing else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import DecodeError, ProtocolError, ReceiptError, TopicError
from protocol.messages import (
    MAX_ACK_RANGES,
    MAX_STATUS_COUNT,
    Abort,
    Ack,
    AckState,
    Fin,
    Init,
    Message,
    Noted,
    NoticeState,
    Receipt,
    ReceiptBody,
    Segment,
    Status,
    decode,
    encode,
)
from protocol.topics import (
    CENTRAL_SHARED_FILTER,
    MAX_OFFSET,
    Kind,
    Topic,
    device_down_filter,
    device_up_filter,
    parse_topic,
)
from tests.protocol.factories import DEVICE, make_keys, seal, vietnamese_bytes
from tests.protocol.test_notice import sealed_notice

KEYS = make_keys(3)
SEALED = seal(vietnamese_bytes(4000), KEYS)
TID = SEALED.header.tid
RECEIPT = Receipt.sign(ReceiptBody(DEVICE, TID, "ab" * 32, "2024-11-25T07:00:00Z", 42), KEYS.device)

MESSAGES: list[Message] = [
    Init(DEVICE, TID, SEALED.signed),
    Segment(DEVICE, TID, 0, b"\x00\x01" * 100),
    Segment(DEVICE, TID, 65536, "Công văn số 5".encode()),
    Fin(DEVICE, TID, SEALED.header.ciphertext_size, SEALED.header.ciphertext_sha256),
    Abort(DEVICE, TID, "gói hỏng: Tuyên Quang"),
    Status(DEVICE, online=True, queue_docs=3, queue_bytes=123456, oldest_age_s=12.5, failed_docs=1,
           last_receipt_at="2024-11-25T07:00:00Z", disk_free_bytes=10**10, version="0.1.0",
           last_error="không đọc được tệp", alarms=("disk_low",), updated_at="2024-11-25T07:01:00Z"),
    Status(DEVICE, online=False),
    Ack(DEVICE, TID, AckState.RECEIVING, ((0, 100), (200, 300))),
    Ack(DEVICE, TID, AckState.STORED),
    Ack(DEVICE, TID, AckState.REJECTED, error="chữ ký sai", error_class="SignatureError"),
    Ack(DEVICE, TID, AckState.UNKNOWN),
    Ack(DEVICE, TID, AckState.DEFERRED, error="quá nhiều lượt gửi", error_class="QuotaExceededError",
        retry_after=60),
    RECEIPT,
    Receipt.sign(ReceiptBody(DEVICE, TID, "cd" * 32, "2024-11-25T07:00:00Z", 7, duplicate=True), KEYS.device),
    sealed_notice(KEYS)[0],
    Noted(DEVICE, TID, NoticeState.CATALOGUED, document_id=12),
    Noted(DEVICE, TID, NoticeState.REFUSED, error="quá nhiều thông báo", error_class="NoticeQuotaError"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    topic, payload = encode(msg)
    assert decode(topic, payload) == msg
    assert str(parse_topic(topic)) == topic


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_truncated_prefix_is_a_protocol_error(msg: Message) -> None:
    topic, payload = encode(msg)
    for cut in range(len(payload)):
        if isinstance(msg, Abort):
            # A reason is free text: a prefix is still a (shorter) reason, never a crash.
            assert isinstance(decode(topic, payload[:cut]), Abort)
            continue
        with pytest.raises(ProtocolError) as info:
            decode(topic, payload[:cut])
        assert info.value.device == DEVICE


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_truncated_topic_is_a_topic_error(msg: Message) -> None:
    topic, payload = encode(msg)
    for cut in range(len(topic)):
        if isinstance(msg, Segment) and "/seg/" in topic[:cut] and topic[:cut][-1].isdigit():
            # ".../seg/65536" cut to ".../seg/6553" names another offset: a different, valid
            # segment (the receiver's geometry checks and the ciphertext hash catch misplaced bytes).
            assert decode(topic[:cut], payload).offset != msg.offset  # type: ignore[union-attr]
            continue
        with pytest.raises(ProtocolError):
            decode(topic[:cut], payload)


def test_receipt_signature_and_canonical_body() -> None:
    assert RECEIPT.verify(KEYS.device_verify) == RECEIPT.body
    with pytest.raises(ReceiptError):
        RECEIPT.verify(make_keys(4).device_verify)
    topic, payload = encode(RECEIPT)
    body = json.loads(payload[64:])
    # Same content, different spelling: refused, the signature covers the canonical form only.
    with pytest.raises(ReceiptError):
        decode(topic, payload[:64] + json.dumps(body, indent=1).encode())
    other = str(Topic(Kind.RECEIPT, "xa-khac"))
    with pytest.raises(ReceiptError):
        decode(other, payload)
    with pytest.raises(ReceiptError):
        ReceiptBody(DEVICE, TID, "AB" * 32, "t", 1)


def test_segment_checksum_and_bounds() -> None:
    topic, payload = encode(MESSAGES[1])
    with pytest.raises(DecodeError):
        decode(topic, payload[:4] + b"\xff" + payload[5:])
    with pytest.raises(DecodeError):
        Segment(DEVICE, TID, 0, b"")
    with pytest.raises(DecodeError):
        Segment(DEVICE, TID, -1, b"x")
    with pytest.raises(DecodeError):
        Segment(DEVICE, TID, MAX_OFFSET, b"x")


def test_init_must_match_its_topic() -> None:
    _, payload = encode(MESSAGES[0])
    with pytest.raises(DecodeError):
        decode(str(Topic(Kind.INIT, DEVICE, "0" * 32)), payload)
    with pytest.raises(DecodeError):
        decode(str(Topic(Kind.INIT, "xa-khac", TID)), payload)


@pytest.mark.parametrize("ranges", [
    ((5, 5),), ((-1, 3),), ((3, 1),), ((0, 5), (5, 9)), ((0, 5), (3, 9)), ((6, 9), (0, 5)),
    ((0, MAX_OFFSET + 1),), ((True, 5),), ((0, 1.5),), ((0, 1, 2),),
])
def test_ack_ranges_must_be_canonical(ranges: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(DecodeError):
        Ack(DEVICE, TID, AckState.RECEIVING, ranges)
    payload = json.dumps({"tid": TID, "state": "receiving", "ranges": [list(r) for r in ranges]}).encode()
    with pytest.raises(DecodeError):
        decode(str(Topic(Kind.ACK, DEVICE)), payload)


def test_ack_range_count_is_capped() -> None:
    many = tuple((2 * i, 2 * i + 1) for i in range(MAX_ACK_RANGES + 1))
    with pytest.raises(DecodeError):
        Ack(DEVICE, TID, AckState.RECEIVING, many)
    assert len(Ack(DEVICE, TID, AckState.RECEIVING, many[:-1]).ranges) == MAX_ACK_RANGES


@pytest.mark.parametrize("payload", [
    b'{"tid": "%s", "state": "receiving", "ranges": [[0, Infinity]]}' % TID.encode(),
    b'{"tid": "%s", "state": "receiving", "ranges": [[0, NaN]]}' % TID.encode(),
    b'{"tid": "%s", "state": "receiving", "ranges": [["0", "5"]]}' % TID.encode(),
    b'{"tid": "%s", "state": "receiving", "ranges": {"0": 5}}' % TID.encode(),
    b'{"tid": "%s", "state": "maybe"}' % TID.encode(),
    b'{"tid": 5, "state": "stored"}',
    b'{"tid": "%s", "state": ["stored"]}' % TID.encode(),
    b'{"tid": "%s", "state": "stored", "error": 5}' % TID.encode(),
    b"[" * 20000 + b"]" * 20000,
    b'{"a":' * 10000,
    b"\xff\xfe",
    b"[]",
    b"null",
])
def test_hostile_ack_payloads(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(str(Topic(Kind.ACK, DEVICE)), payload)


@pytest.mark.parametrize("change", [
    {"online": "false"}, {"online": 1}, {"queue_docs": -1}, {"queue_docs": 1.5}, {"queue_docs": True},
    {"queue_bytes": "7"}, {"oldest_age_s": "old"}, {"disk_free_bytes": [1]}, {"alarms": "disk"},
    {"alarms": [1]}, {"version": 3}, {"device": "xa-khac"},
    # Beyond what a box can hold: summed over the fleet they overflowed the dashboard's SQL.
    {"queue_bytes": 2**63 - 1}, {"queue_docs": MAX_STATUS_COUNT + 1}, {"disk_free_bytes": 2**50},
    {"oldest_age_s": 1e300},
])
def test_hostile_status_payloads(change: dict[str, object]) -> None:
    topic, payload = encode(Status(DEVICE, online=True))
    body = {**json.loads(payload), **change}
    with pytest.raises(DecodeError):
        decode(topic, json.dumps(body).encode())


def test_status_rejects_non_finite_values() -> None:
    with pytest.raises(DecodeError):
        Status(DEVICE, online=True, oldest_age_s=float("nan"))
    with pytest.raises(DecodeError):
        Status(DEVICE, online=True, queue_docs=-3)


def test_fin_bounds() -> None:
    with pytest.raises(DecodeError):
        Fin(DEVICE, TID, MAX_OFFSET, b"\0" * 32)
    with pytest.raises(DecodeError):
        Fin(DEVICE, TID, 5, b"\0" * 31)
    topic, payload = encode(MESSAGES[3])
    with pytest.raises(DecodeError):
        decode(topic, b"XFIN" + payload[4:])


# -- topics -------------------------------------------------------------------------------------

@pytest.mark.parametrize("topic", [
    f"sohoa/v1/up/dev/tx/{TID}/seg/²", f"sohoa/v1/up/dev/tx/{TID}/seg/١٢",
    f"sohoa/v1/up/dev/tx/{TID}/seg/{'9' * 5000}", f"sohoa/v1/up/dev/tx/{TID}/seg/01",
    f"sohoa/v1/up/dev/tx/{TID}/seg/-1", f"sohoa/v1/up/dev/tx/{TID}/seg/{MAX_OFFSET}",
    f"sohoa/v1/up/dev/tx/{TID}/seg/ 1", f"sohoa/v1/up/dev/tx/{TID}/seg/",
    "sohoa/v1/up/+/status", "sohoa/v1/up/#/status", "sohoa/v1/up/../status", "sohoa/v1/up/Dev/status",
    f"sohoa/v1/up/dev/tx/{TID.upper()}/init", "sohoa/v1/up/dev/tx/../init",
    "sohoa/v1/down/dev/init", "sohoa/v1/up/dev/ack", "sohoa/v2/up/dev/status", "$SYS/broker",
    "sohoa/v1/up/dev/status/", f"sohoa/v1/up/dev/tx/{TID}/fin/0", "", "/", "sohoa/v1/up/dev/status\n",
])
def test_bad_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_topic_filters() -> None:
    assert device_up_filter(DEVICE) == f"sohoa/v1/up/{DEVICE}/#"
    assert device_down_filter(DEVICE) == f"sohoa/v1/down/{DEVICE}/#"
    assert CENTRAL_SHARED_FILTER == "$share/central/sohoa/v1/up/#"
    with pytest.raises(DecodeError):
        device_up_filter("+")


def test_topic_needs_the_right_parts() -> None:
    with pytest.raises(TopicError):
        Topic(Kind.SEG, DEVICE, TID)
    with pytest.raises(TopicError):
        Topic(Kind.INIT, DEVICE)
    with pytest.raises(TopicError):
        Topic(Kind.STATUS, DEVICE, TID)
    assert str(Topic(Kind.SEG, DEVICE, TID, 0)).endswith("/seg/0")


_segments = st.sampled_from(["sohoa", "v1", "up", "down", DEVICE, "tx", TID, "seg", "init", "fin", "abort",
                             "status", "ack", "receipt", "0", "17", "01", "+", "#", "", "..", "²"])
_topics = st.one_of(st.text(max_size=120), st.lists(_segments, max_size=9).map("/".join))


@settings(max_examples=400, deadline=None)
@given(_topics)
def test_parse_topic_never_crashes(topic: str) -> None:
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return
    assert str(parsed) == topic   # parsing is exact: one topic, one spelling


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)
_keys = st.sampled_from(["tid", "state", "ranges", "error", "error_class", "device", "online", "queue_docs",
                         "alarms", "sha256", "stored_at", "document_id", "duplicate", "oldest_age_s"])
_objects = st.dictionaries(_keys, _json | st.just(TID) | st.just(DEVICE) | st.sampled_from(list(AckState)),
                           max_size=8)


def _payloads() -> st.SearchStrategy[bytes]:
    valid = [encode(m)[1] for m in MESSAGES]

    def mutate(data: bytes, index: int, value: int) -> bytes:
        if not data:
            return data
        index %= len(data)
        return data[:index] + bytes([value]) + data[index + 1:]

    return st.one_of(
        st.binary(max_size=400),
        _objects.map(lambda o: json.dumps(o, default=str).encode()),
        st.builds(lambda o: b"\0" * 64 + json.dumps(o, default=str).encode(), _objects),
        st.builds(mutate, st.sampled_from(valid), st.integers(0, 10**6), st.integers(0, 255)),
    )


@settings(max_examples=500, deadline=None)
@given(topic=st.one_of(st.sampled_from([encode(m)[0] for m in MESSAGES]), _topics), payload=_payloads())
def test_decode_never_crashes(topic: str, payload: bytes) -> None:
    try:
        msg = decode(topic, payload)
    except ProtocolError:
        return
    # Whatever decodes must encode back to a message that decodes to itself.
    assert decode(*encode(msg)) == msg


_statuses = st.builds(
    Status, device=st.just(DEVICE), online=st.booleans(), queue_docs=st.integers(0, MAX_STATUS_COUNT),
    queue_bytes=st.integers(0, MAX_STATUS_COUNT), oldest_age_s=st.floats(0, 1e9),
    failed_docs=st.integers(0, 1000), last_receipt_at=st.none() | st.text(max_size=30),
    disk_free_bytes=st.none() | st.integers(0, MAX_STATUS_COUNT),
    version=st.none() | st.text(max_size=10), last_error=st.none() | st.text(max_size=50),
    alarms=st.lists(st.text(max_size=10), max_size=4).map(tuple), updated_at=st.none() | st.text(max_size=30))


@st.composite
def _acks(draw: st.DrawFn) -> Ack:
    cuts = sorted(draw(st.sets(st.integers(0, 10**9), max_size=12)))
    pairs = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    # Coalesced means a gap of at least one byte between ranges.
    ranges = tuple(p for i, p in enumerate(pairs) if i == 0 or pairs[i - 1][1] < p[0])
    return Ack(DEVICE, TID, AckState.RECEIVING, ranges, draw(st.none() | st.text(max_size=20)))


@settings(max_examples=200, deadline=None)
@given(st.one_of(_statuses, _acks(), st.builds(Abort, st.just(DEVICE), st.just(TID), st.text(max_size=100)),
                 st.builds(Segment, st.just(DEVICE), st.just(TID), st.integers(0, MAX_OFFSET - 1),
                           st.binary(min_size=1, max_size=300))))
def test_generated_messages_round_trip(msg: Message) -> None:
    assert decode(*encode(msg)) == msg


def test_retry_after_only_on_a_deferred_ack_and_absent_from_other_acks_bytes() -> None:
    with pytest.raises(DecodeError):
        Ack(DEVICE, TID, AckState.REJECTED, retry_after=5)
    for bad in (-1, 24 * 3600 + 1, 1.5, True):
        with pytest.raises(DecodeError):
            Ack(DEVICE, TID, AckState.DEFERRED, retry_after=bad)  # type: ignore[arg-type]
    # Acks central sent before DEFERRED existed keep their exact bytes (no retry_after key).
    assert b"retry_after" not in encode(Ack(DEVICE, TID, AckState.UNKNOWN))[1]


def test_an_edge_that_predates_deferred_cannot_decode_it() -> None:
    """What an older edge does with a deferral: its decoder refuses the state, so its uplink logs and
    ignores the ack and announces the transfer again after its resend interval (never a failure)."""
    topic, payload = encode(Ack(DEVICE, TID, AckState.DEFERRED, error="quota", retry_after=60))
    old = payload.replace(b'"deferred"', b'"later"')
    with pytest.raises(DecodeError, match="unknown ack state"):
        decode(topic, old)
