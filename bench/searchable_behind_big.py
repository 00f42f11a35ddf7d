"""How long after "OCR done" is a small scan searchable at central while big scans are queued ahead of it
on a 256 kbit/s commune link? With progressive sync the small scan's notice (its sealed text and
metadata, protocol/notice.py) goes ahead of every segment whatever ``uplink.max_active``, and central
catalogues it at once ("original on its way"); ``--no-notices`` measures the old path (the whole
package, behind the uplink's scheduling).

    python -m bench.searchable_behind_big [--big-mb 20] [--ahead 1] [--max-active 2] [--cap 180]
                                          [--rate-kbit 0] [--no-notices]

A real deployment on loopback (Mosquitto with the generated config, central, one edge), the edge's
link through the fault proxy (tests/faults/proxy.py) at 256 kbit/s with 100 ms one way; the OCR engine
is the fake one (this measures the link, not tesseract). "OCR done" is the moment the small scan's
outbox row leaves ``stable`` (polled every 50 ms); "searchable" is the moment ``GET /api/documents?q=``
first finds it by a word of its name (polled every 200 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import math
import tempfile
import time
from pathlib import Path

from PIL import Image

from edge import process
from edge.ocr import FakeOcrEngine
from tests.faults.proxy import FaultProxy
from tests.support.deployment import Deployment, _deployment, running
from tests.support.waiting import wait_until

LINK_KBIT = 256
LATENCY_S = 0.1


def noise_jpeg(target_bytes: int, *, seed: int) -> bytes:
    """A colour JPEG of about ``target_bytes`` that neither zstd nor anything else can shrink."""
    side = 1000
    data = b""
    for _ in range(3):
        channels = [Image.effect_noise((side, int(side * 1.41)), 80 + seed + n) for n in range(3)]
        buffer = io.BytesIO()
        Image.merge("RGB", channels).save(buffer, format="JPEG", quality=95, dpi=(300, 300))
        data = buffer.getvalue()
        side = int(side * math.sqrt(target_bytes / len(data)))
    return data


def place(data: bytes, watch: Path, name: str) -> None:
    temp = watch / f".{name}.part"
    temp.write_bytes(data)
    temp.rename(watch / name)   # a rename into place: finished at once


async def measure(deployment: Deployment, args: argparse.Namespace, work: Path) -> dict[str, object]:
    bigs = [noise_jpeg(args.big_mb * 1_000_000, seed=n) for n in range(args.ahead)]
    small = noise_jpeg(60_000, seed=99)
    async with FaultProxy("127.0.0.1", deployment.broker.device_port) as proxy:
        proxy.throttle(LINK_KBIT, LATENCY_S)
        cfg = deployment.edge_config()
        cfg = dataclasses.replace(
            cfg, broker=dataclasses.replace(cfg.broker, url=f"mqtt://127.0.0.1:{proxy.port}"),
            uplink=dataclasses.replace(cfg.uplink, max_active=args.max_active, rate_kbit=args.rate_kbit))
        if args.no_notices:
            process.build_notice = lambda **_: None   # type: ignore[assignment]  # the old path
        async with running(deployment, ocr_engine=FakeOcrEngine(), edge_config=cfg) as service:
            for n, data in enumerate(bigs):
                place(data, cfg.watch_dir, f"Hồ sơ địa chính lớn {n + 1}.jpg")

            async def states() -> dict[str, tuple[str, int | None]]:
                return {d.name: (str(d.state.value), d.ciphertext_size)
                        for d in await service.outbox.recent(50)}

            def sending(now: dict[str, tuple[str, int | None]]) -> int:
                return sum(1 for state, _ in now.values() if state == "sending")

            async def big_ones_sending() -> bool:
                return sending(await states()) >= min(args.ahead, args.max_active)

            assert await wait_until(big_ones_sending, within=300)
            big_sizes = [size or 0 for name, (_, size) in (await states()).items()
                         if name.startswith("Hồ sơ")]
            sent_at_drop = proxy.stats.bytes_up
            dropped = time.monotonic()
            place(small, cfg.watch_dir, "Công văn khẩn Xuânlộc.jpg")
            ocr_done = searchable = None
            deadline = dropped + args.cap
            next_search = 0.0
            while time.monotonic() < deadline:
                now = time.monotonic()
                state = (await states()).get("Công văn khẩn Xuânlộc.jpg", ("", None))[0]
                if ocr_done is None and state not in ("", "seen", "stable"):
                    ocr_done = now
                if now >= next_search:
                    next_search = now + 0.2
                    found = await deployment.get_json("/api/documents", q="xuanloc")
                    if found:
                        searchable = time.monotonic()
                        break
                await asyncio.sleep(0.05)
            final = await states()
            sent = proxy.stats.bytes_up
    active = min(args.ahead, args.max_active)
    rate = LINK_KBIT * 1000 / 8
    # Not overtaken: the small scan waits for the first active big transfer to end. Each active one has
    # about 1/active of the link; what they had left at the drop, shared out, bounds the wait from below.
    left_each = max(0.0, (sum(big_sizes[:active]) - sent_at_drop) / active) if big_sizes else 0.0
    return {
        "big_scans_ahead": args.ahead, "big_bytes_each": len(bigs[0]) if bigs else 0,
        "big_ciphertext_bytes": big_sizes, "small_bytes": len(small), "max_active": args.max_active,
        "ocr_done_after_drop_s": None if ocr_done is None else round(ocr_done - dropped, 2),
        "searchable_after_ocr_done_s": None if searchable is None or ocr_done is None
        else round(searchable - ocr_done, 2),
        "cap_s": args.cap, "bytes_up_during_wait": sent - sent_at_drop,
        "rate_kbit": args.rate_kbit, "notices": not args.no_notices,
        "states_at_end": {k: v[0] for k, v in final.items()},
        "estimate_if_not_overtaking_s": None if args.ahead < args.max_active
        else round(left_each * active / rate, 0),
        "big_alone_s": round((big_sizes[0] if big_sizes else 0) / rate, 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=float, default=20)
    parser.add_argument("--ahead", type=int, default=1, help="big scans queued (and sending) ahead")
    parser.add_argument("--max-active", type=int, default=2,
                        help="uplink.max_active (default: the edge's 2)")
    parser.add_argument("--cap", type=float, default=180, help="give up waiting after this many seconds")
    parser.add_argument("--rate-kbit", type=float, default=0.0,
                        help="uplink.rate_kbit, the edge's own cap (default 0: uncapped)")
    parser.add_argument("--no-notices", action="store_true", help="send no notices (the old path)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        deployments = _deployment(root, tls=False)
        deployment = next(deployments)
        try:
            result = asyncio.run(measure(deployment, args, root))
        finally:
            with contextlib.suppress(StopIteration):
                next(deployments)
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
