"""PromQL against Fly's managed Prometheus (https://api.fly.io/prometheus/ORG) or any Prometheus.

Per-region values come from either one query per region with a `{region}` placeholder, or one query whose
result is grouped by the `region` label. An error, a timeout or an empty result is missing data (an
exception, or an absent region), never zero; so is a NaN or an infinity, per series.

Freshness: a sample's time is the query's evaluation time. How old the data behind it may be is Prometheus's
to say: a target that stops answering has its series marked stale at once, and nothing older than the
server's lookback (5 minutes by default) is ever returned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from daemon.clock import Clock
from daemon.core.samples import Sample
from daemon.fly.auth import authorization

FLY_PROMETHEUS = "https://api.fly.io/prometheus/{org}"
REGION_PLACEHOLDER = "{region}"


class MetricSourceError(Exception):
    """A metric could not be read; the message says from where and why (never with the token)."""


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    points: tuple[tuple[float, float], ...]  # (unix seconds, value)


def default_url(org: str) -> str:
    return FLY_PROMETHEUS.format(org=org)


def _value(raw: object) -> float | None:
    """A sample value, or None when it is no usable number (NaN, infinite, or not a number at all)."""
    try:
        value = float(str(raw))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _series(item: object, matrix: bool) -> Series:
    """One series of a result, checked: a malformed answer is a MetricSourceError, never a KeyError."""
    if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
        raise MetricSourceError(f"malformed series in the answer: {item!r:.100}")
    raw_points = item.get("values") if matrix else [item.get("value")]
    if not isinstance(raw_points, list):
        raise MetricSourceError(f"malformed series in the answer: {item!r:.100}")
    points = []
    for point in raw_points:
        if not isinstance(point, list) or len(point) != 2:
            raise MetricSourceError(f"malformed sample in the answer: {point!r:.100}")
        value = _value(point[1])
        if value is not None:  # a NaN or an infinity is no data for this series, not an error for all
            points.append((float(point[0]), value))
    return Series({str(k): str(v) for k, v in item["metric"].items()}, tuple(points))


class PromQL:
    def __init__(
        self,
        base_url: str,
        clock: Clock,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._clock = clock
        headers = {"Authorization": authorization(token)} if token else {}
        self._url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self._url, headers=headers, timeout=timeout, transport=transport
        )

    def __repr__(self) -> str:
        return f"PromQL({self._url})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, object]:
        try:
            response = await self._http.get(path, params=params)
        except httpx.TimeoutException:
            raise MetricSourceError(f"Prometheus at {self._url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise MetricSourceError(f"cannot reach Prometheus at {self._url}: {type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            raise MetricSourceError(f"Prometheus answered {response.status_code} without JSON") from None
        if not isinstance(body, dict):
            raise MetricSourceError(f"Prometheus answered {response.status_code} with an unexpected body")
        if response.status_code != 200 or body.get("status") != "success":
            error = body.get("error") or response.reason_phrase
            raise MetricSourceError(f"Prometheus refused the query ({response.status_code}): {error}")
        data = body.get("data")
        if not isinstance(data, dict):
            raise MetricSourceError("Prometheus answered without data")
        return data

    async def instant(self, query: str, at: float | None = None) -> list[Series]:
        """An instant query: one point per series (a scalar comes back as one unlabelled series)."""
        params = {"query": query, "time": f"{at if at is not None else self._clock.now():.3f}"}
        data = await self._get("/api/v1/query", params)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "scalar" and isinstance(result, list):
            return [s for s in [_series({"metric": {}, "value": result}, matrix=False)] if s.points]
        if kind != "vector" or not isinstance(result, list):
            raise MetricSourceError(f"expected an instant vector, got {kind}")
        return [s for s in (_series(item, matrix=False) for item in result) if s.points]

    async def range(self, query: str, start: float, end: float, step: float) -> list[Series]:
        """A range query, for analysis windows."""
        params = {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        data = await self._get("/api/v1/query_range", params)
        result = data.get("result")
        if data.get("resultType") != "matrix" or not isinstance(result, list):
            raise MetricSourceError(f"expected a range vector, got {data.get('resultType')}")
        return [_series(item, matrix=True) for item in result]

    async def per_region(
        self, query: str, regions: Iterable[str], label: str = "region"
    ) -> dict[str, Sample]:
        """The query's value per region. Regions without a value are absent (missing), never zero."""
        now = self._clock.now()
        source = f"promql:{self._url}"
        result: dict[str, Sample] = {}
        if REGION_PLACEHOLDER in query:
            for region in regions:
                series = await self.instant(query.replace(REGION_PLACEHOLDER, region), now)
                if series:
                    at = series[0].points[-1][0]
                    result[region] = Sample(sum(s.points[-1][1] for s in series), at, source)
            return result
        series = await self.instant(query, now)
        if series and not any(label in s.labels for s in series):
            raise MetricSourceError(
                f"the result has no {label!r} label: group the query by it, or use a {{region}} placeholder"
            )
        wanted = set(regions)
        for item in series:
            name = item.labels.get(label)
            if name is not None and name in wanted:
                at, value = item.points[-1]
                previous = result.get(name)
                result[name] = Sample(value + (previous.value if previous else 0.0), at, source)
        return result
