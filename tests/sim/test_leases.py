"""Machine leases over real HTTP (machines-api.md §5): acquire, refresh, release, gating and expiry."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from daemon.clock import ManualClock
from daemon.sim.server import SimServer
from tests.sim.helpers import make_app

NONCE = "fly-machine-lease-nonce"
OWNER = "sim@tokens.fly.io"
START = 1_790_000_000  # where the ManualClock starts
LEASE_KEYS = {"nonce", "expires_at", "owner", "description", "version"}


def machine_in(app: dict[str, Any], state: str) -> str:
    """The id of the first machine of a control-API app summary in `state`."""
    return next(m["id"] for m in app["machines"] if m["state"] == state)


async def acquire(api: httpx.AsyncClient, machine_id: str, ttl: int = 30, **kwargs: Any) -> dict[str, Any]:
    response = await api.post(f"/apps/shop/machines/{machine_id}/lease", json={"ttl": ttl}, **kwargs)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_acquire_answers_201_with_the_success_envelope(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Acquire answers 201 {"status":"success","data":{...}} with a 12-hex nonce, the owner, the version."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    response = await manual_api.post(
        f"/apps/shop/machines/{machine_id}/lease", json={"ttl": 30, "description": "deploying v2"}
    )
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "success"
    assert set(body["data"]) == LEASE_KEYS
    data = body["data"]
    assert re.fullmatch(r"[0-9a-f]{12}", data["nonce"])
    assert data["expires_at"] == START + 30
    assert data["owner"] == OWNER
    assert data["description"] == "deploying v2"
    machine = (await manual_api.get(f"/apps/shop/machines/{machine_id}")).json()
    assert data["version"] == machine["instance_id"]
    shown = await manual_api.get(f"/apps/shop/machines/{machine_id}/lease")
    assert shown.status_code == 200
    assert shown.json() == body


async def test_acquire_takes_ttl_from_the_query_without_a_body(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """`POST /lease?ttl=N` with no body (as fly-go sends it) acquires a lease lasting N seconds."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    response = await manual_api.post(f"/apps/shop/machines/{machine_id}/lease", params={"ttl": 7})
    assert response.status_code == 201, response.text
    assert response.json()["data"]["expires_at"] == START + 7


async def test_second_acquire_without_the_nonce_is_409(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A second acquire without (or with a wrong) nonce is 409 in the error envelope, naming the holder."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    held = await acquire(api, machine_id)
    for headers in ({}, {NONCE: "000000000000"}):
        again = await api.post(f"/apps/shop/machines/{machine_id}/lease", json={"ttl": 30}, headers=headers)
        assert again.status_code == 409
        body = again.json()
        assert body["status"] == "error"
        assert body["code"] == "lease_currently_held"
        assert f"machine ID {machine_id} lease currently held by {OWNER}" in body["message"]
    # the holder's lease is untouched
    shown = (await api.get(f"/apps/shop/machines/{machine_id}/lease")).json()["data"]
    assert shown["nonce"] == held["nonce"]
    assert shown["expires_at"] == held["expires_at"]


async def test_refresh_keeps_the_nonce_and_moves_expires_at(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """A refresh with the nonce header keeps the nonce and extends the lease past its first expiry."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    first = await acquire(manual_api, machine_id, ttl=10)
    assert first["expires_at"] == START + 10
    await clock.advance(8)
    refreshed = await acquire(manual_api, machine_id, ttl=10, headers={NONCE: first["nonce"]})
    assert refreshed["nonce"] == first["nonce"]
    assert refreshed["expires_at"] == START + 18
    await clock.advance(5)  # past the first expiry, before the refreshed one
    shown = await manual_api.get(f"/apps/shop/machines/{machine_id}/lease")
    assert shown.status_code == 200
    assert shown.json()["data"]["nonce"] == first["nonce"]
    refused = await manual_api.post(f"/apps/shop/machines/{machine_id}/stop")
    assert refused.status_code == 409


async def test_release_needs_the_right_nonce(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Release is 400 without or with a wrong nonce, 200 with it, then 404 once there is no lease."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    path = f"/apps/shop/machines/{machine_id}/lease"
    nonce = (await acquire(api, machine_id))["nonce"]
    missing = await api.delete(path)
    assert missing.status_code == 400
    assert missing.json()["status"] == "error"
    wrong = await api.delete(path, headers={NONCE: "000000000000"})
    assert wrong.status_code == 400
    assert wrong.json()["status"] == "error"
    assert (await api.get(path)).status_code == 200  # neither failed release let go of the lease
    released = await api.delete(path, headers={NONCE: nonce})
    assert released.status_code == 200
    assert released.json() == {"status": "success", "data": {"ok": True}}
    gone = await api.get(path)
    assert gone.status_code == 404
    assert " lease not found" in gone.json()["message"]
    again = await api.delete(path, headers={NONCE: nonce})
    assert again.status_code == 404
    assert " lease not found" in again.json()["message"]
    # once released, calls without a nonce go through
    assert (await api.post(f"/apps/shop/machines/{machine_id}/stop")).status_code == 200


async def test_release_of_an_expired_lease_is_404(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Releasing a lease that has expired answers 404 `lease not found` (flyctl ignores it)."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    nonce = (await acquire(manual_api, machine_id, ttl=5))["nonce"]
    await clock.advance(5)
    expired = await manual_api.delete(f"/apps/shop/machines/{machine_id}/lease", headers={NONCE: nonce})
    assert expired.status_code == 404
    assert expired.json()["status"] == "error"
    assert " lease not found" in expired.json()["message"]


# (action, the state the machine must be in for the call to succeed, method, path suffix, query)
GATED = [
    ("update", "started", "POST", "", None),
    ("start", "stopped", "POST", "/start", None),
    ("stop", "started", "POST", "/stop", None),
    ("suspend", "started", "POST", "/suspend", None),
    ("restart", "started", "POST", "/restart", None),
    ("cordon", "started", "POST", "/cordon", None),
    ("uncordon", "started", "POST", "/uncordon", None),
    ("destroy", "stopped", "DELETE", "", None),
    ("destroy-force", "started", "DELETE", "", {"force": "true"}),
]


@pytest.mark.parametrize(("action", "state", "method", "suffix", "query"), GATED, ids=[g[0] for g in GATED])
async def test_lease_gated_calls_need_the_nonce(
    api: httpx.AsyncClient,
    control: httpx.AsyncClient,
    sim: SimServer,
    action: str,
    state: str,
    method: str,
    suffix: str,
    query: dict[str, str] | None,
) -> None:
    """While a lease is live, a gated call is 409 `aborted: ... lease currently held` without the nonce."""
    app = await make_app(control, regions={"iad": {"started": 1, "stopped": 1}})
    machine_id = machine_in(app, state)
    path = f"/apps/shop/machines/{machine_id}"
    before = (await api.get(path)).json()
    body = {"config": before["config"] | {"image": "registry.fly.io/shop:v2"}} if action == "update" else None
    nonce = (await acquire(api, machine_id))["nonce"]
    mutations = len(sim.platform.mutations)
    for headers in ({}, {NONCE: "000000000000"}):
        refused = await api.request(method, path + suffix, params=query, json=body, headers=headers)
        assert refused.status_code == 409, refused.text
        message = refused.json()["error"]
        assert message.startswith(f"aborted: machine ID {machine_id} lease currently held by {OWNER}")
        assert "expires at" in message
    after = (await api.get(path)).json()
    assert (after["state"], after["instance_id"]) == (before["state"], before["instance_id"])
    assert len(sim.platform.mutations) == mutations, "a refused call must change nothing"
    allowed = await api.request(method, path + suffix, params=query, json=body, headers={NONCE: nonce})
    assert allowed.status_code == 200, allowed.text
    assert sim.platform.mutations[-1]["action"] == action.removesuffix("-force")


async def test_metadata_and_create_are_not_gated(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """With a lease held, metadata calls and creating a machine in the app succeed without the nonce."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    await acquire(api, machine_id)
    base = f"/apps/shop/machines/{machine_id}/metadata"
    assert (await api.post(base + "/owner", json={"value": "team-a"})).status_code == 204
    assert (await api.get(base + "/owner")).json() == {"value": "team-a"}
    assert (await api.patch(base, json={"metadata": {"tier": "gold"}})).status_code == 204
    assert (await api.delete(base + "/owner")).status_code == 204
    kept = (await api.get(base)).json()
    assert kept["tier"] == "gold"
    assert (await api.put(base, json={"metadata": {"only": "this"}})).status_code == 204
    assert (await api.get(base)).json() == {"only": "this"}
    created = await api.post("/apps/shop/machines", json={"config": {"image": "registry.fly.io/shop:v1"}})
    assert created.status_code == 200, created.text
    assert (await api.get(f"/apps/shop/machines/{machine_id}")).status_code == 200
    # the lease is still there and still gates
    assert (await api.get(f"/apps/shop/machines/{machine_id}/lease")).status_code == 200
    assert (await api.post(f"/apps/shop/machines/{machine_id}/stop")).status_code == 409


async def test_lease_expires_at_expires_at(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """The lease gates until expires_at and disappears exactly then; afterwards anyone may mutate or lease."""
    app = await make_app(manual_control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    path = f"/apps/shop/machines/{machine_id}"
    old = await acquire(manual_api, machine_id, ttl=10)
    await clock.advance(9.5)
    assert (await manual_api.post(path + "/cordon")).status_code == 409
    assert (await manual_api.get(path + "/lease")).status_code == 200
    await clock.advance(0.5)  # exactly expires_at
    assert (await manual_api.get(path + "/lease")).status_code == 404
    assert (await manual_api.post(path + "/cordon")).status_code == 200
    assert (await manual_api.post(path + "/stop")).status_code == 200
    fresh = await acquire(manual_api, machine_id, ttl=10)
    assert fresh["nonce"] != old["nonce"]
    assert fresh["expires_at"] == START + 20


async def test_create_with_lease_ttl_returns_a_nonce(
    clock: ManualClock, manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient
) -> None:
    """Create with lease_ttl answers the machine with a `nonce` that is the live lease's, and gates it."""
    await make_app(manual_control, regions={"iad": 1})
    created = await manual_api.post(
        "/apps/shop/machines", json={"config": {"image": "registry.fly.io/shop:v1"}, "lease_ttl": 60}
    )
    assert created.status_code == 200, created.text
    machine = created.json()
    assert re.fullmatch(r"[0-9a-f]{12}", machine["nonce"])
    path = f"/apps/shop/machines/{machine['id']}"
    lease = (await manual_api.get(path + "/lease")).json()["data"]
    assert lease["nonce"] == machine["nonce"]
    assert lease["owner"] == OWNER
    assert lease["expires_at"] == START + 60
    assert lease["version"] == machine["instance_id"]
    await clock.advance(2)  # created -> starting -> started
    assert (await manual_api.get(path)).json()["state"] == "started"
    assert (await manual_api.post(path + "/stop")).status_code == 409
    assert (await manual_api.post(path + "/stop", headers={NONCE: machine["nonce"]})).status_code == 200
    plain = (
        await manual_api.post("/apps/shop/machines", json={"config": {"image": "registry.fly.io/shop:v1"}})
    ).json()
    assert "nonce" not in plain
    assert (await manual_api.get(f"/apps/shop/machines/{plain['id']}/lease")).status_code == 404


async def test_update_with_lease_ttl_returns_a_nonce(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Update with lease_ttl on an unleased machine acquires a lease atomically and answers its nonce."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    path = f"/apps/shop/machines/{machine_id}"
    config = (await api.get(path)).json()["config"] | {"image": "registry.fly.io/shop:v2"}
    updated = await api.post(path, json={"config": config, "lease_ttl": 30})
    assert updated.status_code == 200, updated.text
    nonce = updated.json()["nonce"]
    lease = (await api.get(path + "/lease")).json()["data"]
    assert lease["nonce"] == nonce
    assert lease["version"] == updated.json()["instance_id"]


@pytest.mark.parametrize("ttl", [0, -5, "soon"])
async def test_acquire_with_a_bad_ttl_is_400(
    api: httpx.AsyncClient, control: httpx.AsyncClient, ttl: Any
) -> None:
    """A ttl that is not a positive integer is 400 in the lease error envelope, and no lease is taken."""
    app = await make_app(control, regions={"iad": 1})
    machine_id = machine_in(app, "started")
    response = await api.post(f"/apps/shop/machines/{machine_id}/lease", params={"ttl": ttl})
    assert response.status_code == 400
    assert response.json()["status"] == "error"
    assert "ttl" in response.json()["message"]
    assert (await api.get(f"/apps/shop/machines/{machine_id}/lease")).status_code == 404


async def test_lease_calls_on_an_unknown_machine_are_404(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Acquire, get and release on a machine that does not exist answer 404 in the lease error envelope."""
    await make_app(control, regions={"iad": 1})
    path = "/apps/shop/machines/0123456789abcd/lease"
    for response in (
        await api.post(path, json={"ttl": 30}),
        await api.get(path),
        await api.delete(path, headers={NONCE: "000000000000"}),
    ):
        assert response.status_code == 404
        assert response.json()["status"] == "error"
        assert response.json()["message"] == "machine not found"
