"""The pure machine choices of core/machines.py: table-driven, no I/O."""

from __future__ import annotations

import pytest

from daemon.core.machines import (
    MachineView,
    Release,
    clone_source,
    current_release,
    eligible,
    least_useful_first,
    to_start,
    to_take_down,
)

V2 = Release(version=2, image="shop:v2")


def m(
    machine_id: str,
    region: str = "iad",
    state: str = "started",
    *,
    version: int | None = 2,
    image: str = "shop:v2",
    healthy: bool | None = True,
    created: str = "2026-11-01T00:00:00Z",
    **kw: object,
) -> MachineView:
    return MachineView(
        id=machine_id,
        region=region,
        state=state,
        image=image,
        release_version=version,
        created_at=created,
        healthy=healthy,
        **kw,  # type: ignore[arg-type]
    )


def test_eligible_drops_other_groups_unreachable_canaries_and_gone_machines() -> None:
    """Only reachable, active, non-canary machines of the process group are considered, sorted by id."""
    machines = [
        m("c"),
        m("a"),
        m("w", process_group="worker"),
        m("u", host_ok=False),
        m("k", canary=True),
        m("d", state="destroyed"),
        m("f", state="failed"),
    ]
    assert [v.id for v in eligible(machines, "app")] == ["a", "c"]


@pytest.mark.parametrize(
    ("machines", "expected"),
    [
        ([m("a", version=1, image="shop:v1"), m("b"), m("c")], Release(2, "shop:v2")),
        ([m("a", image="shop:x"), m("b"), m("c")], Release(2, "shop:v2")),  # the image most machines run
        ([m("a", version=None, image="img")], Release(None, "img")),
        ([], None),
    ],
)
def test_current_release(machines: list[MachineView], expected: Release | None) -> None:
    """The current release is the newest version and the image most of its machines run."""
    assert current_release(machines) == expected


def test_to_start_prefers_suspended_and_only_the_current_release() -> None:
    """Parked machines of the current release in the region start first, suspended before stopped."""
    machines = [
        m("s1", state="stopped"),
        m("old", state="stopped", version=1, image="shop:v1"),
        m("z", state="suspended"),
        m("cdg", region="cdg", state="stopped"),
        m("run"),
    ]
    assert [v.id for v in to_start(machines, "iad", V2, 5)] == ["z", "s1"]
    assert [v.id for v in to_start(machines, "iad", V2, 1)] == ["z"]
    assert to_start(machines, "iad", V2, 0) == []


def test_clone_source_is_healthy_current_and_local_first() -> None:
    """Clones come from a healthy started machine of the current release, in the region if possible."""
    machines = [
        m("old", version=1, image="shop:v1"),
        m("sick", healthy=False),
        m("unknown", healthy=None),
        m("far", region="cdg"),
    ]
    assert clone_source(machines, "iad", V2).id == "far"  # type: ignore[union-attr]
    assert clone_source([*machines, m("near")], "iad", V2).id == "near"  # type: ignore[union-attr]
    assert clone_source([m("old", version=1, image="shop:v1")], "iad", V2) is None


def test_least_useful_first_orders_unhealthy_then_unknown_then_newest() -> None:
    """Scale-down victims: unhealthy first, then no verdict, then healthy; the newest first within each."""
    machines = [
        m("h-old", created="2026-11-01T00:00:00Z"),
        m("h-new", created="2026-11-02T00:00:00Z"),
        m("unknown", healthy=None),
        m("sick", healthy=False, created="2026-10-01T00:00:00Z"),
    ]
    assert [v.id for v in least_useful_first(machines)] == ["sick", "unknown", "h-new", "h-old"]


@pytest.mark.parametrize(
    ("count", "minimum", "expected", "note"),
    [
        (1, 0, ["b"], ""),
        (2, 1, ["b"], "minimum of 1"),
        (5, 0, ["b"], "last started machine of the current release"),
        (0, 0, [], ""),
    ],
)
def test_to_take_down_respects_minimum_and_keeps_one_current(
    count: int, minimum: int, expected: list[str], note: str
) -> None:
    """Never below the region minimum; never the app's last started machine of the current release."""
    machines = [
        m("a", created="2026-11-01T00:00:00Z"),
        m("b", created="2026-11-02T00:00:00Z"),
        m("p", state="stopped"),
    ]
    chosen, why = to_take_down(machines, "iad", count, minimum, V2)
    assert [v.id for v in chosen] == expected
    assert note in why


def test_to_take_down_may_empty_a_region_when_another_runs_the_release() -> None:
    """A region may go to zero when its minimum is zero and another region keeps the current release."""
    machines = [m("a"), m("b", region="cdg")]
    chosen, _ = to_take_down(machines, "iad", 1, 0, V2)
    assert [v.id for v in chosen] == ["a"]


def test_to_take_down_takes_old_release_machines_freely() -> None:
    """Machines of an older release do not count as the last of the current one."""
    machines = [m("new"), m("old", version=1, image="shop:v1", healthy=False)]
    chosen, _ = to_take_down(machines, "iad", 2, 0, V2)
    assert [v.id for v in chosen] == ["old"]
