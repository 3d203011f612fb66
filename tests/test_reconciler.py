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
from daemon.telemetry.metrics import ReconcilerMetrics
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
            HealthWatch(prober, clock),
            MetricWatch(clock, scraper),
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
