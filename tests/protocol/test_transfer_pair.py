"""Sender and receiver driven together through the wire format over a lossy, disconnecting link."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.transfer import SenderState
from tests.protocol.factories import incompressible, vietnamese_bytes
from tests.protocol.harness import LinkModel, TransferPair

LOSSY = LinkModel(drop=0.1, duplicate=0.05, latency=0.05, jitter=0.3, disconnect=0.02, restart=0.01,
                  crash=0.02)


def check_one_exact_document(pair: TransferPair) -> None:
    report = pair.run()
    assert report.finished, f"not done after {report.sim_seconds:.0f} s: {pair.sender.state}"
    assert pair.sender.state is SenderState.DONE
    assert pair.central.documents == [pair.plaintext]   # exactly one document, byte for byte
    assert pair.receipts and all(r == pair.receipts[0] for r in pair.receipts)
    assert pair.central.errors == []


@pytest.mark.parametrize("seed", range(40))
def test_lossy_link_delivers_exactly_one_document(seed: int) -> None:
    size = 2_000 + seed * 997
    check_one_exact_document(TransferPair(incompressible(size), seed=seed, model=LOSSY,
                                          segment_size=512 + 128 * (seed % 5), window=1 + seed % 8))


@pytest.mark.parametrize("seed", range(20))
def test_resume_after_disconnect_resends_at_most_one_window(seed: int) -> None:
    # No drops, duplicates or reordering: every re-sent byte is caused by a disconnect.
    model = LinkModel(latency=0.05, disconnect=0.08, max_faults=5)
    segment_size, window = 1024, 1 + seed % 6
    pair = TransferPair(incompressible(40_000 + seed * 1000), seed=seed, model=model,
                        segment_size=segment_size, window=window, resend_after=5.0)
    check_one_exact_document(pair)
    report = pair.report
    for resent in report.resent_per_session:
        assert resent <= segment_size * window, report
    assert report.resent_bytes <= report.disconnects * segment_size * window


def test_the_fault_model_is_not_vacuous() -> None:
    pairs = [TransferPair(incompressible(30_000), seed=seed, model=LOSSY, segment_size=1024, window=4)
             for seed in range(10)]
    for pair in pairs:
        check_one_exact_document(pair)
    assert sum(p.report.disconnects for p in pairs) >= 5
    assert sum(p.report.restarts for p in pairs) >= 5
    assert all(p.report.resent_bytes > 0 for p in pairs)


def test_faultless_link_sends_every_byte_once() -> None:
    pair = TransferPair(vietnamese_bytes(200_000), seed=1, model=LinkModel(), segment_size=4096, window=8)
    check_one_exact_document(pair)
    assert pair.report.bytes_sent == len(pair.ciphertext)
    assert pair.report.resent_bytes == 0


def test_segment_size_larger_than_the_envelope() -> None:
    check_one_exact_document(TransferPair(b"x", seed=2, model=LOSSY, segment_size=65536, window=4))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), drop=st.floats(0, 0.3), duplicate=st.floats(0, 0.3),
       jitter=st.floats(0, 2), disconnect=st.floats(0, 0.1), restart=st.floats(0, 0.05),
       crash=st.floats(0, 0.1), size=st.integers(1, 30_000), segment_size=st.integers(256, 8192),
       window=st.integers(1, 8), resend_after=st.floats(0.2, 10))
def test_any_link_any_geometry(seed: int, drop: float, duplicate: float, jitter: float, disconnect: float,
                               restart: float, crash: float, size: int, segment_size: int, window: int,
                               resend_after: float) -> None:
    model = LinkModel(drop=drop, duplicate=duplicate, jitter=jitter, disconnect=disconnect, restart=restart,
                      crash=crash)
    check_one_exact_document(TransferPair(incompressible(size), seed=seed, model=model,
                                          segment_size=segment_size, window=window,
                                          resend_after=resend_after))


@pytest.mark.torture
@pytest.mark.parametrize("seed", range(1000))
def test_torture_lossy_link(seed: int) -> None:
    model = LinkModel(drop=0.25, duplicate=0.2, jitter=1.0, disconnect=0.05, restart=0.03, crash=0.05,
                      max_faults=12)
    check_one_exact_document(TransferPair(incompressible(1 + seed * 211), seed=seed, model=model,
                                          segment_size=256 + seed % 4096, window=1 + seed % 8))
