"""Waiting for a condition that has no event to await (a count in SQLite, a file on disk)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def wait_until(predicate: Callable[[], Awaitable[bool]], within: float, interval: float = 0.2) -> bool:
    """Poll an async predicate until it holds or ``within`` seconds pass; True if it held."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return False
