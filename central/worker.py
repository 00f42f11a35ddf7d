"""One central worker process: its config (``--worker`` names one of several on a home), the web app
that owns ingest, and an event loop that SIGTERM and SIGINT end cleanly.

The composition root of central: it sits above ``central.http`` (which may call the operator
commands of ``central.admin``), so nothing below it needs to know how a process is run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from pathlib import Path

from central.config import CentralConfig, load_config
from central.errors import AlreadyRunningError, ConfigError
from central.fsutil import LockHeld, exclusive_lock
from central.http.app import serve_config


async def serve(home: Path, *, ready: asyncio.Event | None = None, worker: str | None = None) -> None:
    """Run ingest and HTTP until cancelled; ``worker`` names one of several processes on this home.

    One process per worker name: the name owns its segment journal files, its assembly directory
    and its broker session, and two processes under one name would delete each other's journal
    (and take the client id from each other every few seconds). The second one is refused."""
    config = as_worker(load_config(home), worker)
    name = config.broker.client_id
    try:
        with exclusive_lock(config.paths.worker_lock(name)):
            await serve_config(config, ready=ready)
    except LockHeld as exc:
        raise AlreadyRunningError(f"another central process is already running as {name!r} on {home} "
                                  f"(pid {exc.holder or '?'})") from None


def as_worker(config: CentralConfig, worker: str | None) -> CentralConfig:
    """The config of worker ``worker``: its own MQTT client id (and so its own session and segment
    journal) on the shared subscription; everything else shared through the catalog."""
    if worker is None:
        return config
    if not worker or len(worker) > 32 or not all(c.isalnum() or c in "-_" for c in worker):
        raise ConfigError(f"--worker {worker!r} must be 1-32 letters, digits, '-' or '_'")
    return dataclasses.replace(config, broker=dataclasses.replace(
        config.broker, client_id=f"{config.broker.client_id}-{worker}"))


def run(home: Path, *, worker: str | None = None) -> int:
    """``asyncio.run(serve)``, with SIGTERM and SIGINT turned into a clean shutdown."""
    as_worker(load_config(home), worker)   # fail fast with a config error, before any loop starts

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(home, worker=worker)

    asyncio.run(main())
    return 0
