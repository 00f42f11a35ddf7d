"""Mutation fuzzing of valid envelopes: nothing mutated is accepted; every refusal is a ProtocolError.

Two attackers: one on the wire (mutates header bytes and ciphertext; holds no key), and one with a
stolen device key (mutates the ciphertext, then re-signs a header that matches it, so the opener's
own checks are all that stand between the mutation and the catalog).
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.envelope import EnvelopeOpener, SignedHeader, verify_ciphertext
from protocol.errors import EnvelopeError, ProtocolError
from tests.protocol.factories import Sealed, for_ciphertext, incompressible, make_keys, seal, vietnamese_bytes

KEYS = make_keys(31)
ENVELOPES = [
    seal(vietnamese_bytes(6000), KEYS, chunk_size=1024),          # compressible: one short chunk
    seal(incompressible(3 * 1024 + 100), KEYS, chunk_size=1024),  # several chunks
    seal(b"", KEYS, chunk_size=1024),                             # empty package
]


@st.composite
def _mutations(draw: st.DrawFn, length: int) -> list[tuple[str, int, int]]:
    kinds = st.sampled_from(["flip", "set", "delete", "insert", "truncate", "append"])
    return draw(st.lists(st.tuples(kinds, st.integers(0, max(length, 1) * 2), st.integers(0, 255)),
                         min_size=1, max_size=4))


def _apply(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in mutations:
        index = position % (len(out) + 1)
        if kind == "flip" and out:
            out[index % len(out)] ^= 1 << (value % 8)
        elif kind == "set" and out:
            out[index % len(out)] = value
        elif kind == "delete" and out:
            del out[index % len(out)]
        elif kind == "insert":
            out.insert(index, value)
        elif kind == "truncate":
            del out[index:]
        elif kind == "append":
            out.append(value)
    return bytes(out)


def _central_accepts(header_bytes: bytes, ciphertext: bytes) -> bytes:
    """What central does with bytes off the wire; returns the plaintext or raises."""
    signed = SignedHeader.decode(header_bytes)
    verified = verify_ciphertext(signed, KEYS.device_verify, size=len(ciphertext),
                                 sha256=hashlib.sha256(ciphertext).digest())
    pieces: list[bytes] = []
    opener = EnvelopeOpener(verified, KEYS.central, max_plaintext=1 << 20, sink=pieces.append)
    opener.update(ciphertext)
    opener.finish()
    return b"".join(pieces)


def _wire_attack(index: int, target: str, mutations: list[tuple[str, int, int]]) -> None:
    envelope = ENVELOPES[index % len(ENVELOPES)]
    header_bytes, ciphertext = envelope.signed.encode(), envelope.ciphertext
    if target in ("header", "both"):
        header_bytes = _apply(header_bytes, mutations)
    if target in ("ciphertext", "both"):
        ciphertext = _apply(ciphertext, mutations)
    if (header_bytes, ciphertext) == (envelope.signed.encode(), envelope.ciphertext):
        assert _central_accepts(header_bytes, ciphertext) == envelope.plaintext
        return
    with pytest.raises(ProtocolError):
        _central_accepts(header_bytes, ciphertext)


def _stolen_key_attack(envelope: Sealed, mutations: list[tuple[str, int, int]]) -> None:
    ciphertext = _apply(envelope.ciphertext, mutations)
    if ciphertext == envelope.ciphertext:
        return
    try:
        forged = for_ciphertext(envelope.header, ciphertext, KEYS.device)
    except ProtocolError:
        return   # the size cannot even be expressed in a well-formed header
    pieces: list[bytes] = []
    with pytest.raises(EnvelopeError):
        verified = verify_ciphertext(forged, KEYS.device_verify, size=len(ciphertext),
                                     sha256=hashlib.sha256(ciphertext).digest())
        opener = EnvelopeOpener(verified, KEYS.central, max_plaintext=1 << 20, sink=pieces.append)
        opener.update(ciphertext)
        opener.finish()
    # Whatever reached the sink before the refusal came from authenticated chunks of the original.
    assert envelope.plaintext.startswith(b"".join(pieces))


_FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_TORTURE = settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_wire_args = {"index": st.integers(0, 2), "target": st.sampled_from(["header", "ciphertext", "both"]),
              "mutations": _mutations(4000)}
_stolen_args = {"index": st.integers(0, 2), "mutations": _mutations(4000)}


@_FAST
@given(**_wire_args)
def test_wire_mutations_are_never_accepted(index: int, target: str,
                                           mutations: list[tuple[str, int, int]]) -> None:
    _wire_attack(index, target, mutations)


@_FAST
@given(**_stolen_args)
def test_resigned_mutations_are_never_accepted(index: int, mutations: list[tuple[str, int, int]]) -> None:
    _stolen_key_attack(ENVELOPES[index % len(ENVELOPES)], mutations)


@pytest.mark.torture
@_TORTURE
@given(**_wire_args)
def test_torture_wire_mutations(index: int, target: str, mutations: list[tuple[str, int, int]]) -> None:
    _wire_attack(index, target, mutations)


@pytest.mark.torture
@_TORTURE
@given(**_stolen_args)
def test_torture_resigned_mutations(index: int, mutations: list[tuple[str, int, int]]) -> None:
    _stolen_key_attack(ENVELOPES[index % len(ENVELOPES)], mutations)
