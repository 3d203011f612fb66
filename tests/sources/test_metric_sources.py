"""Metric sources over real HTTP: the machines' /metrics pages, and PromQL against a real Prometheus
scraping the simulator's fleet. Missing data is never zero."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemon.clock import ManualClock, SystemClock
from daemon.core.samples import Aggregate
from daemon.fly.client import NO_BACKOFF, MachinesClient
from daemon.fly.models import Machine
from daemon.sim.server import SimServer
from daemon.sources.metrics import MachineCountSpec, MetricSpec, MetricWatch, PromQuerySpec, machine_counts
from daemon.sources.prometheus import MetricSourceError, PromQL
from daemon.sources.scrape import Scraper, ScrapeSpec, extract
from daemon.telemetry.metrics import SourceMetrics
from tests.conftest import eventually
from tests.sim.helpers import make_app
from tests.support.prometheus import PrometheusServer, free_port, running_prometheus

INFLIGHT = ScrapeSpec(name="app_inflight_requests", aggregate=Aggregate.SUM, timeout=1.0)


@pytest.fixture
async def manual_fly(manual_sim: SimServer, clock: ManualClock) -> AsyncIterator[MachinesClient]:
    client = MachinesClient(manual_sim.api_url, "sim-token", clock=clock, retry=NO_BACKOFF, rate_limit=False)
    yield client
    await client.aclose()


def test_extract_sums_matching_samples_and_knows_counters() -> None:
    """Matching samples (name and labels) are summed; a counter family is flagged; none found is None."""
    page = (
        '# TYPE req_total counter\nreq_total{status="200"} 5\nreq_total{status="503"} 2\n'
        "# TYPE g gauge\ng 1.5\n"
    )
    assert extract(page, ScrapeSpec(name="req_total")) == (7.0, True)
    assert extract(page, ScrapeSpec(name="req_total", labels={"status": "503"})) == (2.0, True)
    assert extract(page, ScrapeSpec(name="g")) == (1.5, False)
    assert extract(page, ScrapeSpec(name="nope")) is None


async def test_scrape_gauge_per_region(control: httpx.AsyncClient, fly: MachinesClient) -> None:
    """A gauge is summed (or averaged) over each region's machines, and follows the load."""
    await make_app(control, base_latency=0.01, load={"iad": 20, "cdg": 5})
    scraper = Scraper(SystemClock())
    try:
        machines = await fly.list_machines("shop")
        result = await scraper.scrape("shop", machines, INFLIGHT)
        assert set(result.regions) == {"iad", "cdg"}
        assert result.regions["iad"].value > result.regions["cdg"].value > 0
        assert not result.errors
        avg = await scraper.scrape(
            "shop", machines, ScrapeSpec(name="app_inflight_requests", aggregate=Aggregate.AVG)
        )
        assert avg.regions["iad"].value == pytest.approx(result.regions["iad"].value / 2)
    finally:
        await scraper.aclose()


async def test_scrape_counter_becomes_a_rate(
    manual_control: httpx.AsyncClient, manual_fly: MachinesClient, clock: ManualClock
) -> None:
    """A counter is a per-second rate between two scrapes: nothing on the first, then the offered load."""
    await make_app(manual_control, base_latency=0.01, regions={"iad": 2}, load={"iad": 30})
    spec = ScrapeSpec(name="app_http_requests_total", labels={"status": "200"})
    scraper = Scraper(clock)
    try:
        machines = await manual_fly.list_machines("shop")
        first = await scraper.scrape("shop", machines, spec)
        assert first.counter
        assert first.regions == {}  # one scrape gives no rate: missing, not zero
        await clock.advance(10)
        second = await scraper.scrape("shop", machines, spec)
        assert second.regions["iad"].value == pytest.approx(30.0)
        assert second.machines == pytest.approx({m.id: 15.0 for m in machines})
    finally:
        await scraper.aclose()


async def test_scrape_leaves_unreadable_machines_and_regions_out(
    control: httpx.AsyncClient, fly: MachinesClient
) -> None:
    """A machine that does not answer is reported and left out; its region, with nothing read, is missing."""
    await make_app(control, base_latency=0.01, load={"iad": 10, "cdg": 10})
    machines = await fly.list_machines("shop")
    await control.post("/faults", json={"kind": "region_outage", "region": "cdg", "mode": "refuse"})
    scraper = Scraper(SystemClock())
    try:
        result = await scraper.scrape("shop", machines, INFLIGHT)  # the list from before the outage
        assert "cdg" not in result.regions
        assert "iad" in result.regions
        cdg = [m.id for m in machines if m.region == "cdg"]
        assert set(result.errors) == set(cdg)
        assert "cannot connect" in result.errors[cdg[0]]
        wrong = await scraper.scrape("shop", machines, ScrapeSpec(name="no_such_metric", timeout=0.5))
        assert wrong.regions == {}
        assert all("no sample named" in e for m, e in wrong.errors.items() if m not in cdg)
    finally:
        await scraper.aclose()


@pytest.fixture
async def prometheus(sim: SimServer, tmp_path: Path) -> AsyncIterator[PrometheusServer]:
    async with running_prometheus(tmp_path) as server:
        yield server


async def test_promql_per_region_grouped_and_placeholder(
    control: httpx.AsyncClient, sim: SimServer, prometheus: PrometheusServer
) -> None:
    """A query grouped by region and a {region} placeholder query give the same per-region values."""
    await make_app(
        control, base_latency=0.01, load={"iad": 20, "cdg": 5}, regions={"iad": 2, "cdg": 1, "nrt": 1}
    )
    await prometheus.wait_for_targets(prometheus.retarget(sim))
    promql = PromQL(prometheus.url, SystemClock())
    try:
        grouped = await promql.per_region(
            'sum by (region) (app_inflight_requests{app="shop"})', ["iad", "cdg", "nrt"]
        )
        placeholder = await promql.per_region(
            'sum(app_inflight_requests{region="{region}"})', ["iad", "cdg", "nrt"]
        )
        assert set(grouped) == set(placeholder) == {"iad", "cdg", "nrt"}
        assert grouped["iad"].value > grouped["cdg"].value > 0
        assert grouped["nrt"].value == 0.0  # a real zero: nrt has a machine and no load
        for region in grouped:
            assert placeholder[region].value == pytest.approx(grouped[region].value)
        missing = await promql.per_region('sum by (region) (app_inflight_requests{region="lhr"})', ["lhr"])
        assert missing == {}  # empty result: missing, never zero
    finally:
        await promql.aclose()


async def test_promql_errors_and_range(
    control: httpx.AsyncClient, sim: SimServer, prometheus: PrometheusServer
) -> None:
    """A bad query, an ungrouped result and a dead Prometheus are errors; a range query returns points."""
    await make_app(control, base_latency=0.01, load={"iad": 10}, regions={"iad": 1})
    await prometheus.wait_for_targets(prometheus.retarget(sim))
    promql = PromQL(prometheus.url, SystemClock())
    dead = PromQL(f"http://127.0.0.1:{free_port()}", SystemClock(), timeout=1.0)
    try:
        with pytest.raises(MetricSourceError, match="refused the query"):
            await promql.instant("sum(")
        with pytest.raises(MetricSourceError, match="no 'region' label"):
            await promql.per_region("sum(app_inflight_requests)", ["iad"])
        with pytest.raises(MetricSourceError, match="cannot reach Prometheus"):
            await dead.per_region("up", ["iad"])

        async def points() -> int:
            now = SystemClock().now()
            series = await promql.range('app_inflight_requests{app="shop"}', now - 30, now, 1)
            return len(series[0].points) if series else 0

        assert await eventually(lambda: _at_least(points, 2), timeout=10.0)
    finally:
        await promql.aclose()
        await dead.aclose()


async def _at_least(probe, n: int) -> bool:  # type: ignore[no-untyped-def]
    return bool(await probe() >= n)


async def test_promql_sends_the_token(tmp_path: Path) -> None:
    """The token goes in the Authorization header (FlyV1 as is) and never into an error message."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization", ""))
        return httpx.Response(401, json={"status": "error", "error": "unauthorized"})

    promql = PromQL(
        "https://api.fly.io/prometheus/acme",
        SystemClock(),
        token="FlyV1 fm2_secret",
        transport=httpx.MockTransport(handler),
    )
    try:
        with pytest.raises(MetricSourceError) as raised:
            await promql.instant("up")
        assert seen == ["FlyV1 fm2_secret"]
        assert "fm2_secret" not in str(raised.value)
        assert "fm2_secret" not in repr(promql)
    finally:
        await promql.aclose()


async def test_metric_watch_staleness_and_missing(
    manual_control: httpx.AsyncClient, manual_fly: MachinesClient, clock: ManualClock
) -> None:
    """Fresh samples are values; when the source fails they age out and go missing (absent, not zero)."""
    registry = CollectorRegistry()
    scraper = Scraper(clock)
    watch = MetricWatch(clock, scraper, metrics=SourceMetrics(registry))
    spec = MetricSpec(
        name="inflight", source=ScrapeSpec(name="app_inflight_requests", timeout=0.5), max_age=10.0
    )
    try:
        await make_app(manual_control, base_latency=0.01, load={"iad": 20, "cdg": 10})
        machines = await manual_fly.list_machines("shop")
        first = await watch.read("shop", machines, ["iad", "cdg", "nrt"], spec)
        assert set(first.values) == {"iad", "cdg"}
        assert first.missing(["iad", "cdg", "nrt"]) == ["nrt"]
        labels = {"fly_app": "shop", "fly_region": "iad", "metric": "inflight"}
        assert registry.get_sample_value("flywatch_metric_value", labels) == pytest.approx(
            first.values["iad"]
        )
        await manual_control.post(
            "/faults", json={"kind": "region_outage", "region": "iad", "mode": "refuse"}
        )
        await manual_control.post(
            "/faults", json={"kind": "region_outage", "region": "cdg", "mode": "refuse"}
        )
        await clock.advance(5)
        held = await watch.read("shop", machines, ["iad", "cdg"], spec)
        assert "no machine's /metrics could be read" in held.error
        assert set(held.values) == {"iad", "cdg"}  # 5 s old: still fresh
        await clock.advance(6)
        stale = await watch.read("shop", machines, ["iad", "cdg"], spec)
        assert stale.values == {}
        assert stale.samples["iad"].age(clock.now()) == pytest.approx(11.0)
        assert registry.get_sample_value("flywatch_metric_value", labels) is None
        errors = registry.get_sample_value(
            "flywatch_metric_errors_total", {"fly_app": "shop", "source": "scrape"}
        )
        assert errors is not None
        assert errors >= 2
    finally:
        await scraper.aclose()


async def test_metric_watch_forget_starts_the_app_afresh(
    manual_control: httpx.AsyncClient, manual_fly: MachinesClient, clock: ManualClock
) -> None:
    """After forget, the app's value series are gone, no sample read before is served as fresh, and its
    counters need two scrapes again for a rate (as after a restart); another app keeps its own."""
    registry = CollectorRegistry()
    scraper = Scraper(clock)
    watch = MetricWatch(clock, scraper, metrics=SourceMetrics(registry))
    spec = MetricSpec(
        name="rps", source=ScrapeSpec(name="app_http_requests_total", labels={"status": "200"}), max_age=60
    )
    try:
        await make_app(manual_control, base_latency=0.01, regions={"iad": 2}, load={"iad": 30})
        await make_app(manual_control, "other", base_latency=0.01, regions={"cdg": 1}, load={"cdg": 10})
        shop, other = await manual_fly.list_machines("shop"), await manual_fly.list_machines("other")
        await watch.read("shop", shop, ["iad"], spec)
        await watch.read("other", other, ["cdg"], spec)
        await clock.advance(10)
        assert (await watch.read("shop", shop, ["iad"], spec)).values == pytest.approx({"iad": 30.0})
        assert (await watch.read("other", other, ["cdg"], spec)).values == pytest.approx({"cdg": 10.0})
        labels = {"fly_app": "shop", "fly_region": "iad", "metric": "rps"}
        assert registry.get_sample_value("flywatch_metric_value", labels) == pytest.approx(30.0)

        watch.forget({"shop"})
        assert registry.get_sample_value("flywatch_metric_value", labels) is None
        other_labels = {"fly_app": "other", "fly_region": "cdg", "metric": "rps"}
        assert registry.get_sample_value("flywatch_metric_value", other_labels) == pytest.approx(10.0)
        await clock.advance(5)
        again = await watch.read("shop", shop, ["iad"], spec)
        assert again.values == {}  # a first scrape of a counter: no rate, and no 5 s old sample instead
        assert again.samples == {}
        await clock.advance(5)
        assert (await watch.read("shop", shop, ["iad"], spec)).values == pytest.approx({"iad": 30.0})
    finally:
        await scraper.aclose()


async def test_metric_watch_machine_counts_and_unconfigured_promql(
    control: httpx.AsyncClient, fly: MachinesClient
) -> None:
    """Machine counts per region come from the API list; a PromQL metric without Prometheus is an error."""
    await make_app(control, regions={"iad": {"started": 2, "stopped": 1}, "cdg": 1})
    scraper = Scraper(SystemClock())
    watch = MetricWatch(SystemClock(), scraper)
    try:
        machines = await fly.list_machines("shop")
        started = await watch.read(
            "shop", machines, ["iad", "cdg", "nrt"], MetricSpec("started", MachineCountSpec())
        )
        assert started.values == {"iad": 2.0, "cdg": 1.0, "nrt": 0.0}
        stopped = await watch.read(
            "shop", machines, ["iad"], MetricSpec("stopped", MachineCountSpec("stopped"))
        )
        assert stopped.values == {"iad": 1.0}
        assert machine_counts(machines)["iad"] == {"started": 2, "stopped": 1}
        unconfigured = await watch.read("shop", machines, ["iad"], MetricSpec("q", PromQuerySpec("up")))
        assert unconfigured.values == {}
        assert "no Prometheus is configured" in unconfigured.error
    finally:
        await scraper.aclose()


async def test_a_page_in_pieces_is_read_whole() -> None:
    """A /metrics page that arrives in several pieces is read to its end, not cut at the first piece."""
    from aiohttp import web  # noqa: PLC0415 - only this test serves pages

    async def page(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"# TYPE app_inflight gauge\napp_inflight 1")
        await asyncio.sleep(0.05)  # the second piece comes later, as on a real network
        await response.write(b"23\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    scraper = Scraper(SystemClock())
    try:
        machine = Machine.model_validate(
            {
                "id": "m1",
                "state": "started",
                "region": "iad",
                "private_ip": "127.0.0.1",
                "host_status": "ok",
                "config": {"image": "a", "metadata": {"fly_process_group": "app"}},
            }
        )
        result = await scraper.scrape("shop", [machine], ScrapeSpec(name="app_inflight", port=port))
        assert result.machines == {"m1": 123.0}
    finally:
        await scraper.aclose()
        await runner.cleanup()


async def test_a_region_read_in_part_is_missing(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fly: MachinesClient
) -> None:
    """A sum over part of a region would undercount its load: with a machine unread, the region is missing."""
    await make_app(control, base_latency=0.01, load={"iad": 20}, regions={"iad": 2})
    machines = await fly.list_machines("shop")
    await api.post(f"/apps/shop/machines/{machines[0].id}/stop")  # gone quietly: the list is from before
    await eventually(lambda: _not_listening(control, machines[0].id))
    scraper = Scraper(SystemClock())
    try:
        result = await scraper.scrape("shop", machines, INFLIGHT)
        assert result.coverage == {"iad": 0.5}
        assert result.regions == {}
        half = await scraper.scrape(
            "shop", machines, ScrapeSpec(name="app_inflight_requests", min_coverage=0.5)
        )
        assert set(half.regions) == {"iad"}
    finally:
        await scraper.aclose()


async def _not_listening(control: httpx.AsyncClient, machine_id: str) -> bool:
    summary = (await control.get("/apps/shop")).json()
    return not next(m for m in summary["machines"] if m["id"] == machine_id)["listening"]


async def test_an_empty_machine_list_is_no_count(control: httpx.AsyncClient) -> None:
    """An empty list from the Machines API is missing data, not zero machines everywhere."""
    scraper = Scraper(SystemClock())
    try:
        reading = await MetricWatch(SystemClock(), scraper).read(
            "shop", [], ["iad"], MetricSpec("n", MachineCountSpec())
        )
        assert reading.values == {}
        assert "listed no machine" in reading.error
    finally:
        await scraper.aclose()


async def test_promql_infinities_and_nans_are_missing_per_series() -> None:
    """A series whose value is NaN or infinite is missing; the other regions keep their values."""

    def handler(request: httpx.Request) -> httpx.Response:
        result = [
            {"metric": {"region": "iad"}, "value": [1, "5"]},
            {"metric": {"region": "cdg"}, "value": [1, "+Inf"]},
            {"metric": {"region": "nrt"}, "value": [1, "NaN"]},
        ]
        return httpx.Response(
            200, json={"status": "success", "data": {"resultType": "vector", "result": result}}
        )

    promql = PromQL("http://prom.invalid", SystemClock(), transport=httpx.MockTransport(handler))
    try:
        values = await promql.per_region("sum by (region) (x)", ["iad", "cdg", "nrt"])
        assert {region: sample.value for region, sample in values.items()} == {"iad": 5.0}
    finally:
        await promql.aclose()


async def test_promql_malformed_answers_are_source_errors() -> None:
    """An answer of the wrong shape is a MetricSourceError, never a KeyError."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"status": "success", "data": {"resultType": "vector", "result": [{"x": 1}]}}
        )

    promql = PromQL("http://prom.invalid", SystemClock(), transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(MetricSourceError, match="malformed"):
            await promql.instant("x")
    finally:
        await promql.aclose()
