"""The scaling decision core (core/scaling.py): table-driven, `now` injected, ticks simulated by feeding each
decision's memory (after `after_action` for the acting ones) into the next call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from daemon.core.scaling import (
    HOLD,
    SCALE_DOWN,
    SCALE_UP,
    Bounds,
    Decision,
    Direction,
    Memory,
    RegionInput,
    Rules,
    ScheduleWindow,
    after_action,
    decide,
    effective_bounds,
    failover_shares,
)

T0 = 1_790_000_000.0  # any instant: the core never reads the clock
RULES = Rules(target_per_machine=10)  # the defaults: up 0s/10s/4, down 60s/30s/1, tolerance 0.1, hold
INSTANT = Rules(  # no window, no cooldown, no step: only the rule under test acts
    target_per_machine=10, up=Direction(0, 0, 1000), down=Direction(0, 0, 1000)
)
PARIS = ZoneInfo("Europe/Paris")


def region(
    code: str = "iad",
    started: int = 2,
    metric: float | None = 20.0,
    *,
    low: int = 0,
    high: int = 20,
    health: str = "healthy",
    reason: str = "",
    reachable: bool | None = None,
) -> RegionInput:
    return RegionInput(
        region=code,
        bounds=Bounds(low, high),
        started=started,
        metric=metric,
        health=health,
        health_reason=reason,
        reachable=health != "down" if reachable is None else reachable,  # "down" here: an outage
    )


def one(
    subject: RegionInput,
    rules: Rules = RULES,
    memory: Memory | None = None,
    *,
    now: float = T0,
    release: str = "",
) -> Decision:
    memories = {} if memory is None else {subject.region: memory}
    [decision] = decide(now, [subject], rules, memories, release_active=release)
    return decision


@dataclass
class Fleet:
    """Regions whose counts follow the decisions, tick after tick, as the reconciler would carry them out."""

    rules: Rules
    bounds: dict[str, Bounds]
    started: dict[str, int]
    memories: dict[str, Memory] = field(default_factory=dict)
    actions: list[tuple[float, str, str, int]] = field(default_factory=list)  # (now, region, action, count)

    def tick(
        self,
        now: float,
        metrics: Mapping[str, float | None],
        health: Mapping[str, str] | None = None,
        release: str = "",
    ) -> dict[str, Decision]:
        inputs = [
            RegionInput(
                region=code,
                bounds=bounds,
                started=self.started[code],
                metric=metrics.get(code),
                health=(health or {}).get(code, "healthy"),
                health_reason="probes failing",
                reachable=(health or {}).get(code, "healthy") != "down",
            )
            for code, bounds in self.bounds.items()
        ]
        decisions = decide(now, inputs, self.rules, self.memories, release_active=release)
        for decision in decisions:
            memory = decision.memory
            if decision.acts:
                sign = 1 if decision.action == SCALE_UP else -1
                self.started[decision.region] += sign * decision.count
                memory = after_action(memory, decision.action, now)
                self.actions.append((now, decision.region, decision.action, decision.count))
            self.memories[decision.region] = memory
        return {d.region: d for d in decisions}


def paris(*args: int, fold: int = 0) -> float:
    """An instant given as Paris wall-clock time (fold=1: the second pass of a repeated hour)."""
    return datetime(*args, tzinfo=PARIS, fold=fold).timestamp()


# ---------------------------------------------------------------------------- demand: target tracking


@pytest.mark.parametrize(
    ("metric", "started", "desired", "rule", "reason"),
    [
        (45.0, 4, 5, "target_tracking", "45 / target 10 per machine = 5 machine(s)"),
        (25.0, 4, 3, "target_tracking", "25 / target 10 per machine = 3 machine(s)"),
        (35.0, 4, 4, "target_tracking", "35 / target 10 per machine = 4 machine(s)"),
        (
            43.0,
            4,
            4,
            "tolerance",
            "43 over 4 machines is 1.07 of the target 10: within the tolerance 0.1",
        ),
        (
            36.0,
            4,
            4,
            "tolerance",
            "36 over 4 machines is 0.90 of the target 10: within the tolerance 0.1",
        ),
        (30.0, 3, 3, "tolerance", "30 over 3 machines is 1.00 of the target 10: within the tolerance 0.1"),
        (5.0, 0, 1, "target_tracking", "5 / target 10 per machine = 1 machine(s)"),
        (0.0, 0, 0, "target_tracking", "0 / target 10 per machine = 0 machine(s)"),
        (0.0, 3, 0, "target_tracking", "0 / target 10 per machine = 0 machine(s)"),
        (30.000000001, 1, 3, "target_tracking", "30 / target 10 per machine = 3 machine(s)"),
    ],
)
def test_target_tracking_and_tolerance(
    metric: float, started: int, desired: int, rule: str, reason: str
) -> None:
    """Demand is ceil(metric / target), or the current count while the load per machine is within the band."""
    decision = one(region(started=started, metric=metric), INSTANT)
    assert (decision.desired, decision.rule, decision.reason) == (desired, rule, reason)
    expected = SCALE_UP if desired > started else SCALE_DOWN if desired < started else HOLD
    assert decision.action == expected
    assert decision.count == abs(desired - started)
    assert decision.inputs["demand"] == desired


def test_decision_records_its_inputs() -> None:
    """Every decision carries the numbers it was made from, for `flywatch explain`."""
    subject = RegionInput(
        "iad",
        Bounds(1, 8),
        started=2,
        machines={"started": 2, "stopped": 1},
        metric=45.0,
        metric_age=3.0,
        health="healthy",
        health_reason="all 2 machines pass",
    )
    decision = one(subject)
    assert decision.inputs == {
        "metric": 45.0,
        "metric_age": 3.0,
        "started": 2,
        "machines": {"started": 2, "stopped": 1},
        "health": "healthy",
        "health_reason": "all 2 machines pass",
        "min": 1,
        "max": 8,
        "target_per_machine": 10,
        "demand": 5,
        "failover_extra": 0,
        "schedules": [],
    }
    assert (decision.action, decision.count, decision.current, decision.not_acting) == (SCALE_UP, 3, 2, {})


# ---------------------------------------------------------------------------- bounds and missing metrics


@pytest.mark.parametrize(
    ("subject", "rules", "action", "count", "desired", "rule", "reason"),
    [
        (
            region(started=5, metric=150.0, high=8),
            INSTANT,
            SCALE_UP,
            3,
            8,
            "max_bound",
            "150 / target 10 per machine = 15 machine(s); max 8",
        ),
        (
            region(started=3, metric=5.0, low=3),
            INSTANT,
            HOLD,
            0,
            3,
            "min_bound",
            "5 / target 10 per machine = 1 machine(s); min 3",
        ),
        (
            region(started=1, metric=None, low=3),
            INSTANT,
            SCALE_UP,
            2,
            3,
            "min_bound",
            "metric missing or stale: holding the current count; min 3",
        ),
        (
            region(started=4, metric=None, high=9),
            INSTANT,
            HOLD,
            0,
            4,
            "missing_metric",
            "metric missing or stale: holding the current count",
        ),
        (
            region(started=4, metric=None, high=9),
            Rules(target_per_machine=10, on_missing_metric="max", up=Direction(0, 0, 1000)),
            SCALE_UP,
            5,
            9,
            "missing_metric",
            "metric missing or stale: on_missing_metric max",
        ),
        (
            region(started=12, metric=None, high=9),
            INSTANT,
            SCALE_DOWN,
            3,
            9,
            "max_bound",
            "metric missing or stale: holding the current count; max 9",
        ),
    ],
    ids=[
        "max clamps demand",
        "min clamps demand",
        "min enforced with the metric missing",
        "missing metric holds",
        "missing metric: on_missing_metric max",
        "max enforced with the metric missing",
    ],
)
def test_bounds_and_missing_metric(
    subject: RegionInput, rules: Rules, action: str, count: int, desired: int, rule: str, reason: str
) -> None:
    """Demand is clamped to min and max; a missing metric holds (or goes to max); the bounds still apply."""
    decision = one(subject, rules)
    assert (decision.action, decision.count, decision.desired) == (action, count, desired)
    assert (decision.rule, decision.reason) == (rule, reason)


def test_min_not_held_down_by_an_up_window() -> None:
    """Below its min a region goes up at once: an up window's lower recommendations do not hold it."""
    rules = Rules(target_per_machine=10, up=Direction(300, 0, 1000))
    memory = Memory(recommendations=tuple((T0 - s, 0) for s in (200, 100, 10)))
    decision = one(region(started=0, metric=None, low=3), rules, memory)
    assert (decision.action, decision.count, decision.rule) == (SCALE_UP, 3, "min_bound")
    above_min = one(region(started=3, metric=60.0, low=3), rules, memory)
    assert above_min.not_acting == {"stabilization": "lowest recommendation in the last 300s is 0"}


def test_missing_metric_never_scales_down_with_max() -> None:
    """on_missing_metric max goes up to the max step by step, and never takes a region below its count."""
    rules = Rules(target_per_machine=10, on_missing_metric="max")
    fleet = Fleet(rules, {"iad": Bounds(0, 9)}, {"iad": 2})
    for tick in range(10):
        fleet.tick(T0 + 10 * tick, {"iad": None})
    assert fleet.actions == [(T0, "iad", SCALE_UP, 4), (T0 + 10, "iad", SCALE_UP, 3)]
    assert fleet.started == {"iad": 9}


# ---------------------------------------------------------------------------- safety holds


@pytest.mark.parametrize(
    ("subject", "release", "not_acting"),
    [
        (
            region(started=6, metric=20.0),
            "v7 rolling out",
            {"release_freeze": "a release is rolling out or baking: v7 rolling out"},
        ),
        (
            region(started=6, metric=20.0, health="unknown", reason="no health verdict yet"),
            "",
            {"health_unknown": "the region's health is unknown (no health verdict yet): not scaling down"},
        ),
        (
            region(started=6, metric=20.0, health="down", reason="3 of 3 machines failing"),
            "",
            {"region_down": "iad is down (3 of 3 machines failing): left alone, its demand moved"},
        ),
        (
            region(started=12, metric=20.0, high=8, health="down", reason="3 of 3 machines failing"),
            "",
            {"region_down": "iad is down (3 of 3 machines failing): left alone, its demand moved"},
        ),
        (
            region(started=1, metric=90.0, health="down", reason="3 of 3 machines failing"),
            "",
            {"region_down": "iad is down (3 of 3 machines failing): left alone, its demand moved"},
        ),
    ],
    ids=[
        "release freeze",
        "unknown health",
        "region down",
        "region down above max",
        "region down needing more",
    ],
)
def test_safety_holds(subject: RegionInput, release: str, not_acting: dict[str, str]) -> None:
    """A release, unknown health or a down region holds the count, and the decision says which rule did."""
    decision = one(subject, INSTANT, release=release)
    assert (decision.action, decision.count, decision.current) == (HOLD, 0, subject.started)
    assert decision.not_acting == not_acting


@pytest.mark.parametrize(("health", "release"), [("unknown", ""), ("healthy", "v7 baking"), ("degraded", "")])
def test_scale_up_is_never_frozen(health: str, release: str) -> None:
    """Unknown health, a release or a degraded region block scale-down only: more load still gets machines."""
    decision = one(region(started=2, metric=60.0, health=health), INSTANT, release=release)
    assert (decision.action, decision.count, decision.not_acting) == (SCALE_UP, 4, {})


def test_degraded_region_scales_down() -> None:
    """A degraded region is judged on its metric like a healthy one, down included."""
    assert one(region(started=6, metric=20.0, health="degraded"), INSTANT).action == SCALE_DOWN


@pytest.mark.parametrize(
    ("subject", "rules", "release", "count", "not_acting"),
    [
        (
            region(started=10, metric=20.0, high=6),
            INSTANT,
            "v7 baking",
            4,
            {"release_freeze": "a release is rolling out or baking: v7 baking: only down to the max 6"},
        ),
        (
            region(started=10, metric=20.0, high=6),
            RULES,
            "v7 baking",
            1,
            {
                "release_freeze": "a release is rolling out or baking: v7 baking: only down to the max 6",
                "max_step": "4 could go, 1 at most per step",
            },
        ),
        (
            region(started=10, metric=20.0, high=6, health="unknown", reason="no verdict"),
            INSTANT,
            "",
            4,
            {
                "health_unknown": "the region's health is unknown (no verdict): not scaling down: "
                "only down to the max 6"
            },
        ),
        (
            region(started=10, metric=None, high=6),
            Rules(target_per_machine=10, on_missing_metric="max", down=Direction(0, 0, 1000)),
            "",
            4,
            {"missing_metric": "missing or stale data never scales down: only down to the max 6"},
        ),
        (region(started=10, metric=150.0, high=6), INSTANT, "v7 baking", 4, {}),
    ],
    ids=["release", "release, one step", "unknown health", "on_missing_metric max", "demand above max"],
)
def test_max_enforced_through_holds(
    subject: RegionInput, rules: Rules, release: str, count: int, not_acting: dict[str, str]
) -> None:
    """Above its max a region comes down to the max (never below it) even while scale-down is frozen."""
    decision = one(subject, rules, release=release)
    assert (decision.action, decision.count, decision.desired, decision.rule) == (
        SCALE_DOWN,
        count,
        6,
        "max_bound",
    )
    assert decision.not_acting == not_acting


def test_max_not_held_up_by_older_recommendations() -> None:
    """A lowered max is enforced at once: recommendations made under the old max do not hold the count."""
    rules = Rules(target_per_machine=10, down=Direction(60, 0, 1000))
    memory = Memory(recommendations=tuple((T0 - s, 10) for s in (50, 40, 30, 20, 10)))
    decision = one(region(started=10, metric=20.0, high=6), rules, memory)
    # down to the max now; below it (to its demand, 2) only once the window agrees
    assert (decision.action, decision.count, decision.desired) == (SCALE_DOWN, 4, 2)
    frozen = one(region(started=10, metric=20.0, high=6), rules, memory, release="v7 baking")
    assert (frozen.action, frozen.count, frozen.desired, frozen.rule) == (SCALE_DOWN, 4, 6, "max_bound")


def test_first_sight_waits_a_whole_down_window() -> None:
    """With no memory (a new region, a lost store) the first scale-down still waits the down window."""
    fleet = Fleet(RULES, {"iad": Bounds(0, 20)}, {"iad": 6})
    first = fleet.tick(T0, {"iad": 20.0})["iad"]
    assert first.not_acting == {"stabilization": "highest recommendation in the last 60s is 6"}
    for second in range(5, 100, 5):
        fleet.tick(T0 + second, {"iad": 20.0})
    assert fleet.actions == [(T0 + 65, "iad", SCALE_DOWN, 1), (T0 + 95, "iad", SCALE_DOWN, 1)]


def test_ticks_further_apart_than_the_window_still_see_the_drop_in_force_at_its_start() -> None:
    """A down window shorter than the time between ticks (slow ticks, a loaded machine) neither blocks a
    scale-down for ever nor lets one through on a single low reading: the recommendation in force at the
    window's start counts, so the drop is followed at the second tick that sees it."""
    rules = Rules(target_per_machine=10, down=Direction(3, 0, 1000))
    fleet = Fleet(rules, {"iad": Bounds(1, 20)}, {"iad": 3})
    for second in (0.0, 3.2, 6.4):
        fleet.tick(T0 + second, {"iad": 30.0})
    first = fleet.tick(T0 + 9.6, {"iad": 10.0})["iad"]
    assert first.not_acting == {"stabilization": "highest recommendation in the last 3s is 3"}
    fleet.tick(T0 + 12.8, {"iad": 10.0})
    assert fleet.actions == [(T0 + 12.8, "iad", SCALE_DOWN, 2)]


def test_a_gap_longer_than_the_window_waits_a_whole_down_window_again() -> None:
    """Recommendations all older than the down window (no tick decided for longer than it: the API or
    this instance down) are no window at all: a drop seen after the gap waits a whole window, as at first
    sight, instead of being followed at once on a window nobody watched."""
    fleet = Fleet(RULES, {"iad": Bounds(0, 20)}, {"iad": 6})
    for second in range(0, 30, 5):
        fleet.tick(T0 + second, {"iad": 60.0})
    back = T0 + 25 + 300  # five minutes without a tick, then the load has fallen
    after = fleet.tick(back, {"iad": 20.0})["iad"]
    assert after.not_acting == {"stabilization": "highest recommendation in the last 60s is 6"}
    for second in range(5, 100, 5):
        fleet.tick(back + second, {"iad": 20.0})
    assert fleet.actions[0][:2] == (back + 60, "iad")  # the first tick with only the drop in its window


# ---------------------------------------------------------------------------- steps and cooldowns


@pytest.mark.parametrize(
    ("started", "metric", "action", "count", "max_step"),
    [
        (2, 100.0, SCALE_UP, 4, "8 wanted, 4 at most per step"),
        (2, 50.0, SCALE_UP, 3, None),
        (10, 20.0, SCALE_DOWN, 1, "8 could go, 1 at most per step"),
        (3, 20.0, SCALE_DOWN, 1, None),
    ],
)
def test_max_step(started: int, metric: float, action: str, count: int, max_step: str | None) -> None:
    """One tick moves at most max_step machines each way (defaults: 4 up, 1 down), and says when it cuts."""
    decision = one(
        region(started=started, metric=metric), Rules(target_per_machine=10, down=Direction(0, 30, 1))
    )
    assert (decision.action, decision.count) == (action, count)
    assert decision.not_acting == ({} if max_step is None else {"max_step": max_step})


def test_scale_up_cooldown() -> None:
    """After a scale-up, the next one waits for the up cooldown (10s); the step limit spreads a big jump."""
    fleet = Fleet(RULES, {"iad": Bounds(0, 20)}, {"iad": 2})
    first = fleet.tick(T0, {"iad": 140.0})["iad"]
    held = fleet.tick(T0 + 5, {"iad": 140.0})["iad"]
    assert (first.action, first.count) == (SCALE_UP, 4)
    assert (held.action, held.not_acting) == (
        HOLD,
        {"cooldown": "scaled up 5s ago; scale-up cooldown is 10s"},
    )
    fleet.tick(T0 + 10, {"iad": 140.0})
    fleet.tick(T0 + 15, {"iad": 140.0})
    fleet.tick(T0 + 20, {"iad": 140.0})
    assert fleet.actions == [
        (T0, "iad", SCALE_UP, 4),
        (T0 + 10, "iad", SCALE_UP, 4),
        (T0 + 20, "iad", SCALE_UP, 4),
    ]
    assert fleet.started == {"iad": 14}


def test_scale_down_cooldown_counts_from_any_action() -> None:
    """A scale-down waits for the down cooldown (30s) since the last scale action of either direction."""
    rules = Rules(target_per_machine=10, down=Direction(0, 30, 1))
    fleet = Fleet(rules, {"iad": Bounds(0, 20)}, {"iad": 2})
    fleet.tick(T0, {"iad": 60.0})  # up to 6
    held = fleet.tick(T0 + 10, {"iad": 20.0})["iad"]
    assert (held.action, held.not_acting) == (
        HOLD,
        {"cooldown": "scaled 10s ago; scale-down cooldown is 30s"},
    )
    for tick in range(3, 13):
        fleet.tick(T0 + 10 * tick, {"iad": 20.0})
    assert fleet.actions == [
        (T0, "iad", SCALE_UP, 4),
        (T0 + 30, "iad", SCALE_DOWN, 1),
        (T0 + 60, "iad", SCALE_DOWN, 1),
        (T0 + 90, "iad", SCALE_DOWN, 1),
        (T0 + 120, "iad", SCALE_DOWN, 1),
    ]
    assert fleet.started == {"iad": 2}


def test_scale_up_not_delayed_by_a_scale_down() -> None:
    """The up cooldown counts scale-ups only: load arriving right after a scale-down is met at once."""
    rules = Rules(target_per_machine=10, down=Direction(0, 30, 1))
    fleet = Fleet(rules, {"iad": Bounds(0, 20)}, {"iad": 5})
    fleet.tick(T0, {"iad": 20.0})
    up = fleet.tick(T0 + 1, {"iad": 90.0})["iad"]
    assert fleet.actions == [(T0, "iad", SCALE_DOWN, 1), (T0 + 1, "iad", SCALE_UP, 4)]
    assert up.not_acting == {"max_step": "5 wanted, 4 at most per step"}


def test_after_action_starts_the_cooldown_of_its_direction() -> None:
    """after_action stamps the direction that acted; a hold leaves the memory as it was."""
    memory = Memory(recommendations=((T0, 3),), last_demand=3)
    assert after_action(memory, SCALE_UP, T0) == Memory(((T0, 3),), T0, None, 3)
    assert after_action(memory, SCALE_DOWN, T0) == Memory(((T0, 3),), None, T0, 3)
    assert after_action(memory, HOLD, T0) is memory


# ---------------------------------------------------------------------------- stabilization windows


def test_scale_down_waits_for_the_window_and_goes_to_its_highest() -> None:
    """A drop is followed only once the 60s window has seen it throughout, and only to the window's top."""
    rules = Rules(target_per_machine=10, down=Direction(60, 0, 1000))
    fleet = Fleet(rules, {"iad": Bounds(0, 20)}, {"iad": 6})
    decisions = {}
    for second in range(0, 200, 5):
        metric = 60.0 if second < 100 else 40.0 if second < 130 else 20.0
        decisions[second] = fleet.tick(T0 + second, {"iad": metric})["iad"]
    assert decisions[155].not_acting == {"stabilization": "highest recommendation in the last 60s is 6"}
    assert decisions[185].not_acting == {"stabilization": "highest recommendation in the last 60s is 4"}
    assert fleet.actions == [(T0 + 160, "iad", SCALE_DOWN, 2), (T0 + 190, "iad", SCALE_DOWN, 2)]


def test_scale_up_window_goes_to_the_lowest() -> None:
    """With an up window, a rise is followed once the window has seen it throughout, to its lowest."""
    rules = Rules(target_per_machine=10, up=Direction(30, 0, 1000))
    fleet = Fleet(rules, {"iad": Bounds(0, 20)}, {"iad": 2})
    decisions = {}
    for second in range(0, 200, 5):
        metric = 20.0 if second < 100 else 60.0 if second < 115 else 90.0
        decisions[second] = fleet.tick(T0 + second, {"iad": metric})["iad"]
    assert decisions[125].not_acting == {"stabilization": "lowest recommendation in the last 30s is 2"}
    assert fleet.actions == [(T0 + 130, "iad", SCALE_UP, 4), (T0 + 145, "iad", SCALE_UP, 3)]


@pytest.mark.parametrize(
    ("up", "down", "kept"),
    [(0.0, 60.0, 60.0), (90.0, 60.0, 90.0), (0.0, 0.0, 0.0), (30.0, 300.0, 300.0)],
)
def test_memory_keeps_only_the_longest_window(up: float, down: float, kept: float) -> None:
    """Memories keep the recommendations of the longest window, and the last one before it (in force
    when the window began), and drop older ones."""
    rules = Rules(target_per_machine=10, up=Direction(up, 10, 4), down=Direction(down, 30, 1))
    fleet = Fleet(rules, {"iad": Bounds(0, 20)}, {"iad": 2})
    for second in range(0, 600, 5):
        fleet.tick(T0 + second, {"iad": 20.0 + second % 20})
    now = T0 + 595
    ats = [at for at, _ in fleet.memories["iad"].recommendations]
    inside = [T0 + s for s in range(0, 600, 5) if now - (T0 + s) <= kept]
    before = [T0 + s for s in range(0, 600, 5) if now - (T0 + s) > kept][-1:] if kept else []
    assert ats == before + inside
    assert ats[-1] == now


# ---------------------------------------------------------------------------- flapping input


@pytest.mark.parametrize(
    ("pattern", "ups"),
    [
        ([60.0, 10.0], [(0, 4)]),
        ([10.0, 60.0], [(5, 4)]),
        ([60.0, 60.0, 10.0, 10.0], [(0, 4)]),
        ([60.0] * 5 + [10.0] * 5, [(0, 4)]),
        ([100.0, 10.0], [(0, 4), (10, 4)]),
        ([21.0, 19.0], []),
        ([60.0, None], [(0, 4)]),
    ],
    ids=[
        "every tick",
        "every tick, low first",
        "every 2 ticks",
        "every 25s",
        "beyond one step",
        "in band",
        "gaps",
    ],
)
def test_flapping_input_does_not_oscillate(pattern: list[float | None], ups: list[tuple[int, int]]) -> None:
    """A metric flipping high/low faster than the down window (60s) gets a scale-up and never a scale-down."""
    fleet = Fleet(RULES, {"iad": Bounds(1, 20)}, {"iad": 2})
    for tick in range(240):  # 20 minutes of 5s ticks
        fleet.tick(T0 + 5 * tick, {"iad": pattern[tick % len(pattern)]})
    assert [(int(now - T0), count) for now, _, action, count in fleet.actions if action == SCALE_UP] == ups
    assert [a for a in fleet.actions if a[2] == SCALE_DOWN] == []


def test_flapping_slower_than_the_window_follows_each_phase_once() -> None:
    """A load that changes every 2 minutes is followed, one scale-down per phase change, not per tick."""
    fleet = Fleet(RULES, {"iad": Bounds(1, 20)}, {"iad": 2})
    for tick in range(240):
        fleet.tick(T0 + 5 * tick, {"iad": 60.0 if (tick // 24) % 2 == 0 else 40.0})
    directions = [action for _, _, action, _ in fleet.actions]
    assert directions[0] == SCALE_UP
    # each 2-minute low phase: 60s of window, then 2 steps of 1 at the 30s cooldown; no up/down churn in it
    assert directions.count(SCALE_DOWN) == 2 * 5
    assert directions.count(SCALE_UP) == 1 + 4


# ---------------------------------------------------------------------------- failover


@pytest.mark.parametrize(
    ("regions", "demands", "highs", "last", "extra"),
    [
        (
            [region("iad", 4, health="down"), region("ord", 2), region("lax", 2)],
            {"iad": 5, "ord": 2, "lax": 2},
            {"iad": 10, "ord": 10, "lax": 10},
            {"iad": 5},
            {"lax": 3, "ord": 2},
        ),
        (
            [region("iad", 4, health="down"), region("ord", 2), region("lax", 2)],
            {"iad": 6, "ord": 2, "lax": 2},
            {"iad": 10, "ord": 10, "lax": 3},
            {"iad": 6},
            {"lax": 1, "ord": 5},
        ),
        (
            [region("iad", 4, health="down"), region("ord", 9), region("lax", 3)],
            {"iad": 6, "ord": 9, "lax": 3},
            {"iad": 10, "ord": 10, "lax": 3},
            {"iad": 6},
            {"ord": 1},
        ),
        (
            [
                region("iad", 4, health="down"),
                region("ord", 2, health="degraded"),
                region("lax", 2, health="unknown"),
            ],
            {"iad": 4, "ord": 2, "lax": 2},
            {"iad": 10, "ord": 10, "lax": 10},
            {},
            {"ord": 4},
        ),
        (
            [region("iad", 3, health="down"), region("ord", 2)],
            {"iad": 3, "ord": 2},
            {"iad": 10, "ord": 10},
            {"iad": 0},
            {},
        ),
        (
            [region("iad", 3, health="down"), region("ord", 2, health="down")],
            {"iad": 3, "ord": 2},
            {"iad": 10, "ord": 10},
            {},
            {},
        ),
        (
            [region("iad", 3, health="down"), region("cdg", 1, health="down"), region("ord", 2)],
            {"iad": 3, "cdg": 1, "ord": 2},
            {"iad": 10, "cdg": 10, "ord": 10},
            {"iad": 5, "cdg": 2},
            {"ord": 7},
        ),
    ],
    ids=[
        "even shares, remainder first",
        "a full region's share spills over",
        "no room beyond the max",
        "degraded receives, unknown does not, no memory moves the count",
        "a demand of 0 moves nothing",
        "nobody to receive",
        "two regions down",
    ],
)
def test_failover_shares(
    regions: list[RegionInput],
    demands: dict[str, int],
    highs: dict[str, int],
    last: dict[str, int],
    extra: dict[str, int],
) -> None:
    """A down region's last healthy demand is shared among healthy/degraded regions, within their max."""
    bounds = {code: Bounds(0, high) for code, high in highs.items()}
    memories = {code: Memory(last_demand=demand) for code, demand in last.items()}
    given, notes = failover_shares(regions, demands, bounds, memories)
    assert given == extra
    down = ", ".join(r.region for r in regions if r.health == "down")
    assert notes == {code: f"failover: +{n} for {down} (down)" for code, n in extra.items()}


def test_region_down_and_recovery() -> None:
    """A down region is left alone, its demand moves to the others within their max, and comes back after."""
    fleet = Fleet(
        RULES,
        {"iad": Bounds(1, 10), "ord": Bounds(1, 10), "lax": Bounds(1, 3)},
        {"iad": 4, "ord": 2, "lax": 2},
    )
    load = {"iad": 40.0, "ord": 20.0, "lax": 20.0}
    for second in range(0, 100, 5):
        fleet.tick(T0 + second, load)
    assert fleet.actions == []
    assert fleet.memories["iad"].last_demand == 4

    # iad goes down: its own reading (whatever it says) is ignored; its last healthy demand, 4, moves
    down = {"iad": "down"}
    during = fleet.tick(T0 + 100, {**load, "iad": 0.0}, down)
    assert during["iad"].action == HOLD
    assert during["iad"].not_acting == {
        "region_down": "iad is down (probes failing): left alone, its demand moved"
    }
    assert (during["ord"].rule, during["ord"].reason) == (
        "failover",
        "20 over 2 machines is 1.00 of the target 10: within the tolerance 0.1; failover: +3 for iad (down)",
    )
    assert (during["ord"].action, during["ord"].count, during["ord"].inputs["failover_extra"]) == (
        SCALE_UP,
        3,
        3,
    )
    assert (during["lax"].action, during["lax"].count, during["lax"].desired) == (SCALE_UP, 1, 3)
    for second in range(105, 200, 5):
        fleet.tick(T0 + second, {**load, "iad": 0.0}, down)
    assert fleet.started == {"iad": 4, "ord": 5, "lax": 3}
    assert fleet.memories["iad"].last_demand == 4  # the demand from before it went down is kept

    # iad recovers: the extra goes away, but the receivers scale down only after their 60s window
    for second in range(200, 400, 5):
        fleet.tick(T0 + second, load)
    downs = [
        (int(now - T0), code, count) for now, code, action, count in fleet.actions if action == SCALE_DOWN
    ]
    assert downs == [(260, "ord", 1), (260, "lax", 1), (290, "ord", 1), (320, "ord", 1)]
    assert fleet.started == {"iad": 4, "ord": 2, "lax": 2}


def test_failover_counts_the_receivers_room_from_their_own_demand() -> None:
    """A receiver already at its max by its own demand takes nothing; the others take it all."""
    fleet = Fleet(
        INSTANT,
        {"iad": Bounds(0, 10), "ord": Bounds(0, 4), "lax": Bounds(0, 10)},
        {"iad": 4, "ord": 4, "lax": 1},
    )
    fleet.memories["iad"] = Memory(last_demand=4)
    decisions = fleet.tick(T0, {"iad": None, "ord": 60.0, "lax": 10.0}, {"iad": "down"})
    assert decisions["ord"].rule == "max_bound"
    assert decisions["ord"].inputs["failover_extra"] == 0
    assert (decisions["lax"].desired, decisions["lax"].rule) == (5, "failover")


# ---------------------------------------------------------------------------- schedules and DST

BUSINESS = ScheduleWindow("0 8 * * *", 10 * 3600, "Europe/Paris", {"cdg": (4, None)})


@pytest.mark.parametrize(
    ("local", "is_open"),
    [
        # spring forward: 2026-03-29 02:00 -> 03:00 (CET +1 -> CEST +2)
        ((2026, 3, 28, 7, 59), False),
        ((2026, 3, 28, 8, 0), True),
        ((2026, 3, 28, 17, 59), True),
        ((2026, 3, 28, 18, 0), False),
        ((2026, 3, 29, 7, 59), False),
        ((2026, 3, 29, 8, 0), True),
        ((2026, 3, 29, 17, 59), True),
        ((2026, 3, 29, 18, 0), False),
        ((2026, 3, 30, 8, 0), True),
        ((2026, 3, 30, 18, 0), False),
        # fall back: 2026-10-25 03:00 -> 02:00 (CEST +2 -> CET +1)
        ((2026, 10, 24, 7, 59), False),
        ((2026, 10, 24, 8, 0), True),
        ((2026, 10, 24, 17, 59), True),
        ((2026, 10, 24, 18, 0), False),
        ((2026, 10, 25, 2, 30), False),
        ((2026, 10, 25, 7, 59), False),
        ((2026, 10, 25, 8, 0), True),
        ((2026, 10, 25, 17, 59), True),
        ((2026, 10, 25, 18, 0), False),
        ((2026, 10, 26, 8, 0), True),
        ((2026, 10, 26, 18, 0), False),
    ],
)
def test_schedule_window_in_its_zone_across_dst(local: tuple[int, ...], is_open: bool) -> None:
    """A '0 8 * * *' window of 10h in Europe/Paris opens at 08:00 local, before and after each DST change."""
    now = paris(*local)
    assert BUSINESS.open_at(now) is is_open
    rules = Rules(target_per_machine=10, schedules=(BUSINESS,), up=Direction(0, 0, 1000))
    decision = one(region("cdg", started=1, metric=5.0, low=1, high=8), rules, now=now)
    if is_open:
        assert (decision.action, decision.count, decision.desired, decision.rule) == (
            SCALE_UP,
            3,
            4,
            "min_bound",
        )
        assert decision.reason == (
            "5 / target 10 per machine = 1 machine(s); min 4 (schedule '0 8 * * *' (Europe/Paris) open)"
        )
        assert decision.inputs["schedules"] == ["schedule '0 8 * * *' (Europe/Paris) open"]
    else:
        assert (decision.action, decision.desired, decision.rule) == (HOLD, 1, "target_tracking")


@pytest.mark.parametrize(
    ("cron", "duration"),
    [("*/15 * * * *", 900.0), ("0 * * * *", 3600.0), ("0 1 * * *", 4 * 3600.0)],
)
@pytest.mark.parametrize("day", [(2026, 10, 25), (2026, 3, 29)], ids=["fall back", "spring forward"])
def test_schedule_window_stays_open_through_a_dst_change(
    cron: str, duration: float, day: tuple[int, int, int]
) -> None:
    """Windows open from 01:00 local for 4 real hours stay open every minute through the DST change."""
    window = ScheduleWindow(cron, duration, "Europe/Paris", {})
    start = paris(*day, 1, 0)
    closed = [
        datetime.fromtimestamp(start + 60 * minute, UTC).isoformat()
        for minute in range(4 * 60)
        if not window.open_at(start + 60 * minute)
    ]
    assert closed == []
    assert window.open_at(start + duration) is (cron != "0 1 * * *")


def test_schedule_in_the_repeated_hour() -> None:
    """A window firing at 02:30 on the fall-back night opens in each pass of the repeated hour (croniter's
    wall-clock walk: more capacity, never less), and is closed between them."""
    window = ScheduleWindow("30 2 * * *", 600.0, "Europe/Paris", {})
    assert not window.open_at(paris(2026, 10, 25, 2, 29))
    assert window.open_at(paris(2026, 10, 25, 2, 35))
    assert not window.open_at(paris(2026, 10, 25, 2, 59, 59))  # was open: a second past now read an hour off
    assert window.open_at(paris(2026, 10, 25, 2, 35, fold=1))
    assert not window.open_at(paris(2026, 10, 25, 2, 45, fold=1))


@pytest.mark.parametrize(
    ("raises", "policy", "effective"),
    [
        ((4, None), Bounds(1, 8), Bounds(4, 8)),
        ((None, 20), Bounds(1, 8), Bounds(1, 20)),
        ((12, None), Bounds(1, 8), Bounds(12, 12)),
        ((0, 2), Bounds(1, 8), Bounds(1, 8)),
    ],
    ids=["raises min", "raises max", "min above max raises max", "never lowers"],
)
def test_schedule_bounds(raises: tuple[int | None, int | None], policy: Bounds, effective: Bounds) -> None:
    """An open window only raises a region's bounds, and its min lifts the max with it."""
    window = ScheduleWindow("0 8 * * *", 36000, "Europe/Paris", {"cdg": raises})
    now = paris(2026, 6, 1, 9, 0)
    assert effective_bounds(policy, "cdg", [window], now) == (
        effective,
        ["schedule '0 8 * * *' (Europe/Paris) open"],
    )
    assert effective_bounds(policy, "iad", [window], now) == (policy, [])
    assert effective_bounds(policy, "cdg", [window], paris(2026, 6, 1, 7, 0)) == (policy, [])


def test_schedule_closing_scales_down_after_the_window() -> None:
    """When a window closes, the raised min is given back through the usual down window and steps."""
    rules = Rules(target_per_machine=10, schedules=(BUSINESS,))
    fleet = Fleet(rules, {"cdg": Bounds(1, 8)}, {"cdg": 1})
    start = paris(2026, 10, 25, 17, 50)
    for second in range(0, 15 * 60, 5):
        fleet.tick(start + second, {"cdg": 5.0})
    assert [(int(now - start), action, count) for now, _, action, count in fleet.actions] == [
        (0, SCALE_UP, 3),  # 17:50: the window's min 4
        (660, SCALE_DOWN, 1),  # 18:01: 60s after it closed
        (690, SCALE_DOWN, 1),
        (720, SCALE_DOWN, 1),
    ]


def test_a_clock_stepped_back_does_not_block_scaling() -> None:
    """A cooldown start or a recommendation from the future (clock stepped back) is ignored."""
    memory = Memory(recommendations=((5000.0, 1),), last_scale_up=5000.0, last_scale_down=5000.0)
    region = RegionInput("iad", Bounds(1, 8), started=1, metric=60.0, health="healthy")
    [decision] = decide(1000.0, [region], Rules(target_per_machine=20), {"iad": memory})
    assert decision.action == "scale_up"
    assert decision.count == 2
    assert all(at <= 1000.0 for at, _ in decision.memory.recommendations)


def test_a_rollout_under_way_freezes_all_scaling() -> None:
    """During a rollout nothing is added or taken away, not even for the bounds: the counts are moving."""
    busy = RegionInput("iad", Bounds(1, 8), started=2, metric=200.0, health="healthy")
    [decision] = decide(1000.0, [busy], Rules(target_per_machine=20), {}, rollout_active="releases 3, 4")
    assert decision.action == "hold"
    assert "rollout is under way" in decision.not_acting["rollout"]
    short = RegionInput("cdg", Bounds(2, 8), started=0, metric=0.0, health="healthy")
    [decision] = decide(1000.0, [short], Rules(target_per_machine=20), {}, rollout_active="releases 3, 4")
    assert decision.action == "hold"
    [after] = decide(1000.0, [short], Rules(target_per_machine=20), {})
    assert (after.action, after.count) == ("scale_up", 2)  # once it ends, the min is restored


def test_an_average_is_load_per_machine() -> None:
    """An avg (or max) metric is per-machine: 4 machines at 30 against a target of 20 need 6, not 2."""
    hot = RegionInput("iad", Bounds(1, 10), started=4, metric=30.0, health="healthy", per_machine=True)
    rules = Rules(target_per_machine=20, up=Direction(0, 0, 1000), down=Direction(0, 0, 1000))
    [decision] = decide(1000.0, [hot], rules, {})
    assert (decision.action, decision.count, decision.desired) == ("scale_up", 2, 6)
    assert "30 per machine x 4" in decision.reason


def test_machines_in_transition_are_waited_for() -> None:
    """While machines of the region are still starting or stopping, the count is not acted on again."""
    busy = RegionInput("iad", Bounds(1, 10), started=2, metric=100.0, health="healthy", pending=2)
    [decision] = decide(1000.0, [busy], INSTANT, {})
    assert decision.action == "hold"
    assert "2 machine(s) still starting or stopping" in decision.not_acting["settling"]


def test_a_region_failing_from_overload_gets_more_machines() -> None:
    """A region down with machines that answer (503s from overload) is scaled up, not failed over."""
    overloaded = region("cdg", 1, 400.0, high=8, health="down", reason="1 unhealthy (503)", reachable=True)
    decisions = decide(T0, [overloaded, region("iad", 2, 20.0)], INSTANT, {})
    by_region = {d.region: d for d in decisions}
    assert (by_region["cdg"].action, by_region["cdg"].count) == (SCALE_UP, 7)
    assert by_region["iad"].inputs["failover_extra"] == 0  # nothing moves away from a region that answers
    quiet = region("cdg", 4, 0.0, health="down", reason="4 unhealthy", reachable=True)
    [held] = decide(T0, [quiet], INSTANT, {})
    assert held.action == HOLD
    assert "no machine in the region is healthy" in held.not_acting["region_failing"]
