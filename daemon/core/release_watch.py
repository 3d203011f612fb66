"""The release watch's state machine, per app. Pure: the stored state, what the machines show now and the
traffic counted per release come in; the next state and the events to tell come out.

    new release seen -> baking -> healthy | inconclusive (kept, alerted) | failing
    failing, on_failure: rollback, a known-good release on record -> rollback waiting (for a deploy's
        leases, up to `lease_wait`) -> running (chunks of max_parallel) -> done | partial | failed
    done -> the known-good release is watched again; if it fails too: halted (stop, alert), nothing more
        is done automatically until a newer release arrives

Safety rules, each enforced where it is written:
- a release is never rolled back on missing data: too little traffic is baking, then inconclusive;
- one automatic rollback per release: a release rolled back is marked bad, and the watch never rolls it back
  again, nor ever returns to it;
- the rollback target is the last release that ran everywhere and was not judged failing, never the
  failing release itself;
- a failing rollback (the old release fails too, or a machine cannot be reverted) stops everything and alerts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from daemon.core.releases import Baseline, Judgement, Observation, ReleaseVerdict, Thresholds, judge
from daemon.core.rollback import (
    KnownGood,
    MachineRelease,
    ReleaseKey,
    known_good,
    newest_release,
    rolled_out,
    runs,
)
from daemon.core.traffic import Traffic, total

KEEP_PREVIOUS = 3  # known-good records kept besides the current one, for `flywatch rollback --to`
QUANTILE = 0.95
STOPPED = "stopped: nothing more is done by itself until a newer release"
# only a healthy verdict is final: an inconclusive release goes on being judged as traffic comes
FINAL = frozenset({ReleaseVerdict.HEALTHY})


class RollbackState(StrEnum):
    WAITING = "waiting"  # for a deploy's leases
    RUNNING = "running"
    DONE = "done"
    PARTIAL = "partial"  # done except machines others held past the wait; those are reverted when free
    FAILED = "failed"

    @property
    def active(self) -> bool:
        return self in {RollbackState.WAITING, RollbackState.RUNNING}


@dataclass(frozen=True)
class Rollback:
    from_release: ReleaseKey
    to: ReleaseKey
    started_at: float
    by: str = "auto"  # auto | manual
    reason: str = ""
    state: RollbackState = RollbackState.WAITING
    updated: tuple[str, ...] = ()  # machines put back on the known-good config
    destroyed: tuple[str, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)  # machine -> why (leased by others)
    failed: Mapping[str, str] = field(default_factory=dict)
    in_flight: tuple[str, ...] = ()  # machines being changed when this was written (a restart resumes them)
    note: str = ""
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.from_release.to_json(),
            "to": self.to.to_json(),
            "started_at": self.started_at,
            "by": self.by,
            "reason": self.reason,
            "state": self.state.value,
            "updated": list(self.updated),
            "destroyed": list(self.destroyed),
            "skipped": dict(self.skipped),
            "failed": dict(self.failed),
            "in_flight": list(self.in_flight),
            "note": self.note,
            "finished_at": self.finished_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rollback:
        return cls(
            from_release=ReleaseKey.from_json(data["from"]),
            to=ReleaseKey.from_json(data["to"]),
            started_at=float(data["started_at"]),
            by=str(data.get("by", "auto")),
            reason=str(data.get("reason", "")),
            state=RollbackState(data.get("state", "waiting")),
            updated=tuple(data.get("updated") or ()),
            destroyed=tuple(data.get("destroyed") or ()),
            skipped=dict(data.get("skipped") or {}),
            failed=dict(data.get("failed") or {}),
            in_flight=tuple(data.get("in_flight") or ()),
            note=str(data.get("note", "")),
            finished_at=data.get("finished_at"),
        )


@dataclass(frozen=True)
class Watched:
    """The release being judged: the newest one the machines run."""

    release: ReleaseKey
    first_seen: float
    rollout_done_at: float | None = None
    verdict: ReleaseVerdict = ReleaseVerdict.BAKING
    reason: str = ""
    numbers: Mapping[str, float | None] = field(default_factory=dict)
    after_rollback: bool = False  # the known-good release, watched again after a rollback to it
    traffic: Mapping[str, Traffic] = field(default_factory=dict)  # counted on its machines, per region
    baseline: Mapping[str, Traffic] = field(default_factory=dict)  # the known-good release's, last seen
    alerted: tuple[str, ...] = ()  # the alerts already sent for it (failing, inconclusive: once each)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.release.to_json(),
            "first_seen": self.first_seen,
            "rollout_done_at": self.rollout_done_at,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "numbers": dict(self.numbers),
            "after_rollback": self.after_rollback,
            "traffic": {region: traffic_json(t) for region, t in self.traffic.items()},
            "baseline": {region: traffic_json(t) for region, t in self.baseline.items()},
            "alerted": list(self.alerted),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Watched:
        return cls(
            release=ReleaseKey.from_json(data),
            first_seen=float(data["first_seen"]),
            rollout_done_at=data.get("rollout_done_at"),
            verdict=ReleaseVerdict(data.get("verdict", "baking")),
            reason=str(data.get("reason", "")),
            numbers=dict(data.get("numbers") or {}),
            after_rollback=bool(data.get("after_rollback", False)),
            traffic={region: traffic_from_json(t) for region, t in (data.get("traffic") or {}).items()},
            baseline={region: traffic_from_json(t) for region, t in (data.get("baseline") or {}).items()},
            alerted=tuple(data.get("alerted") or ()),
        )


def traffic_json(traffic: Traffic) -> dict[str, Any]:
    """JSON has no infinity: the +Inf bucket's bound is written as Prometheus writes it, "+Inf"."""
    buckets = [["+Inf" if math.isinf(le) else le, count] for le, count in traffic.buckets]
    return {"requests": traffic.requests, "errors": traffic.errors, "buckets": buckets}


def traffic_from_json(data: Mapping[str, Any]) -> Traffic:
    buckets = tuple((float(le), float(count)) for le, count in data.get("buckets") or ())
    return Traffic(float(data.get("requests", 0.0)), float(data.get("errors", 0.0)), buckets)


@dataclass(frozen=True)
class WatchState:
    """Everything the release watch keeps per app in the state store."""

    good: KnownGood | None = None
    previous: tuple[KnownGood, ...] = ()  # older known-good records, newest first
    watched: Watched | None = None
    bad: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # version -> {id, image, reason, at}
    rollback: Rollback | None = None
    halted: str = ""  # why nothing more is done automatically (until a newer release arrives)

    def to_json(self) -> dict[str, Any]:
        return {
            "good": self.good.to_json() if self.good else None,
            "previous": [g.to_json() for g in self.previous],
            "watched": self.watched.to_json() if self.watched else None,
            "bad": {k: dict(v) for k, v in self.bad.items()},
            "rollback": self.rollback.to_json() if self.rollback else None,
            "halted": self.halted,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> WatchState:
        if not data:
            return cls()
        return cls(
            good=KnownGood.from_json(data["good"]) if data.get("good") else None,
            previous=tuple(KnownGood.from_json(g) for g in data.get("previous") or ()),
            watched=Watched.from_json(data["watched"]) if data.get("watched") else None,
            bad=dict(data.get("bad") or {}),
            rollback=Rollback.from_json(data["rollback"]) if data.get("rollback") else None,
            halted=str(data.get("halted", "")),
        )

    def is_bad(self, release: ReleaseKey) -> bool:
        return str(release.version) in self.bad


@dataclass(frozen=True)
class Event:
    """Something to tell: written to the release history, and sent as an alert when `alert` is set."""

    kind: str  # release_seen, verdict, release_failing, release_inconclusive, rollback_started, ...
    summary: str
    release: ReleaseKey | None = None
    numbers: Mapping[str, float | None] = field(default_factory=dict)
    alert: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """The parts of the policy the watch needs."""

    limits: Thresholds
    on_failure: str = "rollback"  # rollback | alert | none
    lease_wait: float = 60.0


@dataclass(frozen=True)
class Step:
    state: WatchState
    events: tuple[Event, ...] = ()


def observe(
    machines: Sequence[MachineRelease], watched: Watched, now: float
) -> tuple[Observation, dict[str, Observation]]:
    """What the watched release's machines show, overall and per region (traffic from its own counts)."""
    mine = [m for m in machines if runs(m, watched.release)]

    def of(group: Sequence[MachineRelease], traffic: Traffic) -> Observation:
        return Observation(
            rollout_done_at=watched.rollout_done_at,
            machines=len(group),
            unhealthy=sum(1 for m in group if m.healthy is False and not m.crashed),
            crashed=sum(1 for m in group if m.crashed),
            requests=traffic.requests,
            errors=traffic.errors,
            p95_latency=traffic.quantile(QUANTILE),
        )

    overall = of(mine, total(watched.traffic.values()))
    regions = {}
    for region, traffic in sorted(watched.traffic.items()):
        group = [m for m in mine if m.region == region]
        # crashes and health are judged over the whole release; a region's own numbers are its traffic
        regions[region] = replace(of(group, traffic), unhealthy=0, crashed=0)
    del now
    return overall, regions


def assess(
    machines: Sequence[MachineRelease],
    watched: Watched,
    baseline: Mapping[str, Traffic],
    limits: Thresholds,
    now: float,
) -> Judgement:
    """The verdict over the whole release, then region by region: a region whose own traffic fails fails the
    release (a bad release can break only where its config or data differ), named in the reason."""
    overall, regions = observe(machines, watched, now)
    base_total = total(baseline.values())
    verdict = judge(overall, limits, _baseline(base_total), now)
    if verdict.verdict is ReleaseVerdict.FAILING:
        return verdict
    for region, seen in regions.items():
        local = judge(seen, limits, _baseline(baseline.get(region, base_total)), now)
        if local.verdict is ReleaseVerdict.FAILING:
            return Judgement(
                local.verdict,
                f"in {region}: {local.reason}",
                {**verdict.numbers, **_prefixed(region, local.numbers)},
            )
    return verdict


def _prefixed(region: str, numbers: Mapping[str, float | None]) -> dict[str, float | None]:
    return {f"{region}.{k}": v for k, v in numbers.items() if k in {"requests", "error_ratio", "p95_latency"}}


def _baseline(traffic: Traffic) -> Baseline:
    return Baseline(error_ratio=traffic.error_ratio, p95_latency=traffic.quantile(QUANTILE))


def advance(
    state: WatchState,
    machines: Sequence[MachineRelease],
    baseline: Mapping[str, Traffic],
    policy: Policy,
    now: float,
) -> Step:
    """One look at the app's releases. Machines are the process group's, canaries included."""
    newest = newest_release(machines)
    if newest is None or (state.rollback is not None and state.rollback.state.active):
        return Step(state)  # nothing released here yet; or a rollback is under way: it is judged when done
    events: list[Event] = []
    watched = state.watched
    if watched is None or watched.release != newest:
        after = (
            state.rollback is not None
            and state.rollback.state in {RollbackState.DONE, RollbackState.PARTIAL}
            and state.rollback.to == newest
            and not state.halted
        )
        watched = Watched(newest, first_seen=now, after_rollback=after)
        if not after:
            events.append(Event("release_seen", f"release {newest.label} ({newest.image}) seen", newest))
        if state.is_bad(newest):
            # back on a release rolled back once (a deploy retried, a human): told, never rolled back twice
            why = (
                f"{newest.label} ({newest.image}) was rolled back before and runs again: "
                "not rolled back twice"
            )
            events.append(Event("release_failing", why, newest, alert=True))
        known = [int(v) for v in state.bad] + ([state.good.release.version] if state.good else [])
        if state.halted and newest.version > max(known, default=0):
            state = replace(state, halted="")  # a release newer than any judged: the watch starts afresh
    if watched.rollout_done_at is None and rolled_out(machines, watched.release):
        watched = replace(watched, rollout_done_at=now)
    final = watched.verdict in FINAL and not state.is_bad(watched.release)
    if (
        baseline
        and not final
        and total(baseline.values()).requests >= total(watched.baseline.values()).requests
    ):
        # kept (a restart loses the window, not this), and only ever replaced by a larger sample
        watched = replace(watched, baseline=dict(baseline))
    if final:
        # a verdict reached after the whole bake is final: a crash a day later is an incident for the
        # health watch and the scaler, not a reason to freeze scaling or to roll back a proven release
        state = replace(state, watched=watched)
        return Step(_record_good(state, machines, watched, now), tuple(events))
    judgement = assess(machines, watched, watched.baseline, policy.limits, now)
    if state.is_bad(watched.release):
        # a release rolled back once is never rolled back again, nor returned to: only told
        judgement = Judgement(
            ReleaseVerdict.FAILING,
            f"marked bad: {state.bad[str(watched.release.version)].get('reason', '')}",
            judgement.numbers,
        )
    changed = judgement.verdict is not watched.verdict or not watched.reason
    watched = replace(watched, verdict=judgement.verdict, reason=judgement.reason, numbers=judgement.numbers)
    state = replace(state, watched=watched)
    if changed:
        events.append(
            Event(
                "verdict",
                f"{watched.release.label}: {judgement.verdict.value}: {judgement.reason}",
                watched.release,
                judgement.numbers,
            )
        )
        state, more = _on_verdict(state, watched, judgement, policy, now)
        state, more = _once(state, more)
        events.extend(more)
    state = _record_good(state, machines, state.watched or watched, now)
    return Step(state, tuple(events))


ONCE = frozenset({"release_failing", "release_inconclusive"})


def _once(state: WatchState, events: list[Event]) -> tuple[WatchState, list[Event]]:
    """A release's failing and inconclusive alerts go out once each: a verdict that flips back and forth
    as numbers move is written to the history every time, and alerted the first time only."""
    watched = state.watched
    if watched is None:
        return state, events
    told = set(watched.alerted)
    result = []
    for event in events:
        if event.alert and event.kind in ONCE:
            if event.kind in told:
                event = replace(event, alert=False)  # noqa: PLW2901 - the same event, not alerted again
            told.add(event.kind)
        result.append(event)
    return replace(state, watched=replace(watched, alerted=tuple(sorted(told)))), result


def _on_verdict(
    state: WatchState, watched: Watched, judgement: Judgement, policy: Policy, now: float
) -> tuple[WatchState, list[Event]]:
    release, numbers = watched.release, judgement.numbers
    if judgement.verdict is ReleaseVerdict.INCONCLUSIVE:
        return state, [
            Event(
                "release_inconclusive",
                f"{release.label} ({release.image}) is inconclusive: {judgement.reason}",
                release,
                numbers,
                alert=True,
            )
        ]
    if judgement.verdict is not ReleaseVerdict.FAILING or state.is_bad(release):
        return state, []
    if state.good is not None and state.good.release == release:
        # the release on record (adopted at first sight, say) fails: it is no longer one to return to
        state = replace(state, good=None)
    if watched.after_rollback:
        why = f"the release rolled back to, {release.label}, fails too: {judgement.reason}; {STOPPED}"
        # the release rolled back to is no longer known-good: no later rollback may return to it
        return replace(state, halted=why, good=None), [
            Event("rollback_failed", why, release, numbers, alert=True)
        ]
    failing = f"{release.label} ({release.image}) is failing: {judgement.reason}"
    if policy.on_failure == "none":
        return state, []
    if policy.on_failure == "alert":
        return state, [
            Event(
                "release_failing",
                f"{failing} (on_failure: alert, not rolled back)",
                release,
                numbers,
                alert=True,
            )
        ]
    good = state.good
    if good is None or good.release.version >= release.version or state.halted:
        why = state.halted or "no earlier known-good release on record to roll back to"
        return state, [
            Event("release_failing", f"{failing}; not rolled back: {why}", release, numbers, alert=True)
        ]
    return start_rollback(state, release, good, now, by="auto", reason=judgement.reason, numbers=numbers)


def start_rollback(
    state: WatchState,
    release: ReleaseKey,
    good: KnownGood,
    now: float,
    *,
    by: str,
    reason: str,
    numbers: Mapping[str, float | None] | None = None,
) -> tuple[WatchState, list[Event]]:
    """Mark `release` bad and start putting `good` back."""
    bad = {
        **state.bad,
        str(release.version): {"id": release.id, "image": release.image, "reason": reason, "at": now},
    }
    rollback = Rollback(release, good.release, now, by=by, reason=reason)
    state = replace(state, bad=bad, rollback=rollback, good=good)
    events = [
        Event(
            "release_failing" if by == "auto" else "rollback_requested",
            f"{release.label} ({release.image}) is failing: {reason}"
            if by == "auto"
            else f"rollback of {release.label} asked for by hand",
            release,
            numbers or {},
            alert=by == "auto",
        ),
        Event(
            "rollback_started",
            f"rolling {release.label} back to {good.release.label} ({good.release.image}): {reason}",
            release,
            numbers or {},
            alert=True,
            details={"to": good.release.to_json(), "by": by},
        ),
    ]
    return state, events


def _record_good(
    state: WatchState, machines: Sequence[MachineRelease], watched: Watched, now: float
) -> WatchState:
    """The known-good record follows the release that runs everywhere, once it is judged not failing (or, with
    nothing on record yet, the release found running: the best there is to return to)."""
    if state.is_bad(watched.release) or not rolled_out(machines, watched.release):
        return state
    good = state.good
    judged_good = watched.verdict in {ReleaseVerdict.HEALTHY, ReleaseVerdict.INCONCLUSIVE}
    if good is not None and good.release == watched.release:
        if watched.verdict is ReleaseVerdict.FAILING:
            return state
        refreshed = known_good(
            machines, watched.release, good.recorded_at, good.verdict or watched.verdict.value, good
        )
        if judged_good and good.verdict != watched.verdict.value:
            refreshed = replace(refreshed, verdict=watched.verdict.value)
        return state if refreshed == good else replace(state, good=refreshed)
    if good is None and watched.verdict is not ReleaseVerdict.FAILING:
        return replace(state, good=known_good(machines, watched.release, now, "adopted"))
    if good is not None and watched.verdict is ReleaseVerdict.INCONCLUSIVE and good.verdict == "healthy":
        return state  # an unproven release never replaces a proven one as the release to return to
    if good is not None and judged_good and watched.release.version > good.release.version:
        previous = (good, *[p for p in state.previous if p.release != good.release])[:KEEP_PREVIOUS]
        return replace(
            state, good=known_good(machines, watched.release, now, watched.verdict.value), previous=previous
        )
    return state


def finish_rollback(state: WatchState, rollback: Rollback, now: float) -> tuple[WatchState, list[Event]]:
    """The rollback's end: done (or partial), with the known-good release watched again; or failed: stop."""
    rollback = replace(rollback, finished_at=now)
    what = (
        f"{rollback.from_release.label} rolled back to {rollback.to.label}: "
        f"{len(rollback.updated)} machine(s) reverted, {len(rollback.destroyed)} destroyed"
    )
    details = {
        "updated": list(rollback.updated),
        "destroyed": list(rollback.destroyed),
        "skipped": dict(rollback.skipped),
        "failed": dict(rollback.failed),
        "result": rollback.state.value,
    }
    if rollback.state is RollbackState.FAILED:
        failures = "; ".join(f"{mid}: {why}" for mid, why in sorted(rollback.failed.items()))
        why = (
            f"rollback of {rollback.from_release.label} to {rollback.to.label} failed: {failures}; {STOPPED}"
        )
        state = replace(state, rollback=rollback, halted=why)
        return state, [Event("rollback_failed", why, rollback.from_release, alert=True, details=details)]
    if rollback.note:
        what += f"; {rollback.note}"
    if rollback.skipped:
        what += "; not rolled back, held by others' leases past the wait: " + ", ".join(
            f"{mid} ({why})" for mid, why in sorted(rollback.skipped.items())
        )
    watched = Watched(rollback.to, first_seen=now, after_rollback=True)
    state = replace(state, rollback=rollback, watched=watched)
    return state, [Event("rollback_finished", what, rollback.from_release, alert=True, details=details)]


@dataclass(frozen=True)
class Hold:
    """Why scaling must hold because of a release: `down` freezes scale-down, `all` freezes every change
    ("" when it need not)."""

    down: str = ""
    all: str = ""


def hold(state: WatchState, now: float, bake: float) -> Hold:
    """A rollback under way, or a failing release about to be rolled back, freeze every change (a clone made
    now would copy the bad release, a machine stopped now could be the one being reverted); a release baking
    freezes scale-down (the old capacity stays until the new release has proven itself)."""
    rollback = state.rollback
    if rollback is not None and rollback.state.active:
        why = f"rollback of {rollback.from_release.label} to {rollback.to.label} under way"
        return Hold(why, why)
    watched = state.watched
    if watched is None:
        return Hold()
    if watched.verdict is ReleaseVerdict.FAILING:
        # no rollback under way (alert only, none possible, or halted): capacity may still grow, but no
        # machine is taken away from a release in trouble
        return Hold(f"release {watched.release.label} is failing: {watched.reason}")
    if watched.verdict is ReleaseVerdict.BAKING:
        since = watched.rollout_done_at if watched.rollout_done_at is not None else watched.first_seen
        return Hold(f"release {watched.release.label} is baking ({max(now - since, 0):.0f}s of {bake:g}s)")
    return Hold()
