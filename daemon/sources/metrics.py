"""The metric watch: reads each app's policy metric per region from its source, keeps the samples with
their time, and says what is fresh. Missing (a source down, a query error, an empty result, a stale sample)
is never zero: a region without a fresh sample has no value at all.

Sources: a scrape of the machines' /metrics pages, a PromQL query, or counts derived from the Machines API
(machines by state and region).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from daemon.clock import Clock
from daemon.core.samples import Sample
from daemon.fly.models import Machine
from daemon.sources.fleet import in_group
from daemon.sources.prometheus import MetricSourceError, PromQL
from daemon.sources.scrape import Scraper, ScrapeSpec
from daemon.telemetry.metrics import SourceMetrics


@dataclass(frozen=True)
class PromQuerySpec:
    query: str  # grouped by `label`, or with a {region} placeholder
    label: str = "region"


@dataclass(frozen=True)
class MachineCountSpec:
    """How many machines are in `state` per region, from the Machines API list."""

    state: str = "started"


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the policy's name for it, e.g. "inflight"
    source: ScrapeSpec | PromQuerySpec | MachineCountSpec
    max_age: float = 30.0  # seconds after which a sample is stale, hence missing
    process_group: str = "app"

    @property
    def kind(self) -> str:
        if isinstance(self.source, ScrapeSpec):
            return "scrape"
        return "promql" if isinstance(self.source, PromQuerySpec) else "machines"


def machine_counts(machines: Iterable[Machine], process_group: str = "app") -> dict[str, Counter[str]]:
    """Machines of the process group by region and state (canaries and destroyed ones left out)."""
    counts: dict[str, Counter[str]] = {}
    for machine in in_group(machines, process_group):
        counts.setdefault(machine.region, Counter())[machine.state] += 1
    return counts


@dataclass(frozen=True)
class Reading:
    """One read of one metric: fresh values per region, and what went wrong, if anything."""

    values: dict[str, float]  # fresh values only
    samples: dict[str, Sample]  # the latest sample per region, fresh or not
    error: str = ""

    def missing(self, regions: Iterable[str]) -> list[str]:
        return [region for region in regions if region not in self.values]


class MetricWatch:
    def __init__(
        self,
        clock: Clock,
        scraper: Scraper,
        promql: PromQL | None = None,
        metrics: SourceMetrics | None = None,
    ) -> None:
        self._clock = clock
        self._scraper = scraper
        self._promql = promql
        self._metrics = metrics
        self._latest: dict[tuple[str, str], dict[str, Sample]] = {}
        self._exported: dict[tuple[str, str], set[str]] = {}

    def forget(self, apps: AbstractSet[str]) -> None:
        """Drop everything kept of `apps`: their samples, their exported value series, and the scraper's
        counters; read again later, each starts afresh (no old sample served as fresh, no rate against an
        old total)."""
        for key in [k for k in self._latest if k[0] in apps]:
            del self._latest[key]
        for key in [k for k in self._exported if k[0] in apps]:
            regions = self._exported.pop(key)
            if self._metrics is not None:
                for region in regions:
                    self._metrics.value.remove(key[0], region, key[1])
        self._scraper.forget(apps)

    async def read(
        self, app: str, machines: list[Machine], regions: Iterable[str], spec: MetricSpec
    ) -> Reading:
        """Read the metric once; keep what was read; answer with what is fresh. Never raises."""
        wanted = list(regions)
        key = (app, spec.name)
        latest = self._latest.setdefault(key, {})
        error = ""
        try:
            latest.update(await self._fetch(app, machines, wanted, spec))
        except MetricSourceError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a reading that cannot be made is missing data, not a crash
            error = f"{type(exc).__name__}: {exc}"
        if error and self._metrics is not None:
            self._metrics.errors.labels(app, spec.kind).inc()
        now = self._clock.now()
        values = {
            region: value
            for region in wanted
            if (sample := latest.get(region)) is not None
            and (value := sample.fresh(now, spec.max_age)) is not None
        }
        self._export(app, spec.name, values)
        return Reading(values=values, samples={r: s for r, s in latest.items() if r in wanted}, error=error)

    async def _fetch(
        self, app: str, machines: list[Machine], regions: list[str], spec: MetricSpec
    ) -> dict[str, Sample]:
        source = spec.source
        if isinstance(source, ScrapeSpec):
            result = await self._scraper.scrape(app, machines, source, spec.process_group)
            if result.errors and self._metrics is not None:
                self._metrics.errors.labels(app, "scrape").inc(len(result.errors))
            if not result.regions and result.errors:
                first = next(iter(result.errors.items()))
                raise MetricSourceError(f"no machine's /metrics could be read (e.g. {first[0]}: {first[1]})")
            return result.regions
        if isinstance(source, PromQuerySpec):
            if self._promql is None:
                raise MetricSourceError(
                    "no Prometheus is configured (FLYWATCH_PROMETHEUS_URL or FLYWATCH_ORG)"
                )
            return await self._promql.per_region(source.query, regions, source.label)
        if not machines:
            # Fly's list is eventually consistent and once came back empty for a deployed app: an empty list
            # is no evidence of zero machines
            raise MetricSourceError("the Machines API listed no machine at all: counts are missing")
        now = self._clock.now()
        counts = machine_counts(machines, spec.process_group)
        return {
            region: Sample(float(counts.get(region, Counter())[source.state]), now, "machines")
            for region in regions
        }

    def _export(self, app: str, metric: str, values: Mapping[str, float]) -> None:
        if self._metrics is None:
            return
        exported = self._exported.setdefault((app, metric), set())
        for region in exported - set(values):
            self._metrics.value.remove(app, region, metric)  # missing is absent, not zero
        for region, value in values.items():
            self._metrics.value.labels(app, region, metric).set(value)
        exported.clear()
        exported.update(values)
