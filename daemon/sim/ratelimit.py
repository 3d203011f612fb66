"""The simulated API's rate limiter: Fly's documented buckets (core/ratelimit.py) on the simulator's clock."""

from __future__ import annotations

from daemon.clock import Clock
from daemon.core.ratelimit import TokenBuckets


class RateLimiter:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._buckets = TokenBuckets()

    def allow(self, action: str, scope: str) -> bool:
        """Take one token from (action, scope)'s bucket; False when it is empty (answer 429)."""
        return self._buckets.take(action, scope, self._clock.now()) == 0.0
