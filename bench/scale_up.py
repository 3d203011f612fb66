"""Benchmark: scale one app from 1 to 20 machines in three regions at once, through the simulator.

flywatch's actuator (client-side rate limiting on Fly's documented buckets) against the same actuator with
that limiting off, which is how fly-autoscaler talks to the API (no client-side limiting, no 429 handling).
Reports the API calls, the 429s and the wall time each took.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from daemon.actuator import Actuator
from daemon.clock import SystemClock
from daemon.core.plan import Outcome, ScaleUp
from daemon.fly.client import MachinesClient, RetryPolicy
from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer

PLAN = {"iad": 7, "cdg": 6, "nrt": 6}  # 1 machine in iad to start with: 20 in all


async def scale_once(*, client_rate_limit: bool) -> dict[str, Any]:
    async with SimServer(SimSettings(transition_delay=0.1, rate_limits=True)) as sim:
        sim.control.build_app({"name": "shop", "regions": {"iad": 1}})
        await sim.settle()
        clock = SystemClock()
        client = MachinesClient(
            sim.api_url, "sim-token", clock=clock, rate_limit=client_rate_limit, retry=RetryPolicy(attempts=8)
        )
        actuator = Actuator(client, clock, wait_timeout=60.0, lease_ttl=30)
        started = time.perf_counter()
        results = await actuator.execute(
            [ScaleUp("shop", region, count, reason="benchmark") for region, count in PLAN.items()]
        )
        elapsed = time.perf_counter() - started
        await client.aclose()
        counters = sim.counters.to_json()
        machines = [m for m in sim.platform.machines_of("shop") if m.state == "started"]
        return {
            "client_rate_limit": client_rate_limit,
            "seconds": elapsed,
            "calls": sum(counters["requests"].values()),
            "calls_by_endpoint": counters["requests"],
            "429s": counters["rate_limited_total"],
            "started_machines": len(machines),
            "all_done": all(r.outcome is Outcome.DONE for r in results),
        }


def run() -> dict[str, Any]:
    flywatch = asyncio.run(scale_once(client_rate_limit=True))
    naive = asyncio.run(scale_once(client_rate_limit=False))
    return {"flywatch": flywatch, "no_client_limiting": naive}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
