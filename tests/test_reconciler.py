"""One reconcile tick in process against the simulator: the status view and the exported machine counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemon.actuator import Actuator
from daemon.clock import SystemClock
from daemon.config import parse_policy
from daemon.fly.client import NO_BACKOFF, MachinesClient
from daemon.reconciler import Reconciler
from daemon.sim.server import SimServer
from daemon.sources.health import HealthWatch
from daemon.sources.metrics import MetricWatch
from daemon.sources.probes import Prober
from daemon.sources.scrape import Scraper
from daemon.store import open_store
from daemon.telemetry.metrics import HealthMetrics, ReconcilerMetrics, SourceMetrics
from tests.sim.helpers import make_app

POLICY = """
apps:
  shop:
    regions: {iad: {min: 2, max: 4}}
    scaling:
      metric: {machines: {state: started}}
      target_per_machine: 1
"""


@pytest.fixture
async def reconciler(sim: SimServer, tmp_path: Path) -> AsyncIterator[tuple[Reconciler, CollectorRegistry]]:
    clock = SystemClock()
    client = MachinesClient(sim.api_url, "sim-token", clock=clock, retry=NO_BACKOFF)
    prober, scraper = Prober(clock), Scraper(clock)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    registry = CollectorRegistry()
    yield (
        Reconciler(
            client,
            Actuator(client, clock, wait_timeout=5, lease_ttl=5),
            HealthWatch(prober, clock, HealthMetrics(registry)),
            MetricWatch(clock, scraper, metrics=SourceMetrics(registry)),
            store,
            clock,
            ReconcilerMetrics(registry),
        ),
        registry,
    )
    await store.close()
    await prober.aclose()
    await scraper.aclose()
    await client.aclose()


async def test_status_tells_the_outcome_and_counts_follow_the_machines(
    control: httpx.AsyncClient, reconciler: tuple[Reconciler, CollectorRegistry]
) -> None:
    """After a tick that starts a parked machine, /status says done, and the stopped count drops to 0."""
    daemon, registry = reconciler
    await make_app(control, regions={"iad": {"started": 1, "stopped": 1}})
    policy = parse_policy(POLICY, "policy.yaml").apps["shop"]
    await daemon.probe("shop", policy)
    await daemon.reconcile("shop", policy)
    last = daemon.status_json()["shop"]["regions"]["iad"]["last_decision"]
    assert (last["action"], last["outcome"]) == ("scale_up", "done")
    assert "1 of 1 done" in last["result"]
    stopped = {"fly_app": "shop", "fly_region": "iad", "state": "stopped"}
    assert registry.get_sample_value("flywatch_machines", stopped) == 1.0  # counted before the action
    await daemon.reconcile("shop", policy)
    assert registry.get_sample_value("flywatch_machines", stopped) == 0.0  # none left in that state
    assert registry.get_sample_value("flywatch_machines", {**stopped, "state": "started"}) == 2.0


def _gauge_apps(registry: CollectorRegistry) -> set[str]:
    """The apps with a series in any of the registry's gauges."""
    return {
        sample.labels["fly_app"]
        for family in registry.collect()
        if family.type == "gauge"
        for sample in family.samples
        if "fly_app" in sample.labels
    }


async def test_forget_drops_the_app_everywhere(
    control: httpx.AsyncClient, reconciler: tuple[Reconciler, CollectorRegistry]
) -> None:
    """forget (the app left the policy, or another instance took it over) removes the app's status and
    every gauge series, its own and the health and metric watches'; watched again, its probe history
    starts afresh: one passing probe is not the healthy_after=2 run."""
    daemon, registry = reconciler
    await make_app(control, regions={"iad": 2}, base_latency=0.01)
    policy = parse_policy(POLICY, "policy.yaml").apps["shop"]
    for _ in range(2):
        await daemon.probe("shop", policy)
    assert {"status 200" in v.reason for v in daemon.latest_health["shop"].machines.values()} == {True}
    await daemon.reconcile("shop", policy)
    assert not daemon.status["shop"].tick_error, daemon.status["shop"].tick_error
    metric = {"fly_app": "shop", "fly_region": "iad", "metric": "machines_started"}
    assert registry.get_sample_value("flywatch_metric_value", metric) == 2.0
    assert registry.get_sample_value(
        "flywatch_region_health", {"fly_app": "shop", "fly_region": "iad", "state": "healthy"}
    )
    daemon.forget({"shop"})
    assert daemon.status_json() == {}
    assert "shop" not in daemon.latest_health
    assert _gauge_apps(registry) == set()  # machine counts, health verdicts and metric values alike
    await daemon.probe("shop", policy)
    again = daemon.latest_health["shop"].machines.values()
    assert {"Fly checks passing" in v.reason for v in again} == {True}, [v.reason for v in again]
