"""Releases from machine configs, the known-good record and the rollback plan (core/rollback.py):
table-driven, pure."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.core.rollback import (
    KnownGood,
    MachineRelease,
    ReleaseKey,
    config_from_versions,
    known_good,
    missing_configs,
    newest_release,
    plan_rollback,
    rolled_out,
)

T0 = 10_000.0
V1 = ReleaseKey(1, "rel_1", "app:v1")
V2 = ReleaseKey(2, "rel_2", "app:v2")
V3 = ReleaseKey(3, "rel_3", "app:v3")


def config(release: ReleaseKey, *, group: str = "app", canary: bool = False, **extra: Any) -> dict[str, Any]:
    """A machine config as `fly deploy` writes it for `release`."""
    metadata = {
        "fly_release_version": str(release.version),
        "fly_release_id": release.id,
        "fly_process_group": group,
    }
    if canary:
        metadata["fly_canary"] = "true"
    return {"image": release.image, "metadata": metadata, **extra}


def machine(
    mid: str,
    release: ReleaseKey,
    *,
    region: str = "iad",
    state: str = "started",
    group: str = "app",
    canary: bool = False,
    healthy: bool | None = None,
    crashed: bool = False,
    **extra: Any,
) -> MachineRelease:
    return MachineRelease(
        mid,
        region,
        state,
        config(release, group=group, canary=canary, **extra),
        process_group=group,
        healthy=healthy,
        crashed=crashed,
    )


def record(*machines: MachineRelease, release: ReleaseKey = V1) -> KnownGood:
    """The known-good record of `release` from these machines."""
    return known_good(machines, release, T0, "healthy")


# ------------------------------------------------------------------ releases as machines show them


@pytest.mark.parametrize(
    ("machines", "expected"),
    [
        ([], None),
        ([MachineRelease("m1", "iad", "started", {"image": "app:v1"})], None),
        ([MachineRelease("m1", "iad", "started", {"metadata": {"fly_release_version": "x"}})], None),
        ([machine("m1", V1), machine("m2", V1)], V1),
        ([machine("m1", V1), machine("m2", V2), machine("m3", V1)], V2),
        # a canary is the first sight of a release
        ([machine("m1", V1), machine("m2", V1), machine("c1", V2, canary=True)], V2),
        # the id and image most machines of the version carry
        (
            [machine("m1", V2), machine("m2", ReleaseKey(2, "rel_x", "app:x")), machine("m3", V2)],
            V2,
        ),
        # a tie goes by name
        (
            [machine("m1", ReleaseKey(2, "rel_b", "app:b")), machine("m2", ReleaseKey(2, "rel_a", "app:a"))],
            ReleaseKey(2, "rel_a", "app:a"),
        ),
        # older machines' images do not count towards the newest release's
        (
            [machine("m1", V1), machine("m2", V1), machine("m3", ReleaseKey(2, "rel_2", "app:new"))],
            ReleaseKey(2, "rel_2", "app:new"),
        ),
    ],
)
def test_newest_release(machines: list[MachineRelease], expected: ReleaseKey | None) -> None:
    """The highest fly_release_version wins (canaries count), with its machines' majority id and image."""
    assert newest_release(machines) == expected


@pytest.mark.parametrize(
    ("machines", "expected"),
    [
        ([machine("m1", V2), machine("m2", V2, region="syd")], True),
        ([machine("m1", V2), machine("m2", V2, state="stopped")], True),
        ([machine("m1", V2), machine("m2", V2, state="updating")], False),
        ([machine("m1", V2), machine("m2", V2, state="replacing")], False),
        ([machine("m1", V2), machine("m2", V1)], False),
        ([machine("m1", V2), machine("m2", ReleaseKey(2, "rel_2", "app:other"))], False),
        # canaries are ignored: on another version, or changing
        ([machine("m1", V2), machine("c1", V3, canary=True)], True),
        ([machine("m1", V2), machine("c1", V2, canary=True, state="starting")], True),
        ([machine("c1", V2, canary=True)], False),
        ([], False),
    ],
)
def test_rolled_out(machines: list[MachineRelease], expected: bool) -> None:
    """Rolled out: every machine but canaries runs the release, none in transition."""
    assert rolled_out(machines, V2) is expected


def test_rolled_out_without_image_matches_the_version_only() -> None:
    """A release known by its version alone is rolled out whatever image its machines run."""
    machines = [machine("m1", V2), machine("m2", ReleaseKey(2, "rel_2", "app:other"))]
    assert rolled_out(machines, ReleaseKey(2))


# ------------------------------------------------------------------ the known-good record


def test_known_good_records_the_machines_on_the_release() -> None:
    """The record holds each machine on the release, canaries and other releases aside, as deep copies."""
    m1 = machine("m1", V1, env={"MODE": "a"})
    machines = [m1, machine("m2", V2), machine("c1", V1, canary=True)]
    good = known_good(machines, V1, T0, "adopted")
    assert good.release == V1
    assert set(good.configs) == {"m1"}
    assert good.configs["m1"] == m1.config
    assert good.recorded_at == T0
    assert good.verdict == "adopted"
    m1.config["env"]["MODE"] = "changed"  # the API's dict, changed later, does not reach the record
    assert good.configs["m1"]["env"] == {"MODE": "a"}


def test_known_good_keeps_configs_of_machines_no_longer_seen() -> None:
    """Configs on record for the release stay for machines updated away or not seen now; seen ones refresh."""
    before = record(machine("m1", V1), machine("m2", V1), machine("m3", V1, env={"OLD": "1"}))
    now = [machine("m1", V2), machine("m3", V1, env={"NEW": "1"})]  # m1 is being updated, m2 is gone
    good = known_good(now, V1, T0 + 60, "healthy", previous=before)
    assert set(good.configs) == {"m1", "m2", "m3"}
    assert good.configs["m1"] == before.configs["m1"]
    assert good.configs["m3"]["env"] == {"NEW": "1"}


def test_known_good_ignores_a_record_of_another_release() -> None:
    """A previous record of another release contributes nothing."""
    before = record(machine("m1", V1), machine("m2", V1))
    good = known_good([machine("m1", V2)], V2, T0, "healthy", previous=before)
    assert set(good.configs) == {"m1"}
    assert good.configs["m1"]["image"] == V2.image


def test_known_good_json_round_trip() -> None:
    """A known-good record survives the state store's JSON."""
    good = record(machine("m1", V1, mounts=[{"volume": "vol_1", "path": "/data"}]), machine("m2", V1))
    assert KnownGood.from_json(good.to_json()) == good


@pytest.mark.parametrize(
    ("machines", "expected"),
    [
        ([machine("m1", V1), machine("m2", V1)], []),
        ([machine("m1", V2), machine("m2", V2)], []),  # both on record
        ([machine("m1", V2), machine("m9", V2), machine("m0", V2)], ["m0", "m9"]),
        ([machine("m1", V1), machine("c1", V2, canary=True)], []),  # a canary is destroyed, not reverted
        ([machine("m9", V1)], []),  # on the good release already
    ],
)
def test_missing_configs(machines: list[MachineRelease], expected: list[str]) -> None:
    """Machines off the known-good release with no config of it on record, sorted: to look up in /versions."""
    good = record(machine("m1", V1), machine("m2", V1))
    assert missing_configs(machines, good) == expected


# ------------------------------------------------------------------ the rollback plan


def test_plan_restores_a_machines_own_config_exactly() -> None:
    """A machine with a config on record gets exactly that config back, as a copy safe to change."""
    own = machine("m1", V1, env={"MODE": "a"}, guest={"cpus": 2}, mounts=[{"volume": "vol_1"}])
    good = record(own)
    plan = plan_rollback([machine("m1", V2, env={"MODE": "b"})], good)
    (target,) = plan.updates
    assert (target.machine_id, target.region, target.origin) == ("m1", "iad", "own")
    assert target.config == good.configs["m1"]
    assert plan.to == V1
    assert not plan.destroys
    assert not plan.stuck
    target.config["env"]["MODE"] = "changed"
    assert good.configs["m1"]["env"] == {"MODE": "a"}
    assert plan_rollback([machine("m1", V2)], good).updates[0].config["env"] == {"MODE": "a"}


def test_plan_gives_a_new_machine_a_siblings_config_with_its_own_mounts() -> None:
    """A machine new in the bad release gets a sibling's config, keeping its own mounts, without standbys."""
    sibling = machine(
        "m1",
        V1,
        env={"MODE": "a"},
        mounts=[{"volume": "vol_m1", "path": "/data"}],
        standbys=["m7"],
    )
    good = record(sibling)
    new = machine("m9", V2, env={"MODE": "b"}, mounts=[{"volume": "vol_m9", "path": "/data"}])
    (target,) = plan_rollback([machine("m1", V1), new], good).updates
    assert target.machine_id == "m9"
    assert target.origin == "sibling:m1"
    assert target.config["mounts"] == [{"volume": "vol_m9", "path": "/data"}]
    assert "standbys" not in target.config
    assert target.config["image"] == V1.image
    assert target.config["env"] == {"MODE": "a"}
    assert good.configs["m1"]["mounts"] == [{"volume": "vol_m1", "path": "/data"}]
    assert good.configs["m1"]["standbys"] == ["m7"]
    target.config["mounts"].append({"volume": "vol_x"})
    assert new.config["mounts"] == [{"volume": "vol_m9", "path": "/data"}]


def test_plan_gives_a_new_machine_without_mounts_none_of_the_siblings() -> None:
    """A sibling's volume never moves: a new machine without mounts gets none."""
    good = record(machine("m1", V1, mounts=[{"volume": "vol_m1", "path": "/data"}]))
    (target,) = plan_rollback([machine("m9", V2)], good).updates
    assert target.config["mounts"] == []


@pytest.mark.parametrize(
    ("on_record", "new", "expected"),
    [
        # the same region first
        (
            [machine("m1", V1, region="iad"), machine("m2", V1, region="syd")],
            machine("m9", V2, region="syd"),
            "sibling:m2",
        ),
        # else by id
        (
            [machine("m2", V1, region="iad"), machine("m1", V1, region="ams")],
            machine("m9", V2, region="syd"),
            "sibling:m1",
        ),
        # the same process group only, even in another region
        (
            [machine("m1", V1, region="syd"), machine("w1", V1, region="iad", group="worker")],
            machine("w9", V2, region="syd", group="worker"),
            "sibling:w1",
        ),
        # no sibling of its group: stuck
        ([machine("m1", V1, region="syd")], machine("w9", V2, region="syd", group="worker"), None),
    ],
)
def test_plan_picks_the_sibling(
    on_record: list[MachineRelease], new: MachineRelease, expected: str | None
) -> None:
    """A sibling is of the same process group, in the same region if any; else the machine is stuck."""
    good = record(*on_record)
    plan = plan_rollback([*on_record, new], good)
    if expected is None:
        assert not plan.updates
        assert set(plan.stuck) == {new.id}
        assert "no known-good config of v1" in plan.stuck[new.id]
    else:
        assert [(t.machine_id, t.origin) for t in plan.updates] == [(new.id, expected)]
        assert not plan.stuck


def test_plan_prefers_a_sibling_seen_in_the_region_to_one_no_longer_seen() -> None:
    """A sibling on record but not seen now (its region unknown) comes after one seen in the same region."""
    good = record(machine("m1", V1, region="syd"), machine("m0", V1, region="syd"))
    plan = plan_rollback([machine("m1", V2, region="syd"), machine("m9", V2, region="syd")], good)
    assert [(t.machine_id, t.origin) for t in plan.updates] == [("m1", "own"), ("m9", "sibling:m1")]


def test_plan_takes_a_sibling_no_longer_seen_when_it_is_the_only_one() -> None:
    """A sibling's config on record is still a way back when the sibling itself is gone."""
    good = record(machine("m0", V1))
    (target,) = plan_rollback([machine("m9", V2)], good).updates
    assert target.origin == "sibling:m0"


def test_plan_destroys_canaries() -> None:
    """A canary of the bad release is destroyed, never reverted."""
    good = record(machine("m1", V1))
    plan = plan_rollback([machine("m1", V1), machine("c1", V2, canary=True)], good)
    assert plan.destroys == ("c1",)
    assert not plan.updates
    assert not plan.empty


def test_plan_orders_crashed_and_unhealthy_first() -> None:
    """Machines that crashed or are unhealthy are reverted first, then by region and id."""
    on_record = [
        machine(mid, V1, region=region) for mid, region in [("a", "ams"), ("b", "iad"), ("c", "syd")]
    ]
    machines = [
        machine("a", V2, region="ams"),
        machine("b", V2, region="iad", healthy=True),
        machine("c", V2, region="syd", crashed=True),
        machine("d", V2, region="ams", healthy=False),
    ]
    plan = plan_rollback(machines, record(*on_record))
    assert [t.machine_id for t in plan.updates] == ["d", "c", "a", "b"]


def test_plan_leaves_good_and_destroyed_machines_alone() -> None:
    """Machines on the good release already, and destroyed ones, are not in the plan."""
    good = record(machine("m1", V1), machine("m2", V1))
    machines = [
        machine("m1", V1),
        machine("m2", V2, state="destroyed"),
        machine("m3", V2, state="destroying"),
        machine("c1", V2, canary=True, state="destroyed"),
    ]
    plan = plan_rollback(machines, good)
    assert plan.empty
    assert not plan.stuck


# ------------------------------------------------------------------ configs from a machine's history


OLDER = config(V1, env={"AT": "older"})
NEWER = config(V1, env={"AT": "newer"})
OTHER_IMAGE = config(ReleaseKey(1, "rel_1", "app:rebuilt"), env={"AT": "other image"})


@pytest.mark.parametrize(
    ("versions", "release", "expected"),
    [
        # newest first: the first match wins
        ([{"user_config": config(V2)}, {"user_config": NEWER}, {"user_config": OLDER}], V1, NEWER),
        # the image must match too
        ([{"user_config": OTHER_IMAGE}, {"user_config": OLDER}], V1, OLDER),
        # unless the release's image is not known
        ([{"user_config": OTHER_IMAGE}, {"user_config": OLDER}], ReleaseKey(1), OTHER_IMAGE),
        # `config` when there is no `user_config`; entries without a config skipped
        ([{"version": "x"}, {"config": NEWER}], V1, NEWER),
        ([{"user_config": config(V2)}, {"user_config": OTHER_IMAGE}], V1, None),
        ([], V1, None),
    ],
)
def test_config_from_versions(
    versions: list[dict[str, Any]], release: ReleaseKey, expected: dict[str, Any] | None
) -> None:
    """The newest config in a machine's history that ran the release (version and image), or None."""
    assert config_from_versions(versions, release) == expected


# ------------------------------------------------------------------ what a rollback leaves alone


def incomplete(mid: str, release: ReleaseKey, **changes: Any) -> MachineRelease:
    """A machine on a host Fly cannot reach: only part of its config is known."""
    whole = machine(mid, release, **changes)
    return MachineRelease(
        whole.id,
        whole.region,
        whole.state,
        whole.config,
        process_group=whole.process_group,
        healthy=whole.healthy,
        crashed=whole.crashed,
        complete=False,
    )


BARE = MachineRelease("m7", "iad", "started", {"image": "other:1", "metadata": {}})


@pytest.mark.parametrize(
    ("machines", "bad", "updated", "destroyed"),
    [
        # bad=V2: a machine of V3 is someone's deploy going forward, never touched
        ([machine("m1", V2), machine("m2", V3)], V2, ["m1"], []),
        ([machine("m1", V3), machine("m2", V3)], V2, [], []),
        # nor a canary of the newer release
        ([machine("m1", V2), machine("c1", V3, canary=True)], V2, ["m1"], []),
        ([machine("m1", V2), machine("c1", V2, canary=True)], V2, ["m1"], ["c1"]),
        # without bad=, every release since the known-good one is reverted
        ([machine("m1", V2), machine("m2", V3)], None, ["m1", "m2"], []),
        # bad=V3: the releases in between (V2) are reverted too
        ([machine("m1", V2), machine("m2", V3)], V3, ["m1", "m2"], []),
        # machines without release metadata are not ours to judge, whatever bad= says
        ([machine("m1", V2), BARE], V2, ["m1"], []),
        ([machine("m1", V2), BARE], None, ["m1"], []),
    ],
)
def test_plan_with_bad_never_targets_newer_releases_or_bare_machines(
    machines: list[MachineRelease], bad: ReleaseKey | None, updated: list[str], destroyed: list[str]
) -> None:
    """With bad= given, machines of a newer release and machines without release metadata are left alone."""
    good = record(machine("m1", V1), machine("m2", V1), machine("m7", V1))
    plan = plan_rollback(machines, good, bad)
    assert sorted(t.machine_id for t in plan.updates) == updated
    assert list(plan.destroys) == destroyed
    assert not plan.stuck
    assert not plan.unreachable


@pytest.mark.parametrize("on_record", [True, False])
def test_plan_leaves_a_machine_on_an_unreachable_host_for_later(on_record: bool) -> None:
    """complete=False: the machine goes to plan.unreachable, neither updated nor stuck (own config or not)."""
    good = record(machine("m1", V1), *([machine("m2", V1)] if on_record else []))
    machines = [machine("m1", V2), incomplete("m2", V2, crashed=True)]
    plan = plan_rollback(machines, good, V2)
    assert [t.machine_id for t in plan.updates] == ["m1"]
    assert plan.unreachable == ("m2",)
    assert not plan.stuck
    assert not plan.destroys


def test_plan_unreachable_is_only_for_machines_to_revert() -> None:
    """An unreachable machine already on the good release, or of a newer one, is not in plan.unreachable;
    an unreachable canary is still destroyed (a destroy sends no config)."""
    good = record(machine("m1", V1))
    machines = [
        incomplete("m1", V1),
        incomplete("m2", V3),
        incomplete("c1", V2, canary=True),
    ]
    plan = plan_rollback(machines, good, V2)
    assert plan.unreachable == ()
    assert plan.destroys == ("c1",)
    assert not plan.updates


@pytest.mark.parametrize(
    ("machines", "expected"),
    [
        # a machine without release metadata does not hold the rollout back
        ([machine("m1", V2), MachineRelease("m7", "iad", "started", {"image": "other:1"})], True),
        ([machine("m1", V2), MachineRelease("m7", "iad", "updating", {"image": "other:1"})], True),
        # nor does one on an unreachable host, whatever its config shows
        ([machine("m1", V2), incomplete("m2", V1)], True),
        ([machine("m1", V2), incomplete("m2", V2, state="replacing")], True),
        # but only machines left out are no rollout
        ([MachineRelease("m7", "iad", "started", {"image": "other:1"})], False),
        ([incomplete("m1", V2), incomplete("m2", V2)], False),
        # the reachable machines with metadata still must all run it
        ([machine("m1", V2), machine("m3", V1), incomplete("m2", V2)], False),
    ],
)
def test_rolled_out_leaves_out_bare_and_unreachable_machines(
    machines: list[MachineRelease], expected: bool
) -> None:
    """rolled_out ignores machines without release metadata and machines with complete=False."""
    assert rolled_out(machines, V2) is expected


def test_known_good_records_no_partial_config() -> None:
    """A machine on an unreachable host is never recorded: its config on record (if any) stays."""
    before = record(machine("m1", V1, env={"AT": "before"}), machine("m2", V1))
    good = known_good(
        [incomplete("m1", V1, env={"AT": "partial"}), machine("m2", V1)], V1, T0, "healthy", before
    )
    assert good.configs["m1"]["env"] == {"AT": "before"}
    fresh = known_good([incomplete("m1", V1), machine("m2", V1)], V1, T0, "healthy")
    assert set(fresh.configs) == {"m2"}
