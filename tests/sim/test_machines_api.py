"""The simulated Machines API over real HTTP: apps, machines, lifecycle calls, and their error cases."""

from __future__ import annotations

import httpx

from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer
from tests.conftest import AUTH
from tests.sim.helpers import machine_ids, make_app, wait_state


async def test_apps_list_and_get(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Apps list needs org_slug and counts machines; get answers the app or 404."""
    await make_app(control)
    listed = await api.get("/apps", params={"org_slug": "personal"})
    assert listed.status_code == 200
    assert listed.json()["total_apps"] == 1
    assert listed.json()["apps"][0]["machine_count"] == 3
    assert (await api.get("/apps")).status_code == 400
    shown = await api.get("/apps/shop")
    assert shown.json()["name"] == "shop"
    missing = await api.get("/apps/nope")
    assert missing.status_code == 404
    assert missing.json() == {"error": "app not found"}


async def test_auth_is_required(sim: SimServer) -> None:
    """No token, an unknown token or a bad scheme is 401; Bearer and FlyV1 are accepted."""
    async with httpx.AsyncClient(base_url=sim.api_url) as client:
        assert (await client.get("/apps", params={"org_slug": "personal"})).status_code == 401
        wrong = await client.get("/apps", params={"org_slug": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"].startswith("Authenticate")
        basic = await client.get(
            "/apps", params={"org_slug": "x"}, headers={"Authorization": "Basic sim-token"}
        )
        assert basic.status_code == 401
        flyv1 = await client.get(
            "/apps", params={"org_slug": "x"}, headers={"Authorization": "FlyV1 sim-token"}
        )
        assert flyv1.status_code == 200
        assert "fly-request-id" in flyv1.headers


async def test_list_filters(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """List filters by region, state, metadata, hides destroyed machines and omits config in summary."""
    await make_app(control, regions={"iad": {"started": 2, "stopped": 1}, "cdg": 1})
    assert len(await machine_ids(api)) == 4
    assert len(await machine_ids(api, region="iad")) == 3
    assert len(await machine_ids(api, state="stopped")) == 1
    assert len(await machine_ids(api, state="started,stopped", region="cdg")) == 1
    assert len(await machine_ids(api, **{"metadata.fly_process_group": "app"})) == 4
    assert await machine_ids(api, **{"metadata.fly_process_group": "worker"}) == []
    bad = await api.get("/apps/shop/machines", params={"state": "sleeping"})
    assert bad.status_code == 400
    summary = (await api.get("/apps/shop/machines", params={"summary": "true"})).json()
    assert all("config" not in m and "events" not in m and "host_status" not in m for m in summary)
    full = (await api.get("/apps/shop/machines")).json()
    assert all(m["config"]["image"] and m["host_status"] == "ok" for m in full)


async def test_machine_get_and_404(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Get answers the machine with config, events and passing checks; unknown ids are 404."""
    await make_app(control)
    machine_id = (await machine_ids(api))[0]
    machine = (await api.get(f"/apps/shop/machines/{machine_id}")).json()
    assert machine["state"] == "started"
    assert machine["private_ip"].startswith("127.")
    assert len(machine["instance_id"]) == 26
    assert machine["checks"][0]["status"] == "passing"
    assert machine["events"][0]["status"] == "started"
    missing = await api.get("/apps/shop/machines/0000")
    assert missing.status_code == 404
    assert missing.json() == {"error": "machine not found"}


async def test_create_boots_and_honours_skip_launch(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Create answers `created`, then the machine starts; skip_launch leaves it created."""
    await make_app(control)
    config = (await api.get(f"/apps/shop/machines/{(await machine_ids(api))[0]}")).json()["config"]
    created = await api.post("/apps/shop/machines", json={"config": config, "region": "nrt", "name": "web-1"})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["state"] == "created"
    assert body["region"] == "nrt"
    assert body["name"] == "web-1"
    assert (await wait_state(api, "shop", body["id"], "started")).json()["state"] == "started"
    parked = (await api.post("/apps/shop/machines", json={"config": config, "skip_launch": True})).json()
    assert parked["region"] == "iad"  # the default region
    settled = await wait_state(api, "shop", parked["id"], "settled")
    assert settled.json()["state"] == "created"
    started = await api.post(f"/apps/shop/machines/{parked['id']}/start")
    assert started.json()["previous_state"] == "created"
    assert (await wait_state(api, "shop", parked["id"], "started")).status_code == 200


async def test_create_errors(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """No image, bad JSON, a bad region, a taken name or an unknown app each get Fly's status."""
    await make_app(control)
    no_image = await api.post("/apps/shop/machines", json={"config": {"env": {}}})
    assert no_image.status_code == 400
    assert "config.image" in no_image.json()["error"]
    assert (await api.post("/apps/shop/machines", json={})).status_code == 400
    malformed = await api.post(
        "/apps/shop/machines", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    assert "not valid JSON" in malformed.json()["error"]
    not_object = await api.post("/apps/shop/machines", json=["config"])
    assert not_object.status_code == 400
    bad_region = await api.post("/apps/shop/machines", json={"config": {"image": "x"}, "region": "moon"})
    assert bad_region.status_code == 400
    await api.post("/apps/shop/machines", json={"config": {"image": "x"}, "name": "taken"})
    taken = await api.post("/apps/shop/machines", json={"config": {"image": "x"}, "name": "taken"})
    assert taken.status_code == 409
    assert (await api.post("/apps/ghost/machines", json={"config": {"image": "x"}})).status_code == 404


async def test_stop_start_suspend_restart(
    api: httpx.AsyncClient, control: httpx.AsyncClient, settings: SimSettings
) -> None:
    """The lifecycle calls move through transient states to their settled ones, and refuse wrong states."""
    # the transient states read right after their calls last long enough to be read on a loaded host
    settings.state_delays.update(stopping=1.0, restarting=1.0)
    await make_app(control)
    machine_id = (await machine_ids(api))[0]
    path = f"/apps/shop/machines/{machine_id}"
    instance = (await api.get(path)).json()["instance_id"]
    assert (await api.post(path + "/stop", json={"signal": "SIGTERM", "timeout": "5s"})).json() == {
        "ok": True
    }
    assert (await api.get(path)).json()["state"] == "stopping"
    assert (await wait_state(api, "shop", machine_id, "stopped", instance_id=instance)).status_code == 200
    assert (await api.post(path + "/suspend")).status_code == 412
    start = await api.post(path + "/start")
    assert start.json() == {"previous_state": "stopped", "migrated": False, "new_host": ""}
    assert (await wait_state(api, "shop", machine_id, "started")).status_code == 200
    again = await api.post(path + "/start")
    assert again.status_code == 412
    assert "current state: 'started'" in again.json()["error"]
    assert (await api.post(path + "/suspend")).status_code == 200
    assert (await wait_state(api, "shop", machine_id, "suspended")).status_code == 200
    assert (await api.post(path + "/start")).json()["previous_state"] == "suspended"
    assert (await wait_state(api, "shop", machine_id, "started")).status_code == 200
    assert (await api.post(path + "/restart")).status_code == 200
    assert (await api.get(path)).json()["state"] == "restarting"
    assert (await wait_state(api, "shop", machine_id, "started")).status_code == 200
    bad_signal = await api.post(path + "/stop", json={"signal": "SIGWHATEVER"})
    assert bad_signal.status_code == 400


async def test_destroy_needs_force_for_a_running_machine(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Destroy refuses a started machine without force; with force or kill it goes, then answers 404."""
    await make_app(control)
    first, second, _ = await machine_ids(api)
    refused = await api.delete(f"/apps/shop/machines/{first}")
    assert refused.status_code == 412
    assert (await api.delete(f"/apps/shop/machines/{first}", params={"force": "true"})).json() == {"ok": True}
    assert (await wait_state(api, "shop", first, "destroyed")).status_code == 200
    assert (await api.get(f"/apps/shop/machines/{first}")).json()["state"] == "destroyed"
    assert first not in await machine_ids(api)
    assert first in await machine_ids(api, include_deleted="true")
    assert (await api.post(f"/apps/shop/machines/{first}/start")).status_code == 404
    assert (await api.delete(f"/apps/shop/machines/{second}", params={"kill": "true"})).status_code == 200


async def test_update_replaces_config_and_keeps_state(
    api: httpx.AsyncClient, control: httpx.AsyncClient, settings: SimSettings
) -> None:
    """Update needs the whole config, checks current_version, mints an instance_id; stopped stays stopped."""
    await make_app(control)
    running, parked, _ = await machine_ids(api)
    machine = (await api.get(f"/apps/shop/machines/{running}")).json()
    config = machine["config"] | {"image": "registry.fly.io/shop:v2", "env": {"MODE": "blue"}}
    stale = await api.post(
        f"/apps/shop/machines/{running}", json={"config": config, "current_version": "01OLD"}
    )
    assert stale.status_code == 409
    updated = await api.post(
        f"/apps/shop/machines/{running}", json={"config": config, "current_version": machine["instance_id"]}
    )
    assert updated.status_code == 200
    assert updated.json()["state"] == "replacing"
    assert updated.json()["instance_id"] != machine["instance_id"]
    assert (await wait_state(api, "shop", running, "started")).status_code == 200
    after = (await api.get(f"/apps/shop/machines/{running}")).json()
    assert after["config"]["env"] == {"MODE": "blue"}
    assert after["config"]["guest"] == machine["config"]["guest"]
    assert after["image_ref"]["tag"] == "v2"
    # a stopped machine stays stopped after an update
    parked_machine = (await api.get(f"/apps/shop/machines/{parked}")).json()
    await api.post(f"/apps/shop/machines/{parked}/stop")
    await wait_state(api, "shop", parked, "stopped", instance_id=parked_machine["instance_id"])
    updated = (await api.post(f"/apps/shop/machines/{parked}", json={"config": config})).json()
    settled = await wait_state(api, "shop", parked, "settled")
    assert settled.json()["state"] == "stopped"
    assert settled.json()["version"] == updated["instance_id"]
    # no image, a region change or a start while replacing are refused
    assert (await api.post(f"/apps/shop/machines/{running}", json={"config": {"env": {}}})).status_code == 400
    moved = await api.post(f"/apps/shop/machines/{running}", json={"config": config, "region": "nrt"})
    assert moved.status_code == 400
    settings.state_delays["replacing"] = 30.0  # replacing still when the start comes, however loaded the host
    await api.post(f"/apps/shop/machines/{parked}", json={"config": config})
    replacing = await api.post(f"/apps/shop/machines/{parked}/start")
    assert replacing.status_code == 412
    assert "replaced" in replacing.json()["error"]


async def test_versions_and_events(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Versions list every config newest first; events are newest first and bounded by limit."""
    await make_app(control)
    machine_id = (await machine_ids(api))[0]
    machine = (await api.get(f"/apps/shop/machines/{machine_id}")).json()
    new_config = machine["config"] | {"image": "registry.fly.io/shop:v2"}
    await api.post(f"/apps/shop/machines/{machine_id}", json={"config": new_config})
    versions = (await api.get(f"/apps/shop/machines/{machine_id}/versions")).json()
    assert [v["user_config"]["image"] for v in versions] == [
        "registry.fly.io/shop:v2",
        machine["config"]["image"],
    ]
    assert versions[1]["version"] == machine["instance_id"]
    await wait_state(api, "shop", machine_id, "started")
    events = (await api.get(f"/apps/shop/machines/{machine_id}/events")).json()
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps, reverse=True)
    assert events[0]["status"] == "started"
    assert len((await api.get(f"/apps/shop/machines/{machine_id}/events", params={"limit": 2})).json()) == 2
    assert (
        await api.get(f"/apps/shop/machines/{machine_id}/events", params={"limit": 99})
    ).status_code == 400


async def test_metadata(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Metadata can be read, set (204), deleted (204) and bulk-updated; a missing key is 404."""
    await make_app(control)
    machine_id = (await machine_ids(api))[0]
    base = f"/apps/shop/machines/{machine_id}/metadata"
    assert (await api.get(base)).json()["fly_process_group"] == "app"
    assert (await api.post(base + "/owner", json={"value": "team-a"})).status_code == 204
    assert (await api.get(base + "/owner")).json() == {"value": "team-a"}
    assert (await api.post(base + "/owner", json={})).status_code == 400
    assert (await api.delete(base + "/owner")).status_code == 204
    assert (await api.get(base + "/owner")).status_code == 404
    assert (
        await api.patch(base, json={"metadata": {"a": "1", "fly_process_group": None}})
    ).status_code == 204
    after = (await api.get(base)).json()
    assert after["a"] == "1"
    assert "fly_process_group" not in after
    stale = await api.put(base, json={"metadata": {"b": "2"}, "machine_version": "01STALE"})
    assert stale.status_code == 412
    machine = (await api.get(f"/apps/shop/machines/{machine_id}")).json()
    assert machine["config"]["metadata"]["a"] == "1"


async def test_unknown_routes_and_methods_answer_json(sim: SimServer) -> None:
    """Paths the simulator does not serve answer JSON 404, never a traceback."""
    async with httpx.AsyncClient(base_url=sim.api_url, headers=AUTH) as client:
        response = await client.get("/apps/shop/volumes")
        assert response.status_code == 404
        assert "error" in response.json()
        assert (await client.put("/apps/shop/machines/abc")).status_code == 404
