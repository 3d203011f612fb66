"""The bodies the control API accepts, validated strictly: a wrong type or an unknown key is a 400 that
names the field, never a value silently coerced ("false" is not false, 1.5 is not 1) or a later 500."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daemon.core.regions import is_region
from daemon.sim.errors import bad_request

Count = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Seconds = NonNegative
Rps = NonNegative
Share = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _region(code: str) -> str:
    if not is_region(code):
        raise ValueError(f"unknown Fly region {code!r}")
    return code


class RegionCounts(Spec):
    started: Count = 0
    stopped: Count = 0
    suspended: Count = 0
    created: Count = 0


class AppSpec(Spec):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9\-]{1,62}$")]
    regions: Annotated[dict[str, Count | RegionCounts], Field(min_length=1)]
    org: str | None = None
    image: Annotated[str, Field(min_length=1)] | None = None
    internal_port: Annotated[int, Field(ge=1, le=65535)] = 8080
    health_path: Annotated[str, Field(pattern=r"^/")] = "/health"
    capacity_rps: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 50.0
    base_latency: Seconds = 0.1
    volume_gb: Count = 0
    metadata: dict[str, str] = Field(default_factory=dict)
    release_version: Annotated[int, Field(ge=1)] = 1
    guest: dict[str, Any] | None = None
    load: dict[str, Rps] = Field(default_factory=dict)

    @field_validator("regions", "load")
    @classmethod
    def _known_regions(cls, value: dict[str, Any]) -> dict[str, Any]:
        for code in value:
            _region(code)
        return value

    def placements(self) -> list[tuple[str, str]]:
        """(region, state) of each machine to place."""
        result: list[tuple[str, str]] = []
        for region, wanted in self.regions.items():
            counts = RegionCounts(started=wanted) if isinstance(wanted, int) else wanted
            for state, n in counts.model_dump().items():
                result.extend((region, state) for _ in range(n))
        return result


class LoadSpec(Spec):
    """Offered requests per second per region."""

    load: dict[str, Rps]

    @field_validator("load")
    @classmethod
    def _known_regions(cls, value: dict[str, float]) -> dict[str, float]:
        for code in value:
            _region(code)
        return value


IMAGE_MODES: dict[str, dict[str, Any]] = {
    "healthy": {},
    "unhealthy": {"health_status": 500},
    "errors": {"error_rate": 0.2},
    "slow": {"extra_latency": 1.0},
    "crash": {"crash": True},
}


class ImageSpec(Spec):
    image: Annotated[str, Field(min_length=1)]
    mode: Literal["healthy", "unhealthy", "errors", "slow", "crash"] = "healthy"
    health_status: Annotated[int, Field(ge=100, le=599)] | None = None
    error_rate: Share | None = None
    extra_latency: Seconds | None = None
    crash: bool | None = None

    def behaviour_fields(self) -> dict[str, Any]:
        """The mode's defaults, overridden by the fields given."""
        given = self.model_dump(exclude={"image", "mode"}, exclude_none=True)
        return {**IMAGE_MODES[self.mode], **given}


class ApiFaultSpec(Spec):
    kind: Literal["api"] = "api"
    endpoint: str = "*"
    app: str | None = None
    status: int = 503
    rate: Share = 1.0
    count: Annotated[int, Field(ge=1)] | None = None
    latency: Seconds = 0.0
    timeout: bool = False
    body: str | None = None
    retry_after: Seconds | None = None  # sent as a Retry-After header
    after: bool = False  # carry the request out, then answer the error: an ambiguous failure

    @field_validator("status")
    @classmethod
    def _error_status(cls, value: int) -> int:
        if value and not 400 <= value <= 599:
            raise ValueError("must be an HTTP error status (400-599), or 0 to answer normally")
        return value


class RegionFault(Spec):
    region: str

    @field_validator("region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        return _region(value)


class OutageSpec(RegionFault):
    kind: Literal["region_outage"]
    app: str | None = None
    mode: Literal["blackhole", "refuse"] = "blackhole"


class CapacitySpec(RegionFault):
    kind: Literal["capacity"]


class RevertSpec(Spec):
    """The next `count` updates (of `app`, or any) are silently reverted by the platform after they settle."""

    kind: Literal["revert_update"]
    app: str | None = None
    count: Annotated[int, Field(ge=1)] = 1


FaultSpec = Annotated[ApiFaultSpec | OutageSpec | CapacitySpec | RevertSpec, Field(discriminator="kind")]


class _FaultBody(Spec):
    fault: FaultSpec


class DeploySpec(Spec):
    image: Annotated[str, Field(min_length=1)]
    strategy: Literal["rolling", "immediate", "canary"] = "rolling"
    max_parallel: Annotated[int, Field(ge=1)] = 1
    wait_timeout: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 120.0  # per machine
    wait_checks: bool = True
    lease_ttl: Annotated[int, Field(ge=1)] = 13  # flyctl's DefaultLeaseTtl


S = TypeVar("S", bound=BaseModel)


def problem(exc: ValidationError) -> str:
    """One line per wrong field: its path and what is wrong."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"] if p != "fault") or "body"
        got = "" if error["type"] in ("missing", "extra_forbidden") else f", got {error['input']!r:.60}"
        lines.append(f"{path}: {error['msg']}{got}")
    return "; ".join(lines)


def parse(model: type[S], data: Any, what: str) -> S:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request(f"bad {what}: {problem(exc)}") from None


def parse_fault(data: Any) -> ApiFaultSpec | OutageSpec | CapacitySpec | RevertSpec:
    if isinstance(data, dict) and "kind" not in data:
        data = {**data, "kind": "api"}
    if isinstance(data, dict) and data.get("kind") not in (
        "api",
        "region_outage",
        "capacity",
        "revert_update",
    ):
        raise bad_request(
            f"bad fault: kind must be api, region_outage, capacity or revert_update, got {data.get('kind')!r}"
        )
    return parse(_FaultBody, {"fault": data}, "fault").fault
