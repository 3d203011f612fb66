"""The simulated fleet over real HTTP: each started machine's own address, health path and /metrics page."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.clock import ManualClock
from tests.conftest import eventually
from tests.sim.helpers import make_app, mark_image, wait_state

Machine = dict[str, Any]


async def machines(control: httpx.AsyncClient, app: str = "shop") -> list[Machine]:
    """The machines of an app as the control API shows them (addresses, load, listening)."""
    response = await control.get(f"/apps/{app}")
    assert response.status_code == 200, response.text
    found: list[Machine] = response.json()["machines"]
    return found


async def by_region(control: httpx.AsyncClient, region: str, app: str = "shop") -> list[Machine]:
    return [m for m in await machines(control, app) if m["region"] == region]


def url(machine: Machine, path: str | None = None) -> str:
    return f"http://{machine['private_ip']}:{machine['port']}{path or machine['health_path']}"


async def health(client: httpx.AsyncClient, machine: Machine, **kwargs: Any) -> httpx.Response:
    return await client.get(url(machine), **kwargs)


async def scrape(
    client: httpx.AsyncClient, machine: Machine
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A machine's /metrics page, parsed: {(sample name, sorted labels): value}."""
    response = await client.get(url(machine, "/metrics"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def requests_total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], status: str) -> float:
    return samples[("app_http_requests_total", (("status", status),))]


def inflight(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return samples[("app_inflight_requests", ())]


async def refused(client: httpx.AsyncClient, machine: Machine) -> bool:
    """True when a new connection to the machine's address is refused (nothing listens there).

    A kept-alive connection opened before the machine stopped is cut instead (the server disconnects
    without an answer); that counts as not refused yet, and the next try opens a new connection.
    """
    try:
        await health(client, machine)
    except httpx.ConnectError:
        return True
    except httpx.RemoteProtocolError:
        return False
    return False


# ---------------------------------------------------------------- addresses, health and metrics


async def test_started_machines_listen_on_distinct_loopback_addresses(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """Each started machine listens on its own 127.x address at the app's port and answers its health path."""
    await make_app(control, internal_port=9091, health_path="/healthz", base_latency=0.01, release_version=4)
    fleet = await machines(control)
    assert len(fleet) == 3
    addresses = [m["private_ip"] for m in fleet]
    assert len(set(addresses)) == 3
    assert all(ip.startswith("127.") and ip != "127.0.0.1" for ip in addresses)
    assert all(m["port"] == 9091 and m["health_path"] == "/healthz" and m["listening"] for m in fleet)
    for machine in fleet:
        described = (await api.get(f"/apps/shop/machines/{machine['id']}")).json()
        assert described["private_ip"] == machine["private_ip"]
        answer = await health(fleet_client, machine)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json() == {
            "status": "ok",
            "machine_id": machine["id"],
            "region": machine["region"],
            "image": machine["image"],
            "release_version": "4",
        }


async def test_unknown_path_is_404(control: httpx.AsyncClient, fleet_client: httpx.AsyncClient) -> None:
    """A machine answers paths other than its health path and /metrics with a JSON 404."""
    await make_app(control, base_latency=0.01)
    machine = (await machines(control))[0]
    answer = await fleet_client.get(url(machine, "/nope"))
    assert answer.status_code == 404
    assert answer.json() == {"error": "not found"}


async def test_metrics_page_is_prometheus_text(
    control: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """/metrics parses as Prometheus text with the inflight gauge, request counter and duration histogram."""
    await make_app(control, base_latency=0.01, load={"iad": 10})
    machine = (await by_region(control, "iad"))[0]
    response = await fleet_client.get(url(machine, "/metrics"))
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert families["app_inflight_requests"].type == "gauge"
    assert families["app_http_requests"].type == "counter"
    assert families["app_http_request_duration_seconds"].type == "histogram"
    statuses = {
        s.labels["status"] for s in families["app_http_requests"].samples if s.name.endswith("_total")
    }
    assert statuses == {"200", "500", "503"}
    histogram = families["app_http_request_duration_seconds"].samples
    bounds = [s.labels["le"] for s in histogram if s.name.endswith("_bucket")]
    assert bounds[-1] == "+Inf"
    assert len(bounds) == 12
    assert {s.name for s in histogram} == {
        "app_http_request_duration_seconds_bucket",
        "app_http_request_duration_seconds_count",
        "app_http_request_duration_seconds_sum",
    }
    cumulative = [s.value for s in histogram if s.name.endswith("_bucket")]
    assert cumulative == sorted(cumulative)
    count = next(s.value for s in histogram if s.name.endswith("_count"))
    assert cumulative[-1] == count


async def test_stopped_machines_do_not_listen(
    control: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """A machine placed stopped has an address but nothing answers there: the connection fails."""
    await make_app(control, base_latency=0.01, regions={"iad": {"started": 1, "stopped": 1}})
    started, stopped = sorted(await machines(control), key=lambda m: m["state"])
    assert (started["state"], stopped["state"]) == ("started", "stopped")
    assert started["listening"]
    assert not stopped["listening"]
    assert (await health(fleet_client, started)).status_code == 200
    with pytest.raises(httpx.ConnectError):
        await health(fleet_client, stopped)


async def test_stop_and_start_through_the_api_close_and_open_the_port(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """A machine stopped via the API stops answering; started again, it answers on the same address."""
    await make_app(control, base_latency=0.01, regions={"iad": 1})
    machine = (await machines(control))[0]
    assert (await health(fleet_client, machine)).status_code == 200
    instance = (await api.get(f"/apps/shop/machines/{machine['id']}")).json()["instance_id"]
    assert (await api.post(f"/apps/shop/machines/{machine['id']}/stop")).status_code == 200
    assert (await wait_state(api, "shop", machine["id"], "stopped", instance_id=instance)).status_code == 200
    await eventually(lambda: refused(fleet_client, machine))
    assert not (await machines(control))[0]["listening"]
    assert (await api.post(f"/apps/shop/machines/{machine['id']}/start")).status_code == 200
    assert (await wait_state(api, "shop", machine["id"], "started")).status_code == 200

    async def answers() -> bool:
        return not await refused(fleet_client, machine)

    await eventually(answers)
    assert (await health(fleet_client, machine)).json()["machine_id"] == machine["id"]
    assert (await machines(control))[0]["listening"]


# ---------------------------------------------------------------- metrics follow load (manual clock)


async def test_counters_integrate_rps_over_time(
    manual_control: httpx.AsyncClient, fleet_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Request counters grow by offered rps x elapsed seconds; the histogram counts the same requests."""
    await make_app(manual_control, base_latency=0.01, capacity_rps=50, regions={"iad": 2})
    first, second = await machines(manual_control)
    assert (await manual_control.put("/apps/shop/load", json={"iad": 20})).status_code == 200
    before = await scrape(fleet_client, first)
    await clock.advance(10)
    after = await scrape(fleet_client, first)
    # 20 rps over two machines: 10 rps each, for 10 s
    assert requests_total(after, "200") - requests_total(before, "200") == pytest.approx(100.0)
    assert requests_total(after, "500") == requests_total(after, "503") == 0.0
    count = after[("app_http_request_duration_seconds_count", ())]
    assert count - before[("app_http_request_duration_seconds_count", ())] == pytest.approx(100.0)
    # every answer took the modelled 0.01 / (1 - 0.2) s
    total = after[("app_http_request_duration_seconds_sum", ())]
    assert total == pytest.approx(count * 0.0125)
    # the other machine took the same share
    assert requests_total(await scrape(fleet_client, second), "200") == pytest.approx(100.0)
    # a load change takes effect from that instant on
    await manual_control.put("/apps/shop/load", json={"iad": 60})
    await clock.advance(5)
    later = await scrape(fleet_client, first)
    assert requests_total(later, "200") - requests_total(after, "200") == pytest.approx(150.0)


async def test_no_load_counts_nothing(
    manual_control: httpx.AsyncClient, fleet_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """With no load set, time passing adds no requests and nothing is in flight."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 1})
    machine = (await machines(manual_control))[0]
    await clock.advance(60)
    samples = await scrape(fleet_client, machine)
    assert requests_total(samples, "200") == 0.0
    assert inflight(samples) == 0.0


async def test_inflight_grows_with_load(
    manual_control: httpx.AsyncClient, fleet_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """The inflight gauge is rps x latency, and rises more than linearly as load nears capacity."""
    await make_app(manual_control, base_latency=0.01, capacity_rps=50, regions={"iad": 1})
    machine = (await machines(manual_control))[0]
    await manual_control.put("/apps/shop/load", json={"iad": 10})
    light = inflight(await scrape(fleet_client, machine))
    assert light == pytest.approx(10 * 0.0125)
    await manual_control.put("/apps/shop/load", json={"iad": 40})
    heavy = inflight(await scrape(fleet_client, machine))
    assert heavy == pytest.approx(40 * 0.05)
    assert heavy > 4 * light
    shown = (await machines(manual_control))[0]
    assert shown["offered_rps"] == pytest.approx(40.0)
    assert shown["inflight"] == pytest.approx(heavy)
    assert shown["latency"] == pytest.approx(0.05)


async def test_machine_past_capacity_sheds_with_503(
    manual_control: httpx.AsyncClient, fleet_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Past capacity a machine answers 503 for 1 - 1/utilisation of requests, on health and in counters."""
    await make_app(manual_control, base_latency=0.0005, capacity_rps=10, regions={"iad": 1})
    machine = (await machines(manual_control))[0]
    await manual_control.put("/apps/shop/load", json={"iad": 40})  # utilisation 4: a share of 0.75 shed
    answers = [(await health(fleet_client, machine)).status_code for _ in range(8)]
    assert answers == [200, 503, 503, 503] * 2
    before = await scrape(fleet_client, machine)
    await clock.advance(10)
    after = await scrape(fleet_client, machine)
    assert requests_total(after, "503") - requests_total(before, "503") == pytest.approx(300.0)
    # what gets through is exactly the capacity
    assert requests_total(after, "200") - requests_total(before, "200") == pytest.approx(100.0)
    shown = (await machines(manual_control))[0]
    assert shown["latency"] == pytest.approx(0.0005 * 20 * 4)


async def test_overloaded_machine_fails_its_fly_checks(
    control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """Fly's own checks turn critical once at least half of a machine's answers are shed."""
    await make_app(control, base_latency=0.001, capacity_rps=10, regions={"iad": 1})
    machine = (await machines(control))[0]
    path = f"/apps/shop/machines/{machine['id']}"
    await control.put("/apps/shop/load", json={"iad": 15})  # a third shed
    assert (await api.get(path)).json()["checks"][0]["status"] == "passing"
    await control.put("/apps/shop/load", json={"iad": 20})  # half shed
    assert (await api.get(path)).json()["checks"][0]["status"] == "critical"


async def test_stopped_region_spills_its_load_to_the_others(
    manual_control: httpx.AsyncClient,
    manual_api: httpx.AsyncClient,
    fleet_client: httpx.AsyncClient,
    clock: ManualClock,
) -> None:
    """When every machine of a region is stopped, its load is shared evenly by the regions still serving."""
    await make_app(
        manual_control, base_latency=0.01, capacity_rps=100, regions={"iad": 1, "cdg": 1, "nrt": 1}
    )
    await manual_control.put("/apps/shop/load", json={"iad": 10, "cdg": 10, "nrt": 30})
    assert {m["region"]: m["offered_rps"] for m in await machines(manual_control)} == {
        "iad": 10.0,
        "cdg": 10.0,
        "nrt": 30.0,
    }
    nrt = (await by_region(manual_control, "nrt"))[0]
    assert (await manual_api.post(f"/apps/shop/machines/{nrt['id']}/stop")).status_code == 200
    await clock.advance(1)  # stopping -> stopped
    shown = {m["region"]: m for m in await machines(manual_control)}
    assert shown["nrt"]["state"] == "stopped"
    assert shown["nrt"]["offered_rps"] == 0.0
    assert shown["iad"]["offered_rps"] == pytest.approx(25.0)
    assert shown["cdg"]["offered_rps"] == pytest.approx(25.0)
    iad = shown["iad"]
    before = await scrape(fleet_client, iad)
    await clock.advance(10)
    after = await scrape(fleet_client, iad)
    assert requests_total(after, "200") - requests_total(before, "200") == pytest.approx(250.0)
    # started again, nrt takes its own load back
    assert (await manual_api.post(f"/apps/shop/machines/{nrt['id']}/start")).status_code == 200
    await clock.advance(1)  # starting -> started
    assert {m["region"]: m["offered_rps"] for m in await machines(manual_control)} == {
        "iad": 10.0,
        "cdg": 10.0,
        "nrt": 30.0,
    }


# ---------------------------------------------------------------- region outages


async def test_region_outage_blackhole_hangs_and_clears(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """A blackholed region's machines are unreachable in the API, hang on HTTP, and come back when cleared."""
    await make_app(control, base_latency=0.01, load={"iad": 20, "cdg": 10})
    cdg = (await by_region(control, "cdg"))[0]
    iad = (await by_region(control, "iad"))[0]
    added = await control.post("/faults", json={"kind": "region_outage", "region": "cdg"})
    assert added.status_code == 201
    described = (await api.get(f"/apps/shop/machines/{cdg['id']}")).json()
    assert described["host_status"] == "unreachable"
    assert "config" not in described
    assert described["incomplete_config"]["image"] == cdg["image"]
    assert (await api.get(f"/apps/shop/machines/{iad['id']}")).json()["host_status"] == "ok"
    assert (await control.get("/faults")).json() == [
        {"kind": "region_outage", "region": "cdg", "app": None, "mode": "blackhole"}
    ]
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        await health(fleet_client, cdg, timeout=0.3)
    assert time.monotonic() - started >= 0.25
    # Fly Proxy routes around the outage: cdg's load goes to iad
    shown = {m["id"]: m for m in await machines(control)}
    assert shown[cdg["id"]]["host_status"] == "unreachable"
    assert shown[cdg["id"]]["offered_rps"] == 0.0
    assert shown[iad["id"]]["offered_rps"] == pytest.approx(15.0)
    assert (await health(fleet_client, iad)).status_code == 200
    # the API cannot act on a machine whose host is unreachable
    assert (await api.post(f"/apps/shop/machines/{cdg['id']}/stop")).status_code == 503
    assert (await control.delete("/faults")).status_code == 200
    assert (await api.get(f"/apps/shop/machines/{cdg['id']}")).json()["host_status"] == "ok"
    assert (await health(fleet_client, cdg)).status_code == 200
    assert (await control.get("/faults")).json() == []


async def test_region_outage_refuse_refuses_connections(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """In refuse mode a region's machines stop listening; clearing the outage makes them listen again."""
    await make_app(control, base_latency=0.01)
    cdg = (await by_region(control, "cdg"))[0]
    added = await control.post("/faults", json={"kind": "region_outage", "region": "cdg", "mode": "refuse"})
    assert added.status_code == 201
    with pytest.raises(httpx.ConnectError):
        await health(fleet_client, cdg)
    shown = (await by_region(control, "cdg"))[0]
    assert shown["state"] == "started"
    assert not shown["listening"]
    assert (await api.get(f"/apps/shop/machines/{cdg['id']}")).json()["host_status"] == "unreachable"
    assert all(m["listening"] for m in await by_region(control, "iad"))
    assert (await control.delete("/faults/cdg")).status_code == 200
    assert (await health(fleet_client, cdg)).status_code == 200
    assert (await by_region(control, "cdg"))[0]["host_status"] == "ok"


async def test_region_outage_can_be_scoped_to_one_app(
    control: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """An outage naming an app leaves the other apps in the same region reachable."""
    await make_app(control, base_latency=0.01, regions={"cdg": 1})
    await make_app(control, "blog", base_latency=0.01, regions={"cdg": 1})
    added = await control.post(
        "/faults", json={"kind": "region_outage", "region": "cdg", "app": "shop", "mode": "refuse"}
    )
    assert added.status_code == 201
    shop = (await machines(control))[0]
    blog = (await machines(control, "blog"))[0]
    assert shop["host_status"] == "unreachable"
    assert blog["host_status"] == "ok"
    with pytest.raises(httpx.ConnectError):
        await health(fleet_client, shop)
    assert (await health(fleet_client, blog)).status_code == 200
    assert (await control.delete("/faults")).status_code == 200


async def test_bad_outage_requests_are_400(control: httpx.AsyncClient) -> None:
    """An outage without a region or with an unknown mode is refused."""
    assert (await control.post("/faults", json={"kind": "region_outage"})).status_code == 400
    bad_mode = await control.post("/faults", json={"kind": "region_outage", "region": "cdg", "mode": "flaky"})
    assert bad_mode.status_code == 400
    assert (await control.get("/faults")).json() == []


# ---------------------------------------------------------------- bad images


async def test_unhealthy_image_fails_health_and_checks(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """An unhealthy image answers 500 on its health path and Fly's checks turn critical."""
    await make_app(control, base_latency=0.01, regions={"iad": 1}, image="registry.fly.io/shop:bad")
    machine = (await machines(control))[0]
    path = f"/apps/shop/machines/{machine['id']}"
    assert (await api.get(path)).json()["checks"][0]["status"] == "passing"
    await mark_image(control, "registry.fly.io/shop:bad", mode="unhealthy")
    answer = await health(fleet_client, machine)
    assert answer.status_code == 500
    assert answer.json()["status"] == "unhealthy"
    checks = (await api.get(path)).json()["checks"]
    assert checks[0]["status"] == "critical"
    await mark_image(control, "registry.fly.io/shop:bad", mode="healthy")
    assert (await health(fleet_client, machine)).status_code == 200
    assert (await api.get(path)).json()["checks"][0]["status"] == "passing"


async def test_erroring_image_fails_exactly_one_answer_in_five(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """An image with error_rate 0.2 answers its health path 500 exactly once in every five requests."""
    await make_app(control, base_latency=0.01, regions={"iad": 1}, image="registry.fly.io/shop:flaky")
    machine = (await machines(control))[0]
    await mark_image(control, "registry.fly.io/shop:flaky", mode="errors", error_rate=0.2)
    answers = [(await health(fleet_client, machine)).status_code for _ in range(10)]
    assert answers == [200, 200, 200, 200, 500] * 2
    # a fifth of answers failing is not enough for Fly's checks to fail
    assert (await api.get(f"/apps/shop/machines/{machine['id']}")).json()["checks"][0]["status"] == "passing"


async def test_erroring_image_500_counter_grows_at_its_rate(
    manual_control: httpx.AsyncClient, fleet_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Under load, an image with error_rate 0.2 counts 20 % of requests as 500 and the rest as 200."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 1}, image="registry.fly.io/shop:flaky")
    machine = (await machines(manual_control))[0]
    await manual_control.put("/apps/shop/load", json={"iad": 10})
    await mark_image(manual_control, "registry.fly.io/shop:flaky", mode="errors", error_rate=0.2)
    before = await scrape(fleet_client, machine)
    await clock.advance(10)
    after = await scrape(fleet_client, machine)
    assert requests_total(after, "500") - requests_total(before, "500") == pytest.approx(20.0)
    assert requests_total(after, "200") - requests_total(before, "200") == pytest.approx(80.0)
    assert requests_total(after, "503") == 0.0


async def test_slow_image_answers_late(control: httpx.AsyncClient, fleet_client: httpx.AsyncClient) -> None:
    """A slow image's answers take at least its extra latency."""
    await make_app(control, base_latency=0.01, regions={"iad": 1}, image="registry.fly.io/shop:slow")
    machine = (await machines(control))[0]
    started = time.monotonic()
    assert (await health(fleet_client, machine)).status_code == 200
    fast = time.monotonic() - started
    await mark_image(control, "registry.fly.io/shop:slow", mode="slow", extra_latency=0.25)
    started = time.monotonic()
    answer = await health(fleet_client, machine)
    slow = time.monotonic() - started
    assert answer.status_code == 200
    assert slow >= 0.25
    assert slow > fast
    assert (await machines(control))[0]["latency"] == pytest.approx(0.26)


async def test_slow_answers_are_concurrent(
    control: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """A slow machine answers requests in parallel: four slow answers take about one latency, not four."""
    await make_app(control, base_latency=0.01, regions={"iad": 1}, image="registry.fly.io/shop:slow")
    machine = (await machines(control))[0]
    await mark_image(control, "registry.fly.io/shop:slow", extra_latency=0.2)
    started = time.monotonic()
    answers = await asyncio.gather(*(health(fleet_client, machine) for _ in range(4)))
    elapsed = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * 4
    assert 0.2 <= elapsed < 0.6


async def test_machine_updated_to_a_crashing_image_ends_failed(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fleet_client: httpx.AsyncClient
) -> None:
    """A machine updated to an image that crashes at boot ends `failed` and stops answering."""
    await make_app(control, base_latency=0.01, regions={"iad": 1})
    machine = (await machines(control))[0]
    await mark_image(control, "registry.fly.io/shop:crash", mode="crash")
    config = (await api.get(f"/apps/shop/machines/{machine['id']}")).json()["config"]
    updated = await api.post(
        f"/apps/shop/machines/{machine['id']}",
        json={"config": config | {"image": "registry.fly.io/shop:crash"}},
    )
    assert updated.status_code == 200, updated.text
    waited = await wait_state(api, "shop", machine["id"], "failed")
    assert waited.status_code == 200
    assert waited.json()["state"] == "failed"
    described = (await api.get(f"/apps/shop/machines/{machine['id']}")).json()
    assert described["events"][0]["type"] == "exit"
    assert described["checks"] == []
    await eventually(lambda: refused(fleet_client, machine))


async def test_image_modes_are_validated(control: httpx.AsyncClient) -> None:
    """Marking an image needs a name and a known mode; the control API lists what was set."""
    assert (await control.post("/images", json={"mode": "slow"})).status_code == 400
    assert (await control.post("/images", json={"image": "x", "mode": "flaky"})).status_code == 400
    assert (await control.post("/images", json={"image": "x", "nonsense": 1})).status_code == 400
    marked = await control.post("/images", json={"image": "x", "mode": "slow", "extra_latency": 0.5})
    assert marked.json() == {
        "image": "x",
        "health_status": 200,
        "error_rate": 0.0,
        "extra_latency": 0.5,
        "crash": False,
    }
    assert (await control.get("/images")).json()["x"]["extra_latency"] == 0.5


async def test_update_counts_the_time_before_it_under_the_old_image(
    manual_control: httpx.AsyncClient,
    manual_api: httpx.AsyncClient,
    fleet_client: httpx.AsyncClient,
    clock: ManualClock,
) -> None:
    """Traffic before an update is not counted as the new image's: the new process starts from zero."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 1})
    machine = (await machines(manual_control))[0]
    await mark_image(manual_control, "registry.fly.io/shop:flaky", mode="errors", error_rate=0.2)
    await manual_control.put("/apps/shop/load", json={"iad": 10})
    await clock.advance(10)  # 100 requests served by the healthy image, not yet scraped
    config = (await manual_api.get(f"/apps/shop/machines/{machine['id']}")).json()["config"]
    flaky = config | {"image": "registry.fly.io/shop:flaky"}
    updated = await manual_api.post(f"/apps/shop/machines/{machine['id']}", json={"config": flaky})
    assert updated.status_code == 200, updated.text
    await clock.advance(2)  # replacing, then starting: back to started on the new image
    assert (await machines(manual_control))[0]["state"] == "started"
    samples = await scrape(fleet_client, machine)
    assert requests_total(samples, "200") == 0.0  # a new process: its counters restart, as a real app's do
    assert requests_total(samples, "500") == 0.0
    await clock.advance(10)  # 100 requests served by the erroring image
    samples = await scrape(fleet_client, machine)
    assert requests_total(samples, "500") == pytest.approx(20.0)
    assert requests_total(samples, "200") == pytest.approx(80.0)


async def test_counters_restart_with_the_process(
    manual_control: httpx.AsyncClient,
    manual_api: httpx.AsyncClient,
    fleet_client: httpx.AsyncClient,
    clock: ManualClock,
) -> None:
    """A machine that is stopped and started again is a new process: its /metrics counters restart at zero."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 1}, load={"iad": 10})
    machine = (await machines(manual_control))[0]
    await clock.advance(5)
    assert requests_total(await scrape(fleet_client, machine), "200") == pytest.approx(50.0)
    path = f"/apps/shop/machines/{machine['id']}"
    instance = (await manual_api.get(path)).json()["instance_id"]
    await manual_api.post(path + "/stop")
    await clock.advance(2)
    await manual_api.get(path + "/wait", params={"state": "stopped", "instance_id": instance, "timeout": 5})
    await manual_api.post(path + "/start")
    await clock.advance(1)  # starting lasts 1 s in manual_sim: started from here on
    assert (await machines(manual_control))[0]["state"] == "started"
    await clock.advance(2)
    assert requests_total(await scrape(fleet_client, machine), "200") == pytest.approx(20.0)
