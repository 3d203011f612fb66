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


# A client keeps one token of each bucket back. Fly counts a request when it arrives, not when it was sent:
# when an earlier request is delayed on the way more than a later one, the two arrive closer together than
# they left, and a client that spends Fly's whole burst gets a 429. One token in hand absorbs up to a whole
# refill interval of such jitter (1 s for most actions), at the cost of one request of the first burst.
CLIENT_HEADROOM = 1.0


class TokenBuckets:
    """One bucket per (action, scope). `now` comes in; nothing here reads a clock.

    `headroom`: tokens of each burst never spent (CLIENT_HEADROOM for a client; 0 for Fly's own buckets).
    """

    def __init__(self, headroom: float = 0.0) -> None:
        self._headroom = headroom
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, action: str, scope: str, now: float) -> float:
        """Take a token: 0.0 when taken, else the seconds until one will be there (nothing taken)."""
        limit = limit_for(action)
        capacity = max(1.0, limit.burst - self._headroom)
        tokens, at = self._buckets.get((action, scope), (capacity, now))
        tokens = min(capacity, tokens + max(now - at, 0.0) * limit.rate)
        if tokens < 1.0:
            self._buckets[(action, scope)] = (tokens, now)
            return (1.0 - tokens) / limit.rate
        self._buckets[(action, scope)] = (tokens - 1.0, now)
        return 0.0
