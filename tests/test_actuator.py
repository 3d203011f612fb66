"""The actuator over real HTTP against the simulator: scale up, scale down, rollouts, leases, dry run, faults.

Every outcome is checked through the simulator (machines, leases, the log of mutations, the counters), not
only through the result objects the actuator returns.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from daemon.actuator import CREATED_BY, Actuator
from daemon.clock import SystemClock
from daemon.core.plan import (
    Action,
    ActionResult,
    Outcome,
    Rollout,
    RolloutTarget,
    ScaleDown,
    ScaleDownMode,
    ScaleUp,
)
from daemon.fly import errors
from daemon.fly.client import IDEMPOTENCY_KEY, NO_BACKOFF, MachinesClient, RetryPolicy
from daemon.sim.api import Exchange
from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer
from tests.conftest import FAST, TOKEN, eventually
from tests.sim.helpers import machine_ids, make_app, wait_state

APP = "shop"
IMAGE_1 = "registry.fly.io/shop:deployment-1"
IMAGE_2 = "registry.fly.io/shop:deployment-2"
MUTATING = {"create", "update", "start", "stop", "suspend", "restart", "destroy", "cordon", "uncordon"}
LEASE_GATED = {"Machines_update", "Machines_start", "Machines_stop", "Machines_suspend", "Machines_delete"}
NONCE = "fly-machine-lease-nonce"

Build = Callable[..., Actuator]


# ---------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
async def build(sim: SimServer) -> AsyncIterator[Build]:
    """Make actuators on the simulator, each with its own client (closed at the end)."""
    clients: list[MachinesClient] = []

    def make(
        *,
        retry: RetryPolicy = NO_BACKOFF,
        dry_run: bool = False,
        timeout: float = 30.0,
        wait_timeout: float = 5,
        guard: Callable[[str], str | None] | None = None,
    ) -> Actuator:
        client = MachinesClient(
            sim.api_url, TOKEN, clock=SystemClock(), retry=retry, timeout=timeout, guard=guard
        )
        clients.append(client)
        return Actuator(client, SystemClock(), dry_run=dry_run, wait_timeout=wait_timeout, lease_ttl=5)

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def actuator(build: Build) -> Actuator:
    return build()


@pytest.fixture
def wire(sim: SimServer) -> list[Exchange]:
    """Every exchange with the simulated Machines API, as seen on the wire."""
    seen: list[Exchange] = []
    sim.observers.append(seen.append)
    return seen


def assert_all_leased(wire: list[Exchange]) -> None:
    """Every lease-gated call flywatch made carried a lease nonce; every create asked for a short lease."""
    ours = [x for x in wire if x.headers.get("User-Agent") == "flywatch"]  # not the test's own set-up calls
    assert ours
    for exchange in (x for x in ours if x.operation in LEASE_GATED):
        assert exchange.headers.get(NONCE), f"{exchange.method} {exchange.path} without a lease"
    for exchange in (x for x in ours if x.operation == "Machines_create"):
        assert json.loads(exchange.body)["lease_ttl"] == 5


async def one(actuator: Actuator, action: Action) -> ActionResult:
    """Run one action through `execute` (the entry point that never raises)."""
    [result] = await actuator.execute([action])
    return result


async def machines(api: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    response = await api.get(f"/apps/{APP}/machines", params=params)
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()
    return result


async def machine(api: httpx.AsyncClient, machine_id: str) -> dict[str, Any]:
    response = await api.get(f"/apps/{APP}/machines/{machine_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def ids_in(app: dict[str, Any], state: str, region: str | None = None) -> list[str]:
    """Ids of a control-API app summary's machines in `state` (and `region`), sorted."""
    return sorted(m["id"] for m in app["machines"] if m["state"] == state and region in (None, m["region"]))


async def states(api: httpx.AsyncClient) -> dict[str, str]:
    return {m["id"]: m["state"] for m in await machines(api)}


async def counters(control: httpx.AsyncClient) -> dict[str, Any]:
    response = await control.get("/counters")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def reset_counters(control: httpx.AsyncClient) -> None:
    assert (await control.delete("/counters")).status_code == 200


async def mutations(control: httpx.AsyncClient, *actions: str) -> list[dict[str, Any]]:
    """The simulator's log of mutations (only `actions`, when given), oldest first."""
    logged: list[dict[str, Any]] = (await counters(control))["mutations"]
    return [m for m in logged if not actions or m["action"] in actions]


async def add_fault(control: httpx.AsyncClient, **fault: Any) -> None:
    response = await control.post("/faults", json=fault)
    assert response.status_code == 201, response.text


async def mark_image(control: httpx.AsyncClient, image: str, mode: str) -> None:
    response = await control.post("/images", json={"image": image, "mode": mode})
    assert response.status_code == 200, response.text


async def leases(api: httpx.AsyncClient) -> dict[str, str]:
    """The live lease nonce of every machine of the app that has one."""
    held = {}
    for machine_id in await machine_ids(api, APP):
        response = await api.get(f"/apps/{APP}/machines/{machine_id}/lease")
        if response.status_code == 200:
            held[machine_id] = response.json()["data"]["nonce"]
        else:
            assert response.status_code == 404, response.text
    return held


async def acquire_foreign_lease(api: httpx.AsyncClient, machine_id: str) -> str:
    """Take a machine's lease as a deploy would (through the raw API), and give its nonce."""
    response = await api.post(
        f"/apps/{APP}/machines/{machine_id}/lease", json={"ttl": 60, "description": "fly deploy"}
    )
    assert response.status_code == 201, response.text
    nonce: str = response.json()["data"]["nonce"]
    return nonce


async def raw_update(api: httpx.AsyncClient, machine_id: str, **changes: Any) -> dict[str, Any]:
    """Update a machine through the raw API (config fields replaced by `changes`), and wait until it runs."""
    current = await machine(api, machine_id)
    config = {**current["config"], **changes}
    response = await api.post(f"/apps/{APP}/machines/{machine_id}", json={"config": config})
    assert response.status_code == 200, response.text
    updated: dict[str, Any] = response.json()
    if current["state"] == "started":
        waited = await wait_state(api, APP, machine_id, "started", version=updated["instance_id"])
        assert waited.status_code == 200, waited.text
    return updated


async def to_release_2(api: httpx.AsyncClient, machine_id: str, image: str = IMAGE_2) -> dict[str, Any]:
    """Deploy release 2 to one machine by hand: a new image and fly_release_version=2."""
    current = await machine(api, machine_id)
    metadata = {**current["config"]["metadata"], "fly_release_version": "2"}
    return await raw_update(api, machine_id, image=image, metadata=metadata)


async def raw_create(api: httpx.AsyncClient, config: dict[str, Any], region: str) -> str:
    """Create a machine through the raw API and wait until it is started."""
    response = await api.post(f"/apps/{APP}/machines", json={"config": config, "region": region})
    assert response.status_code == 200, response.text
    machine_id: str = response.json()["id"]
    waited = await wait_state(api, APP, machine_id, "started")
    assert waited.status_code == 200, waited.text
    return machine_id


async def healthy(api: httpx.AsyncClient, machine_id: str) -> bool:
    checks = (await machine(api, machine_id)).get("checks") or []
    return bool(checks) and all(c["status"] == "passing" for c in checks)


async def critical(api: httpx.AsyncClient, machine_id: str) -> bool:
    checks = (await machine(api, machine_id)).get("checks") or []
    return any(c["status"] == "critical" for c in checks)


async def next_second() -> None:
    """Let the wall clock pass a whole second: Fly's created_at has a resolution of one second."""
    start = int(time.time())

    async def passed() -> bool:
        return int(time.time()) > start

    await eventually(passed, timeout=2.0)


def steps_of(result: ActionResult, outcome: Outcome | None = None) -> list[str]:
    return [s.machine_id for s in result.steps if outcome is None or s.outcome is outcome]


def without(config: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in keys}


# ---------------------------------------------------------------------------- scale up


async def test_scale_up_starts_parked_machines_and_creates_none(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient, wire: list[Exchange]
) -> None:
    """Scale up starts parked machines of the region and creates none when enough are parked."""
    app = await make_app(control, regions={"iad": {"started": 1, "stopped": 2}, "cdg": {"stopped": 1}})
    parked = ids_in(app, "stopped", "iad")
    await reset_counters(control)

    result = await one(actuator, ScaleUp(APP, "iad", 2, reason="load"))

    assert result.outcome is Outcome.DONE, result.reason
    assert sorted(steps_of(result, Outcome.DONE)) == parked
    assert {s.operation for s in result.steps} == {"start"}
    now = await states(api)
    assert all(now[m] == "started" for m in parked)
    assert now[ids_in(app, "stopped", "cdg")[0]] == "stopped"  # another region is not touched
    seen = await counters(control)
    assert "Machines_create" not in seen["requests"]
    assert sorted(m["machine"] for m in await mutations(control, *MUTATING)) == parked
    assert_all_leased(wire)
    assert await leases(api) == {}


async def test_scale_up_resumes_suspended_before_stopped(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Scale up starts a suspended machine (faster to resume) before a stopped one."""
    app = await make_app(control, regions={"iad": {"started": 1, "stopped": 1, "suspended": 1}})
    [suspended] = ids_in(app, "suspended")
    [stopped] = ids_in(app, "stopped")

    result = await one(actuator, ScaleUp(APP, "iad", 1, reason="load"))

    assert result.outcome is Outcome.DONE, result.reason
    assert steps_of(result) == [suspended]
    assert "suspended" in result.steps[0].reason
    now = await states(api)
    assert now[suspended] == "started"
    assert now[stopped] == "stopped"


async def test_scale_up_clones_a_healthy_current_machine_into_the_region(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient, wire: list[Exchange]
) -> None:
    """Clones take the source's config minus standbys and idempotency key, get flywatch_created, and start."""
    app = await make_app(control, regions={"iad": 2})
    source, other = ids_in(app, "started")
    await raw_update(api, source, standbys=[other])
    # the source was itself created by flywatch once: its idempotency key must not be copied
    response = await api.post(
        f"/apps/{APP}/machines/{source}/metadata/{IDEMPOTENCY_KEY}", json={"value": "old-key"}
    )
    assert response.status_code == 204
    await eventually(lambda: healthy(api, source))
    before = await machine(api, source)

    result = await one(actuator, ScaleUp(APP, "cdg", 2, reason="load in cdg"))

    assert result.outcome is Outcome.DONE, result.reason
    assert [s.operation for s in result.steps] == ["create", "create"]
    assert all(f"cloned from {source}" in s.reason for s in result.steps)
    clones = [m for m in await machines(api) if m["id"] not in (source, other)]
    assert len(clones) == 2
    keys = set()
    for clone in clones:
        assert clone["region"] == "cdg"
        assert clone["state"] == "started"
        config = clone["config"]
        expected = without(before["config"], "standbys", "metadata")
        assert without(config, "standbys", "metadata", "mounts") == expected
        assert not config.get("standbys")
        assert not config.get("mounts")
        metadata = dict(config["metadata"])
        assert metadata.pop(CREATED_BY) == "true"
        keys.add(metadata.pop(IDEMPOTENCY_KEY))  # the create's own key, not the source's
        assert metadata == without(before["config"]["metadata"], IDEMPOTENCY_KEY)
    assert len(keys) == 2
    assert "old-key" not in keys
    creates = await mutations(control, "create")
    assert [m["region"] for m in creates] == ["cdg", "cdg"]
    assert_all_leased(wire)
    assert await leases(api) == {}


async def test_an_app_lost_mid_action_ends_it_at_once_and_no_step_after_is_tried(
    build: Build, sim: SimServer, api: httpx.AsyncClient, control: httpx.AsyncClient, wire: list[Exchange]
) -> None:
    """The client's guard says the app is no longer ours once the first create of three is answered: the
    action ends there, raised as NotOwner (not a failed step that the next create follows), the plan's
    next action is not tried either, and nothing more is sent but the release of the create's lease."""
    await make_app(control, regions={"iad": 1})
    lost = asyncio.Event()

    def guard(name: str) -> str | None:
        return "b/2f00aa owns it" if lost.is_set() and name == APP else None

    def lose_after_first_create(exchange: Exchange) -> None:
        if exchange.operation == "Machines_create" and exchange.status == 200:
            lost.set()

    sim.observers.append(lose_after_first_create)
    actuator = build(guard=guard)
    with pytest.raises(errors.NotOwner, match="b/2f00aa owns it"):
        await actuator.execute(
            [ScaleUp(APP, "iad", 3, reason="load"), ScaleUp(APP, "cdg", 1, reason="load in cdg")]
        )
    assert [m["region"] for m in await mutations(control, "create")] == ["iad"]
    sent = [e.operation for e in wire if e.method != "GET"]
    assert sent.count("Machines_create") == 1, sent
    assert set(sent) == {"Machines_create", "Machines_release_lease"}, sent
    assert await leases(api) == {}


async def test_scale_up_clone_drops_the_mounts_of_attached_volumes(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A clone of a machine with a volume is created without its mounts (the volume is attached elsewhere)."""
    app = await make_app(control, regions={"iad": 1}, volume_gb=1)
    [source] = ids_in(app, "started")
    assert (await machine(api, source))["config"]["mounts"]

    result = await one(actuator, ScaleUp(APP, "iad", 1, reason="load"))

    assert result.outcome is Outcome.DONE, result.reason
    [clone] = [m for m in await machines(api) if m["id"] != source]
    assert clone["state"] == "started"
    assert not clone["config"].get("mounts")
    assert (await machine(api, source))["config"]["mounts"]  # the source keeps its volume


async def test_scale_up_never_starts_or_clones_an_older_release(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """With one machine on release 2, parked release-1 machines stay parked and the clone runs release 2."""
    app = await make_app(control, regions={"iad": {"started": 2, "stopped": 1}})
    newest, old = ids_in(app, "started")
    [parked_old] = ids_in(app, "stopped")
    await to_release_2(api, newest)
    await eventually(lambda: healthy(api, newest))

    result = await one(actuator, ScaleUp(APP, "iad", 1, reason="load"))

    assert result.outcome is Outcome.DONE, result.reason
    [step] = result.steps
    assert step.operation == "create"
    assert f"cloned from {newest}" in step.reason
    clone = await machine(api, step.machine_id)
    assert clone["config"]["image"] == IMAGE_2
    assert clone["config"]["metadata"]["fly_release_version"] == "2"
    assert clone["state"] == "started"
    now = await states(api)
    assert now[parked_old] == "stopped"
    assert now[old] == "started"


async def test_scale_up_without_a_healthy_source_fails_with_the_reason(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """With no healthy started machine of the current release to clone, scale up fails and says why."""
    app = await make_app(control, regions={"iad": 2})
    await mark_image(control, IMAGE_1, "unhealthy")
    for machine_id in ids_in(app, "started"):
        await eventually(lambda machine_id=machine_id: critical(api, machine_id))
    await reset_counters(control)

    result = await one(actuator, ScaleUp(APP, "iad", 1, reason="load"))

    assert result.outcome is Outcome.FAILED, result.reason
    assert "no healthy started machine of release 1" in result.reason
    assert "Machines_create" not in (await counters(control))["requests"]
    assert await mutations(control, *MUTATING) == []


async def test_scale_up_capacity_error_fails_that_region_only(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A region without capacity fails naming the region after one create; another region is done."""
    await make_app(control, regions={"iad": 1})
    await add_fault(control, kind="capacity", region="cdg")
    await reset_counters(control)

    cdg, iad = await actuator.execute(
        [ScaleUp(APP, "cdg", 3, reason="load in cdg"), ScaleUp(APP, "iad", 1, reason="load in iad")]
    )

    assert cdg.outcome is Outcome.FAILED, cdg.reason
    assert "insufficient capacity in cdg" in cdg.reason
    assert len(cdg.steps) == 3
    assert all(s.outcome is Outcome.FAILED and s.region == "cdg" for s in cdg.steps)
    assert sum("not tried: cdg has no capacity" in s.reason for s in cdg.steps) == 2
    assert iad.outcome is Outcome.DONE, iad.reason
    seen = await counters(control)
    assert seen["responses"]["Machines_create"] == {"412": 1, "200": 1}  # cdg stopped after its first
    regions = [m["region"] for m in await machines(api)]
    assert regions.count("cdg") == 0
    assert regions.count("iad") == 2


async def test_scale_up_leaves_an_app_alone_while_someone_else_holds_a_lease(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A parked machine under someone else's lease is skipped, and no clone is made around it this tick."""
    app = await make_app(control, regions={"iad": {"started": 1, "stopped": 1}})
    [parked] = ids_in(app, "stopped")
    foreign = await acquire_foreign_lease(api, parked)

    result = await one(actuator, ScaleUp(APP, "iad", 1, reason="load"))

    by_machine = {s.machine_id: s for s in result.steps}
    assert by_machine[parked].outcome is Outcome.SKIPPED
    assert "leased by someone else" in by_machine[parked].reason
    assert [s for s in result.steps if s.operation == "create"] == []
    assert result.outcome is Outcome.SKIPPED
    assert "others hold leases" in result.reason
    assert (await machine(api, parked))["state"] == "stopped"
    assert await leases(api) == {parked: foreign}
    assert not [m for m in await mutations(control, *MUTATING) if m["machine"] == parked]


# ---------------------------------------------------------------------------- scale down


async def test_scale_down_takes_the_unhealthy_machine_first(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Scale down stops an unhealthy machine before healthy ones."""
    app = await make_app(control, regions={"iad": 3})
    sick = ids_in(app, "started")[1]
    await raw_update(api, sick, image="registry.fly.io/shop:bad")
    await mark_image(control, "registry.fly.io/shop:bad", "unhealthy")
    await eventually(lambda: critical(api, sick))
    await reset_counters(control)

    result = await one(actuator, ScaleDown(APP, "iad", 1, reason="idle"))

    assert result.outcome is Outcome.DONE, result.reason
    assert steps_of(result, Outcome.DONE) == [sick]
    now = await states(api)
    assert now[sick] == "stopped"
    assert sorted(m for m, s in now.items() if s == "started") == sorted(set(ids_in(app, "started")) - {sick})
    assert [m["machine"] for m in await mutations(control, *MUTATING)] == [sick]
    assert await leases(api) == {}


async def test_scale_down_takes_the_newest_healthy_machine_first(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Among healthy machines, scale down stops the newest first."""
    app = await make_app(control, regions={"iad": 2})
    config = (await machine(api, ids_in(app, "started")[0]))["config"]
    await next_second()
    newest = await raw_create(api, config, "iad")
    await eventually(lambda: healthy(api, newest))
    assert (await machine(api, newest))["created_at"] > (await machine(api, ids_in(app, "started")[0]))[
        "created_at"
    ]

    result = await one(actuator, ScaleDown(APP, "iad", 1, reason="idle"))

    assert result.outcome is Outcome.DONE, result.reason
    assert steps_of(result) == [newest]
    now = await states(api)
    assert now[newest] == "stopped"
    assert all(now[m] == "started" for m in ids_in(app, "started"))


async def test_scale_down_keeps_the_region_minimum(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Scale down never goes below the region's minimum, and says so."""
    await make_app(control, regions={"iad": 3, "cdg": 1})

    result = await one(actuator, ScaleDown(APP, "iad", 3, reason="idle", min_machines=2))

    assert result.outcome is Outcome.DONE, result.reason
    assert "only 1 of 3 may go: the region keeps its minimum of 2" in result.reason
    assert len(result.steps) == 1
    iad = [m["state"] for m in await machines(api, region="iad")]
    assert sorted(iad) == ["started", "started", "stopped"]

    again = await one(actuator, ScaleDown(APP, "iad", 1, reason="idle", min_machines=2))

    assert again.outcome is Outcome.SKIPPED, again.reason
    assert "minimum of 2" in again.reason
    assert sorted(m["state"] for m in await machines(api, region="iad")) == iad


async def test_scale_down_keeps_the_last_machine_of_the_current_release(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Scale down never stops the last started machine of the current release, even with no minimum."""
    app = await make_app(control, regions={"iad": 2})
    current, old = ids_in(app, "started")
    await to_release_2(api, current)
    await eventually(lambda: healthy(api, current))

    result = await one(actuator, ScaleDown(APP, "iad", 2, reason="idle", min_machines=0))

    assert result.outcome is Outcome.DONE, result.reason
    assert "only 1 of 2 may go: the last started machine of the current release stays" in result.reason
    assert steps_of(result) == [old]
    now = await states(api)
    assert now[current] == "started"
    assert now[old] == "stopped"


async def test_scale_down_suspends_in_suspend_mode(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient, wire: list[Exchange]
) -> None:
    """In suspend mode, scale down suspends the machine instead of stopping it."""
    await make_app(control, regions={"iad": 2})

    result = await one(actuator, ScaleDown(APP, "iad", 1, reason="idle", mode=ScaleDownMode.SUSPEND))

    assert result.outcome is Outcome.DONE, result.reason
    [step] = result.steps
    assert step.operation == "suspend"
    assert step.reason == "suspended"
    assert (await machine(api, step.machine_id))["state"] == "suspended"
    assert [m["action"] for m in await mutations(control, *MUTATING)] == ["suspend"]
    assert_all_leased(wire)
    assert await leases(api) == {}


async def test_scale_down_destroys_only_machines_without_a_volume(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient, wire: list[Exchange]
) -> None:
    """In destroy mode a volume-less machine is stopped then destroyed; one with a volume is only stopped."""
    app = await make_app(control, regions={"iad": 1, "cdg": 1}, volume_gb=1)
    [with_volume] = ids_in(app, "started", "iad")
    config = (await machine(api, with_volume))["config"]
    volume_less = await raw_create(api, without(config, "mounts"), "iad")
    await eventually(lambda: healthy(api, volume_less))
    await reset_counters(control)

    result = await one(actuator, ScaleDown(APP, "iad", 2, reason="idle", mode=ScaleDownMode.DESTROY))

    assert result.outcome is Outcome.DONE, result.reason
    by_machine = {s.machine_id: s for s in result.steps}
    assert by_machine[volume_less].operation == "destroy"
    assert by_machine[volume_less].reason == "stopped, then destroyed"
    assert by_machine[with_volume].operation == "stop"
    assert "volume" in by_machine[with_volume].reason
    done = await mutations(control, *MUTATING)
    assert [m["action"] for m in done if m["machine"] == volume_less] == ["stop", "destroy"]
    assert not [m for m in done if m["machine"] == volume_less and m.get("force")]  # graceful, never forced
    assert [m["action"] for m in done if m["machine"] == with_volume] == ["stop"]
    assert_all_leased(wire)

    async def gone() -> bool:
        return volume_less not in await machine_ids(api)

    await eventually(gone)
    kept = await machine(api, with_volume)
    assert kept["state"] == "stopped"
    assert kept["config"]["mounts"] == config["mounts"]
    assert await leases(api) == {}


async def test_scale_down_skips_a_machine_leased_by_a_deploy(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A machine under someone else's lease is skipped with why; others are done; none of our leases stay."""
    app = await make_app(control, regions={"iad": 4})
    started = ids_in(app, "started")
    leased = started[0]  # first by id among equally old machines: certainly chosen
    foreign = await acquire_foreign_lease(api, leased)

    result = await one(actuator, ScaleDown(APP, "iad", 3, reason="idle"))

    by_machine = {s.machine_id: s for s in result.steps}
    assert set(by_machine) == set(started[:3])
    assert by_machine[leased].outcome is Outcome.SKIPPED
    assert "leased by someone else" in by_machine[leased].reason
    assert all(by_machine[m].outcome is Outcome.DONE for m in started[1:3])
    assert result.outcome is not Outcome.DONE
    assert "2 of 3 done" in result.reason
    assert "leased by someone else" in result.reason
    now = await states(api)
    assert now[leased] == "started"
    assert [now[m] for m in started[1:3]] == ["stopped", "stopped"]
    assert not [m for m in await mutations(control, *MUTATING) if m["machine"] == leased]
    assert await leases(api) == {leased: foreign}  # the deploy's lease is still there, and only it


# ---------------------------------------------------------------------------- rollout


def target(current: dict[str, Any], image: str = IMAGE_2, version: str = "2") -> RolloutTarget:
    """The machine's whole config with a new image and release version."""
    config = {
        **current["config"],
        "image": image,
        "metadata": {**current["config"]["metadata"], "fly_release_version": version},
    }
    return RolloutTarget(machine_id=current["id"], config=config)


async def test_rollout_updates_every_target_two_at_a_time_and_verifies(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient, wire: list[Exchange]
) -> None:
    """A rollout with max_parallel 2 updates every machine to its target config, new instances, verified."""
    await make_app(control, regions={"iad": 2, "cdg": 1})
    before = {m["id"]: m for m in await machines(api)}
    targets = tuple(target(m) for m in before.values())
    await reset_counters(control)

    result = await one(actuator, Rollout(APP, targets, reason="rollback", max_parallel=2))

    assert result.outcome is Outcome.DONE, result.reason
    assert all(s.outcome is Outcome.DONE and IMAGE_2 in s.reason for s in result.steps)
    for wanted in targets:
        after = await machine(api, wanted.machine_id)
        old = before[wanted.machine_id]
        assert after["config"] == dict(wanted.config)
        assert without(after["config"], "image", "metadata") == without(old["config"], "image", "metadata")
        assert after["instance_id"] != old["instance_id"]
        assert after["state"] == "started"
    # never more than two machines under our leases at once, and two at some point
    held, most = set(), 0
    for m in await mutations(control, "lease", "release_lease"):
        if m["action"] == "lease":
            held.add(m["machine"])
        else:
            held.discard(m["machine"])
        most = max(most, len(held))
    assert most == 2
    assert_all_leased(wire)
    assert await leases(api) == {}


async def test_rollout_detects_a_silently_reverted_update_and_stops(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """An update Fly silently reverts fails as "reverted" and stops the rollout: later ones are not tried."""
    await make_app(control, regions={"iad": 3})
    before = await machines(api)
    targets = tuple(target(m) for m in before)
    await add_fault(control, kind="revert_update", app=APP, count=1)
    await reset_counters(control)

    result = await one(actuator, Rollout(APP, targets, reason="rollback", max_parallel=1))

    assert result.outcome is Outcome.FAILED, result.reason
    first, *rest = result.steps
    assert first.outcome is Outcome.FAILED
    assert "reverted" in first.reason
    assert all(s.outcome is Outcome.SKIPPED and "not tried" in s.reason for s in rest)
    assert len(rest) == 2
    assert (await machine(api, first.machine_id))["config"]["image"] == IMAGE_1
    updated = [m["machine"] for m in await mutations(control, "update")]
    assert updated == [first.machine_id]
    for old in before[1:]:
        assert (await machine(api, old["id"]))["instance_id"] == old["instance_id"]
    assert await leases(api) == {}


async def test_rollout_detects_a_reverted_update_of_a_stopped_machine(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A stopped machine's update is verified once it has settled, so a silent revert is caught there too."""
    app = await make_app(control, regions={"iad": {"started": 1, "stopped": 1}})
    [parked] = ids_in(app, "stopped")
    await add_fault(control, kind="revert_update", app=APP, count=1)

    result = await one(actuator, Rollout(APP, (target(await machine(api, parked)),), reason="rollback"))

    assert result.outcome is Outcome.FAILED, result.reason
    assert "reverted" in result.steps[0].reason
    after = await machine(api, parked)
    assert after["state"] == "stopped"
    assert after["config"]["image"] == IMAGE_1


async def test_rollout_updates_a_stopped_machine_and_leaves_it_stopped(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A stopped machine is updated to its target config and stays stopped (it is not started)."""
    app = await make_app(control, regions={"iad": {"started": 1, "stopped": 1}})
    [parked] = ids_in(app, "stopped")
    wanted = target(await machine(api, parked))

    result = await one(actuator, Rollout(APP, (wanted,), reason="rollback"))

    assert result.outcome is Outcome.DONE, result.reason
    after = await machine(api, parked)
    assert after["state"] == "stopped"
    assert after["config"] == dict(wanted.config)


async def test_rollout_skips_a_target_already_on_its_config(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A target that already runs its config is skipped, not updated."""
    await make_app(control, regions={"iad": 1})
    [current] = await machines(api)
    await reset_counters(control)

    same = RolloutTarget(machine_id=current["id"], config=current["config"])
    result = await one(actuator, Rollout(APP, (same,), reason="rollback"))

    assert result.outcome is Outcome.SKIPPED, result.reason
    assert result.steps[0].reason == "already runs the target config"
    assert await mutations(control, *MUTATING, "lease") == []
    assert (await machine(api, current["id"]))["instance_id"] == current["instance_id"]


async def test_rollout_to_a_crashing_image_fails_promptly(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """An update to an image that crashes at boot fails well before the wait timeout and stops the rollout."""
    await make_app(control, regions={"iad": 2})
    before = await machines(api)
    await mark_image(control, IMAGE_2, "crash")

    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await one(actuator, Rollout(APP, tuple(target(m) for m in before), reason="deploy"))
    elapsed = loop.time() - started

    assert result.outcome is Outcome.FAILED, result.reason
    first, second = result.steps
    assert first.outcome is Outcome.FAILED
    assert "failed" in first.reason
    assert second.outcome is Outcome.SKIPPED
    assert (await machine(api, first.machine_id))["state"] == "failed"
    assert (await machine(api, second.machine_id))["instance_id"] == before[1]["instance_id"]
    assert elapsed < 3.0  # the wait timeout is 5 s: a crash is seen as it happens
    assert await leases(api) == {}


async def test_rollout_skips_a_target_leased_by_a_deploy(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A rollout target under someone else's lease is skipped with the reason and left as it was."""
    await make_app(control, regions={"iad": 2})
    leased, free = await machines(api)
    foreign = await acquire_foreign_lease(api, leased["id"])

    result = await one(actuator, Rollout(APP, (target(leased), target(free)), reason="rollback"))

    first, second = result.steps
    assert first.outcome is Outcome.SKIPPED
    assert "leased by someone else" in first.reason
    assert second.outcome is Outcome.DONE, second.reason
    assert (await machine(api, leased["id"]))["instance_id"] == leased["instance_id"]
    assert (await machine(api, free["id"]))["config"]["image"] == IMAGE_2
    assert await leases(api) == {leased["id"]: foreign}


# ---------------------------------------------------------------------------- dry run


async def _dry_actions(api: httpx.AsyncClient) -> dict[str, Action]:
    rollout = Rollout(APP, tuple(target(m) for m in await machines(api, region="cdg")), reason="rollback")
    return {
        "scale_up": ScaleUp(APP, "iad", 3, reason="load"),
        "scale_down": ScaleDown(APP, "cdg", 1, reason="idle", mode=ScaleDownMode.DESTROY),
        "rollout": rollout,
    }


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("scale_up", ["start ", "create 2 clones of "]),
        ("scale_down", ["destroy "]),
        ("rollout", ["update ", IMAGE_2]),
    ],
)
async def test_dry_run_changes_nothing_and_says_what_it_would_do(
    build: Build, api: httpx.AsyncClient, control: httpx.AsyncClient, kind: str, says: list[str]
) -> None:
    """In dry run every kind of action makes no mutation and reports "dry run: would ..."."""
    await make_app(control, regions={"iad": {"started": 1, "stopped": 1}, "cdg": 2})
    before = {m["id"]: (m["state"], m["instance_id"]) for m in await machines(api)}
    action = (await _dry_actions(api))[kind]
    await reset_counters(control)

    result = await one(build(dry_run=True), action)

    assert result.dry_run
    assert result.outcome is Outcome.SKIPPED
    assert result.reason.startswith("dry run: would ")
    for text in says:
        assert text in result.reason
    assert (await counters(control))["mutations"] == []
    assert {m["id"]: (m["state"], m["instance_id"]) for m in await machines(api)} == before


# ---------------------------------------------------------------------------- API faults


async def calm_requests(actuator: Actuator, control: httpx.AsyncClient, count: int) -> int:
    """How many requests the same scale-up costs on an identical app without faults (counters reset after)."""
    await make_app(control, name="calm", regions={"iad": {"started": 1, "stopped": 1}})
    await reset_counters(control)
    result = await one(actuator, ScaleUp("calm", "iad", count, reason="load"))
    assert result.outcome is Outcome.DONE, result.reason
    total = sum((await counters(control))["requests"].values())
    await reset_counters(control)
    return total


async def test_scale_up_rides_out_a_5xx_burst_with_bounded_retries(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A 5xx burst on every endpoint a scale-up uses is retried, a bounded number of times; it ends done."""
    calm = await calm_requests(actuator, control, 2)
    await make_app(control, regions={"iad": {"started": 1, "stopped": 1}})
    burst = {
        "Machines_list": 1,
        "Machines_create_lease": 1,
        "Machines_start": 1,
        "Machines_wait": 1,
        "Machines_create": 1,
        "Machines_release_lease": 1,
    }
    for endpoint, count in burst.items():
        await add_fault(control, endpoint=endpoint, app=APP, status=503, count=count)
    await reset_counters(control)

    result = await one(actuator, ScaleUp(APP, "iad", 2, reason="load"))

    assert result.outcome is Outcome.DONE, result.reason
    seen = await counters(control)
    assert seen["faults_injected"] == burst
    # each 5xx cost one more request; the failed create also two lookups by its idempotency key
    assert sum(seen["requests"].values()) <= calm + sum(burst.values()) + 2 * burst["Machines_create"]
    assert seen["responses"]["Machines_create"] == {"503": 1, "200": 1}
    assert len(await mutations(control, "create")) == 1  # no duplicate machine
    assert sorted(m["state"] for m in await machines(api)) == ["started"] * 3
    assert await leases(api) == {}


async def test_ambiguous_create_makes_no_duplicate_and_leaves_no_lease(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A create done but answered 503 (answer lost) is found again: one machine, and no lease left on it."""
    await make_app(control, regions={"iad": 1})
    await add_fault(control, endpoint="Machines_create", app=APP, status=503, count=1, after=True)

    result = await one(actuator, ScaleUp(APP, "iad", 1, reason="load"))

    assert result.outcome is Outcome.DONE, result.reason
    assert len(await mutations(control, "create")) == 1
    assert sorted(m["state"] for m in await machines(api)) == ["started", "started"]
    assert await leases(api) == {}


async def test_scale_up_rides_out_a_429_storm_with_bounded_retries(
    build: Build, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A storm of 429s with Retry-After is waited out within the retry budget; the scale-up ends done."""
    actuator = build(retry=RetryPolicy(attempts=5, base=0.01, cap=0.05))
    calm = await calm_requests(actuator, control, 2)
    await make_app(control, regions={"iad": {"started": 1, "stopped": 1}})
    storm = {
        "Machines_list": 1,
        "Machines_create_lease": 1,
        "Machines_start": 1,
        "Machines_wait": 1,
        "Machines_create": 2,
    }
    for endpoint, count in storm.items():
        await add_fault(control, endpoint=endpoint, app=APP, status=429, count=count, retry_after=0.05)
    await reset_counters(control)

    result = await one(actuator, ScaleUp(APP, "iad", 2, reason="load"))

    assert result.outcome is Outcome.DONE, result.reason
    seen = await counters(control)
    assert seen["faults_injected"] == storm
    assert sum(seen["requests"].values()) <= calm + sum(storm.values())  # a 429 is retried, never looked up
    assert seen["responses"]["Machines_create"] == {"429": 2, "200": 1}
    assert len(await mutations(control, "create")) == 1
    assert await leases(api) == {}


async def test_persistent_429_gives_up_after_the_retry_budget(
    build: Build, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Under 429s that never end, each call is tried exactly `attempts` times and the step fails."""
    app = await make_app(control, regions={"iad": 2})
    retry = RetryPolicy(attempts=3, base=0.01, cap=0.02)
    await add_fault(control, endpoint="Machines_stop", app=APP, status=429)
    await reset_counters(control)

    result = await one(build(retry=retry), ScaleDown(APP, "iad", 1, reason="idle"))

    assert result.outcome is Outcome.FAILED, result.reason
    assert "429" in result.reason
    assert (await counters(control))["requests"]["Machines_stop"] == 3
    assert sorted(s for s in (await states(api)).values()) == ["started", "started"]
    assert ids_in(app, "started") == sorted(await machine_ids(api))
    assert await leases(api) == {}


async def test_timeout_fault_fails_bounded_without_hanging(
    build: Build, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A call that never answers fails after the client's timeout and retry budget; the lease is released."""
    await make_app(control, regions={"iad": 2})
    await add_fault(control, endpoint="Machines_stop", app=APP, timeout=True)
    actuator = build(retry=RetryPolicy(attempts=2, base=0.01, cap=0.02), timeout=0.3)

    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await one(actuator, ScaleDown(APP, "iad", 1, reason="idle"))
    elapsed = loop.time() - started

    assert result.outcome is Outcome.FAILED, result.reason
    assert "no answer in time" in result.reason
    assert elapsed < 3.0
    # a request that is never answered is counted among the faults, not the answered requests
    assert (await counters(control))["faults_injected"] == {"Machines_stop": 2}
    assert sorted((await states(api)).values()) == ["started", "started"]
    assert await leases(api) == {}


async def test_execute_never_raises_when_the_api_is_down(
    build: Build, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """With every call answering 503, execute still returns one failed result per action, with why."""
    await make_app(control, regions={"iad": 2})
    await make_app(control, name="cart", regions={"iad": 2})
    [first, _] = await machines(api)
    await add_fault(control, endpoint="*", status=503)
    retry = RetryPolicy(attempts=2, base=0.01, cap=0.02)
    plan: list[Action] = [
        ScaleUp(APP, "iad", 1, reason="load"),
        ScaleDown("cart", "iad", 1, reason="idle"),
        Rollout(APP, (target(first),), reason="rollback"),
    ]
    await reset_counters(control)

    results = await build(retry=retry).execute(plan)

    assert [r.action for r in results] == plan
    assert all(r.outcome is Outcome.FAILED for r in results), [r.reason for r in results]
    assert all("503" in r.reason for r in results)
    seen = await counters(control)
    assert seen["requests"]["Machines_list"] == 2 * 2  # two actions list, each within the retry budget
    assert seen["requests"]["Machines_show"] == 2
    assert await mutations(control, *MUTATING) == []


# ---------------------------------------------------------------------------- the server's rate limits


class TestUnderFlyRateLimits:
    """With the simulator enforcing Fly's documented rate limits."""

    @pytest.fixture
    def settings(self) -> SimSettings:
        return SimSettings(transition_delay=FAST, rate_limits=True)

    async def test_scale_up_across_regions_causes_no_429(
        self, actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
    ) -> None:
        """Scaling up by 10 machines in 3 regions at once (starts and creates) never gets a 429."""
        await make_app(
            control,
            regions={
                "iad": {"started": 1, "stopped": 2},
                "cdg": {"stopped": 2},
                "nrt": {"stopped": 1},
            },
        )
        await reset_counters(control)

        results = await actuator.execute(
            [
                ScaleUp(APP, "iad", 4, reason="load"),
                ScaleUp(APP, "cdg", 3, reason="load"),
                ScaleUp(APP, "nrt", 3, reason="load"),
            ]
        )

        assert all(r.outcome is Outcome.DONE for r in results), [r.reason for r in results]
        seen = await counters(control)
        assert seen["rate_limited_total"] == 0
        assert seen["requests"]["Machines_create"] == 5  # more than the burst of 3: the client waited
        started = [m for m in await machines(api) if m["state"] == "started"]
        assert sorted(m["region"] for m in started) == ["cdg"] * 3 + ["iad"] * 5 + ["nrt"] * 3
        assert await leases(api) == {}


async def test_one_apps_actions_run_one_after_the_other(
    actuator: Actuator, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Two scale-downs of one app in one plan cannot together stop its current release's last machines."""
    await make_app(control, regions={"iad": 1, "cdg": 1})
    results = await actuator.execute(
        [ScaleDown(APP, "iad", 1, reason="quiet"), ScaleDown(APP, "cdg", 1, reason="quiet")]
    )
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.SKIPPED]
    assert "last started machine of the current release" in results[1].reason
    assert sorted(m["state"] for m in await machines(api)) == ["started", "stopped"]


async def test_a_malformed_answer_fails_the_action_and_never_raises(control: httpx.AsyncClient) -> None:
    """An answer of the wrong shape (a list of junk) is the action's failure, with its reason."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[{"no": "id"}])

    client = MachinesClient(
        "http://fly.invalid",
        "t",
        clock=SystemClock(),
        retry=NO_BACKOFF,
        transport=httpx.MockTransport(handler),
    )
    try:
        result = await Actuator(client, SystemClock()).run(ScaleUp(APP, "iad", 1, reason="load"))
    finally:
        await client.aclose()
    assert result.outcome is Outcome.FAILED
    assert "unexpected answer" in result.reason
