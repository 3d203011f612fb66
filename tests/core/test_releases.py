"""Release verdicts (core/releases.py): table-driven, pure."""

from __future__ import annotations

import pytest

from daemon.core.releases import Baseline, Observation, ReleaseVerdict, Thresholds, judge

LIMITS = Thresholds(
    bake=300.0, max_error_ratio=0.05, max_p95_latency=0.8, max_unhealthy_ratio=0.25, min_requests=50
)
T0 = 10_000.0
B, H, F, NONE = (
    ReleaseVerdict.BAKING,
    ReleaseVerdict.HEALTHY,
    ReleaseVerdict.FAILING,
    ReleaseVerdict.INCONCLUSIVE,
)


def seen(**changes: object) -> Observation:
    base = {"rollout_done_at": T0, "machines": 4, "requests": 1000.0, "errors": 10.0, "p95_latency": 0.2}
    return Observation(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("observation", "baseline", "now", "verdict", "reason"),
    [
        (seen(), Baseline(), T0 + 400, H, "within limits for the whole bake"),
        (seen(), Baseline(), T0 + 100, B, "within limits so far"),
        (seen(rollout_done_at=None), Baseline(), T0 + 1000, B, "within limits so far"),
        (seen(crashed=1), Baseline(), T0 + 10, F, "1 of 4 machine(s) crashed"),
        (seen(unhealthy=2), Baseline(), T0 + 10, F, "2 of 4 machines unhealthy (50% > 25%)"),
        (seen(unhealthy=1), Baseline(), T0 + 400, H, "within limits"),
        (seen(errors=200.0), Baseline(), T0 + 10, F, "error ratio 20.0% > 5.0%"),
        (
            seen(errors=200.0),
            Baseline(error_ratio=0.18),
            T0 + 400,
            H,
            "within limits",
        ),  # no worse than before
        (seen(errors=200.0), Baseline(error_ratio=0.02), T0 + 10, F, "(previous release: 2.0%)"),
        (seen(p95_latency=1.5), Baseline(), T0 + 10, F, "p95 latency 1500 ms > 800 ms"),
        (seen(p95_latency=1.5), Baseline(p95_latency=1.4), T0 + 400, H, "within limits"),
        (seen(requests=10.0, errors=5.0), Baseline(), T0 + 100, B, "10 requests seen, fewer than the 50"),
        (seen(requests=10.0, errors=5.0), Baseline(), T0 + 400, NONE, "kept, and to be looked at"),
        (
            seen(requests=0.0, errors=0.0, crashed=2),
            Baseline(),
            T0 + 400,
            F,
            "crashed",
        ),  # crashes need no traffic
    ],
)
def test_judge(
    observation: Observation, baseline: Baseline, now: float, verdict: ReleaseVerdict, reason: str
) -> None:
    """Each rule gives its verdict with its numbers; missing traffic is never a failure."""
    judgement = judge(observation, LIMITS, baseline, now)
    assert judgement.verdict is verdict
    assert reason in judgement.reason


def test_numbers_are_kept_with_the_verdict() -> None:
    """The verdict carries every number it was made from, for the record and `flywatch releases`."""
    judgement = judge(seen(errors=100.0), LIMITS, Baseline(error_ratio=0.01), T0 + 400)
    assert judgement.numbers["error_ratio"] == pytest.approx(0.1)
    assert judgement.numbers["baseline_error_ratio"] == 0.01
    assert judgement.numbers["baked_for"] == 400.0
