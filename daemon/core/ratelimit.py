"""Fly's documented Machines API rate limits, and the token buckets that keep to them.

machines-api.md §6: limits apply per action and per identifier (the machine, or the app for list and
create): 1 request/s sustained with a burst of 3; Get Machine allows 5/s with a burst of 10.
The simulator enforces these buckets; the client waits on the same buckets so it never causes a 429.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: float  # bucket capacity


DEFAULT_LIMIT = Limit(rate=1.0, burst=3.0)
GET_MACHINE_LIMIT = Limit(rate=5.0, burst=10.0)


def limit_for(action: str) -> Limit:
    """The limit of an action, named by its OpenAPI operationId."""
    return GET_MACHINE_LIMIT if action == "Machines_show" else DEFAULT_LIMIT


class TokenBuckets:
    """One bucket per (action, scope). `now` comes in; nothing here reads a clock."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, action: str, scope: str, now: float) -> float:
        """Take a token: 0.0 when taken, else the seconds until one will be there (nothing taken)."""
        limit = limit_for(action)
        tokens, at = self._buckets.get((action, scope), (limit.burst, now))
        tokens = min(limit.burst, tokens + max(now - at, 0.0) * limit.rate)
        if tokens < 1.0:
            self._buckets[(action, scope)] = (tokens, now)
            return (1.0 - tokens) / limit.rate
        self._buckets[(action, scope)] = (tokens - 1.0, now)
        return 0.0
