"""The policy file: YAML, validated strictly, every error naming the file, the line and the key path.

    apps.shop.regions.iad.min: must not be above max (8)   (config/flywatch.yaml:7)

Unknown keys, duplicate keys, wrong types, min above max, bad durations, bad cron expressions or time zones,
unknown Fly regions, and a PromQL query that is neither grouped by region nor has a {region} placeholder
are all errors. A policy either loads whole or not at all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.core.regions import is_region

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: Any) -> float:
    """ "5s", "1m30s", "800ms", "2h" or a number of seconds, as seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 5s, 1m30s or 800ms, got {value!r}")  # noqa: TRY004 - pydantic reports ValueErrors
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().replace(" ", "")
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"expected a duration like 5s, 1m30s or 800ms, got {value!r}")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ValueError(f"expected a duration like 5s, 1m30s or 800ms, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def _more_than_zero(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be more than 0s")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
# a check of the key alone (not a model validator), so it is reported alongside the model's other errors
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_more_than_zero)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyPathError(ValueError):
    """A problem a model validator finds with one of its keys: `at` is that key's path below the model,
    so the error names apps.shop.regions.iad.min (and its line), not only apps.shop.regions.iad."""

    def __init__(self, message: str, *at: str | int) -> None:
        super().__init__(message)
        self.at = at


def _region_code(code: str) -> str:
    if not is_region(code):
        raise ValueError(f"unknown Fly region {code!r}")
    return code


RegionCode = Annotated[str, AfterValidator(_region_code)]


class RegionBounds(Model):
    # 1 unless said otherwise: a region scaled to zero has no machine left to measure, and would stay at zero
    min: Annotated[int, Field(ge=0)] = 1
    max: Annotated[int, Field(ge=0)]

    @model_validator(mode="after")
    def _ordered(self) -> RegionBounds:
        if self.min > self.max:
            raise KeyPathError(f"must not be above max ({self.max})", "min")
        return self


class JsonField(Model):
    path: str  # dotted, e.g. status or checks.db
    equals: Any


class HealthPolicy(Model):
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    path: Annotated[str, Field(pattern=r"^/")] = "/health"
    interval: PositiveDuration = 5.0
    timeout: Duration = 2.0
    headers: dict[str, str] = Field(default_factory=dict)
    expect_status: Annotated[list[Annotated[int, Field(ge=100, le=599)]], Field(min_length=1)] = [200]
    max_latency: Duration | None = None
    body_contains: str | None = None
    json_field: JsonField | None = None
    unhealthy_after: Annotated[int, Field(ge=1)] = 2
    healthy_after: Annotated[int, Field(ge=1)] = 2

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthPolicy:
        if not 0 < self.timeout <= self.interval:
            raise KeyPathError(
                f"must be more than 0s and at most the interval ({self.interval:g}s), got {self.timeout:g}s",
                "timeout",
            )
        return self


class ScrapeMetric(Model):
    name: str
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    path: Annotated[str, Field(pattern=r"^/")] = "/metrics"
    aggregate: Literal["sum", "avg", "max"] = "sum"
    labels: dict[str, str] = Field(default_factory=dict)
    min_coverage: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0


class MachinesMetric(Model):
    state: Literal["started", "stopped", "suspended", "created"] = "started"


_GROUPED_BY_REGION = re.compile(r"\bby\s*\(([^)]*)\)")


def promql_by_region(query: str) -> bool:
    """Is the query grouped by region (`sum by (region) (...)`) or written per region (`{region}`)?"""
    if "{region}" in query:
        return True
    return any("region" in (part.strip() for part in m.split(",")) for m in _GROUPED_BY_REGION.findall(query))


class MetricPolicy(Model):
    scrape: ScrapeMetric | None = None
    promql: str | None = None
    machines: MachinesMetric | None = None
    max_age: Duration | None = None  # default: three scaling intervals, at least 30s

    @model_validator(mode="after")
    def _exactly_one(self) -> MetricPolicy:
        given = [name for name in ("scrape", "promql", "machines") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of scrape, promql or machines (got {', '.join(given) or 'none'})"
            )
        if self.promql is not None and not promql_by_region(self.promql):
            raise KeyPathError(
                "the query must be grouped by region (e.g. sum by (region) (...)) "
                "or contain a {region} placeholder",
                "promql",
            )
        return self


class Direction(Model):
    stabilization: Duration = 0.0
    cooldown: Duration = 0.0
    max_step: Annotated[int, Field(ge=1)] = 1000


def _up_default() -> Direction:
    return Direction(stabilization=0.0, cooldown=10.0, max_step=4)


def _down_default() -> Direction:
    return Direction(stabilization=60.0, cooldown=30.0, max_step=1)


class ScheduleBounds(Model):
    min: Annotated[int, Field(ge=0)] | None = None
    max: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ScheduleBounds:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise KeyPathError(f"must not be above max ({self.max})", "min")
        return self


class Schedule(Model):
    cron: str
    duration: PositiveDuration
    timezone: str = "UTC"
    regions: dict[RegionCode, ScheduleBounds]

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f"not a valid cron expression: {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name like Europe/Paris)") from None
        return value


class ScalingPolicy(Model):
    interval: PositiveDuration = 5.0
    metric: MetricPolicy
    target_per_machine: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    tolerance: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    scale_up: Direction = Field(default_factory=_up_default)
    scale_down: Direction = Field(default_factory=_down_default)
    scale_down_action: Literal["stop", "suspend", "destroy"] = "stop"
    on_missing_metric: Literal["hold", "max"] = "hold"
    schedules: list[Schedule] = Field(default_factory=list)

    @property
    def metric_max_age(self) -> float:
        return self.metric.max_age if self.metric.max_age is not None else max(3 * self.interval, 30.0)


class ReleaseTraffic(Model):
    """Where a release's requests, 5xx answers and latency are read, per machine (so that they are counted
    for the release each machine runs): its own /metrics page, or PromQL by `instance` (the machine id)."""

    source: Literal["scrape", "promql"] = "scrape"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    path: Annotated[str, Field(pattern=r"^/")] = "/metrics"
    requests: str = (
        "app_http_requests_total"  # a counter with a status label (promql: fly_app_http_responses_count)
    )
    status_label: str = "status"
    latency: str | None = (
        "app_http_request_duration_seconds"  # a histogram (promql: fly_app_http_response_time_seconds)
    )


class ReleasePolicy(Model):
    bake: Duration = 300.0
    max_error_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    max_p95_latency: Duration | None = None
    max_unhealthy_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    min_requests: Annotated[int, Field(ge=0)] = 50  # fewer during the bake: inconclusive, never rolled back
    on_failure: Literal["rollback", "alert", "none"] = "rollback"
    max_parallel: Annotated[int, Field(ge=1)] = 1
    # a deploy still holding leases is waited for this long; then only the machines it does not hold are
    # rolled back (the report names the others, which are reverted once they are free)
    lease_wait: Duration = 60.0
    traffic: ReleaseTraffic = Field(default_factory=ReleaseTraffic)


class AppPolicy(Model):
    process_group: str = "app"
    regions: Annotated[dict[RegionCode, RegionBounds], Field(min_length=1)]
    health: HealthPolicy = Field(default_factory=HealthPolicy)
    scaling: ScalingPolicy | None = None  # none: watched, never scaled
    release: ReleasePolicy = Field(default_factory=ReleasePolicy)

    @model_validator(mode="after")
    def _schedules_in_managed_regions(self) -> AppPolicy:
        for index, schedule in enumerate(self.scaling.schedules if self.scaling else []):
            stray = sorted(set(schedule.regions) - set(self.regions))
            if stray:
                raise KeyPathError(
                    f"names regions not managed here: {', '.join(stray)}",
                    "scaling",
                    "schedules",
                    index,
                    "regions",
                    stray[0],
                )
        return self


class Webhook(Model):
    url: SecretStr  # a webhook URL is a secret: it is never logged or shown
    format: Literal["slack", "json"] = "json"

    @field_validator("url")
    @classmethod
    def _http(cls, value: SecretStr) -> SecretStr:
        if not re.match(r"^https?://[^/\s]+", value.get_secret_value()):
            raise ValueError("must be an http:// or https:// URL")
        return value


class Alerts(Model):
    webhooks: list[Webhook] = Field(default_factory=list)


class Policy(Model):
    apps: Annotated[
        dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")], AppPolicy], Field(min_length=1)
    ]
    alerts: Alerts = Field(default_factory=Alerts)


# ---------------------------------------------------------------------------- loading


class PolicyError(Exception):
    """A policy that cannot be used; `problems` are one line each: where, which key, what is wrong."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader for which a key given twice in one mapping is an error, not a silent overwrite."""


# The same on libyaml's parser where PyYAML was built with it (its wheels are): a policy of 5,000 apps loads
# in three seconds instead of seventeen. Its errors say less ("found character that cannot start any
# token", not which character), so a document it refuses is read again by the pure-Python one, to say why.
_FastLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _FastUniqueKeyLoader(_FastLoader):  # type: ignore[misc,valid-type]
    """_UniqueKeyLoader on libyaml."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`: construct_mapping merges it, and keys given here override it
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            break  # construct_mapping reports an unhashable key with its line
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (first on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return dict(loader.construct_mapping(node))


for _loader in (_UniqueKeyLoader, _FastUniqueKeyLoader):
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _lines(
    node: yaml.Node | None, path: tuple[Any, ...] = (), found: dict[tuple[Any, ...], int] | None = None
) -> dict[tuple[Any, ...], int]:
    """The line of every key path in a YAML document, to point errors at it."""
    found = {} if found is None else found
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            where = (*path, key.value)
            found[where] = key.start_mark.line + 1
            _lines(value, where, found)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found[(*path, index)] = item.start_mark.line + 1
            _lines(item, (*path, index), found)
    return found


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    source: str
    text: str = field(repr=False)  # the raw document holds the webhook URLs: never in a repr or a log


def _is_validator_step(part: Any) -> bool:
    """Parts of a pydantic error location that are not keys of the document."""
    return (
        part == "[key]"
        or (isinstance(part, str) and part.startswith("function-"))
        or part in {"int", "float", "str"}
    )


def parse_policy(text: str, source: str) -> Policy:
    """Validate a policy document; raise PolicyError listing every problem with its line and key path."""
    composer: type[yaml.SafeLoader] = _FastLoader
    try:
        try:
            data = yaml.load(text, Loader=_FastUniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError:
            composer = yaml.SafeLoader  # what libyaml refuses, the lines are found by the loader that read it
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - says why (or, if not, it is read)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source, [f"{where}: not valid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise PolicyError(source, [f"{source}: the top level must be a mapping with `apps:` (and `alerts:`)"])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        lines = _lines(yaml.compose(text, Loader=composer))  # the lines of the keys, to say where
        problems = []
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if not _is_validator_step(p))
            cause = error.get("ctx", {}).get("error")
            if isinstance(cause, KeyPathError):
                loc = (*loc, *cause.at)
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            key = (
                "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
            )
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            elif error["type"] == "missing":
                message = "required key is missing"
            problems.append(f"{source}:{line}: {key}: {message}" if line else f"{source}: {key}: {message}")
        raise PolicyError(source, problems) from None


def load_policy(path: Path) -> LoadedPolicy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from None
    return LoadedPolicy(policy=parse_policy(text, str(path)), source=str(path), text=text)


def summary(policy: Policy) -> list[str]:
    """One line per app: regions with their bounds, and what drives its scaling."""
    lines = []
    for name, app in policy.apps.items():
        regions = ", ".join(f"{code} {b.min}-{b.max}" for code, b in app.regions.items())
        if app.scaling is None:
            driver = "watch only (no scaling)"
        else:
            metric = app.scaling.metric
            source = (
                f"scrape {metric.scrape.name}"
                if metric.scrape
                else f"promql {metric.promql!r}"
                if metric.promql
                else f"machines {metric.machines.state if metric.machines else ''}"
            )
            driver = f"{source}, target {app.scaling.target_per_machine:g} per machine"
        lines.append(f"{name}: {regions}; {driver}; release rollback: {app.release.on_failure}")
    return lines
