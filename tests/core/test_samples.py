"""Samples, staleness, aggregation and counter rates (core/samples.py)."""

from __future__ import annotations

import pytest

from daemon.core.samples import Aggregate, Sample, aggregate, by_region, counter_rate


def test_fresh_until_the_staleness_limit() -> None:
    """A sample is its value up to its staleness limit, then missing (None), never zero."""
    sample = Sample(value=0.0, at=100.0, source="scrape")
    assert sample.fresh(now=110.0, max_age=10.0) == 0.0
    assert sample.fresh(now=110.5, max_age=10.0) is None
    assert sample.age(90.0) == 0.0


@pytest.mark.parametrize(
    ("values", "how", "expected"),
    [
        ([1.0, 2.0, 3.0], Aggregate.SUM, 6.0),
        ([1.0, 3.0], Aggregate.AVG, 2.0),
        ([1.0, 3.0], Aggregate.MAX, 3.0),
    ],
)
def test_aggregate(values: list[float], how: Aggregate, expected: float) -> None:
    """Sum, average and maximum of machine values."""
    assert aggregate(values, how) == expected


def test_aggregate_of_nothing_is_missing() -> None:
    """No values aggregate to None, not 0."""
    assert aggregate([], Aggregate.SUM) is None


def test_counter_rate_and_resets() -> None:
    """Rates between scrapes; a counter that drops restarted and counts from zero; no history, no rate."""
    assert counter_rate(Sample(100, 10, "s"), Sample(160, 40, "s")) == 2.0
    assert counter_rate(Sample(100, 10, "s"), Sample(30, 40, "s")) == 1.0  # restarted: 30 new requests
    assert counter_rate(None, Sample(30, 40, "s")) is None
    assert counter_rate(Sample(1, 40, "s"), Sample(2, 40, "s")) is None


def test_by_region_leaves_regions_without_values_out() -> None:
    """Machine values group into their regions; a region with no machine value is absent, not zero."""
    regions = {"a": "iad", "b": "iad", "c": "cdg", "d": "nrt"}
    assert by_region({"a": 1.0, "b": 3.0, "c": 5.0}, regions, Aggregate.AVG) == {"iad": 2.0, "cdg": 5.0}
