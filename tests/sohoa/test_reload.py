"""What a SIGHUP may change in a running edge: the uplink cap, the alarm threshold, the log level."""

from __future__ import annotations

import dataclasses

import nacl.signing
import pytest

from edge.service import EdgeService
from edge.uplink import TokenBucket, Uplink
from tests.support.deployment import Deployment


def test_uplink_rate_changes_in_place() -> None:
    uplink = Uplink(device_id="xa-tan-trao", broker_url="mqtt://127.0.0.1:1", username="u", password="p",
                    outbox=None,  # type: ignore[arg-type]  # never touched before run()
                    receipt_key=nacl.signing.SigningKey.generate().verify_key, segment_size=16384)
    uplink.set_rate(256)
    assert uplink._rate_bytes == 32000 and uplink._bucket is None   # the next session makes the bucket
    uplink._bucket = TokenBucket(32000, 32768, 0.0)
    uplink.set_rate(512)
    assert (uplink._bucket.rate, uplink._bucket.burst) == (64000, 32768)
    uplink.set_rate(0)
    assert uplink._rate_bytes is None and uplink._bucket is None


def test_reload_applies_what_it_can_and_names_the_rest(deployment: Deployment) -> None:
    config = deployment.edge_config()
    service = EdgeService(config)
    fresh = dataclasses.replace(
        config, uplink=dataclasses.replace(config.uplink, rate_kbit=128.0, window=4),
        outbox=dataclasses.replace(config.outbox, alarm_after_hours=12.0))
    summary = service.reload(fresh)
    assert service.config.uplink.rate_kbit == 128.0 and service.config.outbox.alarm_after_hours == 12.0
    assert service.config.uplink.window == config.uplink.window   # not applied in place
    assert summary.endswith("needs a restart to change: uplink")
    with pytest.raises(ValueError, match="another box"):
        service.reload(dataclasses.replace(config, device_id="xa-khac"))
