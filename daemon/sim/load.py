"""The load model behind the simulated fleet: what a machine sees when it carries a share of its region.

Offered load is requests per second per region. Fly Proxy spreads a region's load over the machines that
serve there (started and reachable); a region with none sends its load to the regions that have some.
A machine past its capacity answers slower and sheds the excess with 503s; a bad image adds its own errors
and latency. Counters are integrated over time, so /metrics pages read like a real app's: rates follow
load the moment it changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Buckets of app_http_request_duration_seconds, as a typical Prometheus client library sets them.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MAX_LATENCY = 30.0


@dataclass(frozen=True)
class ImageBehaviour:
    """How the instances of one image behave. The default is a healthy image."""

    health_status: int = 200  # what the health path answers when the machine is otherwise fine
    error_rate: float = 0.0  # share of requests (and health probes) answered 500
    extra_latency: float = 0.0  # seconds added to every answer
    crash: bool = False  # the process exits at boot: the machine ends `failed`

    @property
    def healthy(self) -> bool:
        return self == ImageBehaviour()


@dataclass(frozen=True)
class Conditions:
    """What one machine experiences right now."""

    offered_rps: float
    latency: float  # mean seconds per answer
    overload_share: float  # share answered 503 because the machine is past its capacity
    error_share: float  # share answered 500 because of the image

    @property
    def success_share(self) -> float:
        return max(0.0, 1.0 - self.overload_share - self.error_share)

    @property
    def inflight(self) -> float:
        """Requests in flight, by Little's law."""
        return self.offered_rps * self.latency


def conditions(
    offered_rps: float, capacity_rps: float, base_latency: float, image: ImageBehaviour
) -> Conditions:
    utilisation = offered_rps / capacity_rps if capacity_rps > 0 else math.inf
    if utilisation < 1.0:
        # queueing delay grows as 1 / (1 - u), bounded so that u -> 1 stays finite
        latency = base_latency / max(1.0 - utilisation, 0.05)
        overload = 0.0
    else:
        latency = base_latency * 20.0 * utilisation
        overload = 1.0 - 1.0 / utilisation
    latency = min(latency + image.extra_latency, _MAX_LATENCY)
    error = min(image.error_rate, 1.0) * (1.0 - overload)
    return Conditions(offered_rps=offered_rps, latency=latency, overload_share=overload, error_share=error)


def spread(load: dict[str, float], serving: dict[str, int]) -> dict[str, float]:
    """Per-machine offered rps by region: each region's load over its serving machines.

    A region with load but no serving machine sends its load, evenly, to the regions that serve.
    """
    serving_regions = [region for region, count in serving.items() if count > 0]
    orphaned = sum(rps for region, rps in load.items() if serving.get(region, 0) == 0)
    extra = orphaned / len(serving_regions) if serving_regions else 0.0
    return {region: (load.get(region, 0.0) + extra) / serving[region] for region in serving_regions}


@dataclass
class Traffic:
    """Counters of one machine's traffic, integrated over time (the numbers its /metrics page shows)."""

    requests: dict[str, float] = field(default_factory=lambda: {"200": 0.0, "500": 0.0, "503": 0.0})
    buckets: list[float] = field(default_factory=lambda: [0.0] * len(LATENCY_BUCKETS))
    count: float = 0.0
    total_seconds: float = 0.0
    last: float | None = None

    def integrate(self, now: float, current: Conditions | None) -> None:
        """Add what happened since the last call, under `current` (None: the machine served nothing)."""
        if self.last is not None and current is not None and now > self.last and current.offered_rps > 0:
            served = current.offered_rps * (now - self.last)
            self.requests["200"] += served * current.success_share
            self.requests["500"] += served * current.error_share
            self.requests["503"] += served * current.overload_share
            self.count += served
            self.total_seconds += served * current.latency
            for index, bound in enumerate(LATENCY_BUCKETS):
                # latency is exponential with the current mean (a zero mean: every answer in the first bucket)
                share = 1.0 if current.latency <= 0 else 1.0 - math.exp(-bound / current.latency)
                self.buckets[index] += served * share
        self.last = now


class Diffuser:
    """Turns a share into an exact, deterministic sequence: share 0.2 fails exactly every fifth answer."""

    def __init__(self) -> None:
        self._debt = 0.0

    def fire(self, share: float) -> bool:
        self._debt += min(max(share, 0.0), 1.0)
        if self._debt >= 1.0 - 1e-9:
            self._debt -= 1.0
            return True
        return False
