"""Read a /metrics body with prometheus_client's own parser (what Prometheus would accept)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse(text: str) -> tuple[dict[str, str], dict[str, float]]:
    """(family name → type, sample name with sorted labels → value)."""
    families: dict[str, str] = {}
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return families, samples
