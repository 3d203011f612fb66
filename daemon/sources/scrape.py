"""Direct scrapes of each machine's own /metrics page, aggregated per region.

The page is read with prometheus_client's text parser. A gauge is taken as it is; a counter becomes a
per-second rate between this scrape and the previous one of the same machine (a drop is a restart). A
machine whose page cannot be read is left out and its error reported; a region with no machine read is
missing, never zero.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from daemon.clock import Clock
from daemon.core.samples import Aggregate, Sample, by_region, counter_rate
from daemon.fly.models import Machine
from daemon.sources.fleet import in_group
from daemon.sources.http import LazySession, describe, read_body
from daemon.sources.probes import probe_url

_MAX_PAGE = 4 * 1024 * 1024


@dataclass(frozen=True)
class ScrapeSpec:
    name: str  # the sample name as exposed, e.g. app_inflight_requests or app_http_requests_total
    port: int = 8080
    path: str = "/metrics"
    labels: Mapping[str, str] = field(default_factory=dict)  # only samples with these label values
    aggregate: Aggregate = Aggregate.SUM
    timeout: float = 2.0
    # share of a region's started machines that must be read for the region to have a value: a sum over
    # part of a region is an undercount, and an undercount reads as less load than there is
    min_coverage: float = 1.0


@dataclass(frozen=True)
class ScrapeResult:
    regions: dict[str, Sample]  # the aggregate per region (regions with no value are absent)
    machines: dict[str, float]  # the value (or rate) per machine that was read
    errors: dict[str, str]  # why a machine was not read, by machine id
    counter: bool = False
    coverage: dict[str, float] = field(default_factory=dict)  # share of each region's machines read


def extract(page: str, spec: ScrapeSpec) -> tuple[float, bool] | None:
    """The sum of the matching samples on a page, and whether it is a counter; None when there are none."""
    total, found, counter = 0.0, False, False
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name != spec.name or any(sample.labels.get(k) != v for k, v in spec.labels.items()):
                continue
            if not math.isfinite(sample.value):
                raise ValueError(f"{spec.name} is {sample.value}")
            total += sample.value
            found = True
            counter = counter or family.type == "counter"
    return (total, counter) if found else None


class Scraper:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._previous: dict[tuple[str, str, str], Sample] = {}
        self._sessions = LazySession()

    def _client(self) -> aiohttp.ClientSession:
        return self._sessions.get()

    async def aclose(self) -> None:
        await self._sessions.aclose()

    def forget(self, apps: AbstractSet[str]) -> None:
        """Drop the counters kept of `apps`' machines: scraped again later, a counter has no rate until its
        second scrape, as after a restart."""
        for key in [k for k in self._previous if k[0] in apps]:
            del self._previous[key]

    async def _read(self, url: str, timeout: float) -> str:
        async with self._client().get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                raise ValueError(f"status {response.status}")
            return (await read_body(response, _MAX_PAGE)).decode("utf-8", errors="replace")

    async def scrape(
        self, app: str, machines: Iterable[Machine], spec: ScrapeSpec, process_group: str = "app"
    ) -> ScrapeResult:
        """Read every started, reachable machine's page once; aggregate the metric per region."""
        started = [m for m in in_group(machines, process_group) if m.state == "started"]
        targets = [m for m in started if m.host_status == "ok"]
        pages = await asyncio.gather(
            *(self._read(probe_url(m.private_ip, spec.port, spec.path), spec.timeout) for m in targets),
            return_exceptions=True,
        )
        now = self._clock.now()
        values: dict[str, float] = {}
        errors: dict[str, str] = {m.id: "host unreachable" for m in started if m.host_status != "ok"}
        counter = False
        for machine, page in zip(targets, pages, strict=True):
            if isinstance(page, BaseException):
                errors[machine.id] = describe(page, spec.timeout)
                continue
            try:
                found = extract(page, spec)
            except ValueError as exc:
                errors[machine.id] = f"bad metrics page: {exc}"
                continue
            if found is None:
                errors[machine.id] = f"no sample named {spec.name}"
                continue
            value, is_counter = found
            counter = counter or is_counter
            if not is_counter:
                values[machine.id] = value
                continue
            key = (app, machine.id, spec.name)
            current = Sample(value, now, "scrape")
            rate = counter_rate(self._previous.get(key), current)
            self._previous[key] = current
            if rate is not None:
                values[machine.id] = rate
        live = {m.id for m in targets}
        for key in [k for k in self._previous if k[0] == app and k[1] not in live]:
            del self._previous[key]  # a machine that is gone starts afresh
        coverage: dict[str, float] = {}
        for region in {m.region for m in started}:
            in_region = [m.id for m in started if m.region == region]
            coverage[region] = sum(1 for mid in in_region if mid in values) / len(in_region)
        regions_of = {m.id: m.region for m in started if coverage[m.region] >= spec.min_coverage}
        aggregated = by_region(values, regions_of, spec.aggregate)
        samples = {region: Sample(value, now, f"scrape:{spec.name}") for region, value in aggregated.items()}
        return ScrapeResult(
            regions=samples, machines=values, errors=errors, counter=counter, coverage=coverage
        )
