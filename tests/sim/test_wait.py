"""GET .../wait over real HTTP (machines-api.md §4): states, timeouts, versions, on the ManualClock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from daemon.clock import ManualClock
from daemon.sim.server import SimServer
from tests.conftest import eventually
from tests.sim.helpers import make_app


def machine_in(app: dict[str, Any], state: str) -> str:
    """The id of the first machine of a control-API app summary in `state`."""
    return next(m["id"] for m in app["machines"] if m["state"] == state)


def waiters(sim: SimServer, machine_id: str) -> int:
    """How many wait calls the simulator is holding open on the machine."""
    return sum(1 for _, future in sim.platform._waiters.get(machine_id, []) if not future.done())


class Waits:
    """Wait calls sent in the background, each returned once the simulator holds it open."""

    def __init__(self, sim: SimServer, api: httpx.AsyncClient) -> None:
        self.sim = sim
        self.api = api
        self.tasks: list[asyncio.Task[httpx.Response]] = []

    async def start(self, machine_id: str, **params: Any) -> asyncio.Task[httpx.Response]:
        before = waiters(self.sim, machine_id)
        task = asyncio.create_task(self.api.get(f"/apps/shop/machines/{machine_id}/wait", params=params))
        self.tasks.append(task)

        async def held() -> bool:
            return task.done() or waiters(self.sim, machine_id) > before

        await eventually(held)
        assert not task.done(), f"wait answered at once: {task.result().text}"
        return task

    async def answer(self, task: asyncio.Task[httpx.Response]) -> httpx.Response:
        """The wait's answer, which must come now that the clock has moved (bounded on the wall clock)."""

        async def done() -> bool:
            return task.done()

        await eventually(done, timeout=2.0)
        return task.result()

    async def close(self) -> None:
        """Cancel what a failed test left waiting, so that it fails on its own assertion alone."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def waits(manual_sim: SimServer, manual_api: httpx.AsyncClient) -> AsyncIterator[Waits]:
    background = Waits(manual_sim, manual_api)
    yield background
    await background.close()


async def machine(api: httpx.AsyncClient, machine_id: str) -> dict[str, Any]:
    response = await api.get(f"/apps/shop/machines/{machine_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_default_state_is_started(
    clock: ManualClock, waits: Waits, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Without `state`, wait blocks on a stopped machine and answers once it is started."""
    app = await make_app(manual_control, regions={"iad": {"stopped": 1}})
    machine_id = machine_in(app, "stopped")
    task = await waits.start(machine_id, timeout=10)
    assert (await manual_api.post(f"/apps/shop/machines/{machine_id}/start")).status_code == 200
    await clock.advance(0.5)
    assert not task.done()
    assert waiters(waits.sim, machine_id) == 1
    await clock.advance(0.5)  # starting -> started
    response = await waits.answer(task)
    assert response.status_code == 200, response.text
    body = response.json()
    current = await machine(manual_api, machine_id)
    assert body == {
        "ok": True,
        "state": "started",
        "version": current["instance_id"],
        "event_id": current["events"][0]["id"],
    }


async def test_a_reached_state_answers_at_once(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Waiting for the state the machine is already in answers 200 straight away."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    response = await api.get(f"/apps/shop/machines/{machine_id}/wait", params={"timeout": 1})
    assert response.status_code == 200
    assert response.json()["state"] == "started"


@pytest.mark.parametrize("timeout", ["0", "61", "-1", "600"])
async def test_timeout_outside_1_to_60_is_400(
    api: httpx.AsyncClient, control: httpx.AsyncClient, timeout: str
) -> None:
    """A timeout below 1 s or above 60 s is 400 invalid_argument, even when the state is already reached."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    response = await api.get(f"/apps/shop/machines/{machine_id}/wait", params={"timeout": timeout})
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid_argument: timeout must be between 1 and 60")


@pytest.mark.parametrize("timeout", ["abc", "1.5", "10s", ""])
async def test_non_integer_timeout_is_400(
    api: httpx.AsyncClient, control: httpx.AsyncClient, timeout: str
) -> None:
    """A timeout that is not an integer number of seconds is 400 invalid_argument."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    response = await api.get(f"/apps/shop/machines/{machine_id}/wait", params={"timeout": timeout})
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid_argument: timeout must be an integer")


async def test_timeout_bounds_are_accepted(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Timeouts of exactly 1 and 60 seconds are valid."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    for timeout in (1, 60):
        response = await api.get(f"/apps/shop/machines/{machine_id}/wait", params={"timeout": timeout})
        assert response.status_code == 200, response.text


async def test_408_exactly_at_the_deadline(
    clock: ManualClock, waits: Waits, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Wait stays pending until its timeout and answers 408 deadline_exceeded exactly then, with the state."""
    app = await make_app(manual_control, regions={"iad": {"stopped": 1}})
    machine_id = machine_in(app, "stopped")
    task = await waits.start(machine_id, state="started", timeout=10)
    await clock.advance(9.875)
    assert not task.done()
    assert waiters(waits.sim, machine_id) == 1
    await clock.advance(0.125)  # exactly the deadline
    assert waiters(waits.sim, machine_id) == 0
    response = await waits.answer(task)
    assert response.status_code == 408
    assert response.json() == {
        "error": "deadline_exceeded: machine failed to reach desired state, started, currently stopped"
    }


async def test_408_names_the_state_at_the_deadline(
    clock: ManualClock, waits: Waits, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """The 408 message gives the machine's state when the deadline passes, not when the wait began."""
    app = await make_app(manual_control, regions={"iad": {"stopped": 1}})
    machine_id = machine_in(app, "stopped")
    task = await waits.start(machine_id, state="suspended", timeout=5)
    await manual_api.post(f"/apps/shop/machines/{machine_id}/start")
    await clock.advance(4.875)
    assert not task.done()
    assert waiters(waits.sim, machine_id) == 1
    await clock.advance(0.125)
    response = await waits.answer(task)
    assert response.status_code == 408
    assert response.json()["error"].endswith("desired state, suspended, currently started")


async def test_settled_waits_for_any_non_transient_state(
    clock: ManualClock, waits: Waits, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """state=settled blocks through a transient state and answers with the settled state reached."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    assert (await manual_api.post(f"/apps/shop/machines/{machine_id}/stop")).status_code == 200
    task = await waits.start(machine_id, state="settled", timeout=10)
    await clock.advance(0.5)
    assert not task.done()
    await clock.advance(0.5)  # stopping -> stopped
    response = await waits.answer(task)
    assert response.status_code == 200
    assert response.json()["state"] == "stopped"
    again = await manual_api.get(f"/apps/shop/machines/{machine_id}/wait", params={"state": "settled"})
    assert again.status_code == 200
    assert again.json()["state"] == "stopped"


@pytest.mark.parametrize(
    "params",
    [{"state": ["failed", "suspended"]}, {"state": "failed,suspended"}, {"state": "destroyed, suspended"}],
    ids=["repeated", "comma", "comma-space"],
)
async def test_several_states_repeated_or_comma_separated(
    clock: ManualClock,
    waits: Waits,
    manual_api: httpx.AsyncClient,
    manual_control: httpx.AsyncClient,
    params: dict[str, Any],
) -> None:
    """Several states, given repeated or comma-separated, answer when the machine reaches any of them."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    task = await waits.start(machine_id, **params, timeout=10)
    assert (await manual_api.post(f"/apps/shop/machines/{machine_id}/suspend")).status_code == 200
    await clock.advance(0.5)
    assert not task.done()
    await clock.advance(0.5)  # suspending -> suspended
    response = await waits.answer(task)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "suspended"


async def test_unknown_state_is_400(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """A state that cannot be waited for (a transient one, or nonsense) is 400 invalid_argument."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    for state in ("sleeping", "starting", "started,stopping"):
        response = await api.get(f"/apps/shop/machines/{machine_id}/wait", params={"state": state})
        assert response.status_code == 400, state
        assert response.json()["error"].startswith("invalid_argument: invalid state")


async def test_stopped_needs_instance_id(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """state=stopped without instance_id or version is 400; with either it answers."""
    app = await make_app(control, regions={"iad": {"stopped": 1}})
    machine_id = machine_in(app, "stopped")
    path = f"/apps/shop/machines/{machine_id}/wait"
    for state in ("stopped", "started,stopped"):
        refused = await api.get(path, params={"state": state, "timeout": 1})
        assert refused.status_code == 400
        assert refused.json() == {"error": "instance_id required when waiting for stopped machine"}
    version = (await machine(api, machine_id))["instance_id"]
    for key in ("instance_id", "version"):
        answered = await api.get(path, params={"state": "stopped", "timeout": 1, key: version})
        assert answered.status_code == 200, answered.text
        assert answered.json()["version"] == version


async def test_waiting_on_a_replaced_version_is_412(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Waiting on a version an update has replaced is 412 `currently replaced`; the new version answers."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    before = await machine(api, machine_id)
    config = before["config"] | {"image": "registry.fly.io/shop:v2"}
    updated = (await api.post(f"/apps/shop/machines/{machine_id}", json={"config": config})).json()
    path = f"/apps/shop/machines/{machine_id}/wait"
    for key in ("version", "instance_id"):
        old = await api.get(path, params={"state": "started", "timeout": 5, key: before["instance_id"]})
        assert old.status_code == 412
        assert "currently replaced" in old.json()["error"]
        assert old.json()["error"].startswith("failed_precondition:")
    new = await api.get(path, params={"state": "started", "timeout": 5, "version": updated["instance_id"]})
    assert new.status_code == 200
    assert new.json()["version"] == updated["instance_id"]


async def test_waiting_on_the_new_version_blocks_through_replacing(
    clock: ManualClock, waits: Waits, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """A wait for the new version of a replacing machine answers once that version is started."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    config = (await machine(manual_api, machine_id))["config"] | {"image": "registry.fly.io/shop:v2"}
    updated = (await manual_api.post(f"/apps/shop/machines/{machine_id}", json={"config": config})).json()
    task = await waits.start(machine_id, state="started", timeout=10, version=updated["instance_id"])
    await clock.advance(1.5)  # replacing -> starting, half-way through starting
    assert not task.done()
    await clock.advance(0.5)
    response = await waits.answer(task)
    assert response.status_code == 200
    assert response.json()["version"] == updated["instance_id"]


async def test_wait_for_destroyed(
    clock: ManualClock, waits: Waits, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """state=destroyed answers once a destroy finishes; after the retention the machine is 404."""
    app = await make_app(manual_control, regions={"iad": {"stopped": 1}})
    machine_id = machine_in(app, "stopped")
    assert (await manual_api.delete(f"/apps/shop/machines/{machine_id}")).status_code == 200
    task = await waits.start(machine_id, state="destroyed", timeout=10)
    await clock.advance(0.5)
    assert not task.done()
    await clock.advance(0.5)  # destroying -> destroyed
    response = await waits.answer(task)
    assert response.status_code == 200
    assert response.json()["state"] == "destroyed"
    await clock.advance(waits.sim.platform.settings.destroyed_retention)
    gone = await manual_api.get(f"/apps/shop/machines/{machine_id}/wait", params={"state": "destroyed"})
    assert gone.status_code == 404
    assert gone.json() == {"error": "machine not found"}


async def test_wait_for_failed(
    clock: ManualClock, waits: Waits, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """state=failed answers when a crashing image's boot fails."""
    await make_app(manual_control, regions={"iad": 1})
    image = "registry.fly.io/shop:crashy"
    assert (await manual_control.post("/images", json={"image": image, "mode": "crash"})).status_code == 200
    created = (await manual_api.post("/apps/shop/machines", json={"config": {"image": image}})).json()
    task = await waits.start(created["id"], state="failed", timeout=10)
    await clock.advance(1.5)  # created -> starting, half-way through starting
    assert not task.done()
    await clock.advance(0.5)
    response = await waits.answer(task)
    assert response.status_code == 200
    assert response.json()["state"] == "failed"


async def test_wait_on_an_unknown_machine_is_404(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Waiting on a machine that does not exist is 404 machine not found."""
    await make_app(control, regions={"iad": 1})
    response = await api.get("/apps/shop/machines/0123456789abcd/wait")
    assert response.status_code == 404
    assert response.json() == {"error": "machine not found"}
