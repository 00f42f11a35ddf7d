"""Envelope round-trips at the chunk boundaries and every way a stolen key or a bad link can break one."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import tracemalloc
from pathlib import Path

import nacl.public
import nacl.signing
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.envelope import (
    ABYTES,
    DEFAULT_CHUNK_SIZE,
    EnvelopeHeader,
    EnvelopeOpener,
    EnvelopeSealer,
    SignedHeader,
    VerifiedHeader,
    chunk_count,
    key_id,
    verify_ciphertext,
)
from protocol.errors import (
    CiphertextHashError,
    DecompressError,
    DecryptError,
    EnvelopeError,
    HeaderError,
    ProtocolError,
    SignatureError,
    SizeLimitError,
    TrailingDataError,
    TruncatedStreamError,
    UnknownKeyError,
)
from tests.protocol.factories import (
    DEVICE,
    Keys,
    Sealed,
    for_ciphertext,
    incompressible,
    make_keys,
    open_all,
    open_verified,
    resign,
    rle_bomb,
    seal,
    seal_body,
    vietnamese_bytes,
)

KEYS = make_keys(1)
OTHER = make_keys(9)
CHUNK = 1024


def chunks_of(sealed: Sealed) -> list[bytes]:
    full = sealed.header.chunk_size + ABYTES
    return [sealed.ciphertext[i: i + full] for i in range(0, len(sealed.ciphertext), full)]


def sized_plaintext(compressed_size: int, level: int = 3) -> bytes:
    """Incompressible bytes whose zstd frame is exactly ``compressed_size`` bytes long."""
    for overhead in range(64):
        data = incompressible(max(compressed_size - overhead, 0))
        frame = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True
                                         ).compress(data)
        if len(frame) == compressed_size:
            return data
    raise AssertionError(f"no plaintext compresses to {compressed_size} bytes")


def verified(sealed: Sealed, keys: Keys = KEYS) -> VerifiedHeader:
    return verify_ciphertext(sealed.signed, keys.device_verify, size=len(sealed.ciphertext),
                             sha256=hashlib.sha256(sealed.ciphertext).digest())


# -- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 1])
def test_round_trip_at_chunk_boundaries(compressed: int) -> None:
    plaintext = sized_plaintext(compressed)
    sealed = seal(plaintext, KEYS, chunk_size=CHUNK)
    assert sealed.header.ciphertext_size == len(sealed.ciphertext)
    # The last chunk always exists and carries TAG_FINAL, so the geometry is fixed by the size alone.
    assert len(chunks_of(sealed)) == chunk_count(len(sealed.ciphertext), CHUNK)
    assert open_all(sealed.signed, sealed.ciphertext, KEYS) == plaintext


@pytest.mark.parametrize("size", [0, 1, 2, 17, 18, 19, 100])
def test_round_trip_tiny_packages(size: int) -> None:
    # A first (and only) decrypted chunk shorter than a zstd frame header is checked at the end.
    plaintext = vietnamese_bytes(size)
    sealed = seal(plaintext, KEYS)
    assert open_all(sealed.signed, sealed.ciphertext, KEYS, slices=[1] * len(sealed.ciphertext)) == plaintext


def test_round_trip_multi_mib_default_chunks() -> None:
    plaintext = vietnamese_bytes(3 * 1024 * 1024 + 7)
    sealed = seal(plaintext, KEYS, chunk_size=DEFAULT_CHUNK_SIZE, feed=[65536 * 3 + 5] * 100)
    assert open_all(sealed.signed, sealed.ciphertext, KEYS, slices=[12345] * 1000) == plaintext
    assert sealed.header.tid == sealed.header.doc_id.hex()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 20_000), chunk=st.sampled_from([1024, 1500, 4096]),
       feed=st.lists(st.integers(1, 5000), max_size=20), slices=st.lists(st.integers(0, 5000), max_size=20),
       random_body=st.booleans())
def test_round_trip_any_slicing(size: int, chunk: int, feed: list[int], slices: list[int],
                                random_body: bool) -> None:
    plaintext = incompressible(size) if random_body else vietnamese_bytes(size)
    sealed = seal(plaintext, KEYS, chunk_size=chunk, feed=feed)
    assert open_all(sealed.signed, sealed.ciphertext, KEYS, slices=slices) == plaintext


def test_header_encoding_round_trip_and_truncations() -> None:
    sealed = seal(TEXT := vietnamese_bytes(5000), KEYS)
    assert TEXT
    encoded = sealed.signed.encode()
    assert SignedHeader.decode(encoded) == sealed.signed
    assert EnvelopeHeader.decode(sealed.header.encode()) == sealed.header
    for cut in range(len(encoded)):
        with pytest.raises(HeaderError):
            SignedHeader.decode(encoded[:cut])
    header_bytes = sealed.header.encode()
    for cut in range(len(header_bytes)):
        with pytest.raises(HeaderError):
            EnvelopeHeader.decode(header_bytes[:cut])
    with pytest.raises(HeaderError):
        SignedHeader.decode(encoded + b"\0")


def test_header_carries_no_names_or_text() -> None:
    plaintext = "Công văn số 5 – Tuyên Quang.pdf".encode() * 10
    sealed = seal(plaintext, KEYS)
    assert b"Tuy" not in sealed.signed.encode()
    assert plaintext[:16] not in sealed.ciphertext


# -- memory -------------------------------------------------------------------------------------

def _stream_source(total: int, piece: int = 256 * 1024):  # type: ignore[no-untyped-def]
    """Package-like bytes: a quarter random (scan data), the rest Vietnamese text."""
    rng = random.Random(64)
    text = ("Quyết định số 12/QĐ-UBND về việc phê duyệt hồ sơ lưu trữ. " * 3000).encode()
    sent = 0
    while sent < total:
        block = rng.randbytes(piece // 4) + text[: piece - piece // 4]
        block = block[: total - sent]
        sent += len(block)
        yield block


def test_memory_stays_bounded_for_a_64_mib_stream(tmp_path: Path) -> None:
    total = 64 * 1024 * 1024
    limit = 16 * 1024 * 1024
    store = tmp_path / "envelope.bin"
    expected = hashlib.sha256()
    tracemalloc.start()
    try:
        sealer = EnvelopeSealer(device_id=DEVICE, doc_id=b"\x01" * 16, seq=1, signing_key=KEYS.device,
                                central_public_key=KEYS.central.public_key, plaintext_size=total,
                                created_at=1, level=1)
        with store.open("wb") as out:
            for block in _stream_source(total):
                expected.update(block)
                out.write(sealer.update(block))
            tail, signed = sealer.finish()
            out.write(tail)
        _, seal_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()

        digest = hashlib.sha256()
        with store.open("rb") as src:
            while piece := src.read(1 << 20):
                digest.update(piece)
        ok = verify_ciphertext(signed, KEYS.device_verify, size=store.stat().st_size, sha256=digest.digest())
        got = hashlib.sha256()
        produced = 0

        def sink(data: bytes) -> None:
            nonlocal produced
            produced += len(data)
            got.update(data)

        opener = EnvelopeOpener(ok, KEYS.central, max_plaintext=total, sink=sink)
        with store.open("rb") as src:
            while piece := src.read(300_000):
                opener.update(piece)
        opener.finish()
        _, open_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.stat().st_size > total // 5   # the stream really is large, not a toy ratio
    assert produced == total and got.digest() == expected.digest()
    assert seal_peak < limit, f"sealing peaked at {seal_peak / 2**20:.1f} MiB"
    assert open_peak < limit, f"opening peaked at {open_peak / 2**20:.1f} MiB"


# -- negative vectors ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sealed() -> Sealed:
    # Incompressible so the ciphertext spans several chunks.
    return seal(incompressible(5 * CHUNK + 300), KEYS, chunk_size=CHUNK)


def test_truncated_ciphertext(sealed: Sealed) -> None:
    for cut in (0, 1, CHUNK, CHUNK + ABYTES, len(sealed.ciphertext) - 1):
        short = sealed.ciphertext[:cut]
        with pytest.raises(CiphertextHashError):
            verify_ciphertext(sealed.signed, KEYS.device_verify, size=len(short),
                              sha256=hashlib.sha256(short).digest())
        # A caller that skips the check and feeds the short stream still gets an error at finish.
        opener = EnvelopeOpener(verified(sealed), KEYS.central, max_plaintext=1 << 20, sink=lambda _: None)
        opener.update(short)
        with pytest.raises(TruncatedStreamError):
            opener.finish()


def test_dropped_final_chunk(sealed: Sealed) -> None:
    without_last = b"".join(chunks_of(sealed)[:-1])
    opener = EnvelopeOpener(verified(sealed), KEYS.central, max_plaintext=1 << 20, sink=lambda _: None)
    opener.update(without_last)
    with pytest.raises(TruncatedStreamError):
        opener.finish()
    # The attacker re-signs a header that ends where they cut: the last chunk lacks TAG_FINAL.
    forged = for_ciphertext(sealed.header, without_last, KEYS.device)
    with pytest.raises(TruncatedStreamError):
        open_all(forged, without_last, KEYS)


@pytest.mark.parametrize("mangle", ["reorder", "duplicate", "drop_middle"])
def test_reordered_duplicated_dropped_chunks(sealed: Sealed, mangle: str) -> None:
    parts = chunks_of(sealed)
    if mangle == "reorder":
        parts[1], parts[2] = parts[2], parts[1]
    elif mangle == "duplicate":
        parts.insert(2, parts[1])
    else:
        del parts[2]
    mangled = b"".join(parts)
    with pytest.raises(CiphertextHashError):
        verify_ciphertext(sealed.signed, KEYS.device_verify, size=len(mangled),
                          sha256=hashlib.sha256(mangled).digest())
    forged = for_ciphertext(sealed.header, mangled, KEYS.device)
    received: list[bytes] = []
    with pytest.raises(DecryptError):
        open_all(forged, mangled, KEYS, sink=received)
    assert sealed.plaintext.startswith(b"".join(received))


def _field_spans(header: EnvelopeHeader) -> dict[str, tuple[int, int]]:
    """Byte spans of each header field inside SignedHeader.encode() (2-byte length prefix first)."""
    device_len = len(header.device_id)
    spans = {"length": (0, 2), "magic": (2, 10), "version": (10, 11), "device_len": (11, 12),
             "device_id": (12, 12 + device_len)}
    position = 12 + device_len
    for name, size in (("doc_id", 16), ("seq", 8), ("central_key_id", 8), ("sealed_key", 80),
                       ("stream_header", 24), ("chunk_size", 4), ("plaintext_size", 8),
                       ("ciphertext_size", 8), ("ciphertext_sha256", 32), ("created_at", 8)):
        spans[name] = (position, position + size)
        position += size
    spans["signature"] = (position, position + 64)
    return spans


def test_bit_flip_in_every_header_field_is_refused(sealed: Sealed) -> None:
    encoded = sealed.signed.encode()
    spans = _field_spans(sealed.header)
    assert spans["signature"][1] == len(encoded)
    refused_by_signature = set()
    for name, (start, end) in spans.items():
        for index in range(start, end):
            for bit in range(8):
                mutated = bytearray(encoded)
                mutated[index] ^= 1 << bit
                try:
                    signed = SignedHeader.decode(bytes(mutated))
                except HeaderError:
                    continue
                with pytest.raises(SignatureError):
                    verify_ciphertext(signed, KEYS.device_verify, size=len(sealed.ciphertext),
                                      sha256=hashlib.sha256(sealed.ciphertext).digest())
                refused_by_signature.add(name)
    # Every field that still parses after a flip is caught by the signature.
    assert {"doc_id", "seq", "central_key_id", "sealed_key", "stream_header", "plaintext_size",
            "ciphertext_sha256", "created_at", "signature", "device_id"} <= refused_by_signature


@pytest.mark.parametrize("chunk_index", [0, 1, 2, 3, 4, 5])
def test_bit_flip_in_each_ciphertext_chunk(sealed: Sealed, chunk_index: int) -> None:
    full = CHUNK + ABYTES
    position = chunk_index * full + 7
    assert position < len(sealed.ciphertext)
    mutated = bytearray(sealed.ciphertext)
    mutated[position] ^= 0x20
    with pytest.raises(CiphertextHashError):
        verify_ciphertext(sealed.signed, KEYS.device_verify, size=len(mutated),
                          sha256=hashlib.sha256(mutated).digest())
    forged = for_ciphertext(sealed.header, bytes(mutated), KEYS.device)
    received: list[bytes] = []
    with pytest.raises(DecryptError) as info:
        open_all(forged, bytes(mutated), KEYS, sink=received)
    assert info.value.offset == chunk_index * full
    # Only plaintext from chunks before the flipped one may have reached the sink.
    assert sealed.plaintext.startswith(b"".join(received))
    assert len(b"".join(received)) <= chunk_index * CHUNK


def test_opener_rehashes_what_it_is_fed(sealed: Sealed) -> None:
    # Verified for one ciphertext, fed another that authenticates: only possible with the
    # same stream key, so model it with a second envelope whose header we swap in.
    opener = EnvelopeOpener(verified(sealed), KEYS.central, max_plaintext=1 << 20, sink=lambda _: None)
    opener.update(sealed.ciphertext)
    opener.finish()
    with pytest.raises(RuntimeError):
        opener.update(b"")


def test_wrong_central_key(sealed: Sealed) -> None:
    with pytest.raises(UnknownKeyError):
        EnvelopeOpener(verified(sealed), OTHER.central, max_plaintext=1 << 20, sink=lambda _: None)
    # Right key id, but the stream key was sealed to somebody else: the box does not open.
    stranger = nacl.public.SealedBox(OTHER.central.public_key).encrypt(b"k" * 32)
    forged = resign(sealed.header, KEYS.device, sealed_key=stranger)
    ok = verify_ciphertext(forged, KEYS.device_verify, size=len(sealed.ciphertext),
                           sha256=hashlib.sha256(sealed.ciphertext).digest())
    with pytest.raises(DecryptError):
        EnvelopeOpener(ok, KEYS.central, max_plaintext=1 << 20, sink=lambda _: None)


def test_wrong_signer(sealed: Sealed) -> None:
    with pytest.raises(SignatureError):
        verify_ciphertext(sealed.signed, OTHER.device_verify, size=len(sealed.ciphertext),
                          sha256=hashlib.sha256(sealed.ciphertext).digest())
    forged = resign(sealed.header, OTHER.device)
    with pytest.raises(SignatureError):
        forged.verify(KEYS.device_verify)


def test_trailing_garbage(sealed: Sealed) -> None:
    padded = sealed.ciphertext + b"\0garbage"
    with pytest.raises(CiphertextHashError):
        verify_ciphertext(sealed.signed, KEYS.device_verify, size=len(padded),
                          sha256=hashlib.sha256(padded).digest())
    opener = EnvelopeOpener(verified(sealed), KEYS.central, max_plaintext=1 << 20, sink=lambda _: None)
    with pytest.raises(TrailingDataError):
        opener.update(padded)


def test_trailing_bytes_after_zstd_frame_inside_the_stream() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 100)
    forged = seal_body(frame + b"tail", 100, KEYS)
    with pytest.raises(TrailingDataError):
        open_all(forged.signed, forged.ciphertext, KEYS)
    # Two frames back to back: the second one is trailing data, never a second document.
    forged = seal_body(frame + frame, 100, KEYS)
    with pytest.raises(TrailingDataError):
        open_all(forged.signed, forged.ciphertext, KEYS)


def test_zstd_bomb_stops_at_the_declared_size_with_bounded_memory() -> None:
    declared = 1 << 20
    bomb = seal_body(rle_bomb(declared, 512 << 20), declared, KEYS, chunk_size=4096)
    assert len(bomb.ciphertext) < 64 * 1024
    produced = 0

    def sink(data: bytes) -> None:
        nonlocal produced
        produced += len(data)

    tracemalloc.start()
    try:
        with pytest.raises(SizeLimitError):
            open_all(bomb.signed, bomb.ciphertext, KEYS, max_plaintext=declared, sink=_Counter(sink))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert produced <= declared
    assert peak < 16 * 1024 * 1024, f"bomb peaked at {peak / 2**20:.1f} MiB"


class _Counter(list[bytes]):
    """A sink list that forwards to a callback instead of keeping the bytes."""

    def __init__(self, callback):  # type: ignore[no-untyped-def]
        super().__init__()
        self._callback = callback

    def append(self, data: bytes) -> None:
        self._callback(data)


def test_frame_declaring_another_size_is_refused_before_decompressing() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"y" * 5000)
    forged = seal_body(frame, 4000, KEYS)
    received: list[bytes] = []
    with pytest.raises(SizeLimitError):
        open_all(forged.signed, forged.ciphertext, KEYS, sink=received)
    assert received == []
    unknown = zstandard.ZstdCompressor(write_content_size=False).compress(b"y" * 5000)
    forged = seal_body(unknown, 5000, KEYS)
    with pytest.raises(SizeLimitError):
        open_all(forged.signed, forged.ciphertext, KEYS)


def test_short_and_empty_bodies_are_refused_cleanly() -> None:
    for body in (b"", b"\x28\xb5", b"not zstd at all, just some bytes here"):
        forged = seal_body(body, 0, KEYS)
        with pytest.raises(DecompressError):
            open_all(forged.signed, forged.ciphertext, KEYS)


def test_truncated_zstd_frame_inside_a_complete_stream() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(b"z" * 3000)
    forged = seal_body(frame[:-3], 3000, KEYS)
    with pytest.raises(DecompressError):
        open_all(forged.signed, forged.ciphertext, KEYS)


def test_declared_size_above_cap_is_refused_before_decrypting(sealed: Sealed) -> None:
    # Garbage sealed key: if the opener tried to decrypt first it would raise DecryptError.
    forged = resign(sealed.header, KEYS.device, plaintext_size=10 << 30, sealed_key=b"\0" * 80)
    ok = verify_ciphertext(forged, KEYS.device_verify, size=len(sealed.ciphertext),
                           sha256=hashlib.sha256(sealed.ciphertext).digest())
    with pytest.raises(SizeLimitError):
        EnvelopeOpener(ok, KEYS.central, max_plaintext=1 << 30, sink=lambda _: None)


def test_opener_refuses_input_after_an_error(sealed: Sealed) -> None:
    parts = chunks_of(sealed)
    mangled = parts[1] + parts[0] + b"".join(parts[2:])
    forged = for_ciphertext(sealed.header, mangled, KEYS.device)
    ok = verify_ciphertext(forged, KEYS.device_verify, size=len(mangled),
                           sha256=hashlib.sha256(mangled).digest())
    opener = EnvelopeOpener(ok, KEYS.central, max_plaintext=1 << 20, sink=lambda _: None)
    with pytest.raises(DecryptError):
        opener.update(mangled)
    with pytest.raises(RuntimeError):
        opener.update(parts[0])
    with pytest.raises(RuntimeError):
        opener.finish()


def test_header_validation() -> None:
    good = seal(b"abc", KEYS).header
    for change in ({"device_id": "Bad/Id"}, {"doc_id": b"short"}, {"seq": -1},
                   {"chunk_size": 10}, {"ciphertext_size": 3}, {"ciphertext_sha256": b"x"},
                   {"ciphertext_size": 1024 + ABYTES + 1, "chunk_size": 1024}):
        with pytest.raises(HeaderError):
            dataclasses.replace(good, **change)  # type: ignore[arg-type]
    with pytest.raises(HeaderError):
        SignedHeader(good, b"short")


def test_sealer_checks_its_arguments_and_its_feed() -> None:
    kwargs = {"device_id": DEVICE, "doc_id": b"\x02" * 16, "seq": 1, "signing_key": KEYS.device,
              "central_public_key": KEYS.central.public_key, "plaintext_size": 3, "created_at": 1}
    with pytest.raises(HeaderError):
        EnvelopeSealer(**{**kwargs, "device_id": "../etc"})  # type: ignore[arg-type]
    with pytest.raises(HeaderError):
        EnvelopeSealer(**{**kwargs, "chunk_size": 16})  # type: ignore[arg-type]
    sealer = EnvelopeSealer(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sealer.update(b"four")
    sealer = EnvelopeSealer(**kwargs)  # type: ignore[arg-type]
    sealer.update(b"ab")
    with pytest.raises(ValueError):
        sealer.finish()
    sealer.update(b"c")
    sealer.finish()
    with pytest.raises(RuntimeError):
        sealer.finish()
    with pytest.raises(RuntimeError):
        sealer.update(b"")


def test_key_id_is_stable_and_distinct() -> None:
    assert key_id(bytes(KEYS.central.public_key)) == key_id(bytes(KEYS.central.public_key))
    assert key_id(bytes(KEYS.central.public_key)) != key_id(bytes(OTHER.central.public_key))
    assert len(key_id(bytes(KEYS.central.public_key))) == 8


def test_every_envelope_error_is_a_protocol_error() -> None:
    for cls in (CiphertextHashError, DecryptError, SignatureError, SizeLimitError, TrailingDataError,
                TruncatedStreamError, UnknownKeyError, DecompressError, HeaderError):
        assert issubclass(cls, EnvelopeError) and issubclass(cls, ProtocolError)


def test_signing_keys_are_independent_of_the_signature_check() -> None:
    # Sanity for the fixtures: deterministic keys differ per seed.
    assert bytes(make_keys(1).device.verify_key) != bytes(make_keys(2).device.verify_key)
    assert isinstance(KEYS.device, nacl.signing.SigningKey)


def test_open_verified_helper_matches_open_all(sealed: Sealed) -> None:
    assert open_verified(verified(sealed), sealed.ciphertext, KEYS) == sealed.plaintext


def test_each_decompress_call_regenerates_at_most_one_block() -> None:
    # The bomb's blocks are 128 KiB RLE blocks of 4 input bytes: thousands of them in one 4 KiB
    # chunk. The opener hands zstd one block end at a time, so no sink piece exceeds 128 KiB.
    declared = 8 << 20
    bomb = seal_body(rle_bomb(declared, declared), declared, KEYS, chunk_size=4096)
    pieces: list[bytes] = []
    assert len(open_all(bomb.signed, bomb.ciphertext, KEYS, sink=pieces)) == declared
    assert max(len(piece) for piece in pieces) <= 128 * 1024


def test_a_block_above_the_zstd_maximum_is_refused() -> None:
    # RFC 8878: a block regenerates at most 128 KiB. A 2 MiB RLE block is valid to the bit layout
    # (21-bit size) but not to the format; refused before zstd expands it.
    frame = bytearray(rle_bomb(1 << 21, 0))
    frame += ((1 << 21) - 1 << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"A"
    forged = seal_body(bytes(frame), 1 << 21, KEYS)
    with pytest.raises(DecompressError, match="at most"):
        open_all(forged.signed, forged.ciphertext, KEYS)


@given(data=st.binary(min_size=0, max_size=300_000), level=st.sampled_from([1, 3, 10]),
       chunk=st.sampled_from([1024, 4096, 65536]), slice_size=st.integers(min_value=1, max_value=70_000))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_block_walk_round_trips_any_slicing(data: bytes, level: int, chunk: int, slice_size: int) -> None:
    # Multi-block frames (raw, RLE and compressed blocks) cut at every kind of boundary.
    body = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data * 2 + bytes(200_000))
    sealed = seal_body(body, len(data) * 2 + 200_000, KEYS, chunk_size=chunk)
    slices = [slice_size] * (len(sealed.ciphertext) // slice_size + 1)
    assert open_all(sealed.signed, sealed.ciphertext, KEYS, slices=slices) == data * 2 + bytes(200_000)
