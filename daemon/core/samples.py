"""Metric samples, their age, and how per-machine values become per-region ones.

The rule that matters: missing is never zero. A source that is down, a query that failed, an empty
result or a sample older than its staleness limit gives `None`, and whoever decides must treat `None`
as "no data", never as a value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class Aggregate(StrEnum):
    SUM = "sum"
    AVG = "avg"
    MAX = "max"


@dataclass(frozen=True)
class Sample:
    """A value, when it was observed (unix seconds), and where from."""

    value: float
    at: float
    source: str

    def age(self, now: float) -> float:
        return max(now - self.at, 0.0)

    def fresh(self, now: float, max_age: float) -> float | None:
        """The value, or None past its staleness limit."""
        return self.value if self.age(now) <= max_age else None


def aggregate(values: Iterable[float], how: Aggregate) -> float | None:
    """Sum, average or maximum; None when there is nothing to aggregate (never 0)."""
    items = list(values)
    if not items:
        return None
    if how is Aggregate.SUM:
        return sum(items)
    if how is Aggregate.AVG:
        return sum(items) / len(items)
    return max(items)


def counter_rate(previous: Sample | None, current: Sample) -> float | None:
    """Per-second rate of a counter between two scrapes; a drop is a restart, counted from zero."""
    if previous is None:
        return None
    elapsed = current.at - previous.at
    if elapsed <= 0:
        return None
    increase = current.value - previous.value if current.value >= previous.value else current.value
    return increase / elapsed


def by_region(
    per_machine: Mapping[str, float], regions: Mapping[str, str], how: Aggregate
) -> dict[str, float]:
    """Aggregate machine values into their regions (`regions`: machine id -> region); regions with no value
    are absent from the result, not zero."""
    grouped: dict[str, list[float]] = {}
    for machine_id, value in per_machine.items():
        region = regions.get(machine_id)
        if region is not None:
            grouped.setdefault(region, []).append(value)
    result = {}
    for region, values in grouped.items():
        combined = aggregate(values, how)
        if combined is not None:
            result[region] = combined
    return result
