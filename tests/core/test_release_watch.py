"""The release watch's state machine (core/release_watch.py): table-driven, pure.

Each test builds the stored state and the machines of one tick, calls advance (or start_rollback,
finish_rollback, hold) and looks at the next state and the events to tell.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest

from daemon.core.release_watch import (
    KEEP_PREVIOUS,
    Hold,
    Policy,
    Rollback,
    RollbackState,
    Step,
    Watched,
    WatchState,
    advance,
    finish_rollback,
    hold,
    start_rollback,
)
from daemon.core.releases import ReleaseVerdict, Thresholds
from daemon.core.rollback import MachineRelease, ReleaseKey, known_good
from daemon.core.traffic import Traffic

LIMITS = Thresholds(bake=300.0, max_error_ratio=0.05, max_unhealthy_ratio=0.25, min_requests=50)
POLICY = Policy(LIMITS)
T0 = 10_000.0
INF = math.inf
V1 = ReleaseKey(1, "rel_1", "app:v1")
V2 = ReleaseKey(2, "rel_2", "app:v2")
V3 = ReleaseKey(3, "rel_3", "app:v3")
REGIONS = {"m1": "iad", "m2": "iad", "m3": "syd"}
B, H, F, NONE = (
    ReleaseVerdict.BAKING,
    ReleaseVerdict.HEALTHY,
    ReleaseVerdict.FAILING,
    ReleaseVerdict.INCONCLUSIVE,
)
OK = Traffic(1000.0, 10.0)  # 1% errors
ERRORS = Traffic(1000.0, 200.0)  # 20% errors
LITTLE = Traffic(10.0, 0.0)  # too few requests to judge


def machine(mid: str, release: ReleaseKey, *, region: str = "iad", **changes: Any) -> MachineRelease:
    metadata = {
        "fly_release_version": str(release.version),
        "fly_release_id": release.id,
        "fly_process_group": "app",
    }
    if changes.pop("canary", False):
        metadata["fly_canary"] = "true"
    config = {"image": release.image, "metadata": metadata, "env": {"RELEASE": release.label}}
    return MachineRelease(mid, region, changes.pop("state", "started"), config, **changes)


def fleet(release: ReleaseKey, **changes: dict[str, Any]) -> list[MachineRelease]:
    """m1, m2 in iad and m3 in syd, all on `release`; changes per machine id (state=..., crashed=...)."""
    return [machine(mid, release, region=region, **changes.get(mid, {})) for mid, region in REGIONS.items()]


def settled(release: ReleaseKey = V1) -> WatchState:
    """An app whose `release` runs everywhere, is known-good and was judged healthy."""
    good = known_good(fleet(release), release, T0 - 1000, "healthy")
    watched = Watched(release, T0 - 1000, T0 - 1000, H, "within limits for the whole bake")
    return WatchState(good=good, watched=watched)


def tick(
    state: WatchState,
    machines: list[MachineRelease],
    now: float,
    baseline: dict[str, Traffic] | None = None,
    policy: Policy = POLICY,
) -> Step:
    return advance(state, machines, baseline or {}, policy, now)


def fed(state: WatchState, **regions: Traffic) -> WatchState:
    """The watched release with its traffic counted, per region (what releases.py adds before each tick)."""
    assert state.watched is not None
    return replace(state, watched=replace(state.watched, traffic=regions))


def rolling_out(release: ReleaseKey = V2, base: WatchState | None = None) -> WatchState:
    """The state after the first tick of `release`, rolled out at T0 over a settled V1."""
    return tick(base or settled(), fleet(release), T0).state


def kinds(step: Step | tuple[WatchState, list[Any]]) -> list[str]:
    events = step.events if isinstance(step, Step) else step[1]
    return [event.kind for event in events]


def failed_over(policy: Policy = POLICY) -> WatchState:
    """V2 failed and its rollback to V1 was started."""
    return tick(fed(rolling_out(), iad=ERRORS), fleet(V2), T0 + 10, policy=policy).state


# ------------------------------------------------------------------ first sight


def test_first_sight_adopts_the_running_release() -> None:
    """The release found running everywhere on first sight is adopted as known-good."""
    step = tick(WatchState(), fleet(V1), T0)
    assert kinds(step) == ["release_seen", "verdict"]
    assert step.state.good is not None
    assert step.state.good.release == V1
    assert step.state.good.verdict == "adopted"
    assert set(step.state.good.configs) == set(REGIONS)
    assert step.state.watched is not None
    assert step.state.watched.rollout_done_at == T0
    assert step.state.watched.verdict is B


def test_first_sight_mid_rollout_adopts_only_once_rolled_out() -> None:
    """A release still rolling out is not adopted; it is once every machine runs it."""
    first = tick(WatchState(), fleet(V1, m3={"state": "updating"}), T0)
    assert first.state.good is None
    assert first.state.watched is not None
    assert first.state.watched.rollout_done_at is None
    second = tick(first.state, fleet(V1), T0 + 30)
    assert second.state.good is not None
    assert second.state.good.verdict == "adopted"
    assert second.state.watched is not None
    assert second.state.watched.rollout_done_at == T0 + 30


def test_nothing_released_changes_nothing() -> None:
    """Machines without release metadata: no state, no events."""
    bare = [MachineRelease("m1", "iad", "started", {"image": "app:v1"})]
    assert tick(WatchState(), bare, T0) == Step(WatchState())


# ------------------------------------------------------------------ a new release: bake, then a verdict


def test_new_release_bakes_then_healthy_becomes_known_good() -> None:
    """A new release bakes; healthy after the bake, it becomes known-good and the old record moves back."""
    old = settled()
    first = tick(old, fleet(V2), T0)
    assert kinds(first) == ["release_seen", "verdict"]
    assert first.state.watched is not None
    assert first.state.watched.verdict is B
    assert first.state.good == old.good

    during = tick(fed(first.state, iad=OK, syd=OK), fleet(V2), T0 + 100)
    assert not during.events
    assert during.state.good == old.good

    after = tick(during.state, fleet(V2), T0 + 400)
    assert kinds(after) == ["verdict"]
    assert after.state.watched is not None
    assert after.state.watched.verdict is H
    assert after.state.good is not None
    assert after.state.good.release == V2
    assert after.state.good.verdict == "healthy"
    assert after.state.good.recorded_at == T0 + 400
    assert after.state.previous == (old.good,)
    assert not after.events[0].alert


def test_known_good_history_keeps_at_most_keep_previous() -> None:
    """Older known-good records are kept newest first, at most KEEP_PREVIOUS of them."""
    state = settled()
    for version in range(2, 7):
        release = ReleaseKey(version, f"rel_{version}", f"app:v{version}")
        state = tick(state, fleet(release), T0 * version).state
        state = tick(fed(state, iad=OK), fleet(release), T0 * version + 400).state
        assert state.good is not None
        assert state.good.release == release
    assert len(state.previous) == KEEP_PREVIOUS
    assert [p.release.version for p in state.previous] == [5, 4, 3]


@pytest.mark.parametrize(
    ("on_failure", "expected", "alerts"),
    [
        ("rollback", ["verdict", "release_failing", "rollback_started"], [False, True, True]),
        ("alert", ["verdict", "release_failing"], [False, True]),
        ("none", ["verdict"], [False]),
    ],
)
def test_failing_release_per_on_failure(on_failure: str, expected: list[str], alerts: list[bool]) -> None:
    """A failing release is rolled back (rollback), only alerted on (alert), or only recorded (none)."""
    policy = Policy(LIMITS, on_failure=on_failure)
    step = tick(fed(rolling_out(), iad=ERRORS), fleet(V2), T0 + 10, policy=policy)
    assert kinds(step) == expected
    assert [event.alert for event in step.events] == alerts
    assert step.state.watched is not None
    assert step.state.watched.verdict is F
    assert step.state.good is not None
    assert step.state.good.release == V1  # a failing release is never recorded as good
    if on_failure == "rollback":
        rollback = step.state.rollback
        assert rollback is not None
        assert (rollback.state, rollback.from_release, rollback.to, rollback.by) == (
            RollbackState.WAITING,
            V2,
            V1,
            "auto",
        )
        assert "error ratio 20.0%" in rollback.reason
        assert step.state.is_bad(V2)
        assert step.state.bad["2"]["image"] == V2.image
        assert step.events[-1].details["to"] == V1.to_json()
    else:
        assert step.state.rollback is None
        assert not step.state.bad
    if on_failure == "alert":
        assert "(on_failure: alert, not rolled back)" in step.events[-1].summary


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (WatchState(), "no earlier known-good release on record"),
        # the known-good release is the failing one itself (adopted at first sight, still baking)
        (replace(settled(V2), watched=Watched(V2, T0 - 10)), "no earlier known-good release on record"),
        # halted, and the release is not newer than every one judged (V3 was marked bad)
        (replace(settled(), halted="stopped by hand", bad={"3": {"reason": "crashed"}}), "stopped by hand"),
    ],
)
def test_failing_release_without_an_earlier_good_is_only_alerted(state: WatchState, why: str) -> None:
    """Nothing earlier to go back to (or the watch halted): a failing release is alerted, not rolled back."""
    step = tick(state, fleet(V2, m1={"crashed": True}), T0)
    assert kinds(step)[-1] == "release_failing"
    assert step.events[-1].alert
    assert f"not rolled back: {why}" in step.events[-1].summary
    assert step.state.rollback is None
    assert not step.state.is_bad(V2)


def test_too_little_traffic_bakes_then_is_inconclusive_and_kept() -> None:
    """Too little traffic: baking, then inconclusive (alerted once) and kept running, but a proven release
    stays the one to return to."""
    baking = tick(fed(rolling_out(), iad=LITTLE), fleet(V2), T0 + 100)
    assert not baking.events
    assert baking.state.watched is not None
    assert baking.state.watched.verdict is B

    judged = tick(baking.state, fleet(V2), T0 + 400)
    assert kinds(judged) == ["verdict", "release_inconclusive"]
    assert judged.events[1].alert
    assert "kept, and to be looked at" in judged.events[1].summary
    assert judged.state.rollback is None
    assert judged.state.good is not None
    assert judged.state.good.release == V1  # healthy, proven: an unproven release does not replace it

    again = tick(judged.state, fleet(V2), T0 + 500)
    assert not again.events


def test_a_release_marked_bad_seen_again_is_failing_without_a_second_rollback() -> None:
    """A release rolled back once, seen again, is "marked bad" and alerted, never rolled back again."""
    rolled = failed_over()
    assert rolled.rollback is not None
    done, _ = finish_rollback(rolled, replace(rolled.rollback, state=RollbackState.DONE), T0 + 60)
    back = tick(done, fleet(V1), T0 + 70).state

    step = tick(back, fleet(V2), T0 + 100)
    assert kinds(step) == ["release_seen", "release_failing", "verdict"]
    assert step.events[1].alert
    assert "runs again: not rolled back twice" in step.events[1].summary
    assert step.state.watched is not None
    assert step.state.watched.verdict is F
    assert step.state.watched.reason.startswith("marked bad: error ratio 20.0%")
    assert step.state.rollback == done.rollback
    assert step.state.good is not None
    assert step.state.good.release == V1
    assert not tick(step.state, fleet(V2), T0 + 110).events


# ------------------------------------------------------------------ after a rollback


def test_the_release_rolled_back_to_is_watched_again_and_kept_when_healthy() -> None:
    """After a rollback done, the good release is watched after_rollback; healthy, it stays known-good."""
    rolled = failed_over()
    assert rolled.rollback is not None
    done, _ = finish_rollback(rolled, replace(rolled.rollback, state=RollbackState.DONE), T0 + 60)
    assert done.watched is not None
    assert (done.watched.release, done.watched.after_rollback) == (V1, True)

    first = tick(done, fleet(V1), T0 + 70)
    assert kinds(first) == ["verdict"]  # no release_seen: it is the release rolled back to
    healthy = tick(fed(first.state, iad=OK), fleet(V1), T0 + 400)
    assert kinds(healthy) == ["verdict"]
    assert healthy.state.watched is not None
    assert healthy.state.watched.verdict is H
    assert not healthy.state.halted
    assert healthy.state.good is not None
    assert healthy.state.good.release == V1


def test_the_release_rolled_back_to_failing_too_halts() -> None:
    """If the release rolled back to fails too: halted, rollback_failed alerted, and no new rollback."""
    rolled = failed_over()
    assert rolled.rollback is not None
    done, _ = finish_rollback(rolled, replace(rolled.rollback, state=RollbackState.DONE), T0 + 60)

    step = tick(done, fleet(V1, m3={"crashed": True}), T0 + 70)
    assert kinds(step) == ["verdict", "rollback_failed"]
    assert step.events[1].alert
    assert "the release rolled back to, v1, fails too" in step.events[1].summary
    assert "fails too" in step.state.halted
    assert step.state.rollback is not None
    assert step.state.rollback.state is RollbackState.DONE
    assert step.state.rollback.from_release == V2
    assert set(step.state.bad) == {"2"}
    assert hold(step.state, T0 + 70, LIMITS.bake).all == ""  # halted: nothing waits for a rollback
    assert not tick(step.state, fleet(V1, m3={"crashed": True}), T0 + 80).events


def test_after_rollback_survives_the_bad_release_showing_in_between() -> None:
    """Machines briefly on the bad release after a rollback: back on the good one, it is after_rollback."""
    rolled = failed_over()
    assert rolled.rollback is not None
    done, _ = finish_rollback(rolled, replace(rolled.rollback, state=RollbackState.DONE), T0 + 60)
    between = tick(done, [*fleet(V1, m3={"state": "updating"}), machine("m4", V2)], T0 + 65).state
    step = tick(between, fleet(V1, m3={"crashed": True}), T0 + 70)
    assert step.state.watched is not None
    assert step.state.watched.after_rollback
    assert kinds(step) == ["verdict", "rollback_failed"]


def halted_state() -> WatchState:
    """V2 rolled back to V1, which failed too: halted."""
    rolled = failed_over()
    assert rolled.rollback is not None
    done, _ = finish_rollback(rolled, replace(rolled.rollback, state=RollbackState.DONE), T0 + 60)
    state = tick(done, fleet(V1, m3={"crashed": True}), T0 + 70).state
    assert state.halted
    return state


@pytest.mark.parametrize(
    ("release", "cleared"),
    [
        (V2, False),  # the release marked bad
        (V3, True),  # newer than every release judged
    ],
)
def test_halted_is_cleared_only_by_a_newer_release(release: ReleaseKey, cleared: bool) -> None:
    """Halted stays until a release newer than every judged one (good or bad) is seen."""
    step = tick(halted_state(), fleet(release), T0 + 100)
    assert (not step.state.halted) is cleared
    assert step.state.watched is not None
    assert step.state.watched.release == release
    assert not step.state.watched.after_rollback


def test_halted_stays_for_the_same_release_tick_after_tick() -> None:
    """Nothing new seen: halted stays, and a recovered good release does not clear it."""
    state = halted_state()
    step = tick(state, fleet(V1), T0 + 500)
    assert step.state.halted == state.halted


@pytest.mark.parametrize("active", [RollbackState.WAITING, RollbackState.RUNNING])
def test_an_active_rollback_freezes_the_watch(active: RollbackState) -> None:
    """While a rollback waits or runs, advance changes nothing and tells nothing."""
    rolled = failed_over()
    assert rolled.rollback is not None
    state = replace(rolled, rollback=replace(rolled.rollback, state=active))
    for machines in (fleet(V2), fleet(V1), fleet(V3)):
        step = tick(state, machines, T0 + 20)
        assert step.state is state
        assert not step.events


def test_an_identical_tick_tells_nothing() -> None:
    """Verdict events come only on a change: the same tick twice emits nothing the second time."""
    for state, machines in [
        (WatchState(), fleet(V1)),
        (fed(rolling_out(), iad=OK), fleet(V2)),
        (fed(rolling_out(), iad=LITTLE), fleet(V2)),
    ]:
        first = tick(state, machines, T0 + 400)
        assert first.events
        second = tick(first.state, machines, T0 + 400)
        assert not second.events
        assert second.state == first.state


# ------------------------------------------------------------------ how a release is judged


def test_a_failing_region_fails_the_release() -> None:
    """A region with 30% errors of its own fails the release though the overall ratio is within the limit."""
    state = fed(rolling_out(), iad=Traffic(1000.0, 10.0), syd=Traffic(100.0, 30.0))  # 40 of 1100: 3.6%
    step = tick(state, fleet(V2), T0 + 10)
    assert step.state.watched is not None
    assert step.state.watched.verdict is F
    assert step.state.watched.reason == "in syd: error ratio 30.0% > 5.0%"
    assert step.state.watched.numbers["error_ratio"] == pytest.approx(40 / 1100)
    assert step.state.watched.numbers["syd.error_ratio"] == pytest.approx(0.3)
    assert kinds(step) == ["verdict", "release_failing", "rollback_started"]


def test_a_region_with_too_little_traffic_is_not_judged_on_it() -> None:
    """A region with too few requests of its own does not fail the release on its errors."""
    state = fed(rolling_out(), iad=Traffic(1000.0, 10.0), syd=Traffic(10.0, 5.0))
    step = tick(state, fleet(V2), T0 + 400)
    assert step.state.watched is not None
    assert step.state.watched.verdict is H


@pytest.mark.parametrize(
    ("baseline", "verdict"),
    [
        ({}, F),
        ({"iad": Traffic(1000.0, 180.0)}, H),  # 18% before: 20% is no worse
        ({"syd": Traffic(1000.0, 180.0)}, H),  # the whole baseline stands in for a region without one
        ({"iad": Traffic(1000.0, 20.0)}, F),  # 2% before: 20% is the release's doing
    ],
)
def test_errors_the_previous_release_had_too_do_not_fail(
    baseline: dict[str, Traffic], verdict: ReleaseVerdict
) -> None:
    """Errors close to the previous release's own (its baseline) do not fail the release."""
    step = tick(fed(rolling_out(), iad=ERRORS), fleet(V2), T0 + 400, baseline=baseline)
    assert step.state.watched is not None
    assert step.state.watched.verdict is verdict
    assert step.state.watched.numbers["error_ratio"] == pytest.approx(0.2)


def test_crashes_and_unhealthy_machines_fail_without_traffic() -> None:
    """A crashed machine, or too many unhealthy, fail a release with no traffic counted."""
    crashed = tick(rolling_out(), fleet(V2, m1={"crashed": True}), T0 + 10)
    assert crashed.state.watched is not None
    assert crashed.state.watched.reason == "1 of 3 machine(s) crashed"
    unhealthy = tick(rolling_out(), fleet(V2, m1={"healthy": False}, m2={"healthy": False}), T0 + 10)
    assert unhealthy.state.watched is not None
    assert unhealthy.state.watched.verdict is F
    assert "2 of 3 machines unhealthy" in unhealthy.state.watched.reason


# ------------------------------------------------------------------ starting and finishing a rollback


def test_start_rollback_by_hand() -> None:
    """A rollback asked for by hand marks the release bad and is told without alarm."""
    state = rolling_out()
    assert state.good is not None
    next_state, events = start_rollback(state, V2, state.good, T0 + 5, by="manual", reason="asked for")
    assert kinds((next_state, events)) == ["rollback_requested", "rollback_started"]
    assert [event.alert for event in events] == [False, True]
    assert next_state.bad["2"] == {"id": "rel_2", "image": "app:v2", "reason": "asked for", "at": T0 + 5}
    assert next_state.rollback == Rollback(V2, V1, T0 + 5, by="manual", reason="asked for")
    assert hold(next_state, T0 + 5, LIMITS.bake).all


def test_finish_rollback_failed_halts() -> None:
    """A rollback that failed halts the watch and alerts rollback_failed, naming each failure."""
    rolled = failed_over()
    assert rolled.rollback is not None
    rollback = replace(rolled.rollback, state=RollbackState.FAILED, updated=("m1",), failed={"m2": "422"})
    state, events = finish_rollback(rolled, rollback, T0 + 60)
    assert kinds((state, events)) == ["rollback_failed"]
    assert events[0].alert
    assert "rollback of v2 to v1 failed: m2: 422" in events[0].summary
    assert events[0].details["result"] == "failed"
    assert state.halted == events[0].summary
    assert state.rollback == replace(rollback, finished_at=T0 + 60)
    assert state.watched == rolled.watched  # the bad release stays the one watched
    assert not tick(state, fleet(V2, m1={"state": "started"}), T0 + 70).events


@pytest.mark.parametrize("result", [RollbackState.DONE, RollbackState.PARTIAL])
def test_finish_rollback_names_what_was_done_and_skipped(result: RollbackState) -> None:
    """A rollback done (or partial) is summed up, skipped machines named, and the good release watched."""
    rolled = failed_over()
    assert rolled.rollback is not None
    rollback = replace(
        rolled.rollback,
        state=result,
        updated=("m1", "m2"),
        destroyed=("c1",),
        skipped={"m3": "leased by deploy"},
    )
    state, events = finish_rollback(rolled, rollback, T0 + 60)
    assert kinds((state, events)) == ["rollback_finished"]
    summary = events[0].summary
    assert summary.startswith("v2 rolled back to v1: 2 machine(s) reverted, 1 destroyed")
    assert "m3 (leased by deploy)" in summary
    assert events[0].details["skipped"] == {"m3": "leased by deploy"}
    assert not state.halted
    assert state.watched == Watched(V1, first_seen=T0 + 60, after_rollback=True)
    assert state.rollback is not None
    assert state.rollback.finished_at == T0 + 60


# ------------------------------------------------------------------ what scaling must hold


def baking() -> WatchState:
    return rolling_out()


@pytest.mark.parametrize(
    ("state", "down", "everything"),
    [
        (failed_over(), "rollback of v2 to v1 under way", "rollback of v2 to v1 under way"),
        (
            failed_over(Policy(LIMITS, on_failure="alert")),
            "release v2 is failing: error ratio 20.0% > 5.0%",
            "",  # no rollback to wait for: capacity may still grow
        ),
        (baking(), "release v2 is baking (100s of 300s)", ""),
        (replace(baking(), watched=None), "", ""),
        (settled(), "", ""),
    ],
)
def test_hold(state: WatchState, down: str, everything: str) -> None:
    """A rollback under way holds every change; a failing or baking release holds scale-down only."""
    assert hold(state, T0 + 100, LIMITS.bake) == Hold(down, everything)


def test_hold_counts_the_bake_from_first_sight_during_the_rollout() -> None:
    """A release still rolling out has baked for the time since it was first seen."""
    state = tick(settled(), fleet(V2, m3={"state": "updating"}), T0).state
    assert hold(state, T0 + 20, LIMITS.bake).down == "release v2 is baking (20s of 300s)"


# ------------------------------------------------------------------ the state store's JSON


def through_json(data: dict[str, Any]) -> Any:
    """What the store gives back: strict JSON (no Infinity or NaN)."""
    return json.loads(json.dumps(data, allow_nan=False))


def test_watched_json_round_trip_with_the_inf_bucket() -> None:
    """Watched survives strict JSON, its +Inf bucket written as Prometheus writes it."""
    traffic = Traffic(1000.0, 10.0, ((0.1, 600.0), (0.5, 950.0), (INF, 1000.0)))
    watched = Watched(
        V2,
        first_seen=T0,
        rollout_done_at=T0 + 30,
        verdict=F,
        reason="in syd: error ratio 30.0% > 5.0%",
        numbers={"error_ratio": 0.01, "p95_latency": None},
        after_rollback=True,
        traffic={"iad": traffic, "syd": Traffic(100.0, 30.0)},
    )
    data = through_json(watched.to_json())
    assert data["traffic"]["iad"]["buckets"][-1] == ["+Inf", 1000.0]
    back = Watched.from_json(data)
    assert back == watched
    assert back.traffic["iad"].quantile(0.95) == traffic.quantile(0.95)


@pytest.mark.parametrize(
    "rollback",
    [
        Rollback(V2, V1, T0),
        Rollback(
            V2,
            V1,
            T0,
            by="manual",
            reason="asked for",
            state=RollbackState.PARTIAL,
            updated=("m1", "m2"),
            destroyed=("c1",),
            skipped={"m3": "leased by deploy"},
            failed={"m4": "422"},
            in_flight=("m5",),
            note="resumed",
            finished_at=T0 + 60,
        ),
    ],
)
def test_rollback_json_round_trip(rollback: Rollback) -> None:
    """A rollback survives strict JSON, in every field."""
    assert Rollback.from_json(through_json(rollback.to_json())) == rollback


def test_watch_state_json_round_trip() -> None:
    """The whole watch state survives strict JSON: records, watched traffic, bad releases, rollback, halt."""
    state = tick(
        fed(rolling_out(), iad=Traffic(1000.0, 10.0, ((0.1, 900.0), (INF, 1000.0)))), fleet(V2), T0 + 400
    )
    healthy = state.state
    assert healthy.previous
    full = replace(
        healthy,
        bad={"7": {"id": "rel_7", "image": "app:v7", "reason": "crashed", "at": T0}},
        rollback=Rollback(V3, V2, T0, state=RollbackState.DONE, updated=("m1",), finished_at=T0 + 1),
        halted="stopped",
    )
    assert WatchState.from_json(through_json(full.to_json())) == full


@pytest.mark.parametrize("data", [None, {}])
def test_watch_state_from_nothing_is_empty(data: dict[str, Any] | None) -> None:
    """No stored state is the empty state."""
    assert WatchState.from_json(data) == WatchState()


def test_a_final_verdict_is_not_judged_again() -> None:
    """A release judged healthy after its whole bake stays healthy: a crash later rolls nothing back."""
    step = tick(settled(V2), fleet(V2, m1={"crashed": True}), T0)
    assert step.events == ()
    assert step.state.rollback is None
    assert step.state.watched is not None
    assert step.state.watched.verdict is H


def test_an_inconclusive_release_becomes_known_good_when_nothing_proven_is_on_record() -> None:
    """With no healthy release on record, an inconclusive one (no crash, nothing unhealthy) is the best
    there is to return to."""
    state = replace(fed(rolling_out(), iad=LITTLE), good=None)
    judged = tick(tick(state, fleet(V2), T0 + 100).state, fleet(V2), T0 + 400)
    assert judged.state.watched is not None
    assert judged.state.watched.verdict.value == "inconclusive"
    assert judged.state.good is not None
    assert judged.state.good.release == V2


def test_a_failing_release_on_record_is_no_longer_known_good() -> None:
    """A release adopted at first sight that then fails is dropped from the record: no later rollback
    returns to it."""
    state = WatchState(watched=Watched(V2, T0 - 10))
    adopted = tick(state, fleet(V2), T0).state
    assert adopted.good is not None
    failing = tick(adopted, fleet(V2, m1={"crashed": True}), T0 + 5).state
    assert failing.watched is not None
    assert failing.watched.verdict is F
    assert failing.good is None


# ------------------------------------------------------------------ the baseline kept in the record


def test_the_stored_baseline_is_replaced_only_by_a_sample_at_least_as_large() -> None:
    """The watched record's baseline is replaced by a sample with at least as many requests, never a smaller
    (or empty) one, and it survives the store's JSON between ticks."""
    first = Traffic(1000.0, 180.0)
    sequence = [
        # (the baseline releases.py passes in this tick, the baseline kept afterwards)
        ({"iad": first}, {"iad": first}),
        ({"iad": Traffic(500.0, 5.0)}, {"iad": first}),  # smaller: kept
        ({}, {"iad": first}),  # none this tick (a restart lost the window): kept
        ({"iad": Traffic(600.0, 6.0), "syd": Traffic(300.0, 3.0)}, {"iad": first}),  # 900 < 1000
        ({"iad": Traffic(1000.0, 190.0)}, {"iad": Traffic(1000.0, 190.0)}),  # as large: replaced
        (
            {"iad": Traffic(800.0, 8.0), "syd": Traffic(400.0, 4.0)},
            {"iad": Traffic(800.0, 8.0), "syd": Traffic(400.0, 4.0)},
        ),
    ]
    state = rolling_out()
    for n, (given, kept) in enumerate(sequence, start=1):
        state = tick(state, fleet(V2), T0 + n, baseline=given).state
        state = WatchState.from_json(through_json(state.to_json()))
        assert state.watched is not None
        assert dict(state.watched.baseline) == kept, n


def test_the_kept_baseline_judges_the_release_when_a_smaller_sample_comes() -> None:
    """A release with the errors its predecessor had is not failed because a later, smaller sample of the
    predecessor looked better."""
    state = fed(rolling_out(), iad=ERRORS)  # 20% errors
    judged = tick(state, fleet(V2), T0 + 10, baseline={"iad": Traffic(1000.0, 180.0)}).state  # 18% before
    assert judged.watched is not None
    assert judged.watched.verdict is B
    later = tick(judged, fleet(V2), T0 + 20, baseline={"iad": Traffic(100.0, 1.0)})  # 1%, but only 100
    assert later.state.watched is not None
    assert later.state.watched.verdict is B
    assert later.state.rollback is None


# ------------------------------------------------------------------ alerts once per release


@pytest.mark.parametrize("on_failure", ["alert", "rollback"])
def test_a_failing_alert_goes_out_once_though_the_verdict_flips(on_failure: str) -> None:
    """FAILING -> BAKING -> FAILING: the second release_failing is written, not alerted (on_failure alert,
    or rollback with no earlier release on record to roll back to); through the store's JSON each tick."""
    policy = Policy(LIMITS, on_failure=on_failure)
    # with rollback, nothing earlier on record: the failure can only be alerted on, so the verdict can flip
    base = replace(rolling_out(), good=None) if on_failure == "rollback" else rolling_out()
    crashed = fleet(V2, m1={"crashed": True})
    states, told = [base], []
    for n, machines in enumerate([crashed, fleet(V2), crashed], start=1):
        stored = WatchState.from_json(through_json(states[-1].to_json()))  # the daemon reads it back
        step = tick(stored, machines, T0 + 10 * n, policy=policy)
        states.append(step.state)
        told.append([(e.kind, e.alert) for e in step.events if e.kind != "verdict"])
        assert kinds(step)[0] == "verdict"
    assert told[0] == [("release_failing", True)]
    assert told[1] == []
    assert told[2] == [("release_failing", False)]
    verdicts = [s.watched.verdict for s in states[1:] if s.watched is not None]
    assert verdicts == [F, B, F]
    assert states[-1].watched is not None
    assert "release_failing" in states[-1].watched.alerted
    assert states[-1].rollback is None


def test_an_inconclusive_alert_goes_out_once_though_the_verdict_flips() -> None:
    """INCONCLUSIVE -> FAILING -> INCONCLUSIVE (on_failure alert): each kind alerted once, both written."""
    policy = Policy(LIMITS, on_failure="alert")
    state = fed(rolling_out(), iad=LITTLE)
    told = []
    for at, machines in [
        (T0 + 400, fleet(V2)),
        (T0 + 410, fleet(V2, m1={"crashed": True})),
        (T0 + 420, fleet(V2)),
        (T0 + 430, fleet(V2, m1={"crashed": True})),
    ]:
        step = tick(state, machines, at, policy=policy)
        state = step.state
        told.extend((e.kind, e.alert) for e in step.events if e.kind != "verdict")
    assert told == [
        ("release_inconclusive", True),
        ("release_failing", True),
        ("release_inconclusive", False),
        ("release_failing", False),
    ]


def test_the_alerts_of_one_release_do_not_silence_the_next() -> None:
    """A new release starts with no alert sent: its first failure is alerted."""
    policy = Policy(LIMITS, on_failure="alert")
    failing = tick(rolling_out(), fleet(V2, m1={"crashed": True}), T0 + 10, policy=policy).state
    assert failing.watched is not None
    assert failing.watched.alerted == ("release_failing",)
    step = tick(failing, fleet(V3, m1={"crashed": True}), T0 + 20, policy=policy)
    assert [(e.kind, e.alert) for e in step.events if e.kind == "release_failing"] == [
        ("release_failing", True)
    ]


# ------------------------------------------------------------------ what a failing release holds


@pytest.mark.parametrize(
    "state",
    [
        failed_over(Policy(LIMITS, on_failure="alert")),
        failed_over(Policy(LIMITS, on_failure="none")),
        # failing with nothing earlier on record: alerted, no rollback to wait for
        tick(fed(replace(rolling_out(), good=None), iad=ERRORS), fleet(V2), T0 + 10).state,
    ],
    ids=["alert", "none", "no-good-on-record"],
)
def test_a_failing_release_without_a_rollback_holds_scale_down_only(state: WatchState) -> None:
    """A failing release not being rolled back holds scale-down; capacity may still grow (all == "")."""
    assert state.watched is not None
    assert state.watched.verdict is F
    assert state.rollback is None
    held = hold(state, T0 + 100, LIMITS.bake)
    assert held.down == f"release v2 is failing: {state.watched.reason}"
    assert held.all == ""


def test_a_failing_release_flipping_back_holds_scale_down_only_again() -> None:
    """After FAILING -> BAKING -> FAILING with on_failure alert, the hold is scale-down only each time."""
    policy = Policy(LIMITS, on_failure="alert")
    state = rolling_out()
    holds = []
    for n, machines in enumerate(
        [fleet(V2, m1={"crashed": True}), fleet(V2), fleet(V2, m1={"crashed": True})]
    ):
        state = tick(state, machines, T0 + 10 * (n + 1), policy=policy).state
        holds.append(hold(state, T0 + 10 * (n + 1), LIMITS.bake))
    assert [h.all for h in holds] == ["", "", ""]
    assert holds[0].down.startswith("release v2 is failing: 1 of 3 machine(s) crashed")
    assert holds[1].down.startswith("release v2 is baking")
    assert holds[2].down == holds[0].down
