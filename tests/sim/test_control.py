"""The control API under /_sim: counters and the mutation log, and its answers to bad input."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from daemon.clock import ManualClock
from tests.conftest import eventually
from tests.sim.helpers import machine_ids, make_app, wait_state

OWNER = "sim@tokens.fly.io"
NONCE = "fly-machine-lease-nonce"


# ---------------------------------------------------------------- counters and mutations


async def test_counters_count_requests_and_log_every_mutation(
    api: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    """Counters count requests and responses per operationId and log each mutation with who did it."""
    await make_app(control)
    assert (await control.delete("/counters")).json() == {"ok": True}
    before = time.time()
    first = (await machine_ids(api))[0]
    machine = (await api.get(f"/apps/shop/machines/{first}")).json()
    config = machine["config"]
    assert (await api.post(f"/apps/shop/machines/{first}/stop")).status_code == 200
    stopped = await wait_state(api, "shop", first, "stopped", instance_id=machine["instance_id"])
    assert stopped.status_code == 200
    assert (await api.post(f"/apps/shop/machines/{first}/start")).status_code == 200
    assert (await wait_state(api, "shop", first, "started")).status_code == 200
    refused = await api.post(f"/apps/shop/machines/{first}/start")
    assert refused.status_code == 412
    created = await api.post("/apps/shop/machines", json={"config": config, "skip_launch": True})
    assert created.status_code == 200
    second = created.json()["id"]
    lease = await api.post(f"/apps/shop/machines/{second}/lease", json={"ttl": 30})
    assert lease.status_code == 201
    nonce = lease.json()["data"]["nonce"]
    new_config = config | {"image": "registry.fly.io/shop:v2"}
    updated = await api.post(
        f"/apps/shop/machines/{second}", json={"config": new_config}, headers={NONCE: nonce}
    )
    assert updated.status_code == 200
    assert (await wait_state(api, "shop", second, "settled")).status_code == 200
    assert (
        await api.delete(f"/apps/shop/machines/{second}/lease", headers={NONCE: nonce})
    ).status_code == 200
    assert (await api.delete(f"/apps/shop/machines/{second}", params={"force": "true"})).status_code == 200
    after = time.time()

    counters = (await control.get("/counters")).json()
    assert counters["requests"]["Machines_list"] == 1
    assert counters["requests"]["Machines_show"] == 1
    assert counters["requests"]["Machines_start"] == 2
    assert counters["responses"]["Machines_start"] == {"200": 1, "412": 1}
    assert counters["responses"]["Machines_stop"] == {"200": 1}
    assert counters["responses"]["Machines_create"] == {"200": 1}
    assert counters["responses"]["Machines_create_lease"] == {"201": 1}
    assert counters["responses"]["Machines_release_lease"] == {"200": 1}
    assert counters["responses"]["Machines_update"] == {"200": 1}
    assert counters["responses"]["Machines_delete"] == {"200": 1}
    assert counters["requests"]["Machines_wait"] == 3
    assert counters["faults_injected"] == {}
    assert counters["rate_limited_total"] == 0

    mutations = counters["mutations"]
    assert [(m["action"], m["machine"]) for m in mutations] == [
        ("stop", first),
        ("start", first),
        ("create", second),
        ("lease", second),
        ("update", second),
        ("release_lease", second),
        ("destroy", second),
    ]
    for mutation in mutations:
        assert mutation["app"] == "shop"
        assert mutation["source"] == "api"
        assert mutation["owner"] == OWNER
        assert before <= mutation["time"] <= after
    times = [m["time"] for m in mutations]
    assert times == sorted(times)
    assert mutations[0]["previous_state"] == "started"
    assert mutations[4]["image"] == "registry.fly.io/shop:v2"
    assert mutations[6]["force"] is True


async def test_mutations_record_the_user_agent(api: httpx.AsyncClient, control: httpx.AsyncClient) -> None:
    """Each mutation logs the User-Agent of the request that made it; the simulator's own deployer sends
    none, and its mutations say so with an empty agent."""
    await make_app(control, base_latency=0.01, regions={"iad": 1})
    await control.delete("/counters")
    [machine_id] = await machine_ids(api)
    instance_id = (await api.get(f"/apps/shop/machines/{machine_id}")).json()["instance_id"]
    stop = await api.post(f"/apps/shop/machines/{machine_id}/stop", headers={"User-Agent": "flywatch"})
    assert stop.status_code == 200, stop.text
    stopped = await wait_state(api, "shop", machine_id, "stopped", instance_id=instance_id)
    assert stopped.status_code == 200, stopped.text
    assert (await api.post(f"/apps/shop/machines/{machine_id}/start")).status_code == 200  # httpx's own
    assert (await wait_state(api, "shop", machine_id, "started")).status_code == 200
    deployed = await control.post("/apps/shop/deploy", json={"image": "registry.fly.io/shop:v2"})
    assert deployed.status_code == 202, deployed.text

    async def deploy_done() -> bool:
        return bool((await control.get("/apps/shop/releases")).json()[-1]["status"] != "running")

    await eventually(deploy_done)
    mutations = (await control.get("/counters")).json()["mutations"]
    api_calls = [(m["action"], m["agent"]) for m in mutations if m["source"] == "api"]
    assert api_calls == [("stop", "flywatch"), ("start", f"python-httpx/{httpx.__version__}")]
    by_deployer = [m for m in mutations if m["source"] == "deploy"]
    assert {m["action"] for m in by_deployer} >= {"lease", "update"}
    assert {m["agent"] for m in by_deployer} == {""}


async def test_counters_since_filters_and_delete_resets(
    manual_api: httpx.AsyncClient, manual_control: httpx.AsyncClient, clock: ManualClock
) -> None:
    """?since= keeps mutations at or after the timestamp; a bad since is 400; DELETE resets everything."""
    await make_app(manual_control)
    await manual_control.delete("/counters")
    machine_id = (await machine_ids(manual_api))[0]
    t0 = clock.now()
    assert (await manual_api.post(f"/apps/shop/machines/{machine_id}/stop")).status_code == 200
    await clock.advance(5.0)
    machine = (await manual_api.get(f"/apps/shop/machines/{machine_id}")).json()
    assert machine["state"] == "stopped"
    assert (await manual_api.post(f"/apps/shop/machines/{machine_id}/start")).status_code == 200

    async def actions(**params: Any) -> list[tuple[str, float]]:
        response = await manual_control.get("/counters", params=params)
        assert response.status_code == 200
        return [(m["action"], m["time"]) for m in response.json()["mutations"]]

    assert await actions() == [("stop", t0), ("start", t0 + 5.0)]
    assert await actions(since=t0) == [("stop", t0), ("start", t0 + 5.0)]
    assert await actions(since=t0 + 5.0) == [("start", t0 + 5.0)]
    assert await actions(since=t0 + 5.5) == []
    bad = await manual_control.get("/counters", params={"since": "yesterday"})
    assert bad.status_code == 400
    assert "since" in bad.json()["error"]

    assert (await manual_control.delete("/counters")).json() == {"ok": True}
    reset = (await manual_control.get("/counters")).json()
    assert reset == {
        "requests": {},
        "responses": {},
        "rate_limited": {},
        "rate_limited_total": 0,
        "faults_injected": {},
        "mutations": [],
    }
    await manual_api.get("/apps/shop")
    assert (await manual_control.get("/counters")).json()["requests"] == {"Apps_show": 1}


async def test_control_requests_are_not_counted(control: httpx.AsyncClient) -> None:
    """Only Machines API requests are counted: control calls leave the counters empty."""
    await make_app(control)
    await control.get("/apps")
    await control.get("/faults")
    counters = (await control.get("/counters")).json()
    assert counters["requests"] == {}
    assert counters["mutations"] == []


# ---------------------------------------------------------------- bad input


def assert_json_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error, str)
    for word in words:
        assert word in error, error


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/apps/ghost", None),
        ("PUT", "/apps/ghost/load", {"iad": 10}),
        ("POST", "/apps/ghost/deploy", {"image": "registry.fly.io/ghost:v2"}),
        ("GET", "/apps/ghost/releases", None),
    ],
)
async def test_unknown_app_is_404_json(
    control: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    """Every control call about an app that does not exist answers 404 with a JSON error."""
    response = await control.request(method, path, json=body)
    assert_json_error(response, 404, "app not found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/apps"),
        ("PUT", "/apps/shop/load"),
        ("POST", "/apps/shop/deploy"),
        ("POST", "/images"),
        ("POST", "/faults"),
    ],
)
async def test_malformed_json_is_400(control: httpx.AsyncClient, method: str, path: str) -> None:
    """Malformed JSON, a non-object body or no body at all is a 400 that says what is wrong."""
    await make_app(control)
    headers = {"Content-Type": "application/json"}
    malformed = await control.request(method, path, content=b"{not json", headers=headers)
    assert_json_error(malformed, 400, "not valid JSON")
    array = await control.request(method, path, json=["a", "b"])
    assert_json_error(array, 400, "JSON object")
    empty = await control.request(method, path)
    assert_json_error(empty, 400, "required")


async def test_unknown_app_fields_are_rejected(control: httpx.AsyncClient) -> None:
    """An app spec with an unknown field is a 400 naming the field, and no app is created."""
    response = await control.post("/apps", json={"name": "shop", "regions": {"iad": 1}, "colour": "red"})
    assert_json_error(response, 400, "colour")
    assert (await control.get("/apps")).json() == []


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"regions": {"moon": 1}}, "moon"),
        ({"regions": {"iad": 1, "moon": 2}}, "moon"),
        ({"regions": {}}, "regions"),
        ({"regions": ["iad"]}, "regions"),
        ({"regions": {"iad": -1}}, "regions.iad"),
        ({"regions": {"iad": "two"}}, "regions.iad"),
        ({"regions": {"iad": {"running": 1}}}, "running"),
        ({"regions": {"iad": 1}, "capacity_rps": "lots"}, "lots"),
        ({"regions": {"iad": 1}, "internal_port": "http"}, "http"),
        (
            {"regions": {"iad": 1}, "load": {"iad": -5}},
            "load.iad: Input should be greater than or equal to 0",
        ),
        ({"regions": {"iad": 1}, "load": {"iad": "busy"}}, "load.iad: Input should be a valid number"),
        ({"regions": {"iad": 1}, "load": [60]}, "load"),
        ({"regions": {"iad": 1}, "metadata": "team-a"}, "metadata"),
        ({"regions": {"iad": 1}, "metadata": {"team": 5}}, "metadata"),
    ],
)
async def test_bad_app_specs_are_400_and_leave_nothing_behind(
    control: httpx.AsyncClient, spec: dict[str, Any], named: str
) -> None:
    """A bad region, count, number, load or metadata is a 400 naming it; no half-built app stays behind."""
    response = await control.post("/apps", json={"name": "shop", **spec})
    assert_json_error(response, 400, named)
    assert_json_error(await control.get("/apps/shop"), 404, "app not found")
    assert (await control.get("/apps")).json() == []
    # the same name is free for a good spec
    await make_app(control, regions={"iad": 1})


@pytest.mark.parametrize("name", [None, 5, "Shop", "shop_1", "x", "-shop"])
async def test_bad_app_names_are_rejected(control: httpx.AsyncClient, name: Any) -> None:
    """A missing, non-string or invalid app name is a 400."""
    response = await control.post("/apps", json={"name": name, "regions": {"iad": 1}})
    assert_json_error(response, 400, "name")
    assert (await control.get("/apps")).json() == []


async def test_duplicate_app_is_409(control: httpx.AsyncClient) -> None:
    """Creating an app that already exists is a 409, and the existing app keeps its machines."""
    await make_app(control)
    response = await control.post("/apps", json={"name": "shop", "regions": {"nrt": 5}})
    assert_json_error(response, 409, "shop", "already exists")
    machines = (await control.get("/apps/shop")).json()["machines"]
    assert sorted(m["region"] for m in machines) == ["cdg", "iad", "iad"]


@pytest.mark.parametrize(
    ("load", "named"),
    [
        ({"iad": -5}, "load.iad: Input should be greater than or equal to 0"),
        ({"iad": "lots"}, "load.iad: Input should be a valid number"),
        ({"iad": None}, "load.iad: Input should be a valid number"),
        ({"iad": [1]}, "load.iad: Input should be a valid number"),
        ({"iad": "nan"}, "load.iad: Input should be a valid number"),
        ({"iad": "inf"}, "load.iad: Input should be a valid number"),
    ],
)
async def test_bad_load_values_are_400(control: httpx.AsyncClient, load: dict[str, Any], named: str) -> None:
    """Negative, non-numeric or non-finite load values are a 400, and the app's load is unchanged."""
    await make_app(control, load={"iad": 10})
    response = await control.put("/apps/shop/load", json=load)
    assert_json_error(response, 400, named)
    assert (await control.get("/apps/shop")).json()["load"] == {"iad": 10.0}


async def test_good_load_is_applied(control: httpx.AsyncClient) -> None:
    """A valid load map is merged into the app's load and echoed back."""
    await make_app(control, load={"iad": 10})
    response = await control.put("/apps/shop/load", json={"cdg": 25, "iad": 12.5})
    assert response.status_code == 200
    assert response.json() == {"load": {"iad": 12.5, "cdg": 25.0}}


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"image": "registry.fly.io/shop:v2", "mode": "flaky"}, "flaky"),
        ({"mode": "unhealthy"}, "image: Field required"),
        ({"image": "", "mode": "unhealthy"}, "image: String should have at least 1 character"),
        ({"image": "registry.fly.io/shop:v2", "sparkle": True}, "sparkle"),
        ({"image": "registry.fly.io/shop:v2", "error_rate": "lots"}, "error_rate"),
        ({"image": "registry.fly.io/shop:v2", "extra_latency": "slow"}, "extra_latency"),
        ({"image": "registry.fly.io/shop:v2", "health_status": "bad"}, "health_status"),
        ({"image": "registry.fly.io/shop:v2", "crash": "yes"}, "crash"),
    ],
)
async def test_bad_image_specs_are_400(control: httpx.AsyncClient, spec: dict[str, Any], named: str) -> None:
    """An unknown image mode, a missing image or a bad behaviour field is a 400; nothing is recorded."""
    response = await control.post("/images", json=spec)
    assert_json_error(response, 400, named)
    assert (await control.get("/images")).json() == {}


async def test_image_modes_are_applied(control: httpx.AsyncClient) -> None:
    """A known mode sets its behaviour; explicit fields override the mode's defaults."""
    response = await control.post("/images", json={"image": "registry.fly.io/shop:v2", "mode": "errors"})
    assert response.status_code == 200
    assert response.json()["error_rate"] == 0.2
    tuned = await control.post(
        "/images", json={"image": "registry.fly.io/shop:v3", "mode": "errors", "error_rate": 0.5}
    )
    assert tuned.json()["error_rate"] == 0.5
    images = (await control.get("/images")).json()
    assert set(images) == {"registry.fly.io/shop:v2", "registry.fly.io/shop:v3"}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "image: Field required"),
        ({"image": "registry.fly.io/shop:v2", "strategy": "bluegreen"}, "bluegreen"),
        ({"image": "registry.fly.io/shop:v2", "max_parallel": 0}, "max_parallel"),
        ({"image": "registry.fly.io/shop:v2", "max_parallel": "two"}, "two"),
        ({"image": "registry.fly.io/shop:v2", "rollback": True}, "rollback"),
    ],
)
async def test_bad_deploy_requests_are_400(
    control: httpx.AsyncClient, body: dict[str, Any], named: str
) -> None:
    """A deploy without an image, or with a bad strategy, field or number, is a 400; no release starts."""
    await make_app(control)
    response = await control.post("/apps/shop/deploy", json=body)
    assert_json_error(response, 400, named)
    assert (await control.get("/apps/shop/releases")).json() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nothing"),
        ("POST", "/apps/shop/scale"),
        ("PATCH", "/apps"),
        ("PUT", "/faults"),
        ("GET", "/counters/extra"),
    ],
)
async def test_unknown_control_paths_are_404_json(control: httpx.AsyncClient, method: str, path: str) -> None:
    """A path or method the control API does not serve answers a JSON 404 naming it."""
    response = await control.request(method, path)
    assert_json_error(response, 404, "no such control endpoint", method)


async def test_fault_removal_of_unknown_id_is_404(control: httpx.AsyncClient) -> None:
    """Removing a fault that does not exist, by id or by region, is a JSON 404."""
    assert_json_error(await control.delete("/faults/42"), 404, "42")
    assert_json_error(await control.delete("/faults/iad"), 404, "iad")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/apps", {"name": "weird", "regions": {"iad": 1}, "metadata": ["a"]}),
        ("POST", "/apps", {"name": "weird", "regions": {"iad": {"started": "1"}}}),
        ("POST", "/apps", {"name": ["weird"], "regions": {"iad": 1}}),
        ("POST", "/apps", {"name": "weird", "regions": {"iad": 1}, "load": {"iad": {"rps": 1}}}),
        ("PUT", "/apps/shop/load", {"iad": {"rps": 1}}),
        ("POST", "/images", {"image": ["x"], "mode": "slow"}),
        ("POST", "/images", {"image": "x", "mode": ["slow"]}),
        ("POST", "/images", {"image": "x", "error_rate": "high"}),
        ("POST", "/faults", {"kind": "region_outage", "region": 5}),
        ("POST", "/faults", {"kind": "region_outage", "region": "iad", "mode": "melt"}),
        ("POST", "/faults", {"kind": "capacity"}),
        ("POST", "/faults", {"kind": ["api"]}),
        ("POST", "/faults", {"endpoint": "Machines_list", "count": "many"}),
        ("POST", "/faults", {"endpoint": "Machines_list", "rate": None}),
        ("POST", "/faults", {"endpoint": "Machines_list", "status": [503]}),
        ("POST", "/apps/shop/deploy", {"image": 5}),
        ("POST", "/apps/shop/deploy", {"image": "x", "wait_timeout": -1}),
    ],
)
async def test_bad_input_never_breaks_the_simulator(
    control: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]
) -> None:
    """Odd bodies get a 4xx JSON error, never a 500, and the simulator keeps answering afterwards."""
    await make_app(control)
    response = await control.request(method, path, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()
    assert "Traceback" not in response.text
    for probe in ("/apps", "/apps/shop", "/faults", "/images", "/counters", "/health"):
        assert (await control.get(probe)).status_code == 200, probe
    assert (await control.delete("/faults")).status_code == 200


async def test_the_control_index_lists_its_endpoints(control: httpx.AsyncClient) -> None:
    """GET /_sim/ answers the control API's endpoints and where they are documented."""
    index = await control.get("/")
    assert index.status_code == 200
    assert "POST /_sim/faults" in index.json()["endpoints"]
