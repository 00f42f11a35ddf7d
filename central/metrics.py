"""Central's process counters and the ``/metrics`` exposition (``prometheus_client``).

Counters are plain ints bumped by the ingest thread (monotonic, so the GIL is enough) and read by a
custom collector at scrape time; the ingest keeps its simple ``metrics.x += 1`` and no library object
lives on the hot path. Gauges the catalog knows (documents, devices, backlog) are read from the
catalog at scrape time, so several central workers agree on them.

Names follow Prometheus' rules: the ``sohoa_`` prefix, ``_total`` on counters, base units
(``_bytes``, ``_seconds``). Per-device series are bounded: only devices with a problem, worst first,
at most ``DEVICE_SERIES_MAX`` of them (``sohoa_device_series_dropped`` says how many did not fit),
so a fleet of 3,300 boxes never becomes 3,300 × N series. ``METRICS`` below is the documented list;
a test holds the exposition to it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protocol.version import version

DEVICE_SERIES_MAX = 200

# name → (type, help). The documented metrics (README "Metrics" lists the same).
METRICS: dict[str, tuple[str, str]] = {
    "sohoa_central_info": ("gauge", "Always 1; the version label says which sohoa this central runs."),
    "sohoa_central_segments_received": ("counter", "Segments durably written by this process."),
    "sohoa_central_received_bytes": ("counter", "Ciphertext bytes of those segments."),
    "sohoa_central_documents_ingested": ("counter", "Transfers stored and receipted by this process."),
    "sohoa_central_ingest_errors": ("counter", "Messages or transfers refused, by error class."),
    "sohoa_central_messages_paced": ("counter",
                                     "Device messages that waited for their device's message rate."),
    "sohoa_central_ingest_failures": ("counter",
                                      "Times the ingest service ended unexpectedly or failed to restart."),
    "sohoa_central_ingest_running": ("gauge", "1 while the ingest service runs."),
    "sohoa_central_broker_connected": ("gauge", "1 while the ingest is connected to the broker."),
    "sohoa_central_transfers_active": ("gauge", "Transfers announced and not yet stored or rejected."),
    "sohoa_catalog_documents": ("gauge", "Arrivals in the catalog (one per commune that sent a scan)."),
    "sohoa_catalog_objects": ("gauge", "Distinct originals stored (content once)."),
    "sohoa_catalog_stored_bytes": ("gauge", "Bytes of distinct originals stored."),
    "sohoa_devices": ("gauge", "Devices by state: online, offline, never_seen (active, silent since "
                               "enrollment), revoked; possible_clone and with_error overlap them."),
    "sohoa_fleet_backlog_documents": ("gauge", "Documents waiting on active boxes, as they last reported."),
    "sohoa_fleet_backlog_bytes": ("gauge", "Bytes waiting on active boxes, as they last reported."),
    "sohoa_fleet_oldest_backlog_age_seconds": ("gauge", "Age of the oldest waiting document in the fleet."),
    "sohoa_device_up": ("gauge", "Per problem device (bounded): 1 online, 0 offline."),
    "sohoa_device_last_seen_timestamp_seconds": ("gauge",
                                                 "Per problem device (bounded): when it last spoke."),
    "sohoa_device_backlog_documents": ("gauge", "Per problem device (bounded): documents waiting on it."),
    "sohoa_device_oldest_backlog_age_seconds": ("gauge", "Per problem device (bounded): oldest waiting."),
    "sohoa_device_disk_free_bytes": ("gauge", "Per problem device (bounded): free disk it reported."),
    "sohoa_device_series_dropped": ("gauge", "Problem devices not exported per device (over the bound)."),
}


@dataclass(slots=True)
class Metrics:
    segments_received: int = 0
    bytes_received: int = 0
    documents_ingested: int = 0
    ingest_running: bool = False   # the ingest service is up (see central.ingest.service.IngestSupervisor)
    ingest_failures: int = 0       # times it ended unexpectedly or could not be restarted
    ingest_errors: Counter[str] = field(default_factory=Counter)
    messages_paced: int = 0        # waited for their device's rate (central.ingest.rate)

    def error(self, error_class: str) -> None:
        self.ingest_errors[error_class] += 1


@dataclass(frozen=True, slots=True)
class Scrape:
    """What the catalog says at scrape time (``catalog.metrics_snapshot``) plus the broker link."""

    catalog: dict[str, Any]
    broker_connected: bool | None   # None: a catalog-only app, no ingest


def _family(name: str) -> Metric:
    kind, help_text = METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name, help_text)
    return GaugeMetricFamily(name, help_text)


class _Collector(Collector):
    def __init__(self, metrics: Metrics, scrape: Scrape) -> None:
        self._metrics = metrics
        self._scrape = scrape

    def collect(self) -> Iterator[Metric]:
        m, cat = self._metrics, self._scrape.catalog
        info = GaugeMetricFamily("sohoa_central_info", METRICS["sohoa_central_info"][1], labels=["version"])
        info.add_metric([version()], 1)
        yield info
        for name, value in (("sohoa_central_segments_received", m.segments_received),
                            ("sohoa_central_received_bytes", m.bytes_received),
                            ("sohoa_central_documents_ingested", m.documents_ingested),
                            ("sohoa_central_ingest_failures", m.ingest_failures),
                            ("sohoa_central_messages_paced", m.messages_paced)):
            counter = CounterMetricFamily(name, METRICS[name][1], value=value)
            yield counter
        errors = CounterMetricFamily("sohoa_central_ingest_errors", METRICS["sohoa_central_ingest_errors"][1],
                                     labels=["class"])
        for error_class, count in sorted(m.ingest_errors.items()):
            errors.add_metric([error_class], count)
        yield errors
        yield GaugeMetricFamily("sohoa_central_ingest_running", METRICS["sohoa_central_ingest_running"][1],
                                value=int(m.ingest_running))
        # 0 too in a catalog-only app (no ingest, no broker): the series always exists for alerts.
        name = "sohoa_central_broker_connected"
        yield GaugeMetricFamily(name, METRICS[name][1], value=int(bool(self._scrape.broker_connected)))
        for name, key in (("sohoa_central_transfers_active", "transfers_active"),
                          ("sohoa_catalog_documents", "documents"), ("sohoa_catalog_objects", "objects"),
                          ("sohoa_catalog_stored_bytes", "stored_bytes"),
                          ("sohoa_fleet_backlog_documents", "backlog_docs"),
                          ("sohoa_fleet_backlog_bytes", "backlog_bytes"),
                          ("sohoa_fleet_oldest_backlog_age_seconds", "oldest_age_s")):
            yield GaugeMetricFamily(name, METRICS[name][1], value=float(cat[key] or 0))
        devices = GaugeMetricFamily("sohoa_devices", METRICS["sohoa_devices"][1], labels=["state"])
        for state, count in sorted(cat["devices"].items()):
            devices.add_metric([state], count)
        yield devices
        names = ("sohoa_device_up", "sohoa_device_last_seen_timestamp_seconds",
                 "sohoa_device_backlog_documents",
                 "sohoa_device_oldest_backlog_age_seconds", "sohoa_device_disk_free_bytes")
        per_device = {name: GaugeMetricFamily(name, METRICS[name][1], labels=["device"]) for name in names}
        for row in cat["problem_devices"]:
            labels = [row["id"]]
            per_device["sohoa_device_up"].add_metric(labels, int(row["online"]))
            if row["last_seen_ts"] is not None:
                per_device["sohoa_device_last_seen_timestamp_seconds"].add_metric(labels, row["last_seen_ts"])
            per_device["sohoa_device_backlog_documents"].add_metric(labels, row["backlog_docs"])
            per_device["sohoa_device_oldest_backlog_age_seconds"].add_metric(labels, row["oldest_age_s"])
            if row["disk_free_bytes"] is not None:
                per_device["sohoa_device_disk_free_bytes"].add_metric(labels, row["disk_free_bytes"])
        yield from per_device.values()
        yield GaugeMetricFamily("sohoa_device_series_dropped", METRICS["sohoa_device_series_dropped"][1],
                                value=cat["problem_devices_dropped"])


def render(metrics: Metrics, scrape: Scrape) -> bytes:
    """The Prometheus text exposition of one scrape (a fresh registry: nothing global, per app)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics, scrape))
    return generate_latest(registry)
