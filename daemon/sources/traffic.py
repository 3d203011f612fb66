"""Per-machine request traffic for the release watch: requests, 5xx errors and the latency histogram each
machine served since the previous read, so that they can be put down to the release the machine runs.

Two sources. A scrape reads each machine's own /metrics page and keeps its cumulative totals with the
machine's instance_id: the next read's increase is the difference, or the whole new total when the instance
changed (an update starts a new process, which counts from zero) or a counter went down (a restart). A
PromQL source asks Prometheus for `increase()` per machine (`instance`) over the time since the previous
read of the app. Either way a machine with nothing to compare yet, or not in the answer, is absent: missing,
never zero.

The instance_id comes from the machine list the caller passes, so that list should be taken just before
the read: a page read from a new process under an old instance_id is put down to the old release.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from daemon.clock import Clock
from daemon.core.traffic import Buckets, Traffic, increase
from daemon.fly.models import Machine
from daemon.sources.http import LazySession, describe, read_body
from daemon.sources.probes import probe_url
from daemon.sources.prometheus import MetricSourceError, PromQL, Series
from daemon.telemetry.metrics import SourceMetrics

_MAX_PAGE = 4 * 1024 * 1024
PROMQL = "promql"  # the key of `TrafficReading.errors` for a failed PromQL read


@dataclass(frozen=True)
class TrafficSpec:
    source: Literal["scrape", "promql"] = "scrape"
    port: int = 8080  # scrape: http://[private_ip]:port/path
    path: str = "/metrics"
    # scrape: the counter's sample name (with a status label); promql: the metric name,
    # e.g. fly_app_http_responses_count
    requests: str = "app_http_requests_total"
    status_label: str = "status"  # 5xx: a value of this label starting with "5"
    # the histogram's base name (its samples are <latency>_bucket{le}), with promql e.g.
    # fly_app_http_response_time_seconds; None: no latency
    latency: str | None = "app_http_request_duration_seconds"
    timeout: float = 2.0
    # promql: the increase() window of the first read of an app; later reads use the time since the
    # previous successful read, in whole seconds, at least 1
    window: float = 30.0


@dataclass(frozen=True)
class TrafficReading:
    at: float
    # the increase since this reader's previous read of each machine, by machine id; a machine with
    # nothing to compare yet is absent (never zero)
    machines: dict[str, Traffic]
    errors: dict[str, str]  # why a machine (or "promql") was not read


class _NoSampleError(LookupError):
    pass


def _bound(le: str | None) -> float:
    if le is None:
        raise ValueError("a bucket without an le label")
    bound = float(le)  # "+Inf" reads as math.inf
    if math.isnan(bound):
        raise ValueError(f"a bucket with le={le}")
    return bound


def parse(page: str, spec: TrafficSpec) -> Traffic:
    """The cumulative totals on one /metrics page: every status's requests, the 5xx ones, and the latency
    buckets summed per bound. ValueError for a page that is no exposition or holds a NaN or an infinity;
    LookupError when it has no requests sample."""
    bucket_name = f"{spec.latency}_bucket" if spec.latency is not None else None
    requests = errors = 0.0
    found = False
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name not in {spec.requests, bucket_name}:
                continue
            if not math.isfinite(sample.value):
                raise ValueError(f"{sample.name} is {sample.value}")
            if sample.name == spec.requests:
                found = True
                requests += sample.value
                if sample.labels.get(spec.status_label, "").startswith("5"):
                    errors += sample.value
            else:
                bound = _bound(sample.labels.get("le"))
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    if not found:
        raise _NoSampleError(f"no sample named {spec.requests}")
    return Traffic(requests, errors, tuple(sorted(buckets.items())))


@dataclass(frozen=True)
class _Cumulative:
    instance_id: str
    traffic: Traffic


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class TrafficReader:
    """Reads traffic per machine, remembering what it read before (per app and machine). The PromQL
    client, if any, belongs to the caller: `aclose()` closes only the reader's own HTTP session."""

    def __init__(
        self, clock: Clock, promql: PromQL | None = None, metrics: SourceMetrics | None = None
    ) -> None:
        self._clock = clock
        self._promql = promql
        self._metrics = metrics
        self._previous: dict[tuple[str, str], _Cumulative] = {}
        self._queried: dict[str, float] = {}  # when each app was last read through PromQL
        self._sessions = LazySession()

    def _client(self) -> aiohttp.ClientSession:
        return self._sessions.get()

    async def aclose(self) -> None:
        await self._sessions.aclose()

    def forget(self, apps: AbstractSet[str]) -> None:
        """Drop what was read of `apps` before (their machines' totals, their last PromQL read): read
        again later, the next read is a first read (nothing compared with a stale total, the first
        window)."""
        for key in [k for k in self._previous if k[0] in apps]:
            del self._previous[key]
        for app in apps:
            self._queried.pop(app, None)

    async def read(self, app: str, machines: Sequence[Machine], spec: TrafficSpec) -> TrafficReading:
        """One read of every machine given (the caller chooses which: canaries are not special). Never
        raises: what could not be read is in `errors`."""
        at = self._clock.now()
        unique = list({m.id: m for m in machines}.values())
        if spec.source == "promql":
            reading = await self._query(app, unique, spec, at)
        else:
            reading = await self._scrape(app, unique, spec, at)
        if reading.errors and self._metrics is not None:
            self._metrics.errors.labels(app, "traffic").inc(len(reading.errors))
        return reading

    async def _page(self, machine: Machine, spec: TrafficSpec) -> Traffic:
        url = probe_url(machine.private_ip, spec.port, spec.path)
        timeout = aiohttp.ClientTimeout(total=spec.timeout, sock_connect=spec.timeout)
        async with self._client().get(url, timeout=timeout, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"status {response.status}")
            page = (await read_body(response, _MAX_PAGE)).decode("utf-8", errors="replace")
        return parse(page, spec)

    async def _scrape(
        self, app: str, machines: Sequence[Machine], spec: TrafficSpec, at: float
    ) -> TrafficReading:
        started = [m for m in machines if m.state == "started"]
        targets = [m for m in started if m.host_status == "ok"]
        outcomes = await asyncio.gather(*(self._page(m, spec) for m in targets), return_exceptions=True)
        errors = {m.id: "host unreachable" for m in started if m.host_status != "ok"}
        read: dict[str, Traffic] = {}
        for machine, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, _NoSampleError):
                errors[machine.id] = str(outcome)
                continue
            if isinstance(outcome, ValueError | UnicodeError):
                errors[machine.id] = f"bad metrics page: {outcome}"
                continue
            if isinstance(outcome, BaseException):
                errors[machine.id] = describe(outcome, spec.timeout)
                continue
            key = (app, machine.id)
            previous = self._previous.get(key)
            self._previous[key] = _Cumulative(machine.instance_id, outcome)
            if previous is None:
                continue  # first sight: nothing to compare with, so no increase (absent, not zero)
            if previous.instance_id != machine.instance_id:
                # an update: a new process, counting from zero, so its whole total is new (the previous
                # total belonged to the old instance, and subtracting it would undercount the new release)
                read[machine.id] = outcome
            elif (delta := increase(previous.traffic, outcome)) is not None:
                read[machine.id] = delta
        running = {m.id for m in started}
        for key in [k for k in self._previous if k[0] == app and k[1] not in running]:
            # gone or stopped: its next process counts afresh, and first sight of it is absent
            del self._previous[key]
        return TrafficReading(at=at, machines=read, errors=errors)

    async def _query(
        self, app: str, machines: Sequence[Machine], spec: TrafficSpec, at: float
    ) -> TrafficReading:
        if self._promql is None:
            return TrafficReading(
                at, {}, {PROMQL: "no Prometheus is configured (FLYWATCH_PROMETHEUS_URL or FLYWATCH_ORG)"}
            )
        previous = self._queried.get(app)
        seconds = max(1, round(spec.window if previous is None else at - previous))
        selector = f'{{app="{_quoted(app)}"}}[{seconds}s]'
        try:
            counts = await self._promql.instant(
                f"sum by (instance, {spec.status_label}) (increase({spec.requests}{selector}))", at
            )
            histogram = (
                await self._promql.instant(
                    f"sum by (instance, le) (increase({spec.latency}_bucket{selector}))", at
                )
                if spec.latency is not None
                else []
            )
            read = _per_machine(counts, histogram, {m.id for m in machines}, spec.status_label)
        except MetricSourceError as exc:
            return TrafficReading(at, {}, {PROMQL: str(exc)})
        except Exception as exc:  # noqa: BLE001 - a read that cannot be made is missing data, not a crash
            return TrafficReading(at, {}, {PROMQL: f"{type(exc).__name__}: {exc}"})
        # only a successful read moves the window on: the next one covers what this one could not
        self._queried[app] = at
        return TrafficReading(at, read, {})


def _per_machine(
    counts: Iterable[Series], histogram: Iterable[Series], wanted: set[str], status_label: str
) -> dict[str, Traffic]:
    """Traffic per machine id from the two answers; machines not asked for, or not in the requests
    answer, are left out (missing, never zero)."""
    counts = list(counts)
    if counts and not any("instance" in s.labels for s in counts):
        raise MetricSourceError(
            "the result has no 'instance' label: the metric cannot be put down to machines"
        )
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    for series in counts:
        machine = series.labels.get("instance")
        if machine is None or machine not in wanted:
            continue
        value = series.points[-1][1]
        requests[machine] = requests.get(machine, 0.0) + value
        if series.labels.get(status_label, "").startswith("5"):
            errors[machine] = errors.get(machine, 0.0) + value
    buckets: dict[str, dict[float, float]] = {}
    for series in histogram:
        machine = series.labels.get("instance")
        if machine is None or machine not in requests:
            continue
        try:
            bound = _bound(series.labels.get("le"))
        except ValueError as exc:
            raise MetricSourceError(f"a latency series of {machine} is not a bucket: {exc}") from None
        per_bound = buckets.setdefault(machine, {})
        per_bound[bound] = per_bound.get(bound, 0.0) + series.points[-1][1]
    return {
        machine: Traffic(requests[machine], errors.get(machine, 0.0), _sorted(buckets.get(machine, {})))
        for machine in requests
    }


def _sorted(per_bound: dict[float, float]) -> Buckets:
    return tuple(sorted(per_bound.items()))
