"""A tesseract that never finishes a page, and says when it started: for tests of stopping mid-page."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class StalledTesseract:
    command: Path   # give it as ``tesseract_cmd``
    fifo: Path      # it writes its pid here when it starts, then sleeps ten minutes

    @classmethod
    def make(cls, directory: Path) -> StalledTesseract:
        fifo = directory / "tesseract-started"
        os.mkfifo(fifo)
        command = directory / "stalled-tesseract"
        command.write_text(f"#!/bin/sh\necho $$ > '{fifo}'\nexec sleep 600\n")
        command.chmod(0o755)
        return cls(command, fifo)

    async def started(self, within: float = 60) -> int:
        """The pid of the next tesseract to start, once it runs (a FIFO read: an event, not a clock).

        If none starts in time, the reading thread is released before the test fails: a thread left
        blocked on the FIFO would hang the event loop's shutdown, and the suite with it."""
        reading = asyncio.ensure_future(asyncio.to_thread(self.fifo.read_text))
        try:
            return int(await asyncio.wait_for(asyncio.shield(reading), within))
        except TimeoutError:
            with contextlib.suppress(OSError):   # ENXIO: the reader is not there (any more)
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))   # it reads EOF
            with contextlib.suppress(Exception):
                await reading
            raise


def assert_gone(pid: int, within: float = 10) -> None:
    """``pid`` has ended (a zombie waiting for its reaper counts as ended)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        _, alive = psutil.wait_procs([psutil.Process(pid)], timeout=within)
        assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), [p.pid for p in alive]
