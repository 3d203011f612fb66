"""Machine state transitions (machines-api.md §3) observed over HTTP on the ManualClock (1 s per state)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from daemon.clock import ManualClock
from daemon.sim.server import SimServer
from tests.sim.helpers import make_app

START = 1_790_000_000  # where the ManualClock starts
CRASHY = "registry.fly.io/shop:crashy"
HEALTHY = "registry.fly.io/shop:v2"


def machine_in(app: dict[str, Any], state: str) -> str:
    """The id of the first machine of a control-API app summary in `state`."""
    return next(m["id"] for m in app["machines"] if m["state"] == state)


async def get(api: httpx.AsyncClient, machine_id: str) -> dict[str, Any]:
    response = await api.get(f"/apps/shop/machines/{machine_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def timeline(clock: ManualClock, api: httpx.AsyncClient, machine_id: str, seconds: float) -> list[str]:
    """The machine's state now and every half second after, for `seconds` (transitions take 1 s each)."""
    states = [(await get(api, machine_id))["state"]]
    for _ in range(int(seconds * 2)):
        await clock.advance(0.5)
        states.append((await get(api, machine_id))["state"])
    return states


def events(machine: dict[str, Any], count: int) -> list[tuple[str, str, str]]:
    """The machine's last `count` events, oldest first, as (type, status, source)."""
    return [(e["type"], e["status"], e["source"]) for e in reversed(machine["events"][:count])]


async def post(api: httpx.AsyncClient, machine_id: str, action: str, **kwargs: Any) -> httpx.Response:
    response = await api.post(f"/apps/shop/machines/{machine_id}/{action}", **kwargs)
    assert response.status_code == 200, response.text
    return response


async def test_create_goes_created_starting_started(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Create answers `created`; after 1 s it is `starting`, after 2 s `started`, with events for each."""
    await make_app(manual_control, regions={"iad": 1})
    created = await manual_api.post("/apps/shop/machines", json={"config": {"image": HEALTHY}})
    assert created.json()["state"] == "created"
    machine_id = created.json()["id"]
    assert await timeline(clock, manual_api, machine_id, 3) == [
        "created",
        "created",
        "starting",
        "starting",
        "started",
        "started",
        "started",
    ]
    machine = await get(manual_api, machine_id)
    assert events(machine, 3) == [
        ("launch", "created", "user"),
        ("start", "starting", "user"),
        ("start", "started", "flyd"),
    ]
    assert [e["timestamp"] for e in reversed(machine["events"])] == [
        START * 1000,
        (START + 1) * 1000,
        (START + 2) * 1000,
    ]


async def test_create_with_skip_launch_stays_created_until_started(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """With skip_launch the machine rests in `created`; a start takes it through `starting` to `started`."""
    await make_app(manual_control, regions={"iad": 1})
    body = {"config": {"image": HEALTHY}, "skip_launch": True}
    machine_id = (await manual_api.post("/apps/shop/machines", json=body)).json()["id"]
    assert await timeline(clock, manual_api, machine_id, 2) == ["created"] * 5
    start = await post(manual_api, machine_id, "start")
    assert start.json()["previous_state"] == "created"
    assert await timeline(clock, manual_api, machine_id, 2) == [
        "starting",
        "starting",
        "started",
        "started",
        "started",
    ]


async def test_start_during_launch_is_refused(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """A start while a created machine is still launching is 412 `unable to start ... 'created'`."""
    await make_app(manual_control, regions={"iad": 1})
    machine_id = (await manual_api.post("/apps/shop/machines", json={"config": {"image": HEALTHY}})).json()[
        "id"
    ]
    refused = await manual_api.post(f"/apps/shop/machines/{machine_id}/start")
    assert refused.status_code == 412
    assert (
        refused.json()["error"]
        == "failed_precondition: unable to start machine from current state: 'created'"
    )
    await clock.advance(2)
    assert (await get(manual_api, machine_id))["state"] == "started"


async def test_stop_goes_stopping_stopped(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Stop puts a started machine in `stopping` for 1 s, then `stopped`, with stop events."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    assert (await post(manual_api, machine_id, "stop")).json() == {"ok": True}
    assert await timeline(clock, manual_api, machine_id, 1.5) == [
        "stopping",
        "stopping",
        "stopped",
        "stopped",
    ]
    assert events(await get(manual_api, machine_id), 2) == [
        ("stop", "stopping", "user"),
        ("stop", "stopped", "flyd"),
    ]


async def test_suspend_then_start_from_suspended(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Suspend goes `suspending` -> `suspended`; a start from suspended goes `starting` -> `started`."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    await post(manual_api, machine_id, "suspend")
    assert await timeline(clock, manual_api, machine_id, 1.5) == [
        "suspending",
        "suspending",
        "suspended",
        "suspended",
    ]
    start = await post(manual_api, machine_id, "start")
    assert start.json() == {"previous_state": "suspended", "migrated": False, "new_host": ""}
    assert await timeline(clock, manual_api, machine_id, 1.5) == [
        "starting",
        "starting",
        "started",
        "started",
    ]
    assert events(await get(manual_api, machine_id), 4) == [
        ("suspend", "suspending", "user"),
        ("suspend", "suspended", "flyd"),
        ("start", "starting", "user"),
        ("start", "started", "flyd"),
    ]


async def test_start_from_stopped(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """A start from stopped answers previous_state `stopped` and goes `starting` -> `started`."""
    app = await make_app(manual_control, regions={"iad": {"stopped": 1}})
    machine_id = machine_in(app, "stopped")
    assert (await post(manual_api, machine_id, "start")).json()["previous_state"] == "stopped"
    assert await timeline(clock, manual_api, machine_id, 1.5) == [
        "starting",
        "starting",
        "started",
        "started",
    ]


async def test_restart_goes_restarting_starting_started(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Restart goes `restarting` (1 s) -> `starting` (1 s) -> `started`, keeping the version."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    version = (await get(manual_api, machine_id))["instance_id"]
    await post(manual_api, machine_id, "restart")
    assert await timeline(clock, manual_api, machine_id, 2.5) == [
        "restarting",
        "restarting",
        "starting",
        "starting",
        "started",
        "started",
    ]
    machine = await get(manual_api, machine_id)
    assert machine["instance_id"] == version
    assert events(machine, 3) == [
        ("restart", "restarting", "user"),
        ("restart", "starting", "user"),
        ("restart", "started", "flyd"),
    ]


async def test_update_of_started_replaces_then_starts(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Update of a started machine goes `replacing` -> `starting` -> `started` with a new instance_id."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    before = await get(manual_api, machine_id)
    updated = await manual_api.post(
        f"/apps/shop/machines/{machine_id}", json={"config": before["config"] | {"image": HEALTHY}}
    )
    assert updated.status_code == 200
    assert updated.json()["state"] == "replacing"
    new_version = updated.json()["instance_id"]
    assert new_version != before["instance_id"]
    assert len(new_version) == 26
    assert await timeline(clock, manual_api, machine_id, 2.5) == [
        "replacing",
        "replacing",
        "starting",
        "starting",
        "started",
        "started",
    ]
    after = await get(manual_api, machine_id)
    assert after["instance_id"] == new_version
    assert after["config"]["image"] == HEALTHY
    assert events(after, 3) == [
        ("update", "replacing", "user"),
        ("update", "starting", "user"),
        ("update", "started", "flyd"),
    ]


@pytest.mark.parametrize(
    ("placed", "body", "final"),
    [
        ("stopped", {}, "stopped"),
        ("suspended", {}, "stopped"),
        ("started", {"skip_launch": True}, "stopped"),
        ("created", {}, "created"),
    ],
    ids=["stopped", "suspended", "started-skip-launch", "created"],
)
async def test_update_without_launch_settles_without_starting(
    clock: ManualClock,
    manual_api: httpx.AsyncClient,
    manual_control: httpx.AsyncClient,
    placed: str,
    body: dict[str, Any],
    final: str,
) -> None:
    """Update of a stopped/suspended machine (or with skip_launch) ends stopped; of a created one, created."""
    app = await make_app(manual_control, regions={"iad": {placed: 1}})
    machine_id = machine_in(app, placed)
    before = await get(manual_api, machine_id)
    config = before["config"] | {"image": HEALTHY}
    updated = (
        await manual_api.post(f"/apps/shop/machines/{machine_id}", json={"config": config, **body})
    ).json()
    assert updated["instance_id"] != before["instance_id"]
    assert await timeline(clock, manual_api, machine_id, 2.5) == ["replacing", "replacing"] + [final] * 4
    after = await get(manual_api, machine_id)
    assert after["instance_id"] == updated["instance_id"]
    assert events(after, 2) == [("update", "replacing", "user"), ("update", final, "flyd")]


async def test_destroy_goes_destroying_destroyed_then_404(
    clock: ManualClock,
    manual_sim: SimServer,
    manual_api: httpx.AsyncClient,
    manual_control: httpx.AsyncClient,
) -> None:
    """Destroy goes `destroying` -> `destroyed`; GET answers destroyed for the retention, then 404."""
    app = await make_app(manual_control, regions={"iad": {"stopped": 1}})
    machine_id = machine_in(app, "stopped")
    assert (await manual_api.delete(f"/apps/shop/machines/{machine_id}")).json() == {"ok": True}
    assert await timeline(clock, manual_api, machine_id, 1.5) == [
        "destroying",
        "destroying",
        "destroyed",
        "destroyed",
    ]
    destroyed = await get(manual_api, machine_id)
    assert events(destroyed, 2) == [("destroy", "destroying", "user"), ("destroy", "destroyed", "flyd")]
    retention = manual_sim.platform.settings.destroyed_retention
    await clock.advance(retention - 0.5 - 0.25)  # the machine was destroyed 0.5 s ago
    assert (await get(manual_api, machine_id))["state"] == "destroyed"
    await clock.advance(0.25)  # exactly the retention
    gone = await manual_api.get(f"/apps/shop/machines/{machine_id}")
    assert gone.status_code == 404
    assert gone.json() == {"error": "machine not found"}


async def test_force_destroy_of_a_started_machine(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """A started machine is destroyed only with force: 412 without it, then `destroying` -> `destroyed`."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    refused = await manual_api.delete(f"/apps/shop/machines/{machine_id}")
    assert refused.status_code == 412
    assert (await get(manual_api, machine_id))["state"] == "started"
    assert (
        await manual_api.delete(f"/apps/shop/machines/{machine_id}", params={"force": "true"})
    ).status_code == 200
    assert await timeline(clock, manual_api, machine_id, 1) == ["destroying", "destroying", "destroyed"]


async def test_mutations_of_a_destroyed_machine_are_404(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Start, stop and destroy of a destroyed machine answer 404 machine not found."""
    app = await make_app(manual_control, regions={"iad": {"stopped": 1}})
    machine_id = machine_in(app, "stopped")
    await manual_api.delete(f"/apps/shop/machines/{machine_id}")
    again = await manual_api.delete(f"/apps/shop/machines/{machine_id}")
    assert again.status_code == 412  # already being destroyed
    await clock.advance(1)
    path = f"/apps/shop/machines/{machine_id}"
    for response in (
        await manual_api.post(path + "/start"),
        await manual_api.post(path + "/stop"),
        await manual_api.delete(path),
    ):
        assert response.status_code == 404
        assert response.json() == {"error": "machine not found"}


async def mark(control: httpx.AsyncClient, image: str, mode: str) -> None:
    response = await control.post("/images", json={"image": image, "mode": mode})
    assert response.status_code == 200, response.text


async def test_crash_image_ends_failed(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """A machine of a crash image goes `created` -> `starting` -> `failed`, with an exit event."""
    await make_app(manual_control, regions={"iad": 1})
    await mark(manual_control, CRASHY, "crash")
    machine_id = (await manual_api.post("/apps/shop/machines", json={"config": {"image": CRASHY}})).json()[
        "id"
    ]
    assert await timeline(clock, manual_api, machine_id, 3) == [
        "created",
        "created",
        "starting",
        "starting",
        "failed",
        "failed",
        "failed",
    ]
    machine = await get(manual_api, machine_id)
    assert events(machine, 1) == [("exit", "failed", "flyd")]
    assert machine["events"][0]["request"]["exit_event"]["exit_code"] == 1
    assert machine["checks"] == []


async def test_start_of_a_failed_machine(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """A failed machine can be started: it fails again while its image crashes, starts once it does not."""
    await make_app(manual_control, regions={"iad": 1})
    await mark(manual_control, CRASHY, "crash")
    machine_id = (await manual_api.post("/apps/shop/machines", json={"config": {"image": CRASHY}})).json()[
        "id"
    ]
    await clock.advance(2)
    assert (await get(manual_api, machine_id))["state"] == "failed"
    assert (await post(manual_api, machine_id, "start")).json()["previous_state"] == "failed"
    assert await timeline(clock, manual_api, machine_id, 1.5) == ["starting", "starting", "failed", "failed"]
    await mark(manual_control, CRASHY, "healthy")
    await post(manual_api, machine_id, "start")
    assert await timeline(clock, manual_api, machine_id, 1.5) == [
        "starting",
        "starting",
        "started",
        "started",
    ]


async def test_update_of_a_failed_machine_launches_it(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """An update of a failed machine to a good image goes `replacing` -> `starting` -> `started`."""
    await make_app(manual_control, regions={"iad": 1})
    await mark(manual_control, CRASHY, "crash")
    machine_id = (await manual_api.post("/apps/shop/machines", json={"config": {"image": CRASHY}})).json()[
        "id"
    ]
    await clock.advance(2)
    updated = await manual_api.post(f"/apps/shop/machines/{machine_id}", json={"config": {"image": HEALTHY}})
    assert updated.status_code == 200
    assert await timeline(clock, manual_api, machine_id, 2.5) == [
        "replacing",
        "replacing",
        "starting",
        "starting",
        "started",
        "started",
    ]


async def test_stop_and_destroy_of_a_failed_machine(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """A failed machine can be stopped (`stopping` -> `stopped`) and destroyed without force."""
    await make_app(manual_control, regions={"iad": 1})
    await mark(manual_control, CRASHY, "crash")
    body = {"config": {"image": CRASHY}}
    first = (await manual_api.post("/apps/shop/machines", json=body)).json()["id"]
    second = (await manual_api.post("/apps/shop/machines", json=body)).json()["id"]
    await clock.advance(2)
    await post(manual_api, first, "stop")
    assert await timeline(clock, manual_api, first, 1) == ["stopping", "stopping", "stopped"]
    assert (await manual_api.delete(f"/apps/shop/machines/{second}")).status_code == 200
    assert await timeline(clock, manual_api, second, 1) == ["destroying", "destroying", "destroyed"]


@pytest.mark.parametrize(
    ("placed", "action", "message"),
    [
        ("stopped", "suspend", "unable to suspend machine from current state: 'stopped'"),
        ("stopped", "restart", "unable to restart machine from current state: 'stopped'"),
        ("started", "start", "unable to start machine from current state: 'started'"),
        ("suspended", "suspend", "unable to suspend machine from current state: 'suspended'"),
    ],
)
async def test_illegal_transitions_are_412(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient, placed: str, action: str, message: str
) -> None:
    """A call the machine's state does not allow is 412 failed_precondition and leaves the state alone."""
    app = await make_app(manual_control, regions={"iad": {placed: 1}})
    machine_id = machine_in(app, placed)
    refused = await manual_api.post(f"/apps/shop/machines/{machine_id}/{action}")
    assert refused.status_code == 412
    assert refused.json() == {"error": f"failed_precondition: {message}"}
    assert (await get(manual_api, machine_id))["state"] == placed


async def test_calls_during_transient_states_are_refused(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """While replacing, start and a second update are 412; a stop while stopping is a no-op."""
    app = await make_app(manual_control, regions={"iad": {"stopped": 1, "started": 1}})
    parked, running = machine_in(app, "stopped"), machine_in(app, "started")
    path = f"/apps/shop/machines/{parked}"
    config = (await get(manual_api, parked))["config"] | {"image": HEALTHY}
    await manual_api.post(path, json={"config": config})
    start = await manual_api.post(path + "/start")
    assert start.status_code == 412
    assert start.json() == {"error": "failed_precondition: machine getting replaced, refusing to start"}
    second = await manual_api.post(path, json={"config": config})
    assert second.status_code == 412
    assert "current state: 'replacing'" in second.json()["error"]
    await post(manual_api, running, "stop")
    assert (await post(manual_api, running, "stop")).json() == {"ok": True}
    await clock.advance(1)
    assert (await get(manual_api, running))["state"] == "stopped"
    stops = [e for e in (await get(manual_api, running))["events"] if e["status"] == "stopping"]
    assert len(stops) == 1, "a stop while stopping must not begin another stop"
