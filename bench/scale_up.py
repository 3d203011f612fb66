"""Benchmark: scale one app from 1 to 20 machines in three regions at once, through the simulator.

flywatch's actuator (client-side rate limiting on Fly's documented buckets, backoff on a 429) against the same
actuator calling the API the way fly-autoscaler does (fly-platform.md §1.8-1.9): no client-side limiting and
a refused create sent again at once, as its createN loop does. Reports the API calls, the 429s and the wall
time each took, over several runs.
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


FLY_AUTOSCALER_RETRIES = RetryPolicy(
    attempts=1000, base=0.0, cap=0.0, jitter=0.0
)  # again at once, no backoff


async def scale_once(*, client_rate_limit: bool) -> dict[str, Any]:
    async with SimServer(SimSettings(transition_delay=0.1, rate_limits=True)) as sim:
        sim.control.build_app({"name": "shop", "regions": {"iad": 1}})
        await sim.settle()
        clock = SystemClock()
        retry = RetryPolicy(attempts=8) if client_rate_limit else FLY_AUTOSCALER_RETRIES
        client = MachinesClient(
            sim.api_url, "sim-token", clock=clock, rate_limit=client_rate_limit, retry=retry
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


def run(repeat: int = 3) -> dict[str, Any]:
    runs = [
        {
            "flywatch": asyncio.run(scale_once(client_rate_limit=True)),
            "peer": asyncio.run(scale_once(client_rate_limit=False)),
        }
        for _ in range(repeat)
    ]
    return {"runs": runs}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
