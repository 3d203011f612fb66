"""Faults injected into the simulated Machines API over HTTP: errors, bursts, latency, timeouts, capacity."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from daemon.clock import ManualClock
from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer
from daemon.sim.specs import ApiFaultSpec
from tests.conftest import AUTH, eventually
from tests.sim.helpers import machine_ids, make_app


async def add_fault(control: httpx.AsyncClient, **spec: Any) -> dict[str, Any]:
    response = await control.post("/faults", json=spec)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def statuses(api: httpx.AsyncClient, path: str, times: int) -> list[int]:
    return [(await api.get(path)).status_code for _ in range(times)]


async def test_error_rate_fails_exactly_every_other_call(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Rate 0.5 on Machines_list fails exactly every other list call with the status and a JSON error."""
    await make_app(control)
    fault = await add_fault(control, endpoint="Machines_list", status=502, rate=0.5)
    assert fault["kind"] == "api"
    assert fault["endpoint"] == "Machines_list"
    answers = [await api.get("/apps/shop/machines") for _ in range(8)]
    assert [r.status_code for r in answers] == [200, 502] * 4
    for failed in answers[1::2]:
        assert failed.headers["content-type"].startswith("application/json")
        assert failed.json() == {"error": f"bad gateway (injected fault {fault['id']})"}
    assert all(isinstance(r.json(), list) for r in answers[0::2])
    # other endpoints are untouched
    assert await statuses(api, "/apps/shop", 4) == [200] * 4
    listed = (await control.get("/faults")).json()
    assert [f["hits"] for f in listed] == [4]


async def test_burst_fails_next_requests_then_goes_away(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A fault with count 3 fails the next 3 matching requests, then is removed and calls succeed."""
    await make_app(control)
    await add_fault(control, endpoint="Machines_list", status=503, count=3)
    assert await statuses(api, "/apps/shop", 1) == [200]  # not a matching request
    assert await statuses(api, "/apps/shop/machines", 2) == [503, 503]
    active = (await control.get("/faults")).json()
    assert [(f["count"], f["hits"]) for f in active] == [(3, 2)]
    assert await statuses(api, "/apps/shop/machines", 1) == [503]
    assert (await control.get("/faults")).json() == []
    assert await statuses(api, "/apps/shop/machines", 3) == [200, 200, 200]


async def test_wildcard_endpoint_hits_every_operation(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Endpoint "*" fails every Machines API operation, reads and writes alike."""
    await make_app(control)
    machine_id = (await machine_ids(api))[0]
    await add_fault(control, endpoint="*", status=500)
    answers = [
        await api.get("/apps", params={"org_slug": "personal"}),
        await api.get("/apps/shop"),
        await api.get("/apps/shop/machines"),
        await api.get(f"/apps/shop/machines/{machine_id}"),
        await api.post(f"/apps/shop/machines/{machine_id}/stop"),
        await api.post("/apps/shop/machines", json={"config": {"image": "x"}}),
    ]
    assert [r.status_code for r in answers] == [500] * 6
    assert all("injected fault" in r.json()["error"] for r in answers)
    counters = (await control.get("/counters")).json()
    assert counters["faults_injected"] == {
        "Apps_list": 1,
        "Apps_show": 1,
        "Machines_list": 1,
        "Machines_show": 1,
        "Machines_stop": 1,
        "Machines_create": 1,
    }
    # the stop never reached the platform
    assert (await control.get("/counters")).json()["mutations"] == []


async def test_app_scoped_fault_spares_other_apps(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """A fault with `app` hits only requests about that app; other apps and app-less calls work."""
    await make_app(control, "shop")
    await make_app(control, "blog", regions={"iad": 1})
    await add_fault(control, endpoint="*", app="shop", status=503)
    assert await statuses(api, "/apps/shop/machines", 2) == [503, 503]
    assert await statuses(api, "/apps/shop", 1) == [503]
    assert await statuses(api, "/apps/blog/machines", 2) == [200, 200]
    assert await statuses(api, "/apps/blog", 1) == [200]
    assert (await api.get("/apps", params={"org_slug": "personal"})).status_code == 200


async def test_latency_delays_the_answer_until_the_clock_passes_it(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient, clock: ManualClock
) -> None:
    """A latency fault (status 0) holds the answer until the simulated clock has moved past the latency."""
    await make_app(manual_control)
    await add_fault(manual_control, endpoint="Machines_list", status=0, latency=2.0)
    task = asyncio.create_task(manual_api.get("/apps/shop/machines"))
    try:

        async def injected() -> bool:
            counters = (await manual_control.get("/counters")).json()
            return bool(counters["faults_injected"].get("Machines_list") == 1)

        await eventually(injected)
        await clock.advance(1.0)
        assert not task.done()
        await clock.advance(0.75)
        assert not task.done()
        await clock.advance(0.25)
        response = await asyncio.wait_for(task, timeout=5.0)
    finally:
        task.cancel()
    assert response.status_code == 200
    assert len(response.json()) == 3
    # other operations answer at once
    assert (await manual_api.get("/apps/shop")).status_code == 200


async def test_latency_then_error(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient, clock: ManualClock
) -> None:
    """A latency fault with a status waits out the latency, then answers the error."""
    await make_app(manual_control)
    await add_fault(manual_control, endpoint="Apps_show", status=504, latency=5.0)
    task = asyncio.create_task(manual_api.get("/apps/shop"))
    try:

        async def injected() -> bool:
            counters = (await manual_control.get("/counters")).json()
            return bool(counters["faults_injected"].get("Apps_show") == 1)

        await eventually(injected)
        await clock.advance(4.5)
        assert not task.done()
        await clock.advance(0.5)
        response = await asyncio.wait_for(task, timeout=5.0)
    finally:
        task.cancel()
    assert response.status_code == 504
    assert "injected fault" in response.json()["error"]


async def test_timeout_never_answers_and_the_simulator_still_stops() -> None:
    """A timeout fault never answers: the client's timeout fires, and the simulator shuts down promptly."""
    server = SimServer(SimSettings(transition_delay=0.02, rate_limits=False))
    await server.start()
    try:
        server.control.build_app({"name": "shop", "regions": {"iad": 1}})
        await server.settle()
        server.faults.add(ApiFaultSpec(endpoint="Machines_list", timeout=True))
        async with httpx.AsyncClient(base_url=server.api_url, headers=AUTH, timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/apps/shop/machines")
            assert (await client.get("/apps/shop")).status_code == 200
        # a second client is still waiting when the simulator stops: it must not hold the shutdown
        pending_client = httpx.AsyncClient(base_url=server.api_url, headers=AUTH, timeout=30.0)
        pending = asyncio.create_task(pending_client.get("/apps/shop/machines"))
        try:

            async def waiting() -> bool:
                return server.counters.faults["Machines_list"] == 2

            await eventually(waiting)
            assert not pending.done()
            await asyncio.wait_for(server.stop(), timeout=5.0)
            with pytest.raises(httpx.TransportError):
                await asyncio.wait_for(pending, timeout=5.0)
        finally:
            pending.cancel()
            await pending_client.aclose()
    finally:
        await server.stop()


async def test_raw_body_gives_a_text_html_5xx(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """A fault with a raw body answers its status with that non-JSON text/html body, as a proxy would."""
    await make_app(control)
    page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    await add_fault(control, endpoint="Machines_list", status=502, body=page)
    response = await api.get("/apps/shop/machines")
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == page
    with pytest.raises(ValueError, match="Expecting value"):
        response.json()


async def test_faults_are_listed_and_removed(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """GET /_sim/faults lists faults; DELETE by id removes one, DELETE /_sim/faults removes them all."""
    await make_app(control)
    first = await add_fault(control, endpoint="Machines_list", status=503)
    second = await add_fault(control, endpoint="Apps_show", status=500, app="shop")
    await add_fault(control, kind="capacity", region="cdg")
    listed = (await control.get("/faults")).json()
    assert [f.get("id") for f in listed] == [first["id"], second["id"], None]
    assert listed[1] == {
        "id": second["id"],
        "kind": "api",
        "endpoint": "Apps_show",
        "app": "shop",
        "status": 500,
        "rate": 1.0,
        "count": None,
        "latency": 0.0,
        "timeout": False,
        "body": None,
        "retry_after": None,
        "after": False,
        "hits": 0,
    }
    assert listed[2] == {"kind": "capacity", "region": "cdg"}
    assert (await api.get("/apps/shop/machines")).status_code == 503
    removed = await control.delete(f"/faults/{first['id']}")
    assert removed.status_code == 200
    assert removed.json() == {"ok": True}
    assert (await api.get("/apps/shop/machines")).status_code == 200
    assert [f.get("id") for f in (await control.get("/faults")).json()] == [second["id"], None]
    again = await control.delete(f"/faults/{first['id']}")
    assert again.status_code == 404
    assert "error" in again.json()
    assert (await control.delete("/faults")).json() == {"ok": True}
    assert (await control.get("/faults")).json() == []
    assert (await api.get("/apps/shop")).status_code == 200


async def test_counters_report_injected_faults(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Counters count each injected fault per operationId, and the faulted responses by status."""
    await make_app(control)
    await add_fault(control, endpoint="Machines_list", status=503, rate=0.5)
    await statuses(api, "/apps/shop/machines", 4)
    counters = (await control.get("/counters")).json()
    assert counters["faults_injected"] == {"Machines_list": 2}
    assert counters["requests"]["Machines_list"] == 4
    assert counters["responses"]["Machines_list"] == {"200": 2, "503": 2}


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"endpoint": "Machines_list", "colour": "red"}, "colour"),
        ({"endpoint": "Machines_list", "rate": 2}, "rate"),
        ({"endpoint": "Machines_list", "status": 200}, "status"),
        ({"endpoint": "Machines_list", "count": 0}, "count"),
        ({"endpoint": "Machines_list", "status": "soon"}, "soon"),
        ({"endpoint": "Machines_list", "latency": "slow"}, "slow"),
    ],
)
async def test_bad_fault_specs_are_rejected(
    control: httpx.AsyncClient, spec: dict[str, Any], named: str
) -> None:
    """A bad fault spec is a 400 whose message names the problem, and no fault is added."""
    response = await control.post("/faults", json=spec)
    assert response.status_code == 400
    assert named in response.json()["error"]
    assert (await control.get("/faults")).json() == []


async def test_capacity_fault_fails_create_in_that_region_only(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A capacity fault fails create in its region with 412 insufficient_capacity; clearing it restores."""
    await make_app(control)
    added = await control.post("/faults", json={"kind": "capacity", "region": "cdg"})
    assert added.status_code == 201
    config = {"image": "registry.fly.io/shop:v1"}
    refused = await api.post("/apps/shop/machines", json={"config": config, "region": "cdg"})
    assert refused.status_code == 412
    assert refused.json()["status"] == "insufficient_capacity"
    assert "cdg" in refused.json()["error"]
    elsewhere = await api.post("/apps/shop/machines", json={"config": config, "region": "iad"})
    assert elsewhere.status_code == 200
    assert elsewhere.json()["region"] == "iad"
    # existing cdg machines are untouched
    assert len(await machine_ids(api, region="cdg")) == 1
    assert (await control.delete("/faults/cdg")).json() == {"ok": True}
    restored = await api.post("/apps/shop/machines", json={"config": config, "region": "cdg"})
    assert restored.status_code == 200
    assert restored.json()["region"] == "cdg"
    # clearing all faults also lifts a capacity fault
    await control.post("/faults", json={"kind": "capacity", "region": "nrt"})
    assert (
        await api.post("/apps/shop/machines", json={"config": config, "region": "nrt"})
    ).status_code == 412
    await control.delete("/faults")
    assert (
        await api.post("/apps/shop/machines", json={"config": config, "region": "nrt"})
    ).status_code == 200


async def test_capacity_fault_needs_a_region(control: httpx.AsyncClient) -> None:
    """A capacity fault without a region, or an unknown fault kind, is a 400 naming the problem."""
    missing = await control.post("/faults", json={"kind": "capacity"})
    assert missing.status_code == 400
    assert "region" in missing.json()["error"]
    unknown = await control.post("/faults", json={"kind": "earthquake", "region": "iad"})
    assert unknown.status_code == 400
    assert "earthquake" in unknown.json()["error"]
    assert (await control.get("/faults")).json() == []


async def test_retry_after_is_sent_when_asked(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """A fault with retry_after answers with a Retry-After header in seconds."""
    await make_app(control)
    await add_fault(control, endpoint="Machines_list", status=429, retry_after=2, count=1)
    limited = await api.get("/apps/shop/machines")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "2"
    assert "Retry-After" not in (await api.get("/apps/shop/machines")).headers


async def test_after_carries_the_request_out_then_loses_the_answer(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """With `after`, the create happens but the client gets the error: an ambiguous failure."""
    await make_app(control, regions={"iad": 1})
    await add_fault(control, endpoint="Machines_create", status=408, after=True, count=1)
    failed = await api.post("/apps/shop/machines", json={"config": {"image": "x"}, "region": "iad"})
    assert failed.status_code == 408
    assert len(await machine_ids(api)) == 2  # it was created all the same


async def test_revert_update_silently_restores_the_old_config(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """A revert_update fault lets the update answer 200 with a new version, then runs the old image."""
    await make_app(control, regions={"iad": 1})
    machine_id = (await machine_ids(api))[0]
    before = (await api.get(f"/apps/shop/machines/{machine_id}")).json()
    await add_fault(control, kind="revert_update", app="shop")
    config = before["config"] | {"image": "registry.fly.io/shop:v2"}
    updated = await api.post(f"/apps/shop/machines/{machine_id}", json={"config": config})
    assert updated.status_code == 200
    assert updated.json()["config"]["image"] == "registry.fly.io/shop:v2"
    waited = await api.get(
        f"/apps/shop/machines/{machine_id}/wait",
        params={"state": "started", "version": updated.json()["instance_id"], "timeout": 5},
    )
    assert waited.status_code == 200
    after = (await api.get(f"/apps/shop/machines/{machine_id}")).json()
    assert after["instance_id"] == updated.json()["instance_id"]
    assert after["config"]["image"] == before["config"]["image"]
    assert (await control.get("/faults")).json() == []  # spent
    again = await api.post(f"/apps/shop/machines/{machine_id}", json={"config": config})
    await api.get(
        f"/apps/shop/machines/{machine_id}/wait",
        params={"state": "started", "version": again.json()["instance_id"], "timeout": 5},
    )
    assert (await api.get(f"/apps/shop/machines/{machine_id}")).json()["config"]["image"] == config["image"]


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"endpoint": "Machines_list", "timeout": "false"}, "timeout"),
        ({"endpoint": "Nope"}, "Nope"),
        ({"endpoint": "Machines_list", "count": 1.5}, "count"),
        ({"kind": "capacity", "region": "moon"}, "moon"),
        ({"kind": "region_outage", "region": "moon"}, "moon"),
        ({"kind": "revert_update", "count": 0}, "count"),
        ({"endpoint": "Machines_list", "retry_after": -1}, "retry_after"),
    ],
)
async def test_fault_specs_are_strict(control: httpx.AsyncClient, spec: dict[str, Any], named: str) -> None:
    """Wrong types, unknown endpoints and unknown regions are a 400 naming them, never coerced."""
    response = await control.post("/faults", json=spec)
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]
    assert (await control.get("/faults")).json() == []
