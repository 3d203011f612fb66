"""The scaling decision: pure, `now` passed in, every decision a record of its inputs, rule and numbers.

Per app, per region, per tick:
1. bounds: the policy's min and max, raised by any scheduled window open now (cron, duration, time zone);
2. demand: ceil(metric / target_per_machine), or the current count while the metric is within the
   tolerance band; with the metric missing or stale, `on_missing_metric` decides (hold: the current count;
   max: the region's max), and missing data never scales anything down;
3. failover: the demand of a region that is down moves to the healthy and degraded regions (within their
   max; a full region's share spills over to the others), and comes back on recovery; a down region
   itself is left alone;
4. clamp to the bounds; then per direction a stabilization window (scale down only to the highest
   recommendation inside it, up only to the lowest; a region seen for the first time waits a whole down
   window), a cooldown, and a maximum step;
5. safety: one kind of change per region per tick; no scale down while a release rolls out or bakes,
   while the region's health is unknown, or on missing data; but a region above its max comes down to
   the max (never below it) whatever holds it, step by step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter

HOLD, SCALE_UP, SCALE_DOWN = "hold", "scale_up", "scale_down"
RECEIVING = ("healthy", "degraded")  # regions that may take a down region's demand


@dataclass(frozen=True)
class Bounds:
    min: int
    max: int


@dataclass(frozen=True)
class Direction:
    stabilization: float = 0.0
    cooldown: float = 0.0
    max_step: int = 1000


@dataclass(frozen=True)
class ScheduleWindow:
    cron: str
    duration: float
    timezone: str
    regions: Mapping[str, tuple[int | None, int | None]]  # region -> (min, max) while the window is open

    def open_at(self, now: float) -> bool:
        """Did the cron fire within the last `duration` seconds (in the schedule's own time zone)?"""
        zone = ZoneInfo(self.timezone)
        # one second past now, added before converting: aware datetime arithmetic is wall-clock arithmetic
        # and drops `fold`, which would move the start an hour off around a DST change
        local = datetime.fromtimestamp(now + 1, tz=UTC).astimezone(zone)
        # the latest firing at or before now; croniter walks wall-clock time in the zone, DST included
        last: datetime = croniter(self.cron, local).get_prev(datetime)
        return now < last.timestamp() + self.duration


@dataclass(frozen=True)
class Rules:
    target_per_machine: float
    tolerance: float = 0.1
    up: Direction = field(default_factory=lambda: Direction(0.0, 10.0, 4))
    down: Direction = field(default_factory=lambda: Direction(60.0, 30.0, 1))
    on_missing_metric: str = "hold"  # hold | max
    schedules: tuple[ScheduleWindow, ...] = ()


@dataclass(frozen=True)
class RegionInput:
    region: str
    bounds: Bounds
    started: int  # machines of the process group running now
    machines: Mapping[str, int] = field(default_factory=dict)  # by state, for the record
    metric: float | None = None  # fresh value, or None: missing
    metric_age: float | None = None
    health: str = "unknown"  # healthy | degraded | down | unknown
    health_reason: str = ""
    # False when the region is down because nothing there answers (an outage). A region down with machines
    # that answer, but wrongly (503s from overload, say), is reachable: more machines may be the cure.
    reachable: bool = True
    # True when the metric is a per-machine value (an average or a maximum over the region's machines):
    # the region's load is then that value times its machines
    per_machine: bool = False
    pending: int = 0  # machines on their way up or down (starting, stopping, replacing...): not settled yet

    @property
    def out(self) -> bool:
        """Down and unreachable: left alone, and its demand moves to the other regions."""
        return self.health == "down" and not self.reachable


@dataclass(frozen=True)
class Memory:
    """What a region's decisions must remember across ticks and restarts (kept in the state store)."""

    recommendations: tuple[tuple[float, int], ...] = ()  # (at, desired), within the longest window
    last_scale_up: float | None = None
    last_scale_down: float | None = None
    last_demand: int | None = None  # demand while last judged healthy: what moves away if it goes down


@dataclass(frozen=True)
class Decision:
    region: str
    action: str  # scale_up | scale_down | hold
    count: int
    current: int
    desired: int
    rule: str
    reason: str
    inputs: Mapping[str, object]
    not_acting: Mapping[str, str]
    memory: Memory

    @property
    def acts(self) -> bool:
        return self.action != HOLD and self.count > 0


def effective_bounds(
    bounds: Bounds, region: str, schedules: Sequence[ScheduleWindow], now: float
) -> tuple[Bounds, list[str]]:
    """The policy's bounds, raised by the scheduled windows open now; and which windows did it."""
    low, high = bounds.min, bounds.max
    notes = []
    for schedule in schedules:
        if region not in schedule.regions or not schedule.open_at(now):
            continue
        raise_min, raise_max = schedule.regions[region]
        if raise_min is not None and raise_min > low:
            low = raise_min
        if raise_max is not None and raise_max > high:
            high = raise_max
        notes.append(f"schedule {schedule.cron!r} ({schedule.timezone}) open")
    return Bounds(low, max(high, low)), notes


def demand_of(region: RegionInput, rules: Rules, bounds: Bounds) -> tuple[int, str, str]:
    """Machines the region needs by its own metric: (demand, rule, reason)."""
    if region.metric is None:
        if rules.on_missing_metric == "max":
            return bounds.max, "missing_metric", "metric missing or stale: on_missing_metric max"
        return region.started, "missing_metric", "metric missing or stale: holding the current count"
    # the region's total load: a per-machine value (avg, max) counts once for every machine running
    total = region.metric * region.started if region.per_machine else region.metric
    shown = (
        f"{region.metric:g} per machine x {region.started}" if region.per_machine else f"{region.metric:g}"
    )
    ratio = total / (region.started * rules.target_per_machine) if region.started else math.inf
    if region.started and abs(ratio - 1.0) <= rules.tolerance:
        reason = (
            f"{shown} over {region.started} machines is {ratio:.2f} of the target "
            f"{rules.target_per_machine:g}: within the tolerance {rules.tolerance:g}"
        )
        return region.started, "tolerance", reason
    needed = math.ceil(total / rules.target_per_machine - 1e-9)
    reason = f"{shown} / target {rules.target_per_machine:g} per machine = {needed} machine(s)"
    return needed, "target_tracking", reason


def failover_shares(
    regions: Sequence[RegionInput],
    demands: Mapping[str, int],
    bounds: Mapping[str, Bounds],
    memories: Mapping[str, Memory],
) -> tuple[dict[str, int], dict[str, str]]:
    """Extra machines per receiving region, for the demand of regions that are down; and why."""
    down = [r for r in regions if r.out]
    receivers = [r for r in regions if r.health in RECEIVING]
    extra: dict[str, int] = {}
    notes: dict[str, str] = {}
    if not down or not receivers:
        return extra, notes
    # the demand it had while last judged healthy (0 is a demand too), else what it was running
    last = [memories.get(r.region, Memory()).last_demand for r in down]
    moved = sum(max(r.started if d is None else d, 0) for r, d in zip(down, last, strict=True))
    names = ", ".join(r.region for r in down)
    room = {r.region: max(bounds[r.region].max - demands[r.region], 0) for r in receivers}
    # even shares; what a region cannot take within its max spills over to those with room left
    while moved > 0 and (takers := sorted(code for code, left in room.items() if left > 0)):
        shares = [moved // len(takers) + (1 if i < moved % len(takers) else 0) for i in range(len(takers))]
        for code, share in zip(takers, shares, strict=True):
            given = min(share, room[code])
            room[code] -= given
            moved -= given
            extra[code] = extra.get(code, 0) + given
    extra = {code: given for code, given in extra.items() if given}
    notes = {code: f"failover: +{given} for {names} (down)" for code, given in extra.items()}
    return extra, notes


def _window(recommendations: Sequence[tuple[float, int]], now: float, seconds: float) -> list[int]:
    """The recommendations in force over the last `seconds`: those made in it, and the last one made
    before it, which held until the next (ticks further apart than the window, or a gap with no tick at
    all, leave the window's start covered by what was recommended then, not by nothing)."""
    inside = [desired for at, desired in recommendations if now - at <= seconds]
    started = [desired for at, desired in recommendations if now - at >= seconds]  # made by its start
    if seconds > 0 and started:
        inside.append(started[-1])
    return inside


def decide(
    now: float,
    regions: Sequence[RegionInput],
    rules: Rules,
    memories: Mapping[str, Memory],
    *,
    release_active: str = "",
    rollout_active: str = "",
) -> list[Decision]:
    """One decision per region. `release_active`: why a release (rolling out or baking) freezes scale-down
    now; `rollout_active`: why a rollout under way also freezes scale-up ("" when none): clones made now would
    race the deploy and copy a release nobody has verified. The region's min is enforced all the same."""
    memories = {region: _sane(memory, now) for region, memory in memories.items()}
    bounds: dict[str, Bounds] = {}
    schedule_notes: dict[str, list[str]] = {}
    demands: dict[str, int] = {}
    demand_rules: dict[str, tuple[str, str]] = {}
    for region in regions:
        bounds[region.region], schedule_notes[region.region] = effective_bounds(
            region.bounds, region.region, rules.schedules, now
        )
        demand, rule, reason = demand_of(region, rules, bounds[region.region])
        demands[region.region] = demand
        demand_rules[region.region] = (rule, reason)
    extra, failover_notes = failover_shares(regions, demands, bounds, memories)
    longest = max(rules.up.stabilization, rules.down.stabilization)
    decisions = []
    for region in regions:
        memory = memories.get(region.region, Memory())
        bound = bounds[region.region]
        rule, reason = demand_rules[region.region]
        demand = demands[region.region] + extra.get(region.region, 0)
        if region.region in extra:
            rule, reason = "failover", f"{reason}; {failover_notes[region.region]}"
        desired = min(max(demand, bound.min), bound.max)
        if desired != demand:
            side = "min" if desired > demand else "max"
            rule, reason = (
                f"{side}_bound",
                f"{reason}; {side} {getattr(bound, side)}"
                + (f" ({'; '.join(schedule_notes[region.region])})" if schedule_notes[region.region] else ""),
            )
        # the longest window's recommendations, and the last one before it (in force at its start)
        kept = memory.recommendations
        older = [(at, d) for at, d in kept if now - at > longest][-1:] if longest > 0 else []
        history = (*older, *((at, d) for at, d in kept if now - at <= longest))
        if not memory.recommendations and rules.down.stabilization > 0:
            # first sight of the region (new, or its memory lost): the down window it has not watched is
            # taken to have recommended the current count, so a first scale-down waits a window like any other
            history = ((now, max(desired, region.started)),)
        recommendations = (*history, (now, desired))
        last_demand = memory.last_demand
        if region.health in RECEIVING and region.metric is not None:
            last_demand = demands[region.region]
        new_memory = replace(memory, recommendations=recommendations, last_demand=last_demand)
        inputs: dict[str, object] = {
            "metric": region.metric,
            "metric_age": region.metric_age,
            "started": region.started,
            "machines": dict(region.machines),
            "health": region.health,
            "health_reason": region.health_reason,
            "min": bound.min,
            "max": bound.max,
            "target_per_machine": rules.target_per_machine,
            "demand": demands[region.region],
            "failover_extra": extra.get(region.region, 0),
            "schedules": schedule_notes[region.region],
        }
        decisions.append(
            _act(
                now,
                region,
                bound,
                desired,
                rule,
                reason,
                inputs,
                new_memory,
                rules,
                release_active,
                rollout_active,
            )
        )
    return decisions


def _act(
    now: float,
    region: RegionInput,
    bound: Bounds,
    desired: int,
    rule: str,
    reason: str,
    inputs: dict[str, object],
    memory: Memory,
    rules: Rules,
    release_active: str,
    rollout_active: str = "",
) -> Decision:
    current = region.started
    not_acting: dict[str, str] = {}

    def hold(why_rule: str, why: str) -> Decision:
        not_acting[why_rule] = why
        return Decision(
            region.region, HOLD, 0, current, desired, rule, reason, inputs, dict(not_acting), memory
        )

    if region.out:
        return hold(
            "region_down", f"{region.region} is down ({region.health_reason}): left alone, its demand moved"
        )
    if desired != current and rollout_active:
        # even the bounds wait: counts are off while machines are replaced, and clones would copy a release
        # nobody has verified; the rollout ends, then the bounds are enforced
        return hold("rollout", f"a rollout is under way ({rollout_active}): no scaling until it ends")
    if desired != current and region.pending:
        # the last change has not settled: acting again on counts that are moving would double it
        return hold("settling", f"{region.pending} machine(s) still starting or stopping: waiting for them")
    if desired > current:
        lowest = min(_window(memory.recommendations, now, rules.up.stabilization))
        target = max(min(desired, lowest), current) if rule != "min_bound" else desired
        if target <= current:
            return hold(
                "stabilization", f"lowest recommendation in the last {rules.up.stabilization:g}s is {lowest}"
            )
        since = None if memory.last_scale_up is None else now - memory.last_scale_up
        if since is not None and since < rules.up.cooldown:
            return hold(
                "cooldown", f"scaled up {since:.0f}s ago; scale-up cooldown is {rules.up.cooldown:g}s"
            )
        count = min(target - current, rules.up.max_step)
        if count < target - current:
            not_acting["max_step"] = f"{target - current} wanted, {rules.up.max_step} at most per step"
        return Decision(
            region.region, SCALE_UP, count, current, desired, rule, reason, inputs, not_acting, memory
        )
    if desired < current:
        blocked = _down_blocked(region, rule, release_active)
        if blocked and current > bound.max:
            # the max bound is enforced all the same, whatever the demand: down to the max and no further
            not_acting[blocked[0]] = f"{blocked[1]}: only down to the max {bound.max}"
            desired, rule, reason, blocked = bound.max, "max_bound", f"{reason}; max {bound.max}", None
        if blocked:
            return hold(*blocked)
        highest = max(_window(memory.recommendations, now, rules.down.stabilization))
        # no window holds the count above the max (as none holds it below the min)
        target = min(max(desired, highest), current, bound.max)
        if target >= current:
            return hold(
                "stabilization",
                f"highest recommendation in the last {rules.down.stabilization:g}s is {highest}",
            )
        last_change = max(
            (t for t in (memory.last_scale_up, memory.last_scale_down) if t is not None), default=None
        )
        since = None if last_change is None else now - last_change
        if since is not None and since < rules.down.cooldown:
            return hold(
                "cooldown", f"scaled {since:.0f}s ago; scale-down cooldown is {rules.down.cooldown:g}s"
            )
        count = min(current - target, rules.down.max_step)
        if count < current - target:
            not_acting["max_step"] = f"{current - target} could go, {rules.down.max_step} at most per step"
        return Decision(
            region.region, SCALE_DOWN, count, current, desired, rule, reason, inputs, not_acting, memory
        )
    return Decision(region.region, HOLD, 0, current, desired, rule, reason, inputs, not_acting, memory)


def _down_blocked(region: RegionInput, rule: str, release_active: str) -> tuple[str, str] | None:
    """Why the region must not scale down now, if it must not. Policy bounds are enforced all the same."""
    if rule == "max_bound" and region.health != "unknown":
        return None  # the policy's max holds whatever the metric says, once the region can be judged
    if region.health == "unknown":
        return (
            "health_unknown",
            f"the region's health is unknown ({region.health_reason}): not scaling down",
        )
    if region.metric is None:
        return ("missing_metric", "missing or stale data never scales down")
    if release_active:
        return ("release_freeze", f"a release is rolling out or baking: {release_active}")
    if region.health == "unknown":
        return (
            "health_unknown",
            f"the region's health is unknown ({region.health_reason}): not scaling down",
        )
    if region.health == "down":
        return (
            "region_failing",
            f"no machine in the region is healthy ({region.health_reason}): not scaling down",
        )
    return None


def _sane(memory: Memory, now: float) -> Memory:
    """A memory with nothing from the future: after a clock step back (or a store moved between hosts), a
    future cooldown start would block scaling for the whole skew, and a future recommendation would sit in
    every window; both are dropped."""
    return Memory(
        recommendations=tuple((at, d) for at, d in memory.recommendations if at <= now),
        last_scale_up=memory.last_scale_up
        if memory.last_scale_up is None or memory.last_scale_up <= now
        else None,
        last_scale_down=memory.last_scale_down
        if memory.last_scale_down is None or memory.last_scale_down <= now
        else None,
        last_demand=memory.last_demand,
    )


def after_action(memory: Memory, action: str, now: float) -> Memory:
    """The memory once a scale action has been carried out (its cooldown starts now)."""
    if action == SCALE_UP:
        return replace(memory, last_scale_up=now)
    if action == SCALE_DOWN:
        return replace(memory, last_scale_down=now)
    return memory
