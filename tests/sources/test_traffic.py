"""Per-machine traffic for the release watch, over real HTTP: the simulated fleet's /metrics pages, and a real
Prometheus scraping them. Counts are increases since the previous read; a new instance counts from zero;
what cannot be compared or read is absent (never zero) and said in `errors`."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon.clock import ManualClock, SystemClock
from daemon.core.traffic import Traffic, quantile, total
from daemon.fly.client import NO_BACKOFF, MachinesClient
from daemon.fly.models import Machine
from daemon.sim.server import SimServer
from daemon.sources.prometheus import PromQL
from daemon.sources.traffic import TrafficReader, TrafficSpec, parse
from daemon.telemetry.metrics import SourceMetrics
from tests.conftest import eventually
from tests.sim.helpers import make_app, mark_image
from tests.support.prometheus import PrometheusServer, free_port, running_prometheus

SPEC = TrafficSpec(timeout=1.0)
PROMQL_SPEC = TrafficSpec(source="promql")
ERRORS = "registry.fly.io/shop:errors"
SLOW = "registry.fly.io/shop:slow"
NEW = "registry.fly.io/shop:deployment-2"
INF = math.inf


@pytest.fixture
async def manual_fly(manual_sim: SimServer, clock: ManualClock) -> AsyncIterator[MachinesClient]:
    client = MachinesClient(manual_sim.api_url, "sim-token", clock=clock, retry=NO_BACKOFF, rate_limit=False)
    yield client
    await client.aclose()


@pytest.fixture
async def prometheus(sim: SimServer, tmp_path: Path) -> AsyncIterator[PrometheusServer]:
    async with running_prometheus(tmp_path) as server:
        yield server


async def page_requests(fleet_client: httpx.AsyncClient, machine: Machine) -> float:
    """The machine's cumulative request count, read straight from its page (not through the reader)."""
    page = (await fleet_client.get(f"http://{machine.private_ip}:8080/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "app_http_requests_total"
    )


def fake_machine(machine_id: str, port: int = 8080, **fields: Any) -> Machine:
    return Machine.model_validate(
        {
            "id": machine_id,
            "state": "started",
            "region": "iad",
            "private_ip": "127.0.0.1",
            "host_status": "ok",
            "instance_id": f"{machine_id}-1",
            **fields,
        }
    )


def test_parse_sums_statuses_and_buckets() -> None:
    """A page gives all requests, the 5xx ones, and the latency buckets summed per bound over label sets."""
    page = """# TYPE app_http_requests counter
app_http_requests_total{method="GET",status="200"} 70
app_http_requests_total{method="GET",status="404"} 5
app_http_requests_total{method="GET",status="500"} 3
app_http_requests_total{method="POST",status="503"} 2
# TYPE app_http_request_duration_seconds histogram
app_http_request_duration_seconds_bucket{method="GET",le="0.1"} 60
app_http_request_duration_seconds_bucket{method="GET",le="+Inf"} 78
app_http_request_duration_seconds_bucket{method="POST",le="0.1"} 1
app_http_request_duration_seconds_bucket{method="POST",le="+Inf"} 2
app_http_request_duration_seconds_count{method="GET"} 78
app_http_request_duration_seconds_sum{method="GET"} 9.5
"""
    assert parse(page, SPEC) == Traffic(80, 5, ((0.1, 61), (INF, 80)))
    assert parse(page, TrafficSpec(latency=None)) == Traffic(80, 5, ())
    with pytest.raises(LookupError, match="no sample named other_total"):
        parse(page, TrafficSpec(requests="other_total"))


async def test_counts_and_5xx_share_of_an_erroring_image(
    manual_control: httpx.AsyncClient, manual_fly: MachinesClient, clock: ManualClock
) -> None:
    """Each machine's requests and 5xx over the interval are the offered load's, 20% of them errors."""
    await mark_image(manual_control, ERRORS, mode="errors")
    await make_app(
        manual_control,
        image=ERRORS,
        base_latency=0.01,
        regions={"iad": 2, "cdg": 1},
        load={"iad": 40, "cdg": 10},
    )
    machines = await manual_fly.list_machines("shop")
    reader = TrafficReader(clock)
    try:
        first = await reader.read("shop", machines, SPEC)
        assert first.machines == {}  # first sight: nothing to compare with, absent rather than zero
        assert first.errors == {}
        await clock.advance(10)
        second = await reader.read("shop", machines, SPEC)
        assert second.at == clock.now()
        assert second.errors == {}
        expected = {m.id: 200.0 if m.region == "iad" else 100.0 for m in machines}  # 20 and 10 rps for 10 s
        assert {mid: t.requests for mid, t in second.machines.items()} == pytest.approx(expected)
        for traffic in second.machines.values():
            assert traffic.error_ratio == pytest.approx(0.2)
            assert traffic.buckets[-1][0] == INF
            assert traffic.buckets[-1][1] == pytest.approx(traffic.requests)
        assert total(second.machines.values()).error_ratio == pytest.approx(0.2)
    finally:
        await reader.aclose()


async def test_p95_of_a_slow_image_is_above_a_healthy_one(
    manual_control: httpx.AsyncClient, manual_fly: MachinesClient, clock: ManualClock
) -> None:
    """A slow image's p95 lands in its slow buckets (1 s extra), a healthy one's in tens of milliseconds."""
    await mark_image(manual_control, SLOW, mode="slow")
    await make_app(manual_control, "fast", base_latency=0.01, regions={"iad": 1}, load={"iad": 10})
    await make_app(
        manual_control, "slow", image=SLOW, base_latency=0.01, regions={"iad": 1}, load={"iad": 10}
    )
    fast, slow = await manual_fly.list_machines("fast"), await manual_fly.list_machines("slow")
    reader = TrafficReader(clock)
    try:
        await reader.read("fast", fast, SPEC)
        await reader.read("slow", slow, SPEC)
        await clock.advance(10)
        fast_p95 = (await reader.read("fast", fast, SPEC)).machines[fast[0].id].quantile(0.95)
        slow_p95 = (await reader.read("slow", slow, SPEC)).machines[slow[0].id].quantile(0.95)
        # exponential answers of mean 12.5 ms and 1.0125 s: p95 about 3 means, inside the 25-50 ms and
        # 2.5-5 s buckets
        assert fast_p95 is not None
        assert slow_p95 is not None
        assert 0.025 < fast_p95 < 0.05
        assert 2.5 < slow_p95 < 5.0
    finally:
        await reader.aclose()


async def test_an_update_counts_the_new_instance_from_zero(
    manual_control: httpx.AsyncClient,
    manual_fly: MachinesClient,
    clock: ManualClock,
    fleet_client: httpx.AsyncClient,
) -> None:
    """After an update (a new instance_id) the whole new total is the increase, not new minus old."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 1}, load={"iad": 20})
    [old] = await manual_fly.list_machines("shop")
    reader = TrafficReader(clock)
    try:
        await reader.read("shop", [old], SPEC)
        await clock.advance(10)
        before = await reader.read("shop", [old], SPEC)
        assert before.machines[old.id].requests == pytest.approx(200.0)
        deployed = await manual_control.post(
            "/apps/shop/deploy", json={"image": NEW, "strategy": "immediate"}
        )
        assert deployed.status_code == 202, deployed.text
        await clock.advance(2)  # replacing, then starting: a new process
        await clock.advance(15)
        [new] = await manual_fly.list_machines("shop")
        assert (new.id, new.state, new.image) == (old.id, "started", NEW)
        assert new.instance_id != old.instance_id
        after = await reader.read("shop", [new], SPEC)
        counted = await page_requests(fleet_client, new)  # the clock stands still: the same total
        assert counted > 250.0  # more than the old process had: a drop would not have told the restart
        assert after.machines[new.id].requests == pytest.approx(counted)
        assert after.machines[new.id].buckets[-1][1] == pytest.approx(counted)  # the +Inf bucket
    finally:
        await reader.aclose()


async def test_first_sight_absent_and_machines_gone_forgotten(
    manual_control: httpx.AsyncClient, manual_fly: MachinesClient, clock: ManualClock
) -> None:
    """A machine first seen, or seen again after it was gone, is absent; a stopped one is neither read nor
    an error; a failed read keeps the previous one, so the next success has an increase."""
    await make_app(
        manual_control, base_latency=0.01, regions={"iad": {"started": 2, "stopped": 1}}, load={"iad": 20}
    )
    machines = await manual_fly.list_machines("shop")
    a, b = sorted((m for m in machines if m.state == "started"), key=lambda m: m.id)
    [stopped] = [m for m in machines if m.state == "stopped"]
    reader = TrafficReader(clock)
    try:
        assert (await reader.read("shop", machines, SPEC)).machines == {}
        await clock.advance(10)
        one = await reader.read("shop", [a, stopped], SPEC)  # b is gone from the list: forgotten
        assert set(one.machines) == {a.id}
        assert one.errors == {}
        await clock.advance(10)
        both = await reader.read("shop", machines, SPEC)
        assert set(both.machines) == {a.id}  # b is back, first sight again
        assert both.machines[a.id].requests == pytest.approx(100.0)
        outage = await manual_control.post(
            "/faults", json={"kind": "region_outage", "region": "iad", "mode": "refuse"}
        )
        assert outage.status_code < 300, outage.text
        await clock.advance(10)
        failed = await reader.read("shop", machines, SPEC)
        assert failed.machines == {}
        assert set(failed.errors) == {a.id, b.id}
        assert (await manual_control.delete("/faults")).status_code < 300
        await clock.advance(10)
        recovered = await reader.read("shop", machines, SPEC)
        assert set(recovered.machines) == {a.id, b.id}  # compared with the last read that succeeded
        assert all(t.requests > 0 for t in recovered.machines.values())
    finally:
        await reader.aclose()


async def test_unreachable_and_stopped_machines_are_errors_or_absent(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fly: MachinesClient
) -> None:
    """Machines that refuse, hang or sit on an unreachable host are errors; a machine listed stopped is
    skipped; the errors are counted."""
    await make_app(control, base_latency=0.01, regions={"iad": 2, "cdg": 1}, load={"iad": 10, "cdg": 10})
    machines = await fly.list_machines("shop")
    stale_stop, live = sorted((m for m in machines if m.region == "iad"), key=lambda m: m.id)
    [remote] = [m for m in machines if m.region == "cdg"]
    registry = CollectorRegistry()
    reader = TrafficReader(SystemClock(), metrics=SourceMetrics(registry))
    try:
        assert (await api.post(f"/apps/shop/machines/{stale_stop.id}/stop")).status_code == 200
        await eventually(lambda: _not_listening(control, stale_stop.id))
        await control.post("/faults", json={"kind": "region_outage", "region": "cdg", "mode": "refuse"})
        stale = await reader.read("shop", machines, SPEC)  # the list from before: both still "started"
        assert set(stale.errors) == {stale_stop.id, remote.id}
        assert all("cannot connect" in error for error in stale.errors.values())
        assert stale.machines == {}  # the live one is at first sight
        fresh = await reader.read("shop", await fly.list_machines("shop"), SPEC)
        assert fresh.errors == {remote.id: "host unreachable"}  # stopped: nothing to read, no error
        assert set(fresh.machines) == {live.id}
        await control.delete("/faults")
        await control.post("/faults", json={"kind": "region_outage", "region": "cdg", "mode": "blackhole"})
        hung = await reader.read("shop", [remote], TrafficSpec(timeout=0.3))
        assert hung.errors == {remote.id: "timeout after 0.3s"}
        counted = registry.get_sample_value(
            "flywatch_metric_errors_total", {"fly_app": "shop", "source": "traffic"}
        )
        assert counted == 4.0
    finally:
        await control.delete("/faults")
        await reader.aclose()


async def _not_listening(control: httpx.AsyncClient, machine_id: str) -> bool:
    summary = (await control.get("/apps/shop")).json()
    return not next(m for m in summary["machines"] if m["id"] == machine_id)["listening"]


async def test_a_broken_page_is_an_error_for_that_machine(
    control: httpx.AsyncClient, fly: MachinesClient
) -> None:
    """A page that is no exposition, a 404, a missing requests sample, a NaN or a bad bucket is an error for
    its machine only, never an exception."""
    await make_app(control, base_latency=0.01, regions={"iad": 1}, load={"iad": 10})
    machines = await fly.list_machines("shop")
    [machine] = machines
    pages = {
        "/nan": '# TYPE app_http_requests counter\napp_http_requests_total{status="200"} NaN\n',
        "/le": 'app_http_requests_total{status="200"} 1\n'
        'app_http_request_duration_seconds_bucket{le="x"} 1\n',
        "/ok": 'app_http_requests_total{status="200"} 1\n',
    }

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=pages[request.path])

    app = web.Application()
    app.router.add_get("/{page}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    reader = TrafficReader(SystemClock())
    try:
        health = await reader.read("shop", machines, TrafficSpec(path="/health"))  # JSON, not an exposition
        assert health.errors[machine.id].startswith("bad metrics page: ")
        missing = await reader.read("shop", machines, TrafficSpec(path="/nope"))
        assert missing.errors == {machine.id: "bad metrics page: status 404"}
        unnamed = await reader.read("shop", machines, TrafficSpec(requests="no_such_total"))
        assert unnamed.errors == {machine.id: "no sample named no_such_total"}
        own = [fake_machine(name, port) for name in ("nan", "le", "ok")]
        nan = await reader.read("own", own[:1], TrafficSpec(path="/nan", port=port))
        assert nan.errors == {"nan": "bad metrics page: app_http_requests_total is nan"}
        le = await reader.read("own", own[1:2], TrafficSpec(path="/le", port=port))
        assert le.errors["le"].startswith("bad metrics page: could not convert string to float")
        assert (await reader.read("own", own[2:], TrafficSpec(path="/ok", port=port))).machines == {}
        ok = await reader.read("own", own[2:], TrafficSpec(path="/ok", port=port))
        assert ok.errors == {}
        assert ok.machines == {"ok": Traffic(0, 0, ())}  # read twice, nothing new: a real zero
    finally:
        await reader.aclose()
        await runner.cleanup()


def _answer(result: list[dict[str, Any]]) -> httpx.Response:
    return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})


async def test_promql_queries_windows_and_answers() -> None:
    """Two queries per read over the time since the previous good read (first: the spec's window, at least
    1 s); series of machines not asked for, NaN or without requests are absent; errors go to "promql"."""
    clock = ManualClock()
    seen: list[tuple[str, str]] = []
    refuse = False

    def handler(request: httpx.Request) -> httpx.Response:
        query, at = request.url.params["query"], request.url.params["time"]
        seen.append((query, at))
        if refuse:
            return httpx.Response(503, json={"status": "error", "error": "overloaded"})
        if "by (instance, le)" in query:
            return _answer(
                [
                    {"metric": {"instance": "m1", "le": "0.1"}, "value": [at, "3"]},
                    {"metric": {"instance": "m1", "le": "+Inf"}, "value": [at, "4"]},
                    {"metric": {"instance": "m2", "le": "+Inf"}, "value": [at, "9"]},  # no requests: absent
                ]
            )
        return _answer(
            [
                {"metric": {"instance": "m1", "status": "200"}, "value": [at, "3"]},
                {"metric": {"instance": "m1", "status": "503"}, "value": [at, "1"]},
                {"metric": {"instance": "m3", "status": "200"}, "value": [at, "NaN"]},
                {"metric": {"instance": "m4", "status": "200"}, "value": [at, "0"]},
                {"metric": {"instance": "elsewhere", "status": "200"}, "value": [at, "7"]},
            ]
        )

    promql = PromQL("http://prom.invalid", clock, transport=httpx.MockTransport(handler))
    registry = CollectorRegistry()
    reader = TrafficReader(clock, promql, SourceMetrics(registry))
    machines = [fake_machine(m) for m in ("m1", "m2", "m3", "m4", "m5")]
    spec = TrafficSpec(
        source="promql", requests="fly_app_http_responses_count", latency="fly_app_http_response_time_seconds"
    )
    try:
        first = await reader.read("shop", machines, spec)
        assert first.errors == {}
        assert first.machines == {"m1": Traffic(4, 1, ((0.1, 3), (INF, 4))), "m4": Traffic(0, 0, ())}
        assert seen == [
            (
                'sum by (instance, status) (increase(fly_app_http_responses_count{app="shop"}[30s]))',
                f"{clock.now():.3f}",
            ),
            (
                (
                    "sum by (instance, le) "
                    '(increase(fly_app_http_response_time_seconds_bucket{app="shop"}[30s]))'
                ),
                f"{clock.now():.3f}",
            ),
        ]
        await clock.advance(12.4)
        await reader.read("shop", machines, spec)
        assert seen[-1][0].endswith("[12s]))")
        await clock.advance(0.2)
        await reader.read("shop", machines, spec)
        assert seen[-1][0].endswith("[1s]))")  # at least a second
        refuse = True
        await clock.advance(5)
        failed = await reader.read("shop", machines, spec)
        assert failed.machines == {}
        assert set(failed.errors) == {"promql"}
        assert "overloaded" in failed.errors["promql"]
        refuse = False
        await clock.advance(5)
        await reader.read("shop", machines, spec)
        assert seen[-1][0].endswith("[10s]))")  # from the last read that succeeded
        before = len(seen)
        await reader.read("other", machines, TrafficSpec(source="promql", latency=None))
        assert [q for q, _ in seen[before:]] == [
            'sum by (instance, status) (increase(app_http_requests_total{app="other"}[30s]))'
        ]
        unconfigured = await TrafficReader(clock).read("shop", machines, spec)
        assert "no Prometheus is configured" in unconfigured.errors["promql"]
        counted = registry.get_sample_value(
            "flywatch_metric_errors_total", {"fly_app": "shop", "source": "traffic"}
        )
        assert counted == 1.0
    finally:
        await reader.aclose()
        await promql.aclose()


async def test_promql_without_an_instance_label_is_an_error() -> None:
    """Series that name no machine cannot be put down to a release: an error, not an empty reading."""

    def handler(request: httpx.Request) -> httpx.Response:
        return _answer([{"metric": {"status": "200"}, "value": [1, "5"]}])

    clock = ManualClock()
    promql = PromQL("http://prom.invalid", clock, transport=httpx.MockTransport(handler))
    try:
        reading = await TrafficReader(clock, promql).read("shop", [fake_machine("m1")], PROMQL_SPEC)
        assert "no 'instance' label" in reading.errors["promql"]
    finally:
        await promql.aclose()


async def test_promql_against_prometheus(
    control: httpx.AsyncClient, sim: SimServer, fly: MachinesClient, prometheus: PrometheusServer
) -> None:
    """Through a real Prometheus: each machine's counts and 5xx share, and a p95 equal to what
    histogram_quantile gives; a slow, erroring image stands out; machines not scraped are absent."""
    bad = "registry.fly.io/shop:bad"
    await mark_image(control, bad, error_rate=0.2, extra_latency=1.0)
    await make_app(
        control, base_latency=0.01, regions={"iad": {"started": 2, "stopped": 1}}, load={"iad": 20}
    )
    await make_app(control, "bad", image=bad, base_latency=0.01, regions={"iad": 1}, load={"iad": 10})
    await prometheus.wait_for_targets(prometheus.retarget(sim))
    promql = PromQL(prometheus.url, SystemClock())

    async def scraped_thrice() -> bool:
        series = await promql.instant('count_over_time(app_http_requests_total{status="200"}[30s]) >= 3')
        return len(series) == 3

    reader = TrafficReader(SystemClock(), promql)
    try:
        await eventually(scraped_thrice, timeout=15.0)
        shop, broken = await fly.list_machines("shop"), await fly.list_machines("bad")
        started = sorted(m.id for m in shop if m.state == "started")
        asked = [m for m in shop if m.id == started[0]]
        one = await TrafficReader(SystemClock(), promql).read("shop", asked, PROMQL_SPEC)
        assert set(one.machines) == {started[0]}  # the other machine answers too, but was not asked for
        healthy = await reader.read("shop", shop, PROMQL_SPEC)
        failing = await reader.read("bad", broken, PROMQL_SPEC)
        assert healthy.errors == failing.errors == {}
        assert sorted(healthy.machines) == started  # the stopped machine is in no series: absent
        assert set(failing.machines) == {broken[0].id}
        for traffic in healthy.machines.values():
            assert traffic.requests > 0
            assert traffic.error_ratio == 0.0
        [bad_traffic] = failing.machines.values()
        assert bad_traffic.error_ratio == pytest.approx(0.2, rel=1e-3)
        server_p95 = {
            s.labels["instance"]: s.points[-1][1]
            for s in await promql.instant(
                "histogram_quantile(0.95, sum by (instance, le) "
                '(increase(app_http_request_duration_seconds_bucket{app="bad"}[30s])))',
                failing.at,
            )
        }
        assert server_p95 == {broken[0].id: pytest.approx(bad_traffic.quantile(0.95), rel=1e-9)}
        bad_p95 = quantile(0.95, bad_traffic.buckets)
        assert bad_p95 is not None
        assert bad_p95 > 1.0  # a second slower than the healthy machines
        assert all((p := t.quantile(0.95)) is not None and p < 0.1 for t in healthy.machines.values())
    finally:
        await reader.aclose()
        await promql.aclose()


async def test_forget_makes_the_next_read_a_first_read(
    manual_control: httpx.AsyncClient, manual_fly: MachinesClient, clock: ManualClock
) -> None:
    """After forget, a machine's next read is first sight (absent: no increase against the stale total),
    and only the app forgotten starts afresh."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 1}, load={"iad": 20})
    await make_app(manual_control, "other", base_latency=0.01, regions={"cdg": 1}, load={"cdg": 10})
    shop, other = await manual_fly.list_machines("shop"), await manual_fly.list_machines("other")
    reader = TrafficReader(clock)
    try:
        await reader.read("shop", shop, SPEC)
        await reader.read("other", other, SPEC)
        await clock.advance(10)
        assert set((await reader.read("shop", shop, SPEC)).machines) == {shop[0].id}
        reader.forget({"shop"})
        await clock.advance(10)
        again = await reader.read("shop", shop, SPEC)
        assert again.machines == {}  # first sight again: absent, never the 10 s since the stale total
        assert again.errors == {}
        kept = await reader.read("other", other, SPEC)
        assert kept.machines[other[0].id].requests == pytest.approx(200.0)  # 20 s since its last read
        await clock.advance(10)
        assert (await reader.read("shop", shop, SPEC)).machines[shop[0].id].requests == pytest.approx(200.0)
    finally:
        await reader.aclose()


async def test_forget_restarts_the_promql_window() -> None:
    """After forget, the next PromQL read of the app covers the spec's first window, not the time since a
    read made before it was forgotten."""
    clock = ManualClock()
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params["query"])
        return _answer([])

    promql = PromQL("http://prom.invalid", clock, transport=httpx.MockTransport(handler))
    reader = TrafficReader(clock, promql)
    spec = TrafficSpec(source="promql", latency=None)
    try:
        await reader.read("shop", [fake_machine("m1")], spec)
        await clock.advance(12)
        await reader.read("shop", [fake_machine("m1")], spec)
        assert seen[-1].endswith("[12s]))")
        reader.forget({"shop"})
        await clock.advance(600)
        await reader.read("shop", [fake_machine("m1")], spec)
        assert seen[-1].endswith("[30s]))")  # the first window again, not 600 s
    finally:
        await reader.aclose()
        await promql.aclose()
