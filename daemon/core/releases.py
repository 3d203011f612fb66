"""Release verdicts: is the release that machines run now healthy, failing, still baking, or impossible to
judge? Pure: the numbers come in (requests and errors seen, p95 latency, machines unhealthy or crashed, the
previous release's own baseline), and the verdict goes out with every number and threshold that made it.

The rules, in order:
- a release whose machines crash (end `failed`) is failing, whatever else is seen;
- too many of its machines unhealthy (above `max_unhealthy_ratio`) is failing;
- with too little traffic (under `min_requests`), error ratio and latency say nothing: baking while the bake
  lasts, then inconclusive (never rolled back on missing data; the caller alerts);
- an error ratio above `max_error_ratio`, and clearly above the previous release's own (a release is not
  blamed for errors its predecessor had too), is failing; likewise a p95 latency above `max_p95_latency`
  and clearly above the baseline's;
- otherwise: baking until the bake has passed since the rollout ended, then healthy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ReleaseVerdict(StrEnum):
    BAKING = "baking"
    HEALTHY = "healthy"
    FAILING = "failing"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Thresholds:
    bake: float = 300.0
    max_error_ratio: float = 0.05
    max_p95_latency: float | None = None
    max_unhealthy_ratio: float = 0.25
    min_requests: int = 50
    baseline_margin: float = (
        1.5  # worse than the baseline by this factor before it counts against the release
    )


@dataclass(frozen=True)
class Baseline:
    """The previous release's own numbers, when known."""

    error_ratio: float | None = None
    p95_latency: float | None = None


@dataclass(frozen=True)
class Observation:
    """What was seen of the release since its rollout began."""

    rollout_done_at: float | None  # when every machine ran it; None while the rollout goes on
    machines: int  # machines running the release
    unhealthy: int = 0
    crashed: int = 0  # ended `failed`, or exited with an error at boot
    requests: float = 0.0
    errors: float = 0.0  # 5xx answers
    p95_latency: float | None = None


@dataclass(frozen=True)
class Judgement:
    verdict: ReleaseVerdict
    reason: str
    numbers: dict[str, float | None]


def judge(seen: Observation, limits: Thresholds, baseline: Baseline, now: float) -> Judgement:
    error_ratio = seen.errors / seen.requests if seen.requests > 0 else None
    unhealthy_ratio = seen.unhealthy / seen.machines if seen.machines else None
    baked = seen.rollout_done_at is not None and now - seen.rollout_done_at >= limits.bake
    numbers: dict[str, float | None] = {
        "machines": float(seen.machines),
        "unhealthy_ratio": unhealthy_ratio,
        "crashed": float(seen.crashed),
        "requests": seen.requests,
        "error_ratio": error_ratio,
        "p95_latency": seen.p95_latency,
        "baseline_error_ratio": baseline.error_ratio,
        "baseline_p95_latency": baseline.p95_latency,
        "baked_for": None if seen.rollout_done_at is None else now - seen.rollout_done_at,
    }

    def verdict(kind: ReleaseVerdict, reason: str) -> Judgement:
        return Judgement(kind, reason, numbers)

    if seen.crashed:
        return verdict(ReleaseVerdict.FAILING, f"{seen.crashed} of {seen.machines} machine(s) crashed")
    if unhealthy_ratio is not None and unhealthy_ratio > limits.max_unhealthy_ratio:
        return verdict(
            ReleaseVerdict.FAILING,
            f"{seen.unhealthy} of {seen.machines} machines unhealthy "
            f"({unhealthy_ratio:.0%} > {limits.max_unhealthy_ratio:.0%})",
        )
    if seen.requests < limits.min_requests or error_ratio is None:
        why = f"{seen.requests:.0f} requests seen, fewer than the {limits.min_requests} needed to judge"
        if not baked:
            return verdict(ReleaseVerdict.BAKING, why)
        return verdict(ReleaseVerdict.INCONCLUSIVE, f"{why}: kept, and to be looked at")
    if error_ratio > limits.max_error_ratio and _worse(error_ratio, baseline.error_ratio, limits):
        return verdict(
            ReleaseVerdict.FAILING,
            f"error ratio {error_ratio:.1%} > {limits.max_error_ratio:.1%}"
            + _against(baseline.error_ratio, "{:.1%}"),
        )
    if (
        limits.max_p95_latency is not None
        and seen.p95_latency is not None
        and seen.p95_latency > limits.max_p95_latency
        and _worse(seen.p95_latency, baseline.p95_latency, limits)
    ):
        return verdict(
            ReleaseVerdict.FAILING,
            f"p95 latency {seen.p95_latency * 1000:.0f} ms > {limits.max_p95_latency * 1000:.0f} ms"
            + _against(baseline.p95_latency, "{:.3f}s"),
        )
    if not baked:
        return verdict(ReleaseVerdict.BAKING, f"within limits so far (error ratio {error_ratio:.1%})")
    return verdict(
        ReleaseVerdict.HEALTHY, f"within limits for the whole bake (error ratio {error_ratio:.1%})"
    )


def _worse(value: float, baseline: float | None, limits: Thresholds) -> bool:
    """Clearly worse than what the previous release did (with no baseline: worse than nothing)."""
    return baseline is None or value > baseline * limits.baseline_margin


def _against(baseline: float | None, fmt: str) -> str:
    return "" if baseline is None else f" (previous release: {fmt.format(baseline)})"
