"""Releases made through the control API, as `fly deploy` makes them: leases, updates, waits, failures."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from daemon.clock import ManualClock
from tests.conftest import eventually
from tests.sim.helpers import machine_ids, make_app, mark_image

NEW = "registry.fly.io/shop:deployment-2"
DEPLOYER = "deploy@tokens.fly.io"
RELEASE_KEYS = ("fly_release_id", "fly_release_version")

Json = dict[str, Any]


async def deploy(control: httpx.AsyncClient, app: str = "shop", **body: Any) -> Json:
    response = await control.post(f"/apps/{app}/deploy", json={"image": NEW, **body})
    assert response.status_code == 202, response.text
    release: Json = response.json()
    return release


async def latest_release(control: httpx.AsyncClient, app: str = "shop") -> Json:
    response = await control.get(f"/apps/{app}/releases")
    assert response.status_code == 200, response.text
    release: Json = response.json()[-1]
    return release


async def finished(control: httpx.AsyncClient, app: str = "shop") -> Json:
    """Wait (on the wall clock) for the latest release to end, and return it."""

    async def done() -> Json | None:
        release = await latest_release(control, app)
        return release if release["status"] != "running" else None

    result: Json = await eventually(done)
    return result


async def run_out(
    control: httpx.AsyncClient, clock: ManualClock, step: float = 0.25, limit: int = 400
) -> Json:
    """Advance the manual clock until the latest release ends, and return it."""
    for _ in range(limit):
        release = await latest_release(control)
        if release["status"] != "running":
            return release
        await clock.advance(step)
    pytest.fail("the release never ended")


async def described(api: httpx.AsyncClient, app: str = "shop", **params: str) -> dict[str, Json]:
    """Every machine of the app, in full, by id."""
    response = await api.get(f"/apps/{app}/machines", params=params)
    assert response.status_code == 200, response.text
    return {m["id"]: m for m in response.json()}


async def summary(control: httpx.AsyncClient, app: str = "shop") -> dict[str, Json]:
    response = await control.get(f"/apps/{app}")
    assert response.status_code == 200, response.text
    return {m["id"]: m for m in response.json()["machines"]}


def without_release(config: Json) -> Json:
    """A config with the parts a release changes (image, release metadata) taken out."""
    rest = {k: v for k, v in config.items() if k not in {"image", "metadata"}}
    rest["metadata"] = {k: v for k, v in config["metadata"].items() if k not in RELEASE_KEYS}
    return rest


# ---------------------------------------------------------------- a release that goes well


async def test_rolling_deploy_updates_every_machine(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """A rolling release moves every machine to the new image and release metadata, with a new instance_id."""
    await make_app(control, base_latency=0.01, release_version=7, metadata={"team": "web"})
    before = await described(api)
    old_ids = {m["config"]["metadata"]["fly_release_id"] for m in before.values()}
    started = await deploy(control)
    assert started["status"] == "running"
    assert started["version"] == 8
    assert started["image"] == NEW
    assert started["strategy"] == "rolling"
    assert (await latest_release(control))["id"] == started["id"]
    release = await finished(control)
    assert release["status"] == "complete", release
    assert release["error"] == ""
    assert release["machines"] == sorted(before)
    after = await described(api)
    for machine_id, old in before.items():
        new = after[machine_id]
        assert new["state"] == "started"
        assert new["config"]["image"] == NEW
        assert new["image_ref"]["tag"] == "deployment-2"
        assert new["config"]["metadata"]["fly_release_version"] == "8"
        assert new["config"]["metadata"]["fly_release_id"] == started["id"]
        assert started["id"] not in old_ids
        assert new["instance_id"] != old["instance_id"]
        assert without_release(new["config"]) == without_release(old["config"])
        assert new["config"]["metadata"]["team"] == "web"
        assert new["region"] == old["region"]
        assert new["private_ip"] == old["private_ip"]
    # the machines serve the new release
    for machine in (await summary(control)).values():
        answer = await fleet_client.get(f"http://{machine['private_ip']}:{machine['port']}/health")
        assert answer.json()["release_version"] == "8"
        assert answer.json()["image"] == NEW


async def test_versions_count_up_release_after_release(
    control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """Each release takes the previous version plus one and a fresh release id; the list keeps them all."""
    await make_app(control, base_latency=0.01, regions={"iad": 1})
    first = await deploy(control)
    await finished(control)
    second = await deploy(control, image="registry.fly.io/shop:deployment-3")
    assert (await finished(control))["status"] == "complete"
    assert (first["version"], second["version"]) == (2, 3)
    assert first["id"] != second["id"]
    releases = (await control.get("/apps/shop/releases")).json()
    assert [(r["version"], r["status"]) for r in releases] == [(2, "complete"), (3, "complete")]
    machine = next(iter((await described(api)).values()))
    assert machine["config"]["metadata"]["fly_release_version"] == "3"
    assert machine["config"]["image"] == "registry.fly.io/shop:deployment-3"


async def test_deploy_holds_a_lease_per_machine_while_updating(
    manual_control: httpx.AsyncClient, manual_api: httpx.AsyncClient, clock: ManualClock
) -> None:
    """One machine at a time is leased by the deployer while it updates; the lease is released after."""
    await make_app(manual_control, base_latency=0.01)
    first, second, third = sorted(await summary(manual_control))
    await deploy(manual_control)
    await clock.settle()
    owners = {m: s["lease_owner"] for m, s in (await summary(manual_control)).items()}
    assert owners == {first: DEPLOYER, second: None, third: None}
    lease = await manual_api.get(f"/apps/shop/machines/{first}/lease")
    assert lease.status_code == 200
    assert lease.json()["data"]["owner"] == DEPLOYER
    assert lease.json()["data"]["description"] == "fly deploy"
    assert (await manual_api.get(f"/apps/shop/machines/{second}/lease")).status_code == 404
    # someone else cannot act on the leased machine meanwhile
    blocked = await manual_api.post(f"/apps/shop/machines/{first}/stop")
    assert blocked.status_code == 409
    assert "lease currently held" in blocked.json()["error"]
    # replacing (1 s) then starting (1 s): once started and passing, the deployer moves on
    await clock.advance(2.1)
    owners = {m: s["lease_owner"] for m, s in (await summary(manual_control)).items()}
    assert owners == {first: None, second: DEPLOYER, third: None}
    assert (await manual_api.get(f"/apps/shop/machines/{first}/lease")).status_code == 404
    release = await run_out(manual_control, clock)
    assert release["status"] == "complete"
    assert all(s["lease_owner"] is None for s in (await summary(manual_control)).values())
    for machine_id in (first, second, third):
        assert (await manual_api.get(f"/apps/shop/machines/{machine_id}/lease")).status_code == 404


async def test_release_is_running_until_the_last_machine_is_up(
    manual_control: httpx.AsyncClient, clock: ManualClock
) -> None:
    """The releases endpoint shows the release running while machines update, then complete."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 2})
    begun = clock.now()
    await deploy(manual_control)
    await clock.advance(1)
    assert (await latest_release(manual_control))["status"] == "running"
    release = await run_out(manual_control, clock)
    assert release["status"] == "complete"
    # two machines, one at a time, each 1 s replacing and 1 s starting
    assert clock.now() - begun >= 4.0


async def test_stopped_machines_stay_stopped(control: httpx.AsyncClient, api: httpx.AsyncClient) -> None:
    """A stopped machine gets the new image and release metadata but is not started by the release."""
    await make_app(control, base_latency=0.01, regions={"iad": {"started": 1, "stopped": 1}})
    before = await described(api)
    stopped = next(m for m in before.values() if m["state"] == "stopped")
    await deploy(control)
    assert (await finished(control))["status"] == "complete"

    async def settled() -> dict[str, Json] | None:
        machines = await described(api)
        return machines if machines[stopped["id"]]["state"] != "replacing" else None

    # the release does not wait for a stopped machine: it settles back to stopped after its update
    after = await eventually(settled)
    parked = after[stopped["id"]]
    assert parked["state"] == "stopped"
    assert parked["config"]["image"] == NEW
    assert parked["config"]["metadata"]["fly_release_version"] == "2"
    assert parked["instance_id"] != stopped["instance_id"]
    assert not (await summary(control))[stopped["id"]]["listening"]
    running = next(m for m in after.values() if m["id"] != stopped["id"])
    assert running["state"] == "started"


# ---------------------------------------------------------------- releases that fail


async def test_crashing_image_fails_the_release_after_the_first_machine(
    control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """A crashing image leaves the first machine failed and stops the release; the rest keep the old one."""
    await make_app(control, base_latency=0.01)
    before = await described(api)
    first, *rest = sorted(before)
    await mark_image(control, NEW, mode="crash")
    await deploy(control)
    release = await finished(control)
    assert release["status"] == "failed"
    assert f"machine {first} failed to start" in release["error"]
    assert release["machines"] == [first]
    after = await described(api)
    assert after[first]["state"] == "failed"
    assert after[first]["config"]["image"] == NEW
    for machine_id in rest:
        assert after[machine_id]["state"] == "started"
        assert after[machine_id]["config"] == before[machine_id]["config"]
        assert after[machine_id]["instance_id"] == before[machine_id]["instance_id"]
    # nothing is left leased
    assert all(m["lease_owner"] is None for m in (await summary(control)).values())


async def test_unhealthy_image_fails_on_checks(control: httpx.AsyncClient, api: httpx.AsyncClient) -> None:
    """With wait_checks, an image whose checks fail times out on the first machine and fails the release."""
    await make_app(control, base_latency=0.01)
    before = await described(api)
    first, *rest = sorted(before)
    await mark_image(control, NEW, mode="unhealthy")
    await deploy(control, wait_timeout=0.2)
    release = await finished(control)
    assert release["status"] == "failed"
    assert f"machine {first} did not become healthy within 0.2s" in release["error"]
    assert release["machines"] == [first]
    after = await described(api)
    assert after[first]["state"] == "started"
    assert after[first]["config"]["image"] == NEW
    assert after[first]["checks"][0]["status"] == "critical"
    for machine_id in rest:
        assert after[machine_id]["config"]["image"] == before[machine_id]["config"]["image"]
        assert after[machine_id]["checks"][0]["status"] == "passing"


async def test_without_wait_checks_an_unhealthy_image_goes_everywhere(
    control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """wait_checks false only waits for started, so an unhealthy image reaches every machine."""
    await make_app(control, base_latency=0.01)
    await mark_image(control, NEW, mode="unhealthy")
    await deploy(control, wait_checks=False, wait_timeout=0.2)
    release = await finished(control)
    assert release["status"] == "complete"
    after = await described(api)
    assert sorted(release["machines"]) == sorted(after)
    assert all(m["config"]["image"] == NEW and m["state"] == "started" for m in after.values())
    assert all(m["checks"][0]["status"] == "critical" for m in after.values())


async def test_a_machine_leased_by_someone_else_fails_the_release(
    control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """A machine held under someone else's lease fails the release with "lease currently held"."""
    await make_app(control, base_latency=0.01)
    first, second, last = sorted(await described(api))
    lease = await api.post(f"/apps/shop/machines/{last}/lease", json={"ttl": 60, "description": "manual"})
    assert lease.status_code == 201, lease.text
    await deploy(control)
    release = await finished(control)
    assert release["status"] == "failed"
    assert release["error"].startswith(f"machine {last}:")
    assert "lease currently held by sim@tokens.fly.io" in release["error"]
    assert release["machines"] == [first, second]
    after = await described(api)
    assert after[last]["config"]["image"] != NEW
    assert (await api.get(f"/apps/shop/machines/{last}/lease")).json()["data"]["owner"] == "sim@tokens.fly.io"


# ---------------------------------------------------------------- strategies and parallelism


async def test_max_parallel_updates_machines_together(
    manual_control: httpx.AsyncClient, clock: ManualClock
) -> None:
    """max_parallel leases and updates that many machines at once."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 3, "cdg": 1})
    ids = sorted(await summary(manual_control))
    await deploy(manual_control, max_parallel=3)
    await clock.settle()
    shown = await summary(manual_control)
    leased = sorted(m for m, s in shown.items() if s["lease_owner"] == DEPLOYER)
    assert leased == ids[:3]
    assert all(shown[m]["state"] == "replacing" for m in ids[:3])
    assert shown[ids[3]]["state"] == "started"
    assert shown[ids[3]]["image"] != NEW
    assert (await latest_release(manual_control))["machines"] == ids[:3]
    release = await run_out(manual_control, clock)
    assert release["status"] == "complete"
    assert release["machines"] == ids


async def test_immediate_strategy_updates_everything_at_once(
    manual_control: httpx.AsyncClient, manual_api: httpx.AsyncClient, clock: ManualClock
) -> None:
    """strategy immediate updates every machine at once, takes no leases and waits for nothing."""
    await make_app(manual_control, base_latency=0.01)
    started = await deploy(manual_control, strategy="immediate")
    assert started["strategy"] == "immediate"
    await clock.settle()
    release = await latest_release(manual_control)
    assert release["status"] == "complete"
    shown = await summary(manual_control)
    assert sorted(release["machines"]) == sorted(shown)
    assert all(s["state"] == "replacing" and s["lease_owner"] is None for s in shown.values())
    await clock.advance(2)
    after = await described(manual_api)
    assert all(m["state"] == "started" and m["config"]["image"] == NEW for m in after.values())


async def test_canary_machine_is_created_then_destroyed(
    control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """strategy canary boots one extra machine marked fly_canary=true, destroys it, then rolls the rest."""
    await make_app(control, base_latency=0.01)
    originals = sorted(await described(api))
    first_region = (await described(api))[originals[0]]["region"]
    await deploy(control, strategy="canary")

    async def canary_seen() -> Json | None:
        extra = [
            m for m in (await described(api, include_deleted="true")).values() if m["id"] not in originals
        ]
        return extra[0] if extra else None

    canary = await eventually(canary_seen)
    assert canary["config"]["metadata"]["fly_canary"] == "true"
    assert canary["config"]["image"] == NEW
    assert canary["region"] == first_region
    release = await finished(control)
    assert release["status"] == "complete"
    assert release["machines"] == [canary["id"], *originals]  # the canary first, then the rolling update
    everything = await described(api, include_deleted="true")
    assert everything[canary["id"]]["state"] in {"destroying", "destroyed"}
    assert sorted(await machine_ids(api, state="started")) == originals
    assert all(everything[m]["config"]["image"] == NEW for m in originals)
    assert all("fly_canary" not in everything[m]["config"]["metadata"] for m in originals)


async def test_canary_takes_no_traffic(manual_control: httpx.AsyncClient, clock: ManualClock) -> None:
    """The canary is registered with no service: it is offered no load while it runs."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 1}, load={"iad": 10})
    original = next(iter(await summary(manual_control)))
    await deploy(manual_control, strategy="canary")
    await clock.advance(2)  # creating, then starting
    shown = await summary(manual_control)
    canary = next(s for m, s in shown.items() if m != original)
    assert canary["state"] == "started"
    assert canary["offered_rps"] == 0.0
    assert shown[original]["offered_rps"] == pytest.approx(10.0)
    assert (await run_out(manual_control, clock))["status"] == "complete"


async def test_crashing_canary_fails_before_any_machine_is_touched(
    control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """A canary that crashes fails the release and leaves every original machine on the old image."""
    await make_app(control, base_latency=0.01)
    before = await described(api)
    await mark_image(control, NEW, mode="crash")
    await deploy(control, strategy="canary")
    release = await finished(control)
    assert release["status"] == "failed"
    assert release["error"].startswith("canary machine")
    [canary] = release["machines"]  # only the canary, which is left behind, failed, as flyctl leaves it
    assert canary not in before
    after = await described(api)
    for machine_id, old in before.items():
        assert after[machine_id]["config"] == old["config"]


# ---------------------------------------------------------------- refused deploys


async def test_second_deploy_while_one_runs_is_409(control: httpx.AsyncClient) -> None:
    """Only one release of an app runs at a time: a second deploy meanwhile is refused with 409."""
    await make_app(control, base_latency=0.01)
    await deploy(control)
    again = await control.post("/apps/shop/deploy", json={"image": "registry.fly.io/shop:deployment-3"})
    assert again.status_code == 409
    assert "already running" in again.json()["error"]
    assert (await finished(control))["status"] == "complete"
    assert len((await control.get("/apps/shop/releases")).json()) == 1
    # once it is over, the next one is accepted
    assert (await deploy(control, image="registry.fly.io/shop:deployment-3"))["version"] == 3
    await finished(control)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "image: Field required"),
        ({"image": ""}, "image: String should have at least 1 character"),
        ({"image": 5}, "image: Input should be a valid string"),
        ({"image": NEW, "colour": "blue"}, "colour: Extra inputs are not permitted"),
        ({"image": NEW, "strategy": "bluegreen"}, "strategy: Input should be"),
        ({"image": NEW, "max_parallel": 0}, "max_parallel: Input should be greater than or equal to 1"),
        ({"image": NEW, "wait_timeout": -1}, "wait_timeout: Input should be greater than 0"),
        ({"image": NEW, "lease_ttl": 0}, "lease_ttl: Input should be greater than or equal to 1"),
        ({"image": NEW, "max_parallel": "many"}, "bad deploy request"),
    ],
)
async def test_bad_deploy_bodies_are_400(control: httpx.AsyncClient, body: Json, message: str) -> None:
    """A deploy body without an image, with unknown fields or out-of-range values is refused with 400."""
    await make_app(control, base_latency=0.01)
    response = await control.post("/apps/shop/deploy", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert (await control.get("/apps/shop/releases")).json() == []


async def test_deploy_needs_a_json_object_and_a_known_app(control: httpx.AsyncClient) -> None:
    """A body that is not a JSON object is 400; deploying an unknown app is 404."""
    await make_app(control, base_latency=0.01)
    not_json = await control.post(
        "/apps/shop/deploy", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert (await control.post("/apps/shop/deploy", json=[NEW])).status_code == 400
    assert (await control.post("/apps/shop/deploy")).status_code == 400
    assert (await control.post("/apps/ghost/deploy", json={"image": NEW})).status_code == 404
    assert (await control.get("/apps/ghost/releases")).status_code == 404


async def test_deploy_refreshes_its_leases_while_it_waits(
    manual_control: httpx.AsyncClient, manual_api: httpx.AsyncClient, clock: ManualClock
) -> None:
    """A machine that takes longer than the lease ttl to come up stays leased by the deploy all along."""
    await make_app(manual_control, regions={"iad": 1})
    machine_id = (await machine_ids(manual_api))[0]
    await manual_control.post("/images", json={"image": NEW, "mode": "unhealthy"})
    await deploy(manual_control, lease_ttl=4, wait_timeout=20)
    for _ in range(12):  # 12 s: three times the ttl, checks failing, the deploy still waiting
        await clock.advance(1.0)
        lease = (await manual_api.get(f"/apps/shop/machines/{machine_id}/lease")).json()
        assert lease["data"]["owner"] == DEPLOYER
    release = await run_out(manual_control, clock, step=1.0)
    assert release["status"] == "failed"
    assert (await manual_api.get(f"/apps/shop/machines/{machine_id}/lease")).status_code == 404
