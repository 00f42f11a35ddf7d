"""Keys, headers and envelopes for protocol tests: real PyNaCl keys, real zstd, real secretstream."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.public
import nacl.signing

from protocol.envelope import (
    TAG_FINAL,
    TAG_MESSAGE,
    EnvelopeHeader,
    EnvelopeOpener,
    EnvelopeSealer,
    SignedHeader,
    VerifiedHeader,
    key_id,
    verify_ciphertext,
)

DEVICE = "xa-tan-trao-01"
TEXT_VI = "Công văn số 5 – Tuyên Quang: Quyết định về việc số hoá hồ sơ lưu trữ xã Tân Trào.\n"


@dataclass(frozen=True)
class Keys:
    device: nacl.signing.SigningKey
    central: nacl.public.PrivateKey

    @property
    def device_verify(self) -> nacl.signing.VerifyKey:
        return self.device.verify_key


def make_keys(seed: int = 1) -> Keys:
    """Deterministic keys, so a failing Hypothesis example replays the same bytes."""
    return Keys(nacl.signing.SigningKey(bytes([seed]) * 32), nacl.public.PrivateKey(bytes([seed + 1]) * 32))


@dataclass(frozen=True)
class Sealed:
    signed: SignedHeader
    ciphertext: bytes
    plaintext: bytes

    @property
    def header(self) -> EnvelopeHeader:
        return self.signed.header


def seal(plaintext: bytes, keys: Keys, *, chunk_size: int = 1024, doc_id: bytes | None = None,
         feed: Iterable[int] | None = None, level: int = 3, device: str = DEVICE,
         seq: int = 7) -> Sealed:
    """Seal ``plaintext``; ``feed`` gives the sizes of the slices handed to ``update``."""
    sealer = EnvelopeSealer(device_id=device, doc_id=doc_id or hashlib.sha256(plaintext).digest()[:16],
                            seq=seq, signing_key=keys.device, central_public_key=keys.central.public_key,
                            plaintext_size=len(plaintext), created_at=1_732_500_000, chunk_size=chunk_size,
                            level=level)
    out = bytearray()
    pos = 0
    for size in feed or ():
        if pos >= len(plaintext):
            break
        out += sealer.update(plaintext[pos: pos + size])
        pos += size
    if pos < len(plaintext):
        out += sealer.update(plaintext[pos:])
    tail, signed = sealer.finish()
    out += tail
    return Sealed(signed, bytes(out), plaintext)


def resign(header: EnvelopeHeader, key: nacl.signing.SigningKey, **changes: object) -> SignedHeader:
    """An attacker who holds a device key signs whatever header they like."""
    forged = dataclasses.replace(header, **changes)  # type: ignore[arg-type]
    return SignedHeader(forged, key.sign(forged.encode()).signature)


def for_ciphertext(header: EnvelopeHeader, ciphertext: bytes, key: nacl.signing.SigningKey,
                   **changes: object) -> SignedHeader:
    return resign(header, key, ciphertext_size=len(ciphertext),
                  ciphertext_sha256=hashlib.sha256(ciphertext).digest(), **changes)


def open_all(signed: SignedHeader, ciphertext: bytes, keys: Keys, *, max_plaintext: int = 1 << 30,
             slices: Iterable[int] | None = None, sink: list[bytes] | None = None) -> bytes:
    """Verify then open, like central does; returns the plaintext."""
    verified = verify_ciphertext(signed, keys.device_verify, size=len(ciphertext),
                                 sha256=hashlib.sha256(ciphertext).digest())
    return open_verified(verified, ciphertext, keys, max_plaintext=max_plaintext, slices=slices, sink=sink)


def open_verified(verified: VerifiedHeader, ciphertext: bytes, keys: Keys, *, max_plaintext: int = 1 << 30,
                  slices: Iterable[int] | None = None, sink: list[bytes] | None = None) -> bytes:
    pieces: list[bytes] = [] if sink is None else sink
    opener = EnvelopeOpener(verified, keys.central, max_plaintext=max_plaintext, sink=pieces.append)
    pos = 0
    for size in slices or ():
        if pos >= len(ciphertext):
            break
        opener.update(ciphertext[pos: pos + size])
        pos += size
    if pos < len(ciphertext):
        opener.update(ciphertext[pos:])
    opener.finish()
    return b"".join(pieces)


def vietnamese_bytes(size: int, seed: int = 0) -> bytes:
    """Compressible-but-not-trivial package bytes: Vietnamese text mixed with random bytes."""
    rng = random_bytes(seed)
    text = TEXT_VI.encode()
    out = bytearray()
    while len(out) < size:
        out += text
        out += rng(64)
    return bytes(out[:size])


def random_bytes(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def incompressible(size: int) -> bytes:
    return os.urandom(size)


def seal_body(body: bytes, plaintext_size: int, keys: Keys, *, chunk_size: int = 1024,
              device: str = DEVICE) -> Sealed:
    """Encrypt an arbitrary (possibly hostile) compressed body exactly as the sealer would.

    This is what a stolen device key allows: a correctly signed, correctly encrypted envelope whose
    zstd content is whatever the attacker wants.
    """
    stream_key = sodium.crypto_secretstream_xchacha20poly1305_keygen()
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    stream_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, stream_key)
    pieces = [body[i: i + chunk_size] for i in range(0, len(body), chunk_size)] or [b""]
    out = bytearray()
    for index, piece in enumerate(pieces):
        tag = TAG_FINAL if index == len(pieces) - 1 else TAG_MESSAGE
        out += sodium.crypto_secretstream_xchacha20poly1305_push(state, piece, None, tag)
    header = EnvelopeHeader(
        device_id=device, doc_id=b"\x11" * 16, seq=1,
        central_key_id=key_id(bytes(keys.central.public_key)),
        sealed_key=nacl.public.SealedBox(keys.central.public_key).encrypt(stream_key),
        stream_header=stream_header, chunk_size=chunk_size, plaintext_size=plaintext_size,
        ciphertext_size=len(out), ciphertext_sha256=hashlib.sha256(out).digest(), created_at=1)
    return Sealed(SignedHeader(header, keys.device.sign(header.encode()).signature), bytes(out), b"")


def rle_bomb(declared: int, actual: int, *, window_log: int = 17) -> bytes:
    """A zstd frame that declares ``declared`` content bytes but expands to ``actual`` bytes.

    Hand-built: 4-byte frame content size, no single-segment flag, then RLE blocks of 128 KiB
    (4 input bytes each) — about 32 bytes of input per MiB of output.
    """
    block = 128 * 1024
    frame = bytearray(struct.pack("<I", 0xFD2FB528))
    frame.append(0x80)                                   # FCS field 4 bytes, no checksum
    frame.append((window_log - 10) << 3)                 # window descriptor
    frame += struct.pack("<I", declared)
    remaining = actual
    while remaining > 0:
        size = min(block, remaining)
        remaining -= size
        last = 1 if remaining == 0 else 0
        frame += (size << 3 | 1 << 1 | last).to_bytes(3, "little") + b"A"
    return bytes(frame)
