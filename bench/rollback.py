"""Benchmark: a bad release to a finished automatic rollback, 30 machines in three regions, Fly's limits on.

The daemon's parts are built in this process as tests/test_releases.py builds them (the Machines API client
with its default retry policy and client-side rate limiting, the actuator with the daemon's defaults, the
traffic reader, the health watch, the release watch, the reconciler with a SQLite store in a temp dir) and
driven as the daemon's scheduler drives them: a probe job and a reconcile job, each every second, one run of
each at a time, a run that overruns its slot coalesced into the next one.

The simulator (in this process, over real HTTP, Fly's rate limits on, 0.1 s per transient state) serves
`shop` with 10 machines in each of iad, cdg and nrt on a good image. Once the watch has adopted that release
as the known-good one, the bad image is marked through the control API and deployed with strategy
`immediate` (the whole fleet is bad at once). Measured on the wall clock (the simulator's clock too):
t0 the deploy accepted (202), t_detect the rollback started (the failing verdict, `started_at` in the stored
state), t_done the rollback done (`finished_at`). API calls and 429s come from the simulator's
/_sim/counters, snapshotted at t0, at t_detect (the first moment the stored state shows the rollback) and at
t_done; the client's retries from its own flywatch_api_retries_total. Every machine must end on its own
known-good config (the good image, its release metadata, started): anything else fails the benchmark.

The peer: flyctl has no automatic rollback; its manual procedure is `fly deploy --image <old>`, rolling.
Modelled as the simulator's own deployer redeploying the good image over the same bad fleet, strategy
rolling, the same max_parallel, timed from its 202 to the release complete. The simulator's deployer works
on the platform directly (no HTTP, no rate limits, a 50 ms poll of each machine's checks), so it is a lower
bound for flyctl, which makes the same lease / update / wait calls through the rate-limited API. The human
who has to notice the bad release and type the command is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from daemon.actuator import Actuator
from daemon.clock import SystemClock
from daemon.config import AppPolicy, parse_policy
from daemon.core.release_watch import RollbackState, WatchState
from daemon.fly.client import MachinesClient
from daemon.reconciler import Reconciler
from daemon.releases import HISTORY, RELEASES, ReleaseWatch
from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer
from daemon.sources.health import HealthWatch
from daemon.sources.metrics import MetricWatch
from daemon.sources.probes import Prober
from daemon.sources.scrape import Scraper
from daemon.sources.traffic import TrafficReader
from daemon.store import open_store
from daemon.store.base import Store
from daemon.telemetry.metrics import ApiMetrics, HealthMetrics, ReconcilerMetrics, ReleaseMetrics

APP = "shop"
GOOD = "registry.fly.io/shop:good"
BAD = "registry.fly.io/shop:bad"
REGIONS = ("iad", "cdg", "nrt")
PER_REGION = 10
LOAD_RPS = 30.0  # offered per region: 3 requests per second per machine
TICK = 1.0  # the probe job's and the reconcile job's interval (health.interval; no scaling policy)
TRANSITION_DELAY = 0.1
# the simulator's presets: "errors" answers 20% of requests (and health probes) with 500 (judged on
# traffic); "unhealthy" answers the health path with 500 (judged on the health watch's verdicts)
HEADLINE_MODE = "errors"
BAKE = 5.0
MIN_REQUESTS = 20
MAX_PARALLEL = 3  # the headline figures
SCENARIOS = (
    (HEADLINE_MODE, MAX_PARALLEL),
    (HEADLINE_MODE, 1),
    (HEADLINE_MODE, 5),
    ("unhealthy", MAX_PARALLEL),
)
RUNS = 3
# The reconcile job's real period: it and the probe job list the app every TICK each, and Fly allows one list
# per second per app, so each waits about a second for its list call. The runs deploy at even points of it.
CYCLE = 2 * TICK
DEADLINE = 300.0  # seconds from the deploy to a finished rollback, or the benchmark fails
POLICY = f"""
apps:
  {APP}:
    regions: {{{", ".join(f"{r}: {{min: 1, max: {PER_REGION}}}" for r in REGIONS)}}}
    health: {{interval: {TICK:g}s, timeout: 500ms}}
    release:
      bake: {BAKE:g}s
      min_requests: {MIN_REQUESTS}
      max_error_ratio: 0.05
      max_parallel: %(max_parallel)d
      lease_wait: 30s
"""


class BenchmarkError(RuntimeError):
    """The benchmark did not reach what it measures; the message says where it stopped."""


def _policy(max_parallel: int) -> AppPolicy:
    return parse_policy(POLICY % {"max_parallel": max_parallel}, "bench-rollback.yaml").apps[APP]


def _diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Calls and 429s between two /_sim/counters answers, by endpoint."""
    calls = Counter(after["requests"]) - Counter(before["requests"])
    limited = Counter(after["rate_limited"]) - Counter(before["rate_limited"])
    return {
        "calls": sum(calls.values()),
        "429s": sum(limited.values()),
        "calls_by_endpoint": dict(sorted(calls.items())),
        "429s_by_endpoint": dict(sorted(limited.items())),
    }


def _retries(registry: CollectorRegistry) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "flywatch_api_retries"
        for sample in metric.samples
        if sample.name == "flywatch_api_retries_total"
    )


async def _fleet(control: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """The app on the good image; its machines' configs by id, once every machine is started."""
    response = await control.post(
        "/apps",
        json={
            "name": APP,
            "regions": dict.fromkeys(REGIONS, PER_REGION),
            "image": GOOD,
            "load": dict.fromkeys(REGIONS, LOAD_RPS),
            "base_latency": 0.01,
        },
    )
    if response.status_code != 201:
        raise BenchmarkError(f"the app was not created: {response.status_code} {response.text}")
    return await _started_configs(control, PER_REGION * len(REGIONS))


async def _machines(control: httpx.AsyncClient) -> list[dict[str, Any]]:
    machines: list[dict[str, Any]] = (await control.get(f"/apps/{APP}")).json()["machines"]
    return [m for m in machines if m["state"] not in {"destroyed", "destroying"}]


async def _started_configs(control: httpx.AsyncClient, count: int) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        machines = await _machines(control)
        if len(machines) == count and all(m["state"] == "started" and m["listening"] for m in machines):
            return {m["id"]: m["config"] for m in machines}
        await asyncio.sleep(0.05)
    raise BenchmarkError(f"the fleet did not start: {[(m['id'], m['state']) for m in machines]}")


async def _mark_bad(control: httpx.AsyncClient, mode: str) -> None:
    response = await control.post("/images", json={"image": BAD, "mode": mode})
    if response.status_code != 200:
        raise BenchmarkError(f"the bad image was not marked: {response.status_code} {response.text}")


async def _deploy(control: httpx.AsyncClient, image: str, **options: Any) -> dict[str, Any]:
    response = await control.post(f"/apps/{APP}/deploy", json={"image": image, **options})
    if response.status_code != 202:
        raise BenchmarkError(f"deploy of {image} refused: {response.status_code} {response.text}")
    release: dict[str, Any] = response.json()
    return release


async def _every(interval: float, job: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
    """As the daemon's scheduler runs a job: every `interval` from the first run, one run at a time; a run
    that overruns its slot is followed by the next slot (missed runs coalesced)."""
    first = time.monotonic()
    while not stop.is_set():
        await job()
        slots = int((time.monotonic() - first) // interval) + 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), first + slots * interval - time.monotonic())


class Daemon:
    """The daemon's parts for one app, in process."""

    def __init__(self, sim: SimServer, store: Store, policy: AppPolicy) -> None:
        clock = SystemClock()
        self.registry = CollectorRegistry()
        self.client = MachinesClient(
            sim.api_url, "sim-token", clock=clock, metrics=ApiMetrics(self.registry)
        )  # the default RetryPolicy, client-side rate limiting on
        self.prober, self.scraper, self.traffic = Prober(clock), Scraper(clock), TrafficReader(clock)
        actuator = Actuator(self.client, clock)  # the daemon's defaults (app.py)
        self.store = store
        self.policy = policy
        self.releases = ReleaseWatch(
            self.client, actuator, self.traffic, store, clock, ReleaseMetrics(self.registry)
        )
        self.reconciler = Reconciler(
            self.client,
            actuator,
            HealthWatch(self.prober, clock, HealthMetrics(self.registry)),
            MetricWatch(clock, self.scraper),
            store,
            clock,
            ReconcilerMetrics(self.registry),
            self.releases,
        )
        self.tick_errors: list[str] = []
        self.reconcile_ticks = 0
        self._stop = asyncio.Event()
        self._jobs: list[asyncio.Task[None]] = []

    async def _probe(self) -> None:
        await self.reconciler.probe(APP, self.policy)

    async def _reconcile(self) -> None:
        await self.reconciler.reconcile(APP, self.policy)
        self.reconcile_ticks += 1
        error = self.reconciler.status[APP].tick_error
        if error:
            self.tick_errors.append(error)

    def start(self) -> None:
        self._jobs = [
            asyncio.ensure_future(_every(TICK, self._probe, self._stop)),
            asyncio.ensure_future(_every(TICK, self._reconcile, self._stop)),
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._jobs)
        await self.prober.aclose()
        await self.scraper.aclose()
        await self.traffic.aclose()
        await self.client.aclose()

    async def state(self) -> WatchState:
        return WatchState.from_json(await self.store.get(RELEASES, APP))


async def _until(
    daemon: Daemon, predicate: Callable[[WatchState], bool], timeout: float, what: str
) -> WatchState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.tick_errors:
            raise BenchmarkError(f"a reconcile tick failed while waiting for {what}: {daemon.tick_errors[0]}")
        state = await daemon.state()
        if predicate(state):
            return state
        await asyncio.sleep(0.02)
    raise BenchmarkError(f"{what}: not reached within {timeout:g}s: {(await daemon.state()).to_json()}")


def _check_restored(
    machines: list[dict[str, Any]], before: dict[str, dict[str, Any]], who: str, exact: bool
) -> None:
    """Fail loudly unless every machine runs the good image, started (and, `exact`, its own old config)."""
    wrong = [
        f"{m['id']} ({m['region']}): {m['state']}, {m['image']}"
        for m in machines
        if m["state"] != "started" or m["image"] != GOOD
    ]
    if sorted(m["id"] for m in machines) != sorted(before):
        wrong.append(f"machines changed: {sorted(m['id'] for m in machines)} != {sorted(before)}")
    if exact:
        wrong += [
            f"{m['id']}: config differs from its known-good one"
            for m in machines
            if m["config"] != before.get(m["id"])
        ]
    if wrong:
        raise BenchmarkError(f"{who}: not every machine runs the good image: " + "; ".join(wrong))


def _chunks(mutations: list[dict[str, Any]], since: float) -> list[float]:
    """The times the rollback's updates were sent, relative to `since` (the daemon's, source api)."""
    return sorted(m["time"] - since for m in mutations if m["action"] == "update" and m["source"] == "api")


def _calls(log: list[tuple[float, str, int]], start: float, end: float) -> dict[str, Any]:
    """Calls and 429s answered within [start, end), by endpoint, from the simulator's exchange log."""
    window = [(operation, status) for at, operation, status in log if start <= at < end]
    calls = Counter(operation for operation, _ in window)
    limited = Counter(operation for operation, status in window if status == 429)
    return {
        "calls": sum(calls.values()),
        "429s": sum(limited.values()),
        "calls_by_endpoint": dict(sorted(calls.items())),
        "429s_by_endpoint": dict(sorted(limited.items())),
    }


async def _flywatch_once(mode: str, max_parallel: int, workdir: Path, phase: float = 0.0) -> dict[str, Any]:
    settings = SimSettings(transition_delay=TRANSITION_DELAY, rate_limits=True)
    async with (
        SimServer(settings) as sim,
        httpx.AsyncClient(base_url=f"{sim.url}/_sim", timeout=10) as control,
    ):
        log: list[tuple[float, str, int]] = []  # (answered at, operationId, status) of every API call
        sim.observers.append(lambda exchange: log.append((time.time(), exchange.operation, exchange.status)))
        before = await _fleet(control)
        store = open_store(f"sqlite:///{workdir / f'state-{time.monotonic_ns()}.db'}")
        daemon = Daemon(sim, store, _policy(max_parallel))
        daemon.start()
        try:
            await _until(
                daemon,
                lambda s: (
                    s.good is not None and s.good.release.image == GOOD and len(s.good.configs) == len(before)
                ),
                30,
                "the good release adopted",
            )
            # a few reads of the good release's traffic, then the deploy `phase` seconds into the tick cycle
            await asyncio.sleep(3 * TICK + phase)
            await _mark_bad(control, mode)
            counters_t0 = (await control.get("/counters")).json()
            retries_t0 = _retries(daemon.registry)
            await _deploy(control, BAD, strategy="immediate")
            t0 = time.time()
            ticks_t0 = daemon.reconcile_ticks
            started = await _until(daemon, lambda s: s.rollback is not None, DEADLINE, "the rollback started")
            seen_started = time.time()
            history_during = [e.record["kind"] for e in await store.read(HISTORY, key=APP, limit=100)]
            done = await _until(
                daemon,
                lambda s: s.rollback is not None and not s.rollback.state.active,
                DEADLINE - (time.time() - t0),
                "the rollback finished",
            )
            counters_done = (await control.get("/counters")).json()
            seen_done = time.time()
            retries_done = _retries(daemon.registry)
            ticks = daemon.reconcile_ticks - ticks_t0
        finally:
            await daemon.stop()
        machines = await _machines(control)
        history = [e.record for e in await store.read(HISTORY, key=APP, limit=100)]
        await store.close()
    rollback = done.rollback
    if rollback is None or started.rollback is None:
        raise BenchmarkError("the rollback vanished from the stored state")
    if rollback.state is not RollbackState.DONE:
        raise BenchmarkError(f"the rollback ended {rollback.state.value}: {rollback.to_json()}")
    _check_restored(machines, before, "flywatch", exact=True)
    if daemon.tick_errors:
        raise BenchmarkError(f"a reconcile tick failed: {daemon.tick_errors[0]}")
    if rollback.finished_at is None:
        raise BenchmarkError("the rollback has no finished_at")
    failing = next((r for r in history if r["kind"] == "release_failing"), {})
    t_detect, t_done = rollback.started_at, rollback.finished_at
    rollback_phase = _calls(log, t_detect, t_done)
    whole = _diff(counters_done, counters_t0)
    return {
        "mode": mode,
        "max_parallel": max_parallel,
        "phase": phase,
        "detect_seconds": t_detect - t0,
        "rollback_seconds": t_done - t_detect,
        "total_seconds": t_done - t0,
        "state_seen_lag": {"started": seen_started - t_detect, "done": seen_done - t_done},
        "whole": whole,  # /_sim/counters, from just before the deploy to just after t_done
        "detection": _calls(log, t0, t_detect),
        "rollback": rollback_phase,
        # the release history while the rollback ran: its events are written only when the tick ends
        "history_during_rollback": history_during,
        "calls_per_machine": rollback_phase["calls"] / len(before),
        "retries": retries_done - retries_t0,
        "reconcile_ticks": ticks,
        "updated": len(rollback.updated),
        "machines": len(before),
        "reason": rollback.reason,
        "failing_numbers": failing.get("numbers", {}),
        "update_times": _chunks(counters_done["mutations"], t_detect),
    }


async def _manual_once(mode: str, max_parallel: int) -> dict[str, Any]:
    """The peer: the same bad fleet, then `fly deploy --image <good>` rolling, by the simulator's deployer."""
    settings = SimSettings(transition_delay=TRANSITION_DELAY, rate_limits=True)
    async with (
        SimServer(settings) as sim,
        httpx.AsyncClient(base_url=f"{sim.url}/_sim", timeout=10) as control,
    ):
        before = await _fleet(control)
        await _mark_bad(control, mode)
        await _deploy(control, BAD, strategy="immediate")
        await _started_configs(control, len(before))  # the whole fleet on the bad image, serving
        bad = await _machines(control)
        if {m["image"] for m in bad} != {BAD}:
            raise BenchmarkError(f"the bad release did not reach every machine: {[m['image'] for m in bad]}")
        release = await _deploy(control, GOOD, strategy="rolling", max_parallel=max_parallel)
        t0 = time.time()
        deadline = time.monotonic() + DEADLINE
        status = "running"
        while time.monotonic() < deadline:
            releases = (await control.get(f"/apps/{APP}/releases")).json()
            mine = next(r for r in releases if r["id"] == release["id"])
            status = mine["status"]
            if status != "running":
                break
            await asyncio.sleep(0.01)
        elapsed = time.time() - t0
        if status != "complete":
            raise BenchmarkError(f"the manual redeploy ended {status}: {mine}")
        machines = await _machines(control)
    _check_restored(machines, before, "manual redeploy", exact=False)
    return {"mode": mode, "max_parallel": max_parallel, "seconds": elapsed, "machines": len(machines)}


def run(runs: int = RUNS, scenarios: tuple[tuple[str, int], ...] = SCENARIOS) -> dict[str, Any]:
    """Each scenario (bad image mode, max_parallel) `runs` times: flywatch's rollback, then the manual way."""
    started = time.perf_counter()
    results: dict[str, Any] = {"scenarios": []}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, parallel in scenarios:
            scenario_runs = [
                {
                    "flywatch": asyncio.run(_flywatch_once(mode, parallel, Path(tmp), index * CYCLE / runs)),
                    "manual": asyncio.run(_manual_once(mode, parallel)),
                }
                for index in range(runs)
            ]
            results["scenarios"].append({"mode": mode, "max_parallel": parallel, "runs": scenario_runs})
    results["seconds"] = time.perf_counter() - started
    return results


if __name__ == "__main__":
    import json
    import sys

    quick = "--quick" in sys.argv  # one run of the headline scenario
    print(json.dumps(run(1, SCENARIOS[:1]) if quick else run(), indent=2))
