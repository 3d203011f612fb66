"""The load model of the simulated fleet as pure functions: conditions, spread, traffic, diffuser."""

from __future__ import annotations

import math

import pytest

from daemon.sim.load import (
    LATENCY_BUCKETS,
    Conditions,
    Diffuser,
    ImageBehaviour,
    Traffic,
    conditions,
    spread,
)

HEALTHY = ImageBehaviour()


# ---------------------------------------------------------------- conditions()


def test_idle_machine_answers_at_base_latency() -> None:
    """With no load a machine answers at its base latency, with no errors and nothing in flight."""
    idle = conditions(0.0, 50.0, 0.1, HEALTHY)
    assert idle.latency == pytest.approx(0.1)
    assert idle.overload_share == 0.0
    assert idle.error_share == 0.0
    assert idle.success_share == 1.0
    assert idle.inflight == 0.0


def test_latency_grows_with_utilisation_below_capacity() -> None:
    """Below capacity latency is base / (1 - utilisation) and nothing is shed."""
    half = conditions(25.0, 50.0, 0.1, HEALTHY)
    assert half.latency == pytest.approx(0.2)
    assert half.overload_share == 0.0
    ninety = conditions(45.0, 50.0, 0.1, HEALTHY)
    assert ninety.latency == pytest.approx(1.0)
    assert ninety.latency > half.latency


def test_queueing_delay_is_bounded_near_capacity() -> None:
    """Just under capacity the queueing factor is capped at 20x, and it meets the overload branch at u = 1."""
    almost = conditions(49.99, 50.0, 0.1, HEALTHY)
    assert almost.latency == pytest.approx(2.0)
    at_capacity = conditions(50.0, 50.0, 0.1, HEALTHY)
    assert at_capacity.latency == pytest.approx(2.0)
    assert at_capacity.overload_share == pytest.approx(0.0)


@pytest.mark.parametrize(("offered", "share"), [(60.0, 1 / 6), (100.0, 0.5), (200.0, 0.75)])
def test_past_capacity_sheds_one_minus_one_over_utilisation(offered: float, share: float) -> None:
    """Past capacity the overload share is 1 - 1/utilisation and latency is base * 20 * utilisation."""
    over = conditions(offered, 50.0, 0.01, HEALTHY)
    utilisation = offered / 50.0
    assert over.overload_share == pytest.approx(share)
    assert over.latency == pytest.approx(0.01 * 20 * utilisation)
    assert over.success_share == pytest.approx(1.0 / utilisation)
    # what is served successfully is exactly the capacity
    assert over.offered_rps * over.success_share == pytest.approx(50.0)


def test_zero_capacity_sheds_everything() -> None:
    """A machine with no capacity sheds every request and its latency hits the 30 s ceiling."""
    none = conditions(10.0, 0.0, 0.1, HEALTHY)
    assert none.overload_share == 1.0
    assert none.success_share == 0.0
    assert none.latency == 30.0


def test_latency_is_capped_at_thirty_seconds() -> None:
    """However slow the image or heavy the load, the modelled latency never passes 30 s."""
    assert conditions(10_000.0, 1.0, 1.0, HEALTHY).latency == 30.0
    assert conditions(1.0, 50.0, 0.1, ImageBehaviour(extra_latency=100.0)).latency == 30.0


def test_slow_image_adds_its_latency() -> None:
    """extra_latency is added on top of the queueing latency."""
    plain = conditions(25.0, 50.0, 0.1, HEALTHY)
    slow = conditions(25.0, 50.0, 0.1, ImageBehaviour(extra_latency=0.5))
    assert slow.latency == pytest.approx(plain.latency + 0.5)
    assert slow.overload_share == plain.overload_share


def test_image_errors_apply_to_what_is_not_shed() -> None:
    """The image's error rate applies to the share not already shed by overload; shares sum to one."""
    bad = ImageBehaviour(error_rate=0.2)
    under = conditions(10.0, 50.0, 0.1, bad)
    assert under.error_share == pytest.approx(0.2)
    assert under.success_share == pytest.approx(0.8)
    over = conditions(100.0, 50.0, 0.1, bad)
    assert over.overload_share == pytest.approx(0.5)
    assert over.error_share == pytest.approx(0.1)
    assert over.success_share == pytest.approx(0.4)
    assert over.overload_share + over.error_share + over.success_share == pytest.approx(1.0)


def test_error_rate_above_one_is_clamped() -> None:
    """An error rate above 1 counts as 1: every answer fails, none is negative."""
    broken = conditions(10.0, 50.0, 0.1, ImageBehaviour(error_rate=3.0))
    assert broken.error_share == 1.0
    assert broken.success_share == 0.0


def test_inflight_follows_littles_law() -> None:
    """Requests in flight are offered rps times latency, and grow faster than the load."""
    light = conditions(10.0, 50.0, 0.01, HEALTHY)
    heavy = conditions(40.0, 50.0, 0.01, HEALTHY)
    assert light.inflight == pytest.approx(10.0 * 0.0125)
    assert heavy.inflight == pytest.approx(40.0 * 0.05)
    assert heavy.inflight > 4 * light.inflight


def test_image_behaviour_healthy_flag() -> None:
    """Only the default behaviour counts as healthy; any bad field makes an image unhealthy."""
    assert ImageBehaviour().healthy
    assert not ImageBehaviour(health_status=500).healthy
    assert not ImageBehaviour(error_rate=0.1).healthy
    assert not ImageBehaviour(extra_latency=0.1).healthy
    assert not ImageBehaviour(crash=True).healthy


# ---------------------------------------------------------------- spread()


def test_spread_shares_a_region_over_its_machines() -> None:
    """Each region's load is divided evenly among its serving machines."""
    assert spread({"iad": 30.0, "cdg": 10.0}, {"iad": 3, "cdg": 2}) == pytest.approx(
        {"iad": 10.0, "cdg": 5.0}
    )


def test_spread_region_without_load_gets_zero() -> None:
    """A serving region that is offered nothing gets zero per machine; unknown load regions are orphaned."""
    assert spread({}, {"iad": 2}) == {"iad": 0.0}
    assert spread({"iad": 10.0}, {"iad": 1, "cdg": 1}) == {"iad": 10.0, "cdg": 0.0}


def test_spread_orphaned_load_spills_evenly_over_serving_regions() -> None:
    """A region with load and no serving machine sends its load evenly to every region that serves."""
    per_machine = spread({"iad": 20.0, "cdg": 10.0, "nrt": 30.0}, {"iad": 2, "cdg": 1, "nrt": 0})
    # nrt's 30 rps go 15 to iad (two machines) and 15 to cdg (one machine)
    assert per_machine == pytest.approx({"iad": 17.5, "cdg": 25.0})
    assert "nrt" not in per_machine


def test_spread_load_from_a_region_with_no_machines_at_all_spills() -> None:
    """Load offered in a region that has no machines at all is also spread to the serving regions."""
    assert spread({"syd": 12.0}, {"iad": 1, "cdg": 2}) == pytest.approx({"iad": 6.0, "cdg": 3.0})


def test_spread_conserves_load() -> None:
    """Total load is conserved: per-machine rps times machines adds up to what was offered."""
    load = {"iad": 20.0, "cdg": 10.0, "nrt": 30.0, "syd": 7.0}
    serving = {"iad": 2, "cdg": 1, "nrt": 0, "ams": 3}
    per_machine = spread(load, serving)
    assert sum(per_machine[r] * serving[r] for r in per_machine) == pytest.approx(sum(load.values()))


def test_spread_with_nobody_serving_is_empty() -> None:
    """With no serving machine anywhere the load goes nowhere."""
    assert spread({"iad": 10.0}, {"iad": 0}) == {}
    assert spread({"iad": 10.0}, {}) == {}


# ---------------------------------------------------------------- Traffic.integrate()


def _steady(rps: float, latency: float = 0.05, overload: float = 0.0, error: float = 0.0) -> Conditions:
    return Conditions(offered_rps=rps, latency=latency, overload_share=overload, error_share=error)


def test_first_integration_only_sets_the_starting_point() -> None:
    """The first call counts nothing: there is no interval yet, only a start time."""
    traffic = Traffic()
    traffic.integrate(100.0, _steady(10.0))
    assert traffic.count == 0.0
    assert traffic.requests == {"200": 0.0, "500": 0.0, "503": 0.0}
    assert traffic.last == 100.0


def test_counters_grow_by_rps_times_seconds() -> None:
    """Over an interval the counters grow by rps x seconds, split by the shares in force."""
    traffic = Traffic()
    traffic.integrate(0.0, None)
    traffic.integrate(10.0, _steady(20.0, overload=0.25, error=0.15))
    assert traffic.count == pytest.approx(200.0)
    assert traffic.requests["200"] == pytest.approx(120.0)
    assert traffic.requests["500"] == pytest.approx(30.0)
    assert traffic.requests["503"] == pytest.approx(50.0)
    assert sum(traffic.requests.values()) == pytest.approx(traffic.count)
    assert traffic.total_seconds == pytest.approx(200.0 * 0.05)


def test_integration_uses_the_conditions_given_for_the_interval() -> None:
    """Each interval is counted at the rate passed for it, so rates follow load changes."""
    traffic = Traffic()
    traffic.integrate(0.0, _steady(10.0))
    traffic.integrate(5.0, _steady(10.0))  # 50 served at 10 rps
    traffic.integrate(7.0, _steady(100.0))  # 200 served at 100 rps
    assert traffic.count == pytest.approx(250.0)


def test_idle_interval_counts_nothing_and_zeroes_inflight() -> None:
    """An interval under None (not serving) adds nothing and moves the start on."""
    traffic = Traffic()
    traffic.integrate(0.0, _steady(10.0))
    traffic.integrate(10.0, _steady(10.0))
    traffic.integrate(20.0, None)
    assert traffic.count == pytest.approx(100.0)
    assert traffic.last == 20.0
    traffic.integrate(25.0, _steady(10.0))
    assert traffic.count == pytest.approx(150.0)


def test_time_going_backwards_counts_nothing() -> None:
    """A call at or before the last instant adds nothing."""
    traffic = Traffic()
    traffic.integrate(10.0, _steady(10.0))
    traffic.integrate(10.0, _steady(10.0))
    traffic.integrate(5.0, _steady(10.0))
    assert traffic.count == 0.0


def test_histogram_buckets_follow_an_exponential_latency() -> None:
    """Buckets are cumulative, bounded by the count, and hold count x (1 - exp(-bound / mean))."""
    traffic = Traffic()
    traffic.integrate(0.0, None)
    traffic.integrate(10.0, _steady(100.0, latency=0.1))
    assert len(traffic.buckets) == len(LATENCY_BUCKETS)
    assert traffic.buckets == sorted(traffic.buckets)
    assert all(b <= traffic.count for b in traffic.buckets)
    for bound, value in zip(LATENCY_BUCKETS, traffic.buckets, strict=True):
        assert value == pytest.approx(1000.0 * (1.0 - math.exp(-bound / 0.1)))
    # about 63 % of answers are at or under the mean
    assert traffic.buckets[LATENCY_BUCKETS.index(0.1)] / traffic.count == pytest.approx(1 - math.exp(-1))


# ---------------------------------------------------------------- Diffuser


@pytest.mark.parametrize(
    ("share", "pattern"),
    [
        (0.2, [False, False, False, False, True] * 3),
        (0.5, [False, True] * 5),
        (0.75, [False, True, True, True] * 3),
        (1 / 3, [False, False, True] * 4),
        (1.0, [True] * 6),
        (0.0, [False] * 6),
    ],
)
def test_diffuser_fires_exactly_on_schedule(share: float, pattern: list[bool]) -> None:
    """A share becomes an exact, deterministic sequence: 0.2 fires every fifth call, and so on."""
    diffuser = Diffuser()
    assert [diffuser.fire(share) for _ in pattern] == pattern


def test_diffuser_long_run_matches_the_share() -> None:
    """Over many calls the number of firings is the share times the calls, give or take one."""
    diffuser = Diffuser()
    fired = sum(diffuser.fire(0.37) for _ in range(1000))
    assert abs(fired - 370) <= 1


def test_diffuser_clamps_out_of_range_shares() -> None:
    """Shares above 1 act as 1 and negative shares as 0; a bad share leaves no debt behind."""
    diffuser = Diffuser()
    assert all(diffuser.fire(5.0) for _ in range(3))
    assert not any(diffuser.fire(-2.0) for _ in range(3))
    assert [diffuser.fire(0.5) for _ in range(2)] == [False, True]


def test_diffuser_follows_a_changing_share() -> None:
    """The owed fraction carries over when the share changes."""
    diffuser = Diffuser()
    assert not diffuser.fire(0.6)
    assert diffuser.fire(0.6)  # 1.2 owed: fires, 0.2 left
    assert not diffuser.fire(0.1)  # 0.3
    assert diffuser.fire(0.7)  # 1.0
