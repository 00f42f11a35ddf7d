"""Both sides' /metrics, read by prometheus_client's parser: every documented metric is there."""

from __future__ import annotations

import urllib.request

from central.metrics import METRICS as CENTRAL_METRICS
from edge.statuspage import METRICS as EDGE_METRICS
from protocol.version import version
from tests.browser.conftest import CLONE, LIVE, Scene
from tests.support.prom import parse


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def _check(families: dict[str, str], documented: dict[str, tuple[str, str]]) -> None:
    assert set(documented) <= set(families), sorted(set(documented) - set(families))
    for name, (kind, _) in documented.items():
        assert families[name] == kind, name
    assert all(name.startswith("sohoa_") for name in families)


def test_central_metrics(scene: Scene) -> None:
    content_type, text = _get(scene.url + "/metrics")
    assert content_type.startswith("text/plain")
    families, samples = parse(text)
    _check(families, CENTRAL_METRICS)
    assert samples['sohoa_devices{state="never_seen"}'] == 1
    assert samples['sohoa_devices{state="revoked"}'] == 1
    assert samples['sohoa_devices{state="possible_clone"}'] == 1
    assert samples["sohoa_catalog_documents"] == 2
    assert samples["sohoa_central_broker_connected"] == 1 and samples["sohoa_central_ingest_running"] == 1
    assert samples['sohoa_central_ingest_errors_total{class="SequenceReusedError"}'] >= 1
    assert samples[f'sohoa_device_up{{device="{CLONE}"}}'] == 1
    assert samples["sohoa_central_documents_ingested_total"] == 2


def test_edge_metrics(scene: Scene) -> None:
    content_type, text = _get(scene.clerk_url + "/metrics")
    assert content_type.startswith("text/plain")
    families, samples = parse(text)
    _check(families, EDGE_METRICS)
    assert samples['sohoa_edge_documents{state="delivered"}'] == 1
    assert samples["sohoa_edge_refused_documents"] == 1 and samples["sohoa_edge_link_up"] == 1
    assert samples["sohoa_edge_receipts_total"] == 1 and samples["sohoa_edge_sent_bytes_total"] > 0
    assert samples[f'sohoa_edge_info{{device="{LIVE}",version="{version()}"}}'] == 1
