"""Machines as the release watch reads them (releases.crashed, releases.view) and the actuator's image
check and failure classification (actuator._same_image, actuator._passing): table-driven, over
fly.models.Machine objects as the Machines API gives them."""

from __future__ import annotations

from typing import Any, cast

import pytest

from daemon.actuator import Actuator, BootFailedError, VerificationFailedError, _passing, _same_image
from daemon.clock import ManualClock
from daemon.core.health import MachineVerdict, Verdict
from daemon.core.plan import Outcome, Rollout, RolloutTarget
from daemon.fly import errors
from daemon.fly.client import MachinesClient
from daemon.fly.models import ImageRef, Machine
from daemon.releases import crashed, view
from daemon.sources.health import AppHealth

SINCE = 1_790_000_000.0  # seconds; a whole number, so SINCE * 1000 is an exact millisecond timestamp
IMAGE = "registry.fly.io/shop:deployment-2"


def event(kind: str, at: float, status: str = "", **exit_event: Any) -> dict[str, Any]:
    """One machine event as Fly (and the simulator's _event) writes it; exit_event fields for an exit."""
    request = {"exit_event": {"exit_code": 0, "oom_killed": False, **exit_event}} if kind == "exit" else {}
    return {
        "type": kind,
        "status": status or ("failed" if kind == "exit" else "started"),
        "source": "flyd",
        "timestamp": int(at * 1000),
        "request": request,
    }


def config(version: int = 2, image: str = IMAGE) -> dict[str, Any]:
    return {
        "image": image,
        "metadata": {
            "fly_release_version": str(version),
            "fly_release_id": f"rel_{version}",
            "fly_process_group": "app",
        },
        "env": {"MODE": "a"},
    }


def fly_machine(
    *,
    state: str = "started",
    events: list[dict[str, Any]] | None = None,
    reachable: bool = True,
    **extra: Any,
) -> Machine:
    """A machine as GET /machines shows it; an unreachable host shows only `incomplete_config`."""
    body: dict[str, Any] = {
        "id": "m1",
        "region": "iad",
        "state": state,
        "instance_id": "01INSTANCE",
        "host_status": "ok" if reachable else "unreachable",
        "events": events or [],
        ("config" if reachable else "incomplete_config"): config(),
        **extra,
    }
    return Machine.model_validate(body)


# ------------------------------------------------------------------ crashed


@pytest.mark.parametrize(
    ("state", "events", "expected"),
    [
        # failed is a crash, whatever the events say (none here)
        ("failed", [], True),
        ("failed", [event("exit", SINCE - 3600, exit_code=0)], True),
        # a non-zero exit since the launch, after `since`: a crash (events are newest first)
        ("started", [event("exit", SINCE + 10, exit_code=1), event("launch", SINCE)], True),
        # exactly at `since` counts
        ("stopped", [event("exit", SINCE, exit_code=1)], True),
        # restarted after the crash: still a crash of this config
        (
            "started",
            [event("start", SINCE + 20), event("exit", SINCE + 10, exit_code=137, oom_killed=True)],
            True,
        ),
        # a stop someone asked for (autostop, a scale-down) ends with a signal: no crash
        ("stopped", [event("exit", SINCE + 10, exit_code=143, requested_stop=True)], False),
        # older than `since`: an old incident, not the release judged now
        ("started", [event("exit", SINCE - 1, exit_code=1)], False),
        # before the latest update: the config that crashed is gone
        (
            "started",
            [event("update", SINCE + 20), event("exit", SINCE + 10, exit_code=1), event("launch", SINCE)],
            False,
        ),
        # before the launch
        ("started", [event("launch", SINCE + 20), event("exit", SINCE + 10, exit_code=1)], False),
        # exit code 0 is a clean exit
        ("stopped", [event("exit", SINCE + 10, exit_code=0)], False),
        # an exit event without an exit code says nothing
        ("stopped", [{**event("exit", SINCE + 10), "request": {}}], False),
        ("started", [], False),
    ],
)
def test_crashed(state: str, events: list[dict[str, Any]], expected: bool) -> None:
    """Failed, or a non-zero unrequested exit since the last update/launch and at/after `since`: a crash."""
    assert crashed(fly_machine(state=state, events=events), SINCE) is expected


def test_crashed_reads_the_simulators_exit_event() -> None:
    """The exit event the simulator writes when an image crashes at boot counts as a crash."""
    sim_exit = {
        "id": "01EVENT",
        "type": "exit",
        "status": "failed",
        "source": "flyd",
        "timestamp": int((SINCE + 5) * 1000),
        "request": {"exit_event": {"exit_code": 1, "oom_killed": False}},
    }
    machine = fly_machine(state="stopped", events=[sim_exit, event("launch", SINCE)])
    assert crashed(machine, SINCE)
    assert not crashed(machine, SINCE + 6)


# ------------------------------------------------------------------ view


def health(verdict: Verdict, *, unreachable: bool = False) -> AppHealth:
    """The health watch's verdict on m1 alone."""
    judged = MachineVerdict("m1", "iad", verdict, "probe", no_answer=unreachable, unreachable=unreachable)
    return AppHealth(app="shop", at=SINCE, machines={"m1": judged}, regions={})


def test_view_of_a_reachable_machine() -> None:
    """A machine with its whole config: complete, with that config, its release and its crash."""
    machine = fly_machine(events=[event("exit", SINCE + 10, exit_code=1)])
    seen = view(machine, health(Verdict.HEALTHY), SINCE)
    assert seen.complete
    assert seen.config == config()
    assert (seen.id, seen.region, seen.state, seen.process_group) == ("m1", "iad", "started", "app")
    assert seen.version == 2
    assert seen.crashed
    assert seen.healthy is True


def test_view_of_a_machine_on_an_unreachable_host_is_incomplete() -> None:
    """Only `incomplete_config` (host unreachable): complete=False, its release still read from it."""
    seen = view(fly_machine(reachable=False), health(Verdict.UNHEALTHY, unreachable=True), SINCE)
    assert not seen.complete
    assert seen.version == 2
    assert seen.image == IMAGE
    assert seen.healthy is None


def test_view_of_a_machine_without_any_config_is_incomplete() -> None:
    """No config at all: complete=False, the image from image_ref, no release."""
    machine = Machine.model_validate(
        {
            "id": "m1",
            "region": "iad",
            "state": "started",
            "host_status": "unreachable",
            "image_ref": {"registry": "registry.fly.io", "repository": "shop", "tag": "deployment-2"},
        }
    )
    seen = view(machine, None, SINCE)
    assert not seen.complete
    assert seen.config == {"image": IMAGE}
    assert seen.version is None


@pytest.mark.parametrize(
    ("verdict", "unreachable", "expected"),
    [
        (Verdict.HEALTHY, False, True),
        (Verdict.UNHEALTHY, False, False),
        (Verdict.UNKNOWN, False, None),
        # an unreachable host is an outage, not the release: never "unhealthy"
        (Verdict.UNHEALTHY, True, None),
        (Verdict.HEALTHY, True, None),
    ],
)
def test_view_healthy_from_the_health_verdict(
    verdict: Verdict, unreachable: bool, expected: bool | None
) -> None:
    """The health watch's verdict gives healthy True/False/None; one from an unreachable host gives None."""
    machine = fly_machine(reachable=not unreachable)
    assert view(machine, health(verdict, unreachable=unreachable), SINCE).healthy is expected


# ------------------------------------------------------------------ _same_image


def ref(registry: str = "", repository: str = "", tag: str = "", digest: str = "") -> ImageRef:
    return ImageRef.model_validate(
        {"registry": registry, "repository": repository, "tag": tag, "digest": digest}
    )


DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("image_ref", "image", "expected"),
    [
        (ref("registry.fly.io", "shop", "good"), "registry.fly.io/shop:good", True),
        (ref("registry.fly.io", "shop", "good"), "registry.fly.io/shop:bad", False),
        (ref("registry.fly.io", "shop", "good"), "registry.fly.io/other:good", False),
        (ref("ghcr.io", "shop", "good"), "registry.fly.io/shop:good", False),
        # Docker Hub: the registry and library/ written out by Fly, implicit in the config
        (ref("docker.io", "library/nginx", "1.25"), "nginx:1.25", True),
        (ref("docker.io", "nginx", "1.25"), "nginx:1.25", True),
        (ref("docker.io", "library/nginx", "1.25"), "docker.io/library/nginx:1.25", True),
        (ref("docker.io", "library/nginx", "1.25"), "nginx:1.26", False),
        (ref("docker.io", "grafana/grafana", "10"), "grafana/grafana:10", True),
        # no tag is latest
        (ref("registry.fly.io", "shop", "latest"), "registry.fly.io/shop", True),
        (ref("registry.fly.io", "shop", ""), "registry.fly.io/shop", True),
        (ref("registry.fly.io", "shop", ""), "registry.fly.io/shop:latest", True),
        (ref("registry.fly.io", "shop", "good"), "registry.fly.io/shop", False),
        # a registry with a port
        (ref("localhost:5000", "shop", "1"), "localhost:5000/shop:1", True),
        (ref("localhost:5000", "shop", "latest"), "localhost:5000/shop", True),
        # a digest reference is compared by digest, whatever the tag
        (ref("registry.fly.io", "shop", "deployment-2", DIGEST), f"registry.fly.io/shop@{DIGEST}", True),
        (ref("registry.fly.io", "shop", "good", DIGEST), f"registry.fly.io/shop:good@{OTHER_DIGEST}", False),
        (ref("registry.fly.io", "shop", "good", OTHER_DIGEST), f"registry.fly.io/shop@{DIGEST}", False),
    ],
)
def test_same_image(image_ref: ImageRef, image: str, expected: bool) -> None:
    """image_ref names the config's image: same registry, repository and tag (or digest), forms aside."""
    assert _same_image(image_ref, image) is expected


# ------------------------------------------------------------------ _passing


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (errors.error_for("Machines_update", 503, "upstream unavailable", "req-1"), True),
        (errors.ServerError("Machines_update", "boom", status=500), True),
        (errors.TransportError("Machines_update", "connection reset"), True),
        (errors.error_for("Machines_update", 429, "rate limited", "req-1"), True),
        (errors.error_for("Machines_update", 409, "machine current version is a, not b", "req-1"), True),
        (errors.BadResponse("Machines_show", "not JSON", status=200), True),
        (errors.LeaseLost("Machines_update", "lease could not be refreshed"), True),
        (errors.error_for("Machines_update", 412, "precondition failed", "req-1"), False),
        (errors.error_for("Machines_update", 400, "invalid config", "req-1"), False),
        (errors.error_for("Machines_update", 404, "machine not found", "req-1"), False),
        (errors.error_for("Machines_update", 408, "deadline exceeded", "req-1"), False),
        (errors.error_for("Machines_update", 409, "lease currently held by someone", "req-1"), False),
        (errors.error_for("Machines_update", 412, "insufficient resources", "req-1"), False),
        (errors.error_for("Machines_update", 422, "unprocessable", "req-1"), False),
        (VerificationFailedError("update reverted"), False),
        (BootFailedError("did not start"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_passing(exc: Exception, expected: bool) -> None:
    """Failures of the way to the machine (5xx, no answer, 429, version conflict) may pass; others do not."""
    assert _passing(exc) is expected


def test_error_for_gives_the_classes_the_table_relies_on() -> None:
    """error_for tells the classes apart as the _passing table assumes."""
    assert type(errors.error_for("e", 503, "x", "")) is errors.ServerError
    assert type(errors.error_for("e", 429, "x", "")) is errors.RateLimited
    assert type(errors.error_for("e", 409, "current version", "")) is errors.VersionConflict
    assert type(errors.error_for("e", 409, "lease currently held", "")) is errors.LeaseHeld
    assert type(errors.error_for("e", 408, "x", "")) is errors.RequestTimeout
    assert type(errors.error_for("e", 412, "x", "")) is errors.PreconditionFailed


# ------------------------------------------------------------------ a rollout step's retryable flag


class _FailingReads:
    """A Machines API whose GET /machines/{id} answers `machine` first, then raises `error` (a 5xx)."""

    def __init__(self, error: errors.FlyApiError, machine: Machine | None = None) -> None:
        self._error = error
        self._machine = machine

    async def get_machine(self, app: str, machine_id: str) -> Machine:
        del app, machine_id
        machine, self._machine = self._machine, None
        if machine is None:
            raise self._error
        return machine


async def _update_step(client: _FailingReads) -> Any:
    actuator = Actuator(cast("MachinesClient", client), ManualClock())
    target = RolloutTarget("m1", config())
    result = await actuator.run(Rollout("shop", (target,), "rollback of v3 to v2"))
    (step,) = result.steps
    return step


async def test_a_5xx_reading_the_machine_before_an_update_is_retryable() -> None:
    """A 5xx on the read before an update is a failure of the way to the machine: retryable."""
    step = await _update_step(_FailingReads(errors.ServerError("Machines_show", "boom", status=502)))
    assert step.outcome is Outcome.FAILED
    assert step.retryable


async def test_a_5xx_seeing_through_a_machine_already_at_target_is_retryable() -> None:
    """A 5xx while seeing through a machine that already runs its target config: retryable."""
    parked = fly_machine(state="stopped")  # runs config() already; stopped: only its image is verified
    step = await _update_step(_FailingReads(errors.ServerError("Machines_show", "boom", status=502), parked))
    assert step.outcome is Outcome.FAILED
    assert step.retryable


async def test_a_4xx_reading_the_machine_before_an_update_is_not_retryable() -> None:
    """A 404 on the read before an update is the machine's own failure: not retryable."""
    step = await _update_step(_FailingReads(errors.NotFound("Machines_show", "machine not found")))
    assert step.outcome is Outcome.FAILED
    assert not step.retryable


def test_an_image_pinned_by_digest_matches_an_image_ref_without_one() -> None:
    """A config pinned by digest, and an image_ref that reports no digest: only the names can be compared."""
    ref = ImageRef(registry="registry.fly.io", repository="shop", tag="good")
    assert _same_image(ref, "registry.fly.io/shop@sha256:abc")
    assert not _same_image(ref, "registry.fly.io/other@sha256:abc")
