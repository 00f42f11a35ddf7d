"""Process counters and the Prometheus text rendering for /metrics.

Counters are bumped by the ingest thread and read by the HTTP handler; plain ints under the GIL are
enough for monotonic counters. Gauges that the catalog knows (documents, bytes, online devices)
are read from the catalog at scrape time, so several workers agree on them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from central.catalog import CatalogTotals


@dataclass(slots=True)
class Metrics:
    segments_received: int = 0
    bytes_received: int = 0
    documents_ingested: int = 0
    ingest_running: bool = False   # the ingest service is up (see central.service.IngestSupervisor)
    ingest_failures: int = 0       # times it ended unexpectedly or could not be restarted
    ingest_errors: Counter[str] = field(default_factory=Counter)

    def error(self, error_class: str) -> None:
        self.ingest_errors[error_class] += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(metrics: Metrics, totals: CatalogTotals) -> str:
    lines = [
        "# HELP documents_total Documents stored in the catalog (duplicates counted once).",
        "# TYPE documents_total gauge",
        f"documents_total {totals.documents}",
        "# HELP bytes_stored Bytes of original documents stored.",
        "# TYPE bytes_stored gauge",
        f"bytes_stored {totals.bytes_stored}",
        "# HELP segments_received_total Segments durably written by this process.",
        "# TYPE segments_received_total counter",
        f"segments_received_total {metrics.segments_received}",
        "# HELP transfers_active Transfers announced and not yet stored or rejected.",
        "# TYPE transfers_active gauge",
        f"transfers_active {totals.transfers_active}",
        "# HELP devices_online Devices whose last status said online.",
        "# TYPE devices_online gauge",
        f"devices_online {totals.devices_online}",
        "# HELP ingest_running 1 while the ingest service runs, 0 after it stopped unexpectedly.",
        "# TYPE ingest_running gauge",
        f"ingest_running {int(metrics.ingest_running)}",
        "# HELP ingest_failures_total Times the ingest service ended unexpectedly or failed to restart.",
        "# TYPE ingest_failures_total counter",
        f"ingest_failures_total {metrics.ingest_failures}",
        "# HELP ingest_errors_total Messages or transfers refused, by error class.",
        "# TYPE ingest_errors_total counter",
    ]
    lines += [f'ingest_errors_total{{class="{_escape(name)}"}} {count}'
              for name, count in sorted(metrics.ingest_errors.items())]
    return "\n".join(lines) + "\n"
