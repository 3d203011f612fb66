"""Health verdicts: of one probe, of a machine over time, of a region, and of flywatch's own view.

Pure functions over plain data; `now` comes in. The rules, in order of precedence:
- a probe passes when it was answered and every condition holds (status in the set, latency under the
  maximum, body contains, JSON field equals); a probe with no answer is a failure *without an answer*;
- a machine turns unhealthy after `unhealthy_after` failures in a row and healthy after `healthy_after`
  successes in a row (hysteresis); with no probe for `stale_after` seconds its probe verdict is unknown;
- an unreachable host, or a Fly check that is critical, makes a machine unhealthy whatever the probes say;
  Fly checks that pass make a machine healthy while our probes have no verdict yet;
- a region is down when no machine in it is healthy (or its hosts are unreachable), degraded when some fail,
  healthy when none fail, and unknown with nothing to judge;
- when every probed machine everywhere failed without an answer, the fault is likelier ours than the world's:
  every region is then unknown, and says why, instead of down.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


class RegionState(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ProbeConditions:
    expect_status: frozenset[int] = frozenset({200})
    max_latency: float | None = None  # seconds
    body_contains: str | None = None
    json_field: tuple[str, Any] | None = None  # (dotted path, expected value)


@dataclass(frozen=True)
class ProbeOutcome:
    """What one probe saw. `status` is None when nothing answered; `error` then says what happened."""

    at: float
    latency: float
    status: int | None = None
    body: str = ""
    error: str = ""
    # the machine took the connection but did not answer in time: a host that is there (overloaded, say),
    # not a silent one; an outage, or our own network gone, is a connection that cannot be made
    slow: bool = False


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    outcome: ProbeOutcome

    @property
    def answered(self) -> bool:
        return self.outcome.status is not None

    @property
    def label(self) -> str:
        """For flywatch_probes_total{result}: ok, failed (answered wrongly) or error (no answer)."""
        if self.ok:
            return "ok"
        return "failed" if self.answered else "error"


def _json_path(body: str, path: str) -> tuple[bool, Any]:
    try:
        value: Any = json.loads(body)
    except ValueError:
        return False, None
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return False, None
    return True, value


def judge(outcome: ProbeOutcome, conditions: ProbeConditions) -> ProbeResult:
    """Did the probe pass? The reason names the first condition that failed, with its numbers."""
    if outcome.status is None:
        return ProbeResult(False, f"no answer: {outcome.error or 'unknown error'}", outcome)
    if outcome.status not in conditions.expect_status:
        expected = ", ".join(str(s) for s in sorted(conditions.expect_status))
        return ProbeResult(False, f"status {outcome.status}, expected {expected}", outcome)
    if conditions.max_latency is not None and outcome.latency > conditions.max_latency:
        return ProbeResult(
            False,
            f"latency {outcome.latency * 1000:.0f} ms over {conditions.max_latency * 1000:.0f} ms",
            outcome,
        )
    if conditions.body_contains is not None and conditions.body_contains not in outcome.body:
        return ProbeResult(False, f"body does not contain {conditions.body_contains!r}", outcome)
    if conditions.json_field is not None:
        path, expected = conditions.json_field
        found, value = _json_path(outcome.body, path)
        if not found:
            return ProbeResult(False, f"JSON field {path} missing", outcome)
        if value != expected:
            return ProbeResult(False, f"JSON field {path} is {value!r}, expected {expected!r}", outcome)
    return ProbeResult(True, f"status {outcome.status} in {outcome.latency * 1000:.0f} ms", outcome)


@dataclass(frozen=True)
class Hysteresis:
    unhealthy_after: int = 2
    healthy_after: int = 2
    stale_after: float = 30.0  # seconds without a probe before the probe verdict is unknown


@dataclass(frozen=True)
class MachineHealth:
    """The probe history of one machine: its verdict, the current runs, the last result."""

    verdict: Verdict = Verdict.UNKNOWN
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    reason: str = "not probed yet"
    last_at: float | None = None
    last_answered: bool = True


def step(state: MachineHealth, result: ProbeResult, rules: Hysteresis) -> MachineHealth:
    """The machine's health after one more probe. After a gap longer than `stale_after`, the old history
    says nothing of now: the machine starts afresh."""
    if state.last_at is not None and result.outcome.at - state.last_at > rules.stale_after:
        state = MachineHealth()
    if result.ok:
        successes, failures = state.successes + 1, 0
        verdict = Verdict.HEALTHY if successes >= rules.healthy_after else state.verdict
        if state.verdict is Verdict.UNHEALTHY and verdict is Verdict.UNHEALTHY:
            reason = f"recovering: {successes} of {rules.healthy_after} probes passed ({result.reason})"
        else:
            reason = result.reason
    else:
        successes, failures = 0, state.failures + 1
        verdict = Verdict.UNHEALTHY if failures >= rules.unhealthy_after else state.verdict
        reason = f"{failures} failed probe(s) in a row: {result.reason}"
    return MachineHealth(
        verdict=verdict,
        successes=successes,
        failures=failures,
        reason=reason,
        last_at=result.outcome.at,
        last_answered=result.answered or result.outcome.slow,
    )


@dataclass(frozen=True)
class MachineSignals:
    """Everything known of one started machine's health at one moment."""

    machine_id: str
    region: str
    probe: MachineHealth
    host_ok: bool = True
    fly_checks: bool | None = None  # True: all passing, False: one critical, None: no verdict


@dataclass(frozen=True)
class MachineVerdict:
    machine_id: str
    region: str
    verdict: Verdict
    reason: str
    no_answer: bool = False  # unhealthy because nothing answered (rather than a wrong answer)
    unreachable: bool = False  # Fly reports the machine's host unreachable


def machine_verdict(signals: MachineSignals, now: float, rules: Hysteresis) -> MachineVerdict:
    probe = signals.probe
    stale = probe.last_at is None or now - probe.last_at > rules.stale_after
    probe_verdict = Verdict.UNKNOWN if stale else probe.verdict
    probe_reason = (
        ("no probe yet" if probe.last_at is None else f"last probe {now - probe.last_at:.0f}s ago")
        if stale
        else probe.reason
    )

    def verdict(v: Verdict, reason: str, *, no_answer: bool = False) -> MachineVerdict:
        return MachineVerdict(signals.machine_id, signals.region, v, reason, no_answer, not signals.host_ok)

    if not signals.host_ok:
        return verdict(Verdict.UNHEALTHY, "host unreachable (Fly host_status)", no_answer=True)
    if signals.fly_checks is False:
        return verdict(Verdict.UNHEALTHY, f"a Fly check is critical; probe: {probe_reason}")
    if probe_verdict is Verdict.UNHEALTHY:
        return verdict(Verdict.UNHEALTHY, probe_reason, no_answer=not probe.last_answered)
    if probe_verdict is Verdict.HEALTHY:
        return verdict(Verdict.HEALTHY, probe_reason)
    if signals.fly_checks is True:
        return verdict(Verdict.HEALTHY, f"Fly checks passing; probe: {probe_reason}")
    return verdict(Verdict.UNKNOWN, probe_reason)


@dataclass(frozen=True)
class RegionHealth:
    region: str
    state: RegionState
    reason: str
    healthy: int = 0
    unhealthy: int = 0
    unknown: int = 0
    no_answer: bool = False  # every failing machine failed without an answer


def region_health(region: str, machines: Iterable[MachineVerdict]) -> RegionHealth:
    verdicts = list(machines)
    healthy = sum(1 for m in verdicts if m.verdict is Verdict.HEALTHY)
    failing = [m for m in verdicts if m.verdict is Verdict.UNHEALTHY]
    unknown = sum(1 for m in verdicts if m.verdict is Verdict.UNKNOWN)
    summary = f"{healthy} healthy, {len(failing)} unhealthy, {unknown} unknown"
    example = f"; e.g. {failing[0].machine_id}: {failing[0].reason}" if failing else ""
    if not verdicts:
        state, reason = RegionState.UNKNOWN, "no started machine to judge"
    elif failing and not healthy and all(m.unreachable for m in failing):
        state, reason = RegionState.DOWN, f"region unreachable ({summary})"
    elif failing and not healthy and unknown:
        # some machines have no verdict yet: too little to call the region down (and move its load away)
        state, reason = (
            RegionState.UNKNOWN,
            f"no healthy machine, but not all judged yet ({summary}){example}",
        )
    elif failing and not healthy:
        state, reason = RegionState.DOWN, f"no healthy machine ({summary}){example}"
    elif not healthy:
        state, reason = RegionState.UNKNOWN, f"no verdict yet ({summary})"
    elif failing:
        state, reason = RegionState.DEGRADED, f"{summary}{example}"
    else:
        state, reason = RegionState.HEALTHY, summary
    return RegionHealth(
        region=region,
        state=state,
        reason=reason,
        healthy=healthy,
        unhealthy=len(failing),
        unknown=unknown,
        no_answer=bool(failing) and all(m.no_answer for m in failing),
    )


_DOUBT = "every region failed at once with no answer: flywatch's own connectivity is in doubt"


def _tally(regions: Iterable[RegionHealth]) -> tuple[int, int]:
    """(regions judged, of them down with nothing answering) of one app."""
    judged = [r for r in regions if r.state is not RegionState.UNKNOWN]
    return len(judged), sum(1 for r in judged if r.state is RegionState.DOWN and r.no_answer)


def _in_doubt(judged: int, silent: int) -> bool:
    return judged > 1 and silent == judged


def doubted(regions: Mapping[str, RegionHealth]) -> dict[str, RegionHealth]:
    """One app's regions while flywatch's own connectivity is in doubt: down becomes unknown, saying why."""
    return {
        name: replace(r, state=RegionState.UNKNOWN, reason=f"{_DOUBT} (was: {r.reason})")
        if r.state is RegionState.DOWN
        else r
        for name, r in regions.items()
    }


class Doubt:
    """The rule that spans apps, kept up to date one app at a time: each app's latest regions counted,
    so that judging the app just probed costs the same with 5 apps or 5,000 (recounting every app at each
    probe made a round of probes quadratic in the apps)."""

    def __init__(self) -> None:
        self._by_app: dict[str, tuple[int, int]] = {}
        self._judged = 0
        self._silent = 0

    @property
    def active(self) -> bool:
        """True when every region of every app that has machines is down with nothing answering at all."""
        return _in_doubt(self._judged, self._silent)

    def update(self, app: str, regions: Iterable[RegionHealth]) -> bool:
        """Count the app's latest regions (its own, not doubted); whether the doubt changed by it."""
        before = self.active
        self.forget(app)
        judged, silent = self._by_app[app] = _tally(regions)
        self._judged += judged
        self._silent += silent
        return self.active != before

    def forget(self, app: str) -> None:
        judged, silent = self._by_app.pop(app, (0, 0))
        self._judged -= judged
        self._silent -= silent


def doubt_own_connectivity(regions: Mapping[str, Mapping[str, RegionHealth]]) -> bool:
    """True when every region of every app that has machines is down with nothing answering at all."""
    doubt = Doubt()
    for app, per_app in regions.items():
        doubt.update(app, per_app.values())
    return doubt.active


def with_doubt(regions: Mapping[str, Mapping[str, RegionHealth]]) -> dict[str, dict[str, RegionHealth]]:
    """Every region's health, turned unknown (and saying why) when flywatch's own connectivity is in doubt."""
    if not doubt_own_connectivity(regions):
        return {app: dict(per_app) for app, per_app in regions.items()}
    return {app: doubted(per_app) for app, per_app in regions.items()}
