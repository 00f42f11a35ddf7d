"""One SQLite connection confined to one thread, awaited from asyncio (Datasette's write thread).

The writer's thread is also where the ingest runs, so its fsyncs and commits never block the loop
and the connection is never shared between threads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from central import catalog

T = TypeVar("T")


class Database:
    def __init__(self, path: Path, *, readonly: bool, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection = self._executor.submit(
            catalog.connect, path, readonly=readonly).result()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the connection's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._conn, *args))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)
