"""Direct scrapes of each machine's own /metrics page, aggregated per region.

The page is read with prometheus_client's text parser. A gauge is taken as it is; a counter becomes a
per-second rate between this scrape and the previous one of the same machine (a drop is a restart). A
machine whose page cannot be read is left out and its error reported; a region with no machine read is
missing, never zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from daemon.clock import Clock
from daemon.core.samples import Aggregate, Sample, by_region, counter_rate
from daemon.fly.models import Machine
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


@dataclass(frozen=True)
class ScrapeResult:
    regions: dict[str, Sample]  # the aggregate per region (regions with no value are absent)
    machines: dict[str, float]  # the value (or rate) per machine that was read
    errors: dict[str, str]  # why a machine was not read, by machine id
    counter: bool = False


def extract(page: str, spec: ScrapeSpec) -> tuple[float, bool] | None:
    """The sum of the matching samples on a page, and whether it is a counter; None when there are none."""
    total, found, counter = 0.0, False, False
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name != spec.name or any(sample.labels.get(k) != v for k, v in spec.labels.items()):
                continue
            total += sample.value
            found = True
            counter = counter or family.type == "counter"
    return (total, counter) if found else None


class Scraper:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._previous: dict[tuple[str, str, str], Sample] = {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0))
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _read(self, url: str, timeout: float) -> str:
        limit = aiohttp.ClientTimeout(total=timeout)
        async with self._client().get(url, timeout=limit) as response:
            if response.status != 200:
                raise ValueError(f"status {response.status}")
            return (await response.content.read(_MAX_PAGE)).decode("utf-8", errors="replace")

    async def scrape(self, app: str, machines: Iterable[Machine], spec: ScrapeSpec) -> ScrapeResult:
        """Read every started, reachable machine's page once; aggregate the metric per region."""
        targets = [m for m in machines if m.state == "started" and m.host_status == "ok"]
        pages = await asyncio.gather(
            *(self._read(probe_url(m.private_ip, spec.port, spec.path), spec.timeout) for m in targets),
            return_exceptions=True,
        )
        now = self._clock.now()
        values: dict[str, float] = {}
        errors: dict[str, str] = {}
        counter = False
        for machine, page in zip(targets, pages, strict=True):
            if isinstance(page, BaseException):
                errors[machine.id] = _describe(page)
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
        regions = {m.id: m.region for m in targets}
        aggregated = by_region(values, regions, spec.aggregate)
        samples = {region: Sample(value, now, f"scrape:{spec.name}") for region, value in aggregated.items()}
        return ScrapeResult(regions=samples, machines=values, errors=errors, counter=counter)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror if exc.os_error else exc}"
    return f"{type(exc).__name__}: {exc}"
