"""The observability pack against the real thing: deploy/prometheus/alerts.yml with its promtool unit tests,
and deploy/grafana/flywatch.json's queries run by a real Prometheus (Debian's) that scrapes a real
`flywatch run` process watching the simulator.

The scenario runs once per module: the daemon scales `shop` up on a load step, rolls a bad release back
(alerting a webhook), reloads its policy on SIGHUP and then rejects a broken one, is refused with 429s until
ticks fail, and sees a region go down. By then every series the dashboard and the alerts read exists, and
the tests judge the answers Prometheus gave to every panel query and every alert expression.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from aiohttp import web

from daemon.sim.model import SimSettings
from tests.conftest import running_sim
from tests.e2e.conftest import APP, Daemon, Flywatch, create_shop, free_port, policy, set_load, started
from tests.support.contract import ContractChecker
from tests.support.prometheus import (
    PrometheusServer,
    running_prometheus,
    scrape_fixed_target,
    wait_for_series,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "flywatch.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"

JOB = "flywatch"  # the scrape job alerts.yml expects
REGIONS = ("iad", "cdg", "nrt")
BAD = "registry.fly.io/shop:bad"
# Grafana's variables as a dashboard showing `shop` in every region would substitute them
VARIABLES = {
    "${datasource}": "",
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "10m",
    "$app": "shop",
    "$region": "(iad|cdg|nrt)",
}
# what each alert expression (its `for` aside) says after the scenario: firing (True) or quiet (False)
ALERT_AFTER_SCENARIO = {
    "FlywatchDown": False,
    "FlywatchAbsent": False,
    "FlywatchNoTick": False,
    "FlywatchTicksFailing": True,
    "FlywatchRegionDown": True,
    "FlywatchRollbackFired": True,
    "FlywatchRollbackFailed": False,
    "FlywatchApiRateLimited": True,
    "FlywatchPolicyReloadFailed": True,
    "FlywatchInstanceCutOff": False,
    "FlywatchAppsUnowned": False,
}
QUERY_DEADLINE = 15.0  # seconds Prometheus may take to answer a query with data (rate() needs 2 scrapes)


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: `make test` installs Debian's prometheus (scripts/system-deps.sh)")
    return subprocess.run(  # noqa: S603 - our own files and text
        [binary, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that queries, inside rows too."""
    for panel in document["panels"]:
        yield from (p for p in panel.get("panels", []) if p.get("targets"))
        if panel.get("targets"):
            yield panel


def substituted(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):  # longest first: $__rate_interval before $__range
        expr = expr.replace(name, VARIABLES[name])
    return expr


def panel_queries() -> list[tuple[str, str]]:
    """(panel title and refId, query with the variables substituted) for every panel target."""
    return [
        (f"{panel['title']} [{target['refId']}]", substituted(target["expr"]))
        for panel in panels(dashboard())
        for target in panel["targets"]
    ]


# ---------------------------------------------------------------------------------------------- static


def test_alert_rules_pass_promtool_check_rules() -> None:
    """`promtool check rules` accepts deploy/prometheus/alerts.yml."""
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    """`promtool test rules` passes deploy/prometheus/alerts_test.yml."""
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_rule_is_unit_tested_firing_and_quiet() -> None:
    """Every rule of alerts.yml has a promtool case where it fires and one where it does not; each has a
    severity and a summary and description that use its labels."""
    tests = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert "$labels" in rule["annotations"]["summary"] + rule["annotations"]["description"], name
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name}: no case where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{name}: no case where it stays quiet"
    assert {rule["alert"] for rule in alert_rules()} == set(ALERT_AFTER_SCENARIO)


def test_the_dashboard_has_its_variables_and_every_query_is_filtered() -> None:
    """The dashboard has a Prometheus datasource variable and multi-value app and region variables from
    flywatch's metrics; every query goes to that datasource, and filters by $app (and $region) wherever its
    metric has the label."""
    document = dashboard()
    assert document["schemaVersion"] >= 39
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for name in ("app", "region"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["multi"], name
        assert variable["includeAll"], name
        assert variable["datasource"]["uid"] == "${datasource}"
        assert re.fullmatch(
            rf"label_values\(flywatch_\w+(\{{.*\}})?, fly_{name}\)", variable["definition"]
        ), name
    with_app = {"flywatch_desired_machines", "flywatch_machines", "flywatch_scaling_actions_total"}
    with_app |= {"flywatch_region_health", "flywatch_machine_healthy", "flywatch_probes_total"}
    with_app |= {"flywatch_probe_duration_seconds_bucket", "flywatch_metric_value"}
    with_region = set(with_app)
    with_app |= {"flywatch_release_info", "flywatch_release_verdict", "flywatch_rollbacks_total"}
    with_app |= {"flywatch_tick_errors_total", "flywatch_last_tick_timestamp_seconds"}
    with_app |= {"flywatch_metric_errors_total"}
    for panel in panels(document):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            for metric, selector in re.findall(r"(flywatch_\w+)(\{[^}]*\})?", target["expr"]):
                if metric in with_app:
                    assert 'fly_app=~"$app"' in selector, f"{panel['title']}: {metric} without $app"
                if metric in with_region:
                    assert 'fly_region=~"$region"' in selector, f"{panel['title']}: {metric} without $region"
    for name, expr in panel_queries():
        assert "$" not in expr, f"{name}: a variable the tests do not substitute: {expr}"


# ---------------------------------------------------------------------------------------------- the scenario


@dataclass(frozen=True)
class Observed:
    """What the scenario left: flywatch's /metrics text and Prometheus's answers."""

    metrics: str
    panels: dict[str, dict[str, Any]]  # panel title [refId] -> the /api/v1/query answer
    alerts: dict[str, dict[str, Any]]  # alert name -> the answer to its expression
    first_rollback: dict[str, Any]  # the answer to increase() over the rollbacks counter
    app_values: list[str]  # what Grafana's `app` variable would offer
    region_values: list[str]


class Receiver:
    """A webhook receiver for flywatch's alerts (the alerts counter needs deliveries)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/observability"

    async def handle(self, request: web.Request) -> web.Response:
        self.events.append((await request.json())["event"])
        return web.Response(text="ok")


def scenario_policy(webhook: str) -> dict[str, Any]:
    """tests/e2e's scaling policy for `shop` (1 s intervals), a release watch with a 3 s bake, a webhook."""
    document = policy()
    document["apps"][APP]["release"] = {
        "bake": "3s",
        "min_requests": 30,
        "max_error_ratio": 0.05,
        "max_p95_latency": "500ms",
        "max_parallel": 2,
        "lease_wait": "30s",
    }
    document["alerts"] = {"webhooks": [{"url": webhook, "format": "json"}]}
    return document


async def sample(daemon: Daemon, name: str, **labels: str) -> float:
    """The sum of the daemon's own samples of `name` with those labels (0 when it has none)."""
    total = 0.0
    for line in (await daemon.metrics()).splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match[3])
    return total


async def release_state(daemon: Daemon) -> dict[str, Any]:
    state: dict[str, Any] = (await daemon.status()).get("releases", {}).get(APP) or {}
    return state


async def query(client: httpx.AsyncClient, expr: str) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get("/api/v1/query", params={"query": expr})).json()
    return body


def finite(answer: dict[str, Any]) -> bool:
    """A successful answer with at least one sample whose value is a number (not NaN, not infinite)."""
    if answer.get("status") != "success":
        return False
    return any(math.isfinite(float(series["value"][1])) for series in answer["data"]["result"])


async def play(
    flywatch: Flywatch, control: httpx.AsyncClient, receiver: Receiver, server: PrometheusServer
) -> Daemon:
    """The story, with `server` scraping the daemon: scale up, a bad release rolled back, reloads good and
    bad, 429s until ticks fail, and a region outage. Every step waits on what the daemon says it did."""
    await create_shop(control, dict.fromkeys(REGIONS, 1), dict.fromkeys(REGIONS, 1))
    flywatch.write_policy(scenario_policy(receiver.url))
    daemon = flywatch.spawn()
    scrape_fixed_target(server, daemon.url.removeprefix("http://"), job=JOB)
    await daemon.wait_ready()

    async def adopted() -> bool:
        return ((await release_state(daemon)).get("good") or {}).get("version") == 1

    await daemon.until(adopted, timeout=30, what="release v1 recorded as known-good")

    await set_load(control, {"iad": 2})  # a load step: iad needs two machines

    async def scaled() -> bool:
        return (await started(control))["iad"] == 2

    await daemon.until(scaled, timeout=20, what="iad scaled up to 2")

    (await control.post("/images", json={"image": BAD, "mode": "errors"})).raise_for_status()
    deployed = await control.post(f"/apps/{APP}/deploy", json={"image": BAD, "strategy": "immediate"})
    deployed.raise_for_status()

    async def rolled_back() -> bool:
        rollback = (await release_state(daemon)).get("rollback") or {}
        return rollback.get("state") == "done"

    await daemon.until(rolled_back, timeout=60, what="the bad release rolled back")

    daemon.send(signal.SIGHUP)  # a reload that works...

    async def reloaded() -> bool:
        return await sample(daemon, "flywatch_config_reloads_total", result="ok") >= 1

    await daemon.until(reloaded, timeout=10, what="the policy reloaded on SIGHUP")
    flywatch.write_policy("apps: [not, a, mapping]\n")  # ...and a broken file, rejected (the old one stays)

    async def rejected() -> bool:
        return await sample(daemon, "flywatch_config_reloads_total", result="error") >= 1

    await daemon.until(rejected, timeout=15, what="the broken policy rejected")

    fault = await control.post("/faults", json={"endpoint": "Machines_list", "app": APP, "status": 429})
    fault.raise_for_status()

    async def ticks_failed() -> bool:  # twice in one series: Prometheus sees it go up, not just appear
        return await sample(daemon, "flywatch_tick_errors_total", tick="probe") >= 2

    await daemon.until(ticks_failed, timeout=30, what="ticks failing on 429s")
    (await control.delete(f"/faults/{fault.json()['id']}")).raise_for_status()

    outage = await control.post("/faults", json={"kind": "region_outage", "region": "nrt", "mode": "refuse"})
    outage.raise_for_status()

    async def nrt_down() -> bool:
        return await sample(daemon, "flywatch_region_health", fly_region="nrt", state="down") == 1

    await daemon.until(nrt_down, timeout=15, what="nrt judged down")

    async def alerted() -> bool:
        return await sample(daemon, "flywatch_alerts_total", event="rollback_finished", result="sent") >= 1

    await daemon.until(alerted, timeout=15, what="the rollback alerts delivered")
    return daemon


async def observe(server: PrometheusServer, daemon: Daemon) -> Observed:
    """The daemon's /metrics, every panel query's answer (waiting up to a deadline for data), every alert
    expression's answer, and the values of the app and region variables."""
    await wait_for_series(server, 'flywatch_region_health{state="down"} == 1')  # the last step, scraped
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + QUERY_DEADLINE
        by_panel: dict[str, Any] = {}
        for name, expr in panel_queries():
            while True:
                by_panel[name] = await query(client, expr)
                if finite(by_panel[name]) or loop.time() >= deadline:
                    break
                await asyncio.sleep(0.25)
        by_alert: dict[str, Any] = {}
        for rule in alert_rules():
            name = rule["alert"]
            while True:  # an expression expected to fire may wait for the scrapes that show it
                by_alert[name] = await query(client, rule["expr"])
                if (
                    not ALERT_AFTER_SCENARIO[name]
                    or by_alert[name]["data"]["result"]
                    or loop.time() >= deadline
                ):
                    break
                await asyncio.sleep(0.25)
        first_rollback = await query(
            client, f'sum(increase(flywatch_rollbacks_total{{fly_app="{APP}"}}[10m]))'
        )
        apps = await client.get(
            "/api/v1/label/fly_app/values", params={"match[]": "flywatch_last_tick_timestamp_seconds"}
        )
        regions = await client.get(
            "/api/v1/label/fly_region/values",
            params={"match[]": f'flywatch_region_health{{fly_app=~"{APP}"}}'},
        )
    return Observed(
        metrics=await daemon.metrics(),
        panels=by_panel,
        alerts=by_alert,
        first_rollback=first_rollback,
        app_values=apps.json()["data"],
        region_values=regions.json()["data"],
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def observed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Observed]:
    """The scenario, once: a simulator (Fly's rate limits on), `flywatch run`, a webhook receiver, and a
    Prometheus scraping the daemon every second as the job `flywatch`. All of it is stopped before the tests
    judge what it left."""
    directory = tmp_path_factory.mktemp("observability")
    (directory / "prometheus").mkdir()
    receiver = Receiver()
    hooks = web.Application()
    hooks.router.add_post("/hooks/observability", receiver.handle)
    runner = web.AppRunner(hooks, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
    settings = SimSettings(transition_delay=0.05, rate_limits=True)
    try:
        async with (
            running_sim(settings, ContractChecker()) as sim,
            running_prometheus(directory / "prometheus") as server,
            httpx.AsyncClient(base_url=sim.url + "/_sim", timeout=10.0) as control,
        ):
            flywatch = Flywatch(sim, directory)
            try:
                result = await observe(server, await play(flywatch, control, receiver, server))
            finally:
                await flywatch.aclose()
    finally:
        await runner.cleanup()
    yield result


def test_promtool_check_metrics_is_clean_on_flywatchs_metrics(observed: Observed) -> None:
    """`promtool check metrics` finds no problem in flywatch's /metrics text, with every metric family the
    dashboard and the alerts read present in it."""

    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|sum|count)$", "", name)

    exported = {family(name) for name in re.findall(r"^# TYPE (\w+) ", observed.metrics, re.MULTILINE)}
    read = {family(name) for name in re.findall(r"flywatch_\w+", DASHBOARD.read_text() + ALERTS.read_text())}
    assert read <= exported, f"not exported: {sorted(read - exported)}"
    result = promtool("check", "metrics", stdin=observed.metrics)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_the_variables_offer_the_app_and_its_regions(observed: Observed) -> None:
    """The app and region variables' label_values queries offer `shop` and its three regions."""
    assert APP in observed.app_values
    assert set(REGIONS) <= set(observed.region_values)


@pytest.mark.parametrize("name", [name for name, _ in panel_queries()])
def test_every_panel_query_parses_and_returns_data(observed: Observed, name: str) -> None:
    """The panel's query, its variables substituted, parses and answers data from Prometheus after the
    scenario (a sample with a value that is a number): the scenario makes every event a panel shows happen."""
    answer = observed.panels[name]
    assert answer["status"] == "success", answer
    assert finite(answer), f"{name}: no data: {answer}"


@pytest.mark.parametrize("name", list(ALERT_AFTER_SCENARIO))
def test_every_alert_expression_selects_what_the_scenario_did(observed: Observed, name: str) -> None:
    """The rule's expression parses against the real series, and fires (its `for` aside) exactly when the
    scenario made its event happen."""
    answer = observed.alerts[name]
    assert answer["status"] == "success", answer
    assert bool(answer["data"]["result"]) is ALERT_AFTER_SCENARIO[name], answer


def test_a_first_rollback_shows_in_increase(observed: Observed) -> None:
    """The scenario's one rollback shows in increase() over flywatch_rollbacks_total, as rate() and
    increase() panels and rules expect of a counter."""
    answer = observed.first_rollback
    assert answer["status"] == "success", answer
    assert finite(answer), answer
    assert float(answer["data"]["result"][0]["value"][1]) > 0, answer


def test_every_legend_names_labels_its_query_keeps() -> None:
    """A legend's {{label}} is one the query groups by: a renamed label (app -> fly_app) would otherwise
    render every series with the same empty name."""
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            legend = target.get("legendFormat", "")
            wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
            grouped = re.findall(r"\bby\s*\(([^)]*)\)", target["expr"])
            if not wanted or not grouped:
                continue
            kept = {label.strip() for group in grouped for label in group.split(",")}
            assert wanted <= kept, (
                f"{panel['title']}: legend {legend!r} names {wanted - kept}, not kept by the query"
            )
