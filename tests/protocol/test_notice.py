"""Notices: round trip, domain separation from envelopes, caps, and every way their bytes can lie."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from protocol.bag import DocumentField, OcrInfo, PackageMetadata
from protocol.envelope import SignedHeader
from protocol.errors import BagError, DecodeError, ProtocolError, SignatureError, SizeLimitError
from protocol.messages import Init, Notice, decode, encode
from protocol.notice import (
    MAX_NOTICE_PLAINTEXT,
    NoticeContent,
    open_notice,
    seal_notice,
)
from tests.protocol.factories import DEVICE, TEXT_VI, Keys, make_keys, seal

TID = "0123456789abcdef0123456789abcdef"


def metadata(*, tid: str = TID, device: str = DEVICE, seq: int = 7) -> PackageMetadata:
    return PackageMetadata(
        tid=tid, device_id=device, seq=seq, original_name="Công văn khẩn.jpg",
        original_sha256=hashlib.sha256(b"original").hexdigest(), original_size=20_000_000,
        media_type="image/jpeg", pages=1, captured_at="2026-11-25T07:00:00+00:00",
        ocr=OcrInfo(engine="fake", languages=("vie",), dpi=300, seconds=0.1),
        document={"so_ky_hieu": DocumentField("5/CV-UBND", 0.9)})


def sealed_notice(keys: Keys, content: NoticeContent | None = None) -> tuple[Notice, NoticeContent]:
    content = content or NoticeContent(metadata(), TEXT_VI * 3)
    signed, ciphertext = seal_notice(content, signing_key=keys.device,
                                     central_public_key=keys.central.public_key, created_at=1_732_500_000)
    return Notice(DEVICE, TID, signed, ciphertext), content


def test_round_trip_over_the_wire() -> None:
    keys = make_keys(5)
    notice, content = sealed_notice(keys)
    topic, payload = encode(notice)
    assert topic == f"sohoa/v1/up/{DEVICE}/tx/{TID}/notice"
    back = decode(topic, payload)
    assert isinstance(back, Notice)
    opened = open_notice(back.signed_header, back.ciphertext, keys.device_verify, keys.central)
    assert opened == content
    assert TEXT_VI.encode() not in payload   # sealed, not merely signed


def test_a_notice_header_is_not_an_envelope_init_nor_the_reverse() -> None:
    keys = make_keys(5)
    notice, _ = sealed_notice(keys)
    # Replayed as an init, the notice's signature does not verify (another context).
    with pytest.raises(SignatureError):
        Init(DEVICE, TID, notice.signed_header).signed_header.verify(keys.device_verify)
    envelope = seal(b"package bytes", keys, doc_id=bytes.fromhex(TID))
    with pytest.raises(SignatureError):
        open_notice(envelope.signed, envelope.ciphertext, keys.device_verify, keys.central)


def test_another_devices_key_or_a_flipped_bit_is_refused() -> None:
    keys = make_keys(5)
    notice, _ = sealed_notice(keys)
    with pytest.raises(SignatureError):
        open_notice(notice.signed_header, notice.ciphertext, make_keys(9).device_verify, keys.central)
    flipped = bytearray(notice.ciphertext)
    flipped[10] ^= 1
    with pytest.raises(ProtocolError):
        open_notice(notice.signed_header, bytes(flipped), keys.device_verify, keys.central)


def test_content_must_name_the_headers_transfer() -> None:
    keys = make_keys(5)
    signed, ciphertext = seal_notice(NoticeContent(metadata(), "x"), signing_key=keys.device,
                                     central_public_key=keys.central.public_key, created_at=1)
    # A validly signed header whose tid or seq differs from the sealed metadata's.
    header = dataclasses.replace(signed.header, seq=8)
    from protocol.notice import NOTICE_CONTEXT  # noqa: PLC0415

    forged = SignedHeader(header, keys.device.sign(NOTICE_CONTEXT + header.encode()).signature)
    with pytest.raises(BagError):
        open_notice(forged, ciphertext, keys.device_verify, keys.central)


def test_size_caps() -> None:
    keys = make_keys(5)
    big = NoticeContent(metadata(), "chữ " * (MAX_NOTICE_PLAINTEXT // 4))
    with pytest.raises(SizeLimitError):
        seal_notice(big, signing_key=keys.device, central_public_key=keys.central.public_key, created_at=1)
    notice, _ = sealed_notice(keys)
    topic, payload = encode(notice)
    with pytest.raises(DecodeError):
        decode(topic, payload + b"\0" * (400 * 1024))


@pytest.mark.parametrize("raw", [
    b"", b"[]", b"{}", b'{"format":"sohoa-notice/2","metadata":{},"text":""}',
    b'{"format":"sohoa-notice/1","metadata":{},"text":""}',
    b'{"format":"sohoa-notice/1","metadata":[],"text":""}',
    b'{"format":"sohoa-notice/1","metadata":{},"text":"","extra":1}',
    b"\xff\xfe", b"[" * 100_000,
])
def test_hostile_plaintexts_are_bag_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        NoticeContent.from_bytes(raw)


def test_content_round_trips() -> None:
    content = NoticeContent(metadata(), TEXT_VI)
    assert NoticeContent.from_bytes(content.to_bytes()) == content
