"""Login rate limiting: failed attempts per key (client address, operator name) in a sliding window.

Kept apart from ``central.http.auth`` so the app's typed keys (``central.http.state``) can name it without
importing the handlers that read those keys.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

LOGIN_MAX_FAILURES = 5
LOGIN_WINDOW_S = 15 * 60


@dataclass(slots=True)
class LoginLimiter:
    """At most ``max_failures`` failed logins per key (address, name) in a sliding window."""

    max_failures: int = LOGIN_MAX_FAILURES
    window_s: float = LOGIN_WINDOW_S
    _failures: dict[str, deque[float]] = field(default_factory=lambda: defaultdict(deque))

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures[key]
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, keys: tuple[str, ...]) -> float:
        now = time.monotonic()
        waits = [times[0] + self.window_s - now for key in keys
                 if len(times := self._recent(key, now)) >= self.max_failures]
        return max(waits, default=0.0)

    def failed(self, keys: tuple[str, ...]) -> None:
        now = time.monotonic()
        for key in keys:
            self._recent(key, now).append(now)

    def succeeded(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            self._failures.pop(key, None)
