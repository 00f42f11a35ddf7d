"""Expiry: transfers without progress for a long time give their bytes back; served flags are lowered.

Level-triggered (STYLE 17): the reconciler runs ``sweep`` every minute or so inside a writer
transaction; nothing is scheduled per transfer. An expired transfer keeps its catalog row (state
``expired``, its seq still spent): a late segment or fin is answered UNKNOWN, so the device announces it
again, and that init — weighed like a new transfer — starts it from zero under the same tid, so the
document still arrives exactly once.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from central.ingest.batch import BatchStage
from central.ingest.store import IngestStore

log = logging.getLogger("sohoa.central.ingest")

# No progress for this long and the transfer's bytes are dropped (docs/DECISIONS.md: a weekend off).
EXPIRE_AFTER_S = 72 * 3600.0


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sweep(db: IngestStore, stage: BatchStage, *, now: float, expire_after_s: float) -> list[str]:
    """Expire transfers without progress since ``now - expire_after_s`` and lower the flag of devices
    clean for a whole rejected-transfer window; return the expired tids. Their journal files are freed
    by the next ``collect`` after this commits."""
    before = _iso(now - expire_after_s)
    expired = db.expire_stalled(before=before)
    at = _iso(now)
    per_device: dict[str, int] = {}
    for tid, device in expired:
        db.add_fixity(event="expired", device=device, tid=tid, at=at,
                      detail=json.dumps({"no_progress_since": before}))
        stage.remove_legacy_part(tid)
        per_device[device] = per_device.get(device, 0) + 1
    for device, count in sorted(per_device.items()):
        log.info("expired %d transfer(s) of %s without progress since %s; their bytes are dropped, the "
                 "box sends them again from zero when it comes back", count, device, before)
    stage.expired += len(expired)
    for device in db.clear_misbehaving(quiet_since=now - stage.quotas.rejected_window_s):
        log.info("device %s is back within its rejected-transfer budget", device)
    return [tid for tid, _ in expired]
