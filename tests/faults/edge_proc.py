"""Run an edge service as its own process with the fake OCR engine, for kill -9 tests.

    python -m tests.faults.edge_proc --home DIR [--quiet-seconds S]

The fake engine is chosen through the OcrEngine interface (``EdgeService(ocr_engine=…)``); the real
engine is exercised by the end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
from pathlib import Path

from edge import config as edge_config
from edge.ocr import FakeOcrEngine
from edge.service import EdgeService


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--quiet-seconds", type=float, default=0.3)
    parser.add_argument("--rate-kbit", type=float, default=0.0, help="uplink cap (0 = none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = edge_config.load(args.home)
    cfg = dataclasses.replace(cfg, intake=dataclasses.replace(
        cfg.intake, quiet_seconds=args.quiet_seconds, check_interval=0.1, rescan_seconds=1.0,
        unknown_quiet_seconds=1.0, incomplete_grace_seconds=3.0),
        retention=dataclasses.replace(cfg.retention, release_after_seconds=0.0),
        uplink=dataclasses.replace(cfg.uplink, resend_after=3.0, status_interval=2.0,
                                   rate_kbit=args.rate_kbit))

    async def run() -> None:
        service = EdgeService(cfg, ocr_engine=FakeOcrEngine())
        task = asyncio.create_task(service.run())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())


if __name__ == "__main__":
    main()
