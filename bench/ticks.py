"""Benchmarks of the daemon loop.

1. Decision latency: a load step in one region of the simulator, to the first start or create call the
   daemon (in this process, on the wall clock) makes for it; the scaling interval is 1 s.
2. One tick over 1,000 apps of 10 machines each (3 regions): the CPU time and memory of the decision core
   alone, and of whole reconcile ticks (list, decide, record) against a simulator in another process.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import yaml

from daemon.app import Daemon
from daemon.core.scaling import Bounds, RegionInput, Rules, decide
from daemon.settings import Settings
from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer

APPS = 1000
REGIONS = ("iad", "cdg", "nrt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _policy(apps: list[str], metric: dict[str, Any], interval: str) -> dict[str, Any]:
    return {
        "apps": {
            name: {
                "regions": {region: {"min": 1, "max": 10} for region in REGIONS},
                "health": {"port": 8080, "path": "/health", "interval": interval, "timeout": "500ms"},
                "scaling": {
                    "interval": interval,
                    "metric": metric,
                    "target_per_machine": 10,
                    "scale_up": {"stabilization": "0s", "cooldown": "5s", "max_step": 4},
                },
            }
            for name in apps
        }
    }


async def _latency_once(workdir: Path) -> float:
    async with SimServer(SimSettings(transition_delay=0.1, rate_limits=True)) as sim:
        sim.control.build_app({"name": "shop", "regions": dict.fromkeys(REGIONS, 1), "base_latency": 0.01})
        await sim.settle()
        config = workdir / "policy.yaml"
        metric = {"scrape": {"name": "app_inflight_requests"}, "max_age": "10s"}
        config.write_text(yaml.safe_dump(_policy(["shop"], metric, "1s")))
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            fly_api_token="sim-token",  # type: ignore[arg-type]
            machines_api_url=sim.api_url,
            config=config,
            listen="127.0.0.1:0",
            state_url=f"sqlite:///{workdir / f'state-{time.monotonic_ns()}.db'}",
        )
        daemon = Daemon(settings)
        await daemon.start()
        try:
            deadline = time.monotonic() + 20
            while not daemon._ready()[0] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.5)  # two quiet ticks, so health has a verdict
            step_at = sim.clock.now()
            sim.platform.set_load("shop", {"cdg": 400.0})
            while time.monotonic() < deadline + 20:
                acted = [
                    m
                    for m in sim.platform.mutations
                    if m["time"] >= step_at and m["action"] in {"start", "create"}
                ]
                if acted:
                    return float(acted[0]["time"] - step_at)
                await asyncio.sleep(0.01)
            raise RuntimeError("the daemon did not scale up")
        finally:
            await daemon.stop()


def decision_latency(runs: int = 5) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        return [asyncio.run(_latency_once(Path(tmp))) for _ in range(runs)]


def core_tick() -> dict[str, float]:
    """The decision core alone over 1,000 apps of 3 regions."""
    rules = Rules(target_per_machine=10)
    inputs = [
        [RegionInput(r, Bounds(1, 10), started=3, metric=25.0 + i % 7, health="healthy") for r in REGIONS]
        for i in range(APPS)
    ]
    tracemalloc.start()
    started = time.process_time()
    for regions in inputs:
        decide(1_790_000_000.0, regions, rules, {})
    cpu = time.process_time() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"cpu_seconds": cpu, "peak_bytes": float(peak)}


async def _full_ticks(workdir: Path) -> dict[str, float]:
    names = [f"app-{i:04d}" for i in range(APPS)]
    scenario = {
        "settings": {"rate_limits": False, "serve_fleet": False, "transition_delay": 0.1},
        "apps": [{"name": n, "regions": {"iad": 4, "cdg": 3, "nrt": 3}} for n in names],
    }
    (workdir / "world.yaml").write_text(yaml.safe_dump(scenario))
    port = _free_port()
    sim = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        "sim",
        "--port",
        str(port),
        "--scenario",
        str(workdir / "world.yaml"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/_sim/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        config = workdir / "many.yaml"
        config.write_text(yaml.safe_dump(_policy(names, {"machines": {"state": "started"}}, "1h")))
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            fly_api_token="sim-token",  # type: ignore[arg-type]
            machines_api_url=f"http://127.0.0.1:{port}",
            config=config,
            listen="127.0.0.1:0",
            state_url=f"sqlite:///{workdir / 'many.db'}",
        )
        daemon = Daemon(settings)
        daemon._scheduler.every = lambda *a, **k: None  # type: ignore[method-assign]
        await daemon.start()
        try:
            assert daemon.reconciler is not None
            assert daemon.loaded is not None
            policies = daemon.loaded.policy.apps
            await asyncio.gather(
                *(daemon.reconciler.reconcile(n, policies[n]) for n in names[:20])
            )  # warm up
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(daemon.reconciler.reconcile(n, policies[n]) for n in names))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            errors = sum(1 for s in daemon.reconciler.status.values() if s.tick_error)
        finally:
            await daemon.stop()
    finally:
        sim.terminate()
        await sim.wait()
    return {
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "max_rss_kib": float(rss_after),
        "rss_growth_kib": float(rss_after - rss_before),
        "errors": float(errors),
    }


def full_ticks() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(_full_ticks(Path(tmp)))


def run() -> dict[str, Any]:
    return {"latency": decision_latency(), "core": core_tick(), "full": full_ticks(), "cores": os.cpu_count()}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
