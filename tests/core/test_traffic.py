"""Traffic increases, sums and latency quantiles (core/traffic.py).

The expected quantiles are what Prometheus 2.42's histogram_quantile answers for the same buckets (taken with
`promtool test rules` on series of exactly these counts); NaN there is None here.
"""

from __future__ import annotations

import math

import pytest

from daemon.core.traffic import Buckets, Traffic, increase, quantile, total

INF = math.inf

MID: Buckets = ((0.1, 10), (0.5, 30), (1.0, 40), (INF, 40))
TAIL: Buckets = ((0.1, 5), (0.5, 8), (INF, 10))
SIM: Buckets = (
    (0.005, 1),
    (0.01, 2),
    (0.025, 7),
    (0.05, 20),
    (0.1, 60),
    (0.25, 200),
    (0.5, 380),
    (1.0, 395),
    (2.5, 400),
    (5.0, 400),
    (10.0, 400),
    (INF, 400),
)


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        # linear inside the bucket the rank falls in
        (0.5, MID, 0.3),
        (0.25, MID, 0.1),
        (0.9, MID, 0.8),
        (0.95, MID, 0.9),
        (0.99, MID, 0.98),
        (1.0, MID, 1.0),
        (0.0, MID, 0.0),
        # the first bucket starts at zero
        (0.25, ((0.1, 10), (INF, 10)), 0.025),
        (0.95, ((0.1, 10), (INF, 10)), 0.095),
        # an answer in the +Inf bucket is the highest finite bound
        (0.9, TAIL, 0.5),
        (0.99, TAIL, 0.5),
        (1.0, TAIL, 0.5),
        (0.5, TAIL, 0.1),
        # an empty bucket in the middle: the rank's first bucket wins
        (0.5, ((0.1, 5), (0.5, 5), (1.0, 10), (INF, 10)), 0.1),
        (0.9, ((0.1, 5), (0.5, 5), (1.0, 10), (INF, 10)), 0.9),
        # empty first bucket
        (0.5, ((0.1, 0), (0.5, 10), (INF, 10)), 0.3),
        # the simulator's buckets, as a healthy machine fills them
        (0.25, SIM, 0.14285714285714285),
        (0.5, SIM, 0.25),
        (0.9, SIM, 0.4722222222222222),
        (0.95, SIM, 0.5),
        (0.99, SIM, 1.3),
        (1.0, SIM, 2.5),
        # a dip (increases taken per bucket) is raised to the count below it
        (0.5, ((0.1, 3), (0.5, 2), (1.0, 8), (INF, 10)), 0.7),
        (0.25, ((0.1, 3), (0.5, 2), (1.0, 8), (INF, 10)), 0.08333333333333334),
        # a +Inf count below a lower bucket's: the total is the highest count
        (0.5, ((0.1, 5), (0.5, 10), (INF, 8)), 0.1),
        (0.9, ((0.1, 5), (0.5, 10), (INF, 8)), 0.42),
        (0.95, ((0.1, 5), (0.5, 10), (INF, 8)), 0.46),
        # a first bound at or below zero is the answer for any rank inside it
        (0.25, ((-1.0, 5), (1.0, 10), (INF, 10)), -1.0),
        (0.9, ((-1.0, 5), (1.0, 10), (INF, 10)), 0.6),
        # unordered input, and buckets of the same bound added up
        (0.5, ((INF, 40), (1.0, 40), (0.1, 10), (0.5, 30)), 0.3),
        (0.5, ((0.1, 4), (0.1, 6), (0.5, 30), (1.0, 40), (INF, 40)), 0.3),
    ],
)
def test_quantile_as_prometheus_computes_it(q: float, buckets: Buckets, expected: float) -> None:
    """quantile() gives what Prometheus's histogram_quantile gives for the same buckets."""
    assert quantile(q, buckets) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "buckets",
    [
        (),
        ((INF, 10),),  # only +Inf: nothing to interpolate
        ((0.1, 0), (INF, 0)),  # no observations
        ((0.1, 5), (0.5, 10)),  # no +Inf bucket
    ],
)
def test_quantile_of_no_usable_histogram_is_missing(buckets: Buckets) -> None:
    """No observations, no +Inf bucket or nothing but +Inf: None (Prometheus: NaN), never zero."""
    assert quantile(0.95, buckets) is None


def test_quantile_zero_over_empty_first_buckets() -> None:
    """q=0 over empty first buckets is the lowest bound holding anything (Prometheus divides 0 by 0: NaN)."""
    assert quantile(0.0, ((0.1, 0), (0.5, 10), (INF, 10))) == 0.1


@pytest.mark.parametrize("q", [-0.1, 1.5, 95.0, math.nan])
def test_quantile_outside_zero_to_one_is_refused(q: float) -> None:
    """A quantile outside [0, 1] (95 meant as 0.95, say) is a ValueError, not a quiet None."""
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile(q, MID)


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        # a plain increase, bucket by bucket
        (
            Traffic(100, 10, ((0.1, 60), (INF, 100))),
            Traffic(150, 12, ((0.1, 90), (INF, 150))),
            Traffic(50, 2, ((0.1, 30), (INF, 50))),
        ),
        # nothing happened
        (Traffic(100, 10, ((INF, 100),)), Traffic(100, 10, ((INF, 100),)), Traffic(0, 0, ((INF, 0),))),
        # requests went down: restarted, the new total is what was counted since
        (
            Traffic(100, 10, ((0.1, 60), (INF, 100))),
            Traffic(30, 1, ((0.1, 20), (INF, 30))),
            Traffic(30, 1, ((0.1, 20), (INF, 30))),
        ),
        # only the errors went down: a restart too
        (Traffic(100, 10), Traffic(120, 3), Traffic(120, 3)),
        # only a bucket went down: a restart too
        (
            Traffic(100, 10, ((0.1, 60), (INF, 100))),
            Traffic(120, 12, ((0.1, 50), (INF, 120))),
            Traffic(120, 12, ((0.1, 50), (INF, 120))),
        ),
        # a bucket seen for the first time counts from zero
        (
            Traffic(100, 0, ((INF, 100),)),
            Traffic(110, 0, ((0.1, 4), (INF, 110))),
            Traffic(10, 0, ((0.1, 4), (INF, 10))),
        ),
        # no histogram at all
        (Traffic(5, 1), Traffic(8, 1), Traffic(3, 0)),
    ],
)
def test_increase(previous: Traffic, current: Traffic, expected: Traffic) -> None:
    """The increase between two cumulative readings; a counter that went down is a restart."""
    assert increase(previous, current) == expected


def test_increase_with_nothing_before_is_missing() -> None:
    """The first reading has nothing to compare with: None, not its total and not zero."""
    assert increase(None, Traffic(100, 10)) is None


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([], Traffic()),
        ([Traffic(10, 1, ((0.1, 5), (INF, 10)))], Traffic(10, 1, ((0.1, 5), (INF, 10)))),
        (
            [Traffic(10, 1, ((0.1, 5), (INF, 10))), Traffic(30, 6, ((0.1, 20), (INF, 30)))],
            Traffic(40, 7, ((0.1, 25), (INF, 40))),
        ),
        # a machine without a histogram adds its counts and leaves the buckets alone
        ([Traffic(10, 1, ((INF, 10),)), Traffic(5, 5)], Traffic(15, 6, ((INF, 10),))),
        ([Traffic(5, 5), Traffic(10, 1, ((INF, 10),))], Traffic(15, 6, ((INF, 10),))),
    ],
)
def test_total_adds_counts_and_buckets(parts: list[Traffic], expected: Traffic) -> None:
    """Traffic adds up: counts, and cumulative buckets bound by bound."""
    assert total(parts) == expected


def test_sums_judged_by_ratio_and_quantile() -> None:
    """The error ratio and quantile of a sum are those of all its requests together; none without requests."""
    fast = Traffic(10, 1, ((0.1, 10), (1.0, 10), (INF, 10)))
    slow = Traffic(30, 9, ((0.1, 0), (1.0, 30), (INF, 30)))
    combined = fast + slow
    assert combined.error_ratio == pytest.approx(0.25)
    assert combined.buckets == ((0.1, 10.0), (1.0, 40.0), (INF, 40.0))
    assert combined.quantile(0.5) == pytest.approx(0.1 + 0.9 * (20 - 10) / (40 - 10))
    nothing = Traffic()
    assert (nothing.error_ratio, nothing.quantile(0.95)) == (None, None)
