"""Fly's documented Machines API rate limits: a token bucket per action and per machine (or app).

machines-api.md §6: 1 request/s sustained with a burst of 3 for every action but Get Machine, which
allows 5/s with a burst of 10. List and create are counted per app, the rest per machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.clock import Clock


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: float  # bucket capacity


DEFAULT_LIMIT = Limit(rate=1.0, burst=3.0)
GET_MACHINE_LIMIT = Limit(rate=5.0, burst=10.0)


def limit_for(action: str) -> Limit:
    return GET_MACHINE_LIMIT if action == "Machines_show" else DEFAULT_LIMIT


class RateLimiter:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, action: str, scope: str) -> bool:
        """Take one token from (action, scope)'s bucket; False when it is empty."""
        limit = limit_for(action)
        now = self._clock.now()
        tokens, at = self._buckets.get((action, scope), (limit.burst, now))
        tokens = min(limit.burst, tokens + (now - at) * limit.rate)
        if tokens < 1.0:
            self._buckets[(action, scope)] = (tokens, now)
            return False
        self._buckets[(action, scope)] = (tokens - 1.0, now)
        return True
