"""Rate limits of the simulated Machines API (machines-api.md §6): token buckets per action and scope."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from daemon.clock import ManualClock
from daemon.sim.model import SimSettings
from tests.sim.helpers import make_app

NONCE = "fly-machine-lease-nonce"
LIMITED = {"error": "rate limit exceeded"}


def machines_in(app: dict[str, Any], state: str) -> list[str]:
    """The ids of a control-API app summary's machines in `state`."""
    return [m["id"] for m in app["machines"] if m["state"] == state]


async def counters(control: httpx.AsyncClient) -> dict[str, Any]:
    response = await control.get("/counters")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def test_fourth_immediate_start_on_one_machine_is_429(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Start allows a burst of 3 per machine: the 4th immediate call is 429; another machine is unaffected."""
    app = await make_app(manual_control, regions={"iad": {"stopped": 2}})
    first, second = machines_in(app, "stopped")
    statuses = [(await manual_api.post(f"/apps/shop/machines/{first}/start")).status_code for _ in range(3)]
    assert 429 not in statuses
    assert statuses[0] == 200
    limited = await manual_api.post(f"/apps/shop/machines/{first}/start")
    assert limited.status_code == 429
    assert limited.json() == LIMITED
    other = await manual_api.post(f"/apps/shop/machines/{second}/start")
    assert other.status_code == 200


async def test_fourth_immediate_stop_on_one_machine_is_429(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Stop allows a burst of 3 per machine: the 4th immediate call is 429; another machine is unaffected."""
    app = await make_app(manual_control, regions={"iad": 2})
    first, second = machines_in(app, "started")
    for _ in range(3):
        assert (await manual_api.post(f"/apps/shop/machines/{first}/stop")).status_code == 200
    limited = await manual_api.post(f"/apps/shop/machines/{first}/stop")
    assert limited.status_code == 429
    assert limited.json() == LIMITED
    assert (await manual_api.post(f"/apps/shop/machines/{second}/stop")).status_code == 200


async def test_fourth_immediate_lease_call_on_one_machine_is_429(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Lease acquire/refresh allows a burst of 3 per machine; the 4th is 429 (in the lease envelope)."""
    app = await make_app(manual_control, regions={"iad": 2})
    first, second = machines_in(app, "started")
    path = f"/apps/shop/machines/{first}/lease"
    nonce = (await manual_api.post(path, json={"ttl": 30})).json()["data"]["nonce"]
    for _ in range(2):
        assert (await manual_api.post(path, json={"ttl": 30}, headers={NONCE: nonce})).status_code == 201
    limited = await manual_api.post(path, json={"ttl": 30}, headers={NONCE: nonce})
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate limit exceeded"
    assert limited.json()["status"] == "error"
    assert (await manual_api.post(f"/apps/shop/machines/{second}/lease", json={"ttl": 30})).status_code == 201


async def test_actions_have_separate_buckets(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Exhausting one action's bucket on a machine leaves the machine's other actions alone."""
    app = await make_app(manual_control, regions={"iad": 1})
    (machine_id,) = machines_in(app, "started")
    path = f"/apps/shop/machines/{machine_id}"
    for _ in range(3):
        await manual_api.post(path + "/cordon")
    assert (await manual_api.post(path + "/cordon")).status_code == 429
    assert (await manual_api.post(path + "/uncordon")).status_code == 200
    assert (await manual_api.post(path + "/stop")).status_code == 200


async def test_get_machine_allows_burst_10_at_5_per_second(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Get Machine allows 10 at once per machine, then 429, and refills at 5 per second."""
    app = await make_app(manual_control, regions={"iad": 2})
    first, second = machines_in(app, "started")
    path = f"/apps/shop/machines/{first}"
    for _ in range(10):
        assert (await manual_api.get(path)).status_code == 200
    limited = await manual_api.get(path)
    assert limited.status_code == 429
    assert limited.json() == LIMITED
    assert (await manual_api.get(f"/apps/shop/machines/{second}")).status_code == 200
    await clock.advance(0.125)  # 0.625 of a token at 5/s
    assert (await manual_api.get(path)).status_code == 429
    await clock.advance(0.375)  # half a second since the bucket emptied: 2.5 tokens
    assert [(await manual_api.get(path)).status_code for _ in range(3)] == [200, 200, 429]


async def test_list_is_counted_per_app(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """List Machines allows a burst of 3 per app; another app's list is unaffected."""
    await make_app(manual_control, "shop", regions={"iad": 1})
    await make_app(manual_control, "blog", regions={"iad": 1})
    for _ in range(3):
        assert (await manual_api.get("/apps/shop/machines")).status_code == 200
    limited = await manual_api.get("/apps/shop/machines", params={"region": "iad"})
    assert limited.status_code == 429
    assert limited.json() == LIMITED
    assert (await manual_api.get("/apps/blog/machines")).status_code == 200


async def test_create_is_counted_per_app(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Create allows a burst of 3 per app; the 4th is 429 and creates nothing; another app may create."""
    await make_app(manual_control, "shop", regions={"iad": 1})
    await make_app(manual_control, "blog", regions={"iad": 1})
    body = {"config": {"image": "registry.fly.io/shop:v1"}}
    for _ in range(3):
        assert (await manual_api.post("/apps/shop/machines", json=body)).status_code == 200
    limited = await manual_api.post("/apps/shop/machines", json=body)
    assert limited.status_code == 429
    assert limited.json() == LIMITED
    assert (await manual_api.post("/apps/blog/machines", json=body)).status_code == 200
    summary = (await manual_control.get("/apps/shop")).json()
    assert len(summary["machines"]) == 1 + 3


async def test_bucket_refills_at_1_per_second_up_to_3(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """An empty bucket gains one call per second, and never holds more than the burst of 3."""
    app = await make_app(manual_control, regions={"iad": 1})
    (machine_id,) = machines_in(app, "started")
    path = f"/apps/shop/machines/{machine_id}/cordon"
    for _ in range(3):
        assert (await manual_api.post(path)).status_code == 200
    assert (await manual_api.post(path)).status_code == 429
    await clock.advance(0.5)
    assert (await manual_api.post(path)).status_code == 429
    await clock.advance(0.5)
    assert (await manual_api.post(path)).status_code == 200
    assert (await manual_api.post(path)).status_code == 429
    await clock.advance(60)  # a long quiet spell refills to the burst, no further
    assert [(await manual_api.post(path)).status_code for _ in range(4)] == [200, 200, 200, 429]


async def test_429s_are_counted(manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient) -> None:
    """Every 429 is counted per operation in GET /_sim/counters, with a total; answered calls are not."""
    app = await make_app(manual_control, regions={"iad": 1})
    (machine_id,) = machines_in(app, "started")
    assert (await counters(manual_control))["rate_limited_total"] == 0
    for _ in range(5):
        await manual_api.post(f"/apps/shop/machines/{machine_id}/cordon")
    for _ in range(4):
        await manual_api.get("/apps/shop/machines")
    body = await counters(manual_control)
    assert body["rate_limited"] == {"Machines_cordon": 2, "Machines_list": 1}
    assert body["rate_limited_total"] == 3
    assert body["responses"]["Machines_cordon"] == {"200": 3, "429": 2}
    assert body["responses"]["Machines_list"] == {"200": 3, "429": 1}
    assert body["requests"]["Machines_cordon"] == 5
    assert (await manual_control.delete("/counters")).status_code == 200
    assert (await counters(manual_control))["rate_limited_total"] == 0


async def test_rate_limits_are_off_in_the_default_settings(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """The wall-clock `sim` fixture has rate limits off: many immediate calls all answer."""
    await make_app(control, regions={"iad": 1})
    statuses = {(await api.get("/apps/shop/machines")).status_code for _ in range(12)}
    assert statuses == {200}
    assert (await control.get("/counters")).json()["rate_limited_total"] == 0


async def test_rate_limits_switch_on_with_the_settings(
    settings: SimSettings, api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Turning `rate_limits` on in the simulator's settings takes effect for the next call."""
    await make_app(control, regions={"iad": 1})
    for _ in range(5):
        assert (await api.get("/apps/shop/machines")).status_code == 200
    settings.rate_limits = True
    statuses = [(await api.get("/apps/shop/machines")).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


class TestOnTheWallClock:
    """With rate limits on over the wall clock (the `settings` fixture overridden for this class)."""

    @pytest.fixture
    def settings(self) -> SimSettings:
        return SimSettings(transition_delay=0.02, rate_limits=True)

    async def test_burst_then_429(self, api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
        """With rate limits on, the 4th immediate list of an app is 429 and is counted."""
        await make_app(control, regions={"iad": 1})
        statuses = [(await api.get("/apps/shop/machines")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        assert (await control.get("/counters")).json()["rate_limited"] == {"Machines_list": 1}
