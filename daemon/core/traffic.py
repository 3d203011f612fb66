"""Request traffic as the release watch counts it: requests, 5xx errors and a latency histogram, as increases
over an interval, per machine. Pure: readings come in, increases and quantiles go out.

A machine's counters are read as cumulative totals (its /metrics page) or as increases over an interval
(PromQL `increase()`); either way the watch works on increases, attributed to the release the machine ran
during the interval, and adds them up per release and per region. A counter that went down is a restart:
its new total is what was counted since.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

Buckets = tuple[tuple[float, float], ...]  # (upper bound `le`, cumulative count), ascending, +Inf last


@dataclass(frozen=True)
class Traffic:
    """Requests seen (or an increase of them): all, 5xx, and the latency histogram's cumulative buckets."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: Buckets = ()

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.requests + other.requests, self.errors + other.errors, _add(self.buckets, other.buckets)
        )

    @property
    def error_ratio(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None

    def quantile(self, q: float) -> float | None:
        return quantile(q, self.buckets)


def total(parts: Iterable[Traffic]) -> Traffic:
    result = Traffic()
    for part in parts:
        result += part
    return result


def _add(a: Buckets, b: Buckets) -> Buckets:
    if not a:
        return b
    if not b:
        return a
    counts: dict[float, float] = {}
    for bound, count in (*a, *b):
        counts[bound] = counts.get(bound, 0.0) + count
    return tuple(sorted(counts.items()))


def increase(previous: Traffic | None, current: Traffic) -> Traffic | None:
    """What a machine counted between two cumulative readings; None for the first reading (nothing to
    compare with). A counter below its previous value was reset (the process restarted): the new total is
    what was counted since the restart."""
    if previous is None:
        return None
    if current.requests < previous.requests or current.errors < previous.errors:
        return current
    before = dict(previous.buckets)
    if any(count < before.get(bound, 0.0) for bound, count in current.buckets):
        return current
    buckets = tuple((bound, count - before.get(bound, 0.0)) for bound, count in current.buckets)
    return Traffic(current.requests - previous.requests, current.errors - previous.errors, buckets)


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly inside its bucket as Prometheus's
    histogram_quantile does; None with no observations. An answer in the +Inf bucket is the highest finite
    bound (the histogram can say no more than "above it").

    As Prometheus does, buckets of the same bound are added up, and a cumulative count below the count of a
    lower bound is raised to it: increases taken per bucket (PromQL's `increase()` extrapolates each
    bucket's series on its own) are not exactly monotonic, and a dip would otherwise move the answer, or
    shrink the total the rank is taken of."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile is between 0 and 1, not {q}")
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if len(ordered) < 2 or ordered[-1][0] != math.inf:
        return None
    cumulative = list(accumulate((count for _, count in ordered), max))
    observations = cumulative[-1]
    if observations <= 0:
        return None
    rank = q * observations
    lower_bound, lower_count = 0.0, 0.0
    for index, ((bound, _), count) in enumerate(zip(ordered, cumulative, strict=True)):
        if count >= rank:
            if bound == math.inf:
                return lower_bound
            if index == 0 and bound <= 0:
                return bound  # nothing is known below a first bound at or under zero
            if count == lower_count:
                return bound  # q = 0 with empty first buckets: the lowest bound that holds anything
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return None
