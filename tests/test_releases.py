"""The release watch in process, ticked by the test, against the simulator over real HTTP: a bad release is
rolled back to every machine's own known-good config; a good one is kept; leases held by others are
respected; a rollback by hand; a restart in the middle resumes without touching a machine twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemon.actuator import Actuator
from daemon.clock import SystemClock
from daemon.config import AppPolicy, parse_policy
from daemon.core.release_watch import RollbackState, WatchState
from daemon.fly.client import NO_BACKOFF, MachinesClient
from daemon.reconciler import Reconciler
from daemon.releases import HISTORY, RELEASES, ReleaseWatch
from daemon.sim.server import SimServer
from daemon.sources.health import HealthWatch
from daemon.sources.metrics import MetricWatch
from daemon.sources.probes import Prober
from daemon.sources.scrape import Scraper
from daemon.sources.traffic import TrafficReader
from daemon.store import open_store
from daemon.store.base import Store
from daemon.telemetry.metrics import ReconcilerMetrics, ReleaseMetrics
from tests.sim.helpers import make_app, mark_image

GOOD = "registry.fly.io/shop:good"
BAD = "registry.fly.io/shop:bad"
POLICY = """
apps:
  shop:
    regions: {iad: {min: 1, max: 4}, cdg: {min: 1, max: 4}, nrt: {min: 1, max: 4}}
    health: {interval: 1s, timeout: 500ms, unhealthy_after: 1, healthy_after: 1}
    release:
      bake: 2s
      min_requests: 20
      max_error_ratio: 0.05
      max_parallel: 2
      lease_wait: %(lease_wait)s
"""


@dataclass
class Watch:
    reconciler: Reconciler
    releases: ReleaseWatch
    store: Store
    registry: CollectorRegistry
    policy: AppPolicy

    async def tick(self) -> None:
        await self.reconciler.probe("shop", self.policy)
        await self.reconciler.reconcile("shop", self.policy)
        assert not self.reconciler.status["shop"].tick_error, self.reconciler.status["shop"].tick_error

    async def state(self) -> WatchState:
        return WatchState.from_json(await self.store.get(RELEASES, "shop"))

    async def until(self, predicate: Any, ticks: int = 60) -> WatchState:
        """Tick until the stored state satisfies `predicate` (bounded by a count of ticks, not a sleep)."""
        for _ in range(ticks):
            await self.tick()
            state = await self.state()
            if predicate(state):
                return state
            await _pause()
        pytest.fail(f"not reached within {ticks} ticks: {(await self.state()).to_json()}")


async def _pause() -> None:
    await asyncio.sleep(0.2)  # a tick of traffic between looks: the fleet's counters move with wall time


@pytest.fixture
async def build(sim: SimServer, tmp_path: Path) -> AsyncIterator[Any]:
    clock = SystemClock()
    client = MachinesClient(sim.api_url, "sim-token", clock=clock, retry=NO_BACKOFF)
    prober, scraper, traffic = Prober(clock), Scraper(clock), TrafficReader(clock)
    stores: list[Store] = []

    def make(lease_wait: str = "30s") -> Watch:
        store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
        stores.append(store)
        registry = CollectorRegistry()
        actuator = Actuator(client, clock, wait_timeout=10, lease_ttl=5)
        releases = ReleaseWatch(client, actuator, traffic, store, clock, ReleaseMetrics(registry))
        reconciler = Reconciler(
            client,
            actuator,
            HealthWatch(prober, clock),
            MetricWatch(clock, scraper),
            store,
            clock,
            ReconcilerMetrics(registry),
            releases,
        )
        policy = parse_policy(POLICY % {"lease_wait": lease_wait}, "policy.yaml").apps["shop"]
        return Watch(reconciler, releases, store, registry, policy)

    yield make
    for store in stores:
        await store.close()
    await prober.aclose()
    await scraper.aclose()
    await traffic.aclose()
    await client.aclose()


async def _machines(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await api.get("/apps/shop/machines")
    return [m for m in response.json() if m["state"] != "destroyed"]


async def _fleet(control: httpx.AsyncClient, api: httpx.AsyncClient) -> list[dict[str, Any]]:
    await make_app(
        control,
        regions={"iad": 2, "cdg": 1, "nrt": 1},
        image=GOOD,
        load={"iad": 40, "cdg": 20, "nrt": 20},
        capacity_rps=1000,
        base_latency=0.01,
        metadata={"team": "shop"},
    )
    return await _machines(api)


async def _adopted(watch: Watch, control: httpx.AsyncClient, api: httpx.AsyncClient) -> list[dict[str, Any]]:
    """The fleet up, and its release recorded as known-good; its machines as they were then."""
    machines = await _fleet(control, api)
    await watch.until(lambda s: s.good is not None)
    return machines


async def _bad_release(control: httpx.AsyncClient, mode: str, **options: Any) -> None:
    await mark_image(control, BAD, mode=mode)
    await _deploy(control, BAD, **({"strategy": "immediate"} | options))


async def _deploy(control: httpx.AsyncClient, image: str, **options: Any) -> None:
    response = await control.post("/apps/shop/deploy", json={"image": image, **options})
    assert response.status_code == 202, response.text


async def test_a_release_with_errors_is_rolled_back_to_each_machines_own_config(
    build: Any, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """20% errors: failing, rolled back; every machine runs its own known-good config again, exactly."""
    watch = build()
    before = {m["id"]: m["config"] for m in await _adopted(watch, control, api)}
    await _bad_release(control, "errors")
    state = await watch.until(lambda s: s.rollback is not None and not s.rollback.state.active)
    assert state.rollback is not None
    assert state.rollback.state is RollbackState.DONE, state.rollback
    assert "error ratio" in state.rollback.reason
    after = {m["id"]: m["config"] for m in await _machines(api)}
    assert after == before  # image, release metadata and everything else: as they were
    assert sorted(state.rollback.updated) == sorted(before)
    assert "2" in state.bad  # the release rolled back is marked, never returned to
    kinds = [e.record["kind"] for e in await watch.store.read(HISTORY, key="shop", limit=100)]
    assert {"release_failing", "rollback_started", "rollback_finished"} <= set(kinds)
    assert (
        watch.registry.get_sample_value("flywatch_rollbacks_total", {"fly_app": "shop", "result": "done"})
        == 1
    )
    # the watch goes on, and does not roll back again
    for _ in range(5):
        await watch.tick()
    assert (await watch.state()).rollback == state.rollback


async def test_a_good_release_is_kept_and_becomes_the_known_good(
    build: Any, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """A healthy release bakes, is judged healthy, and becomes the record to roll back to."""
    watch = build()
    await _adopted(watch, control, api)
    await _deploy(control, "registry.fly.io/shop:v2", strategy="immediate")
    state = await watch.until(lambda s: s.good is not None and s.good.release.version == 2)
    assert state.rollback is None
    assert state.watched is not None
    assert state.watched.verdict.value == "healthy"
    assert {m["config"]["image"] for m in await _machines(api)} == {"registry.fly.io/shop:v2"}
    assert [p.release.version for p in state.previous] == [1]


async def test_a_crashing_release_is_rolled_back(
    build: Any, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """Machines that end `failed` fail the release at once; they are updated back and start again."""
    watch = build()
    await _adopted(watch, control, api)
    await _bad_release(control, "crash")
    state = await watch.until(lambda s: s.rollback is not None and not s.rollback.state.active)
    assert state.rollback is not None
    assert state.rollback.state is RollbackState.DONE
    assert "crashed" in state.rollback.reason
    machines = await _machines(api)
    assert {m["config"]["image"] for m in machines} == {GOOD}
    assert {m["state"] for m in machines} == {"started"}


async def test_a_foreign_lease_is_waited_for_then_left_alone_and_reported(
    build: Any, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """A machine someone else holds past lease_wait is not touched; the others are reverted; the report
    names it; once free, it is reverted too."""
    watch = build(lease_wait="1s")
    await _adopted(watch, control, api)
    await _bad_release(control, "errors")
    machines = await _machines(api)
    held = min(m["id"] for m in machines)
    response = await api.post(
        f"/apps/shop/machines/{held}/lease", json={"ttl": 120, "description": "a human"}
    )
    assert response.status_code == 201, response.text
    nonce = response.json()["data"]["nonce"]
    state = await watch.until(lambda s: s.rollback is not None and s.rollback.state is RollbackState.PARTIAL)
    assert state.rollback is not None
    assert held in state.rollback.skipped
    assert held not in state.rollback.updated
    images = {m["id"]: m["config"]["image"] for m in await _machines(api)}
    assert images[held] == BAD
    assert {image for mid, image in images.items() if mid != held} == {GOOD}
    release = await api.delete(
        f"/apps/shop/machines/{held}/lease", headers={"fly-machine-lease-nonce": nonce}
    )
    assert release.status_code == 200, release.text
    state = await watch.until(lambda s: s.rollback is not None and s.rollback.state is RollbackState.DONE)
    assert {m["config"]["image"] for m in await _machines(api)} == {GOOD}


async def test_a_rollback_by_hand_goes_back_to_the_previous_known_good(
    build: Any, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """`flywatch rollback` of a healthy release: back to the release before it, marked as asked by hand."""
    watch = build()
    await _adopted(watch, control, api)
    await _deploy(control, "registry.fly.io/shop:v2", strategy="immediate")
    await watch.until(lambda s: s.good is not None and s.good.release.version == 2)
    await watch.releases.request_rollback("shop", None, "test")
    state = await watch.until(lambda s: s.rollback is not None and not s.rollback.state.active)
    assert state.rollback is not None
    assert (state.rollback.by, state.rollback.to.version) == ("manual", 1)
    assert {m["config"]["image"] for m in await _machines(api)} == {GOOD}


async def test_a_restart_mid_rollback_resumes_without_touching_a_machine_twice(
    build: Any, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """The daemon dies (its tick cancelled) right after the rollback's first updates are sent; a new watch on
    the same store (a restart) finishes it, seeing the machines already updated through; the mutation log
    shows exactly one rollback update per machine."""
    watch = build()
    machines = await _adopted(watch, control, api)
    await _bad_release(control, "errors")

    async def reverts() -> list[str]:
        counters = (await control.get("/counters")).json()
        return [
            m["machine"]
            for m in counters["mutations"]
            if m["action"] == "update" and m["image"] == GOOD and m["owner"] == "sim@tokens.fly.io"
        ]

    for _ in range(60):  # tick until one tick starts the rollback; kill it once its first update is sent
        task = asyncio.ensure_future(watch.tick())
        # the simulator's log is polled (bounded: the tick ends by itself) to catch the first update sent
        while not task.done() and not await reverts():  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            break
        await task
        await _pause()
    else:
        pytest.fail("no rollback started")
    died = await watch.state()
    assert died.rollback is not None
    assert died.rollback.state.active  # it died in the middle
    assert died.rollback.in_flight  # with the machines it was changing on record
    assert len(await reverts()) < len(machines)
    fresh = build()  # a new process: nothing in memory, the same store
    state = await fresh.until(lambda s: s.rollback is not None and not s.rollback.state.active)
    assert state.rollback is not None
    assert state.rollback.state is RollbackState.DONE, state.rollback
    assert sorted(await reverts()) == sorted(m["id"] for m in machines)  # each once, none twice
    assert sorted(state.rollback.updated) == sorted(m["id"] for m in machines)


async def test_errors_the_previous_release_had_too_do_not_fail_a_release(
    build: Any, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """An immediate deploy replaces every machine between two ticks: the baseline still comes from the
    release before it (itself above the limit: alerted, not known-good), so a new release with the same
    10% errors is not blamed for them, and is kept."""
    await mark_image(control, GOOD, error_rate=0.1)
    await mark_image(control, "registry.fly.io/shop:v2", error_rate=0.1)
    watch = build()
    await _adopted(watch, control, api)
    for _ in range(5):  # the known-good release's own traffic: its baseline
        await watch.tick()
        await _pause()
    await _deploy(control, "registry.fly.io/shop:v2", strategy="immediate")
    state = await watch.until(
        lambda s: (
            s.watched is not None and s.watched.release.version == 2 and s.watched.verdict.value == "healthy"
        )
    )
    assert state.rollback is None
    assert state.watched is not None
    assert state.good is not None
    assert state.good.release.version == 2
    assert state.watched.numbers["baseline_error_ratio"] is not None
    assert state.watched.numbers["error_ratio"] is not None
    assert state.watched.numbers["error_ratio"] > 0.05  # above the limit, and as bad as before: kept


async def test_a_failed_canary_left_behind_by_a_deploy_is_destroyed(
    build: Any, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """flyctl's canary of a bad release fails its checks and the deploy stops, leaving it: the release is
    judged failing on it (Fly's checks), the canary is destroyed, and no other machine is touched."""
    watch = build()
    before = {m["id"]: m["config"] for m in await _adopted(watch, control, api)}
    await _bad_release(control, "unhealthy", strategy="canary", wait_timeout=2)
    state = await watch.until(lambda s: s.rollback is not None and not s.rollback.state.active)
    assert state.rollback is not None
    assert state.rollback.state is RollbackState.DONE, state.rollback
    assert len(state.rollback.destroyed) == 1
    assert state.rollback.updated == ()
    after = {m["id"]: m["config"] for m in await _machines(api) if m["state"] != "destroying"}
    assert after == before  # the canary is going; every other machine as it was
    canary = (await api.get(f"/apps/shop/machines/{state.rollback.destroyed[0]}")).json()
    assert canary["state"] in {"destroying", "destroyed"}
    assert canary["config"]["metadata"]["fly_canary"] == "true"


def _release_series(registry: CollectorRegistry, app: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (sample.name, sample.labels)
        for family in registry.collect()
        if family.name in {"flywatch_release_info", "flywatch_release_verdict"}
        for sample in family.samples
        if sample.labels.get("fly_app") == app
    ]


async def test_forget_drops_the_status_and_the_release_gauges(
    build: Any, control: httpx.AsyncClient, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler's forget reaches the release watch: no /status entry and no release gauge series of
    the app are left, its traffic reader forgets it too, and the history and stored state stay; watched
    again, the app is shown afresh from its stored state."""
    watch = build()
    await _adopted(watch, control, api)
    assert "shop" in watch.releases.status
    assert _release_series(watch.registry, "shop")
    forgotten: list[AbstractSet[str]] = []
    original = TrafficReader.forget

    def spy(reader: TrafficReader, apps: AbstractSet[str]) -> None:
        forgotten.append(apps)
        original(reader, apps)

    monkeypatch.setattr(TrafficReader, "forget", spy)
    stored = (await watch.state()).to_json()
    history = await watch.store.read(HISTORY, key="shop", limit=100)
    watch.reconciler.forget({"shop"})
    assert "shop" not in watch.releases.status
    assert _release_series(watch.registry, "shop") == []
    assert forgotten == [{"shop"}]
    assert (await watch.state()).to_json() == stored  # only memory is dropped
    assert await watch.store.read(HISTORY, key="shop", limit=100) == history
    await watch.tick()
    assert watch.releases.status["shop"]["good"] is not None
    info = [
        labels for name, labels in _release_series(watch.registry, "shop") if name == "flywatch_release_info"
    ]
    assert [labels["version"] for labels in info] == ["1"]
