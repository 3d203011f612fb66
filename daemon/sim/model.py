"""The simulated Fly platform's state: apps, machines, leases, versions, events, volumes, images and load.

Every operation of the Machines API is a method here that either returns the JSON Fly would answer or
raises `ApiError` with Fly's status and body. The HTTP layer (api.py) only parses and routes. Machine
states follow machines-api.md §3: a request puts a machine in a transient state, and a timer on the
injected clock settles it after a configurable delay.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import math
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from daemon.clock import Clock, Timer
from daemon.core.regions import is_region
from daemon.sim import errors
from daemon.sim.ids import IdSource
from daemon.sim.load import Conditions, Diffuser, ImageBehaviour, Traffic, conditions, spread

Json = dict[str, Any]

TRANSIENT_STATES = frozenset(
    {"creating", "starting", "stopping", "restarting", "suspending", "destroying", "replacing", "updating"}
)
SETTLED_STATES = frozenset({"created", "started", "stopped", "suspended", "failed", "destroyed"})
WAITABLE_STATES = frozenset({"started", "stopped", "suspended", "destroyed", "failed", "settled"})
LIST_STATE_FILTERS = frozenset({"created", "started", "stopped", "suspended"})
STOP_SIGNALS = frozenset({"SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM"})
DEFAULT_INTERNAL_PORT = 8080
DEFAULT_HEALTH_PATH = "/health"


@dataclass
class SimSettings:
    """Knobs of the simulated platform. The defaults behave like Fly, only faster."""

    transition_delay: float = 0.1  # seconds a machine spends in each transient state
    state_delays: dict[str, float] = field(default_factory=dict)  # per transient state, overrides the above
    destroyed_retention: float = 5.0  # GET answers `destroyed` this long after a destroy, then 404
    events_retained: int = 20  # Fly keeps about the last 20 events of a machine
    default_region: str = "iad"
    org_slug: str = "personal"
    tokens: dict[str, str] = field(default_factory=lambda: {"sim-token": "sim@tokens.fly.io"})
    rate_limits: bool = True
    serve_fleet: bool = True  # false: no machine listens (for benchmarks of the API alone, with huge fleets)
    default_lease_ttl: int = 30
    seed: int | None = 0

    def delay(self, state: str) -> float:
        return self.state_delays.get(state, self.transition_delay)


@dataclass(frozen=True)
class Actor:
    """Who asked for a mutation: the token's owner, which door it came through, and the client that sent
    it (the request's User-Agent; "" for the simulator's own deployer and the control API)."""

    owner: str
    source: str = "api"  # api | deploy | control
    agent: str = ""


CONTROL = Actor(owner="Fly.io system", source="control")


@dataclass
class Lease:
    nonce: str
    owner: str
    description: str
    expires_at: float
    version: str

    def envelope(self) -> Json:
        return {
            "status": "success",
            "data": {
                "nonce": self.nonce,
                "expires_at": math.ceil(self.expires_at),
                "owner": self.owner,
                "description": self.description,
                "version": self.version,
            },
        }


@dataclass
class Volume:
    id: str
    name: str
    region: str
    size_gb: int
    created_at: float
    attached_machine_id: str | None = None


@dataclass
class Machine:
    id: str
    name: str
    app: str
    region: str
    private_ip: str
    created_at: float
    updated_at: float
    state: str
    instance_id: str
    config: Json
    versions: list[tuple[str, Json]]  # (version, user_config), oldest first
    events: deque[Json]
    lease: Lease | None = None
    cordoned: bool = False
    started_at: float | None = None
    destroyed_at: float | None = None
    launching: bool = False  # created and on its way to started: a start now is refused
    timer: Timer | None = None
    traffic: Traffic = field(default_factory=Traffic)
    health_errors: Diffuser = field(default_factory=Diffuser)
    health_overload: Diffuser = field(default_factory=Diffuser)

    @property
    def image(self) -> str:
        return str(self.config.get("image", ""))

    @property
    def metadata(self) -> dict[str, str]:
        meta = self.config.get("metadata")
        if not isinstance(meta, dict):
            meta = self.config["metadata"] = {}
        return meta

    def internal_port(self) -> int:
        for service in self.config.get("services") or []:
            port = service.get("internal_port")
            if isinstance(port, int):
                return port
        return DEFAULT_INTERNAL_PORT

    def health_path(self) -> str:
        for check in (self.config.get("checks") or {}).values():
            if check.get("type") == "http" and check.get("path"):
                return str(check["path"])
        for service in self.config.get("services") or []:
            for check in service.get("checks") or []:
                if check.get("type") == "http" and check.get("path"):
                    return str(check["path"])
        return DEFAULT_HEALTH_PATH


@dataclass
class Release:
    id: str
    version: int
    image: str
    strategy: str
    created_at: float
    status: str = "running"  # running | complete | failed
    error: str = ""
    machines: list[str] = field(default_factory=list)

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "version": self.version,
            "image": self.image,
            "strategy": self.strategy,
            "status": self.status,
            "error": self.error,
            "created_at": iso(self.created_at),
            "machines": list(self.machines),
        }


@dataclass
class App:
    name: str
    id: str
    org: str
    internal_numeric_id: int
    capacity_rps: float = 50.0  # what one machine serves before it sheds load
    base_latency: float = 0.1  # seconds per answer when idle
    load: dict[str, float] = field(default_factory=dict)  # offered rps per region
    machines: dict[str, Machine] = field(default_factory=dict)
    volumes: dict[str, Volume] = field(default_factory=dict)
    releases: list[Release] = field(default_factory=list)
    integrated_at: float | None = None  # when its machines' counters were last brought up to date
    cached_conditions: tuple[int, dict[str, Conditions]] | None = None  # (platform generation, conditions)


@dataclass
class Outage:
    region: str
    app: str | None  # None: every app in the region
    mode: str = "blackhole"  # blackhole: connections hang; refuse: connections are refused

    def covers(self, machine: Machine) -> bool:
        return machine.region == self.region and self.app in (None, machine.app)


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_ref(image: str) -> Json:
    """Split an image reference the way Fly reports it in `image_ref`."""
    reference, _, digest = image.partition("@")
    first, slash, rest = reference.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "docker.io", reference
    repository, colon, tag = path.rpartition(":")
    if not colon:
        repository, tag = path, "latest"
    return {
        "registry": registry,
        "repository": repository,
        "tag": tag,
        "digest": digest or "sha256:" + hashlib.sha256(image.encode()).hexdigest(),
        "labels": {},
    }


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in {"1", "true", "yes"}


class Platform:
    """All simulated apps and machines, and every operation on them."""

    def __init__(self, clock: Clock, settings: SimSettings | None = None) -> None:
        self.clock = clock
        self.settings = settings or SimSettings()
        self.ids = IdSource(self.settings.seed)
        self.apps: dict[str, App] = {}
        self.images: dict[str, ImageBehaviour] = {}
        self.outages: list[Outage] = []
        self.capacity_errors: set[str] = set()  # regions where create fails for lack of capacity
        # (app or None for any, count): the next updates that the platform silently reverts after they settle
        self.revert_updates: list[tuple[str | None, int]] = []
        self.mutations: list[Json] = []
        self.listeners: list[Callable[[Machine, str], None]] = []  # called with (machine, old_state)
        self._waiters: dict[str, list[tuple[Callable[[Machine], bool], asyncio.Future[None]]]] = {}
        self._ip_allocator: Callable[[], str] = self._default_ip
        self._next_ip = 0
        self._generation = 0

    # ---------------------------------------------------------------- lookups

    def set_ip_allocator(self, allocator: Callable[[], str]) -> None:
        self._ip_allocator = allocator

    def _default_ip(self) -> str:
        self._next_ip += 1
        n = self._next_ip
        return f"127.{200 + (n >> 16) % 50}.{(n >> 8) & 255}.{n & 255}"

    def app(self, name: str) -> App:
        app = self.apps.get(name)
        if app is None:
            raise errors.not_found("app")
        return app

    def machine(self, app_name: str, machine_id: str, *, live: bool = True) -> Machine:
        """A machine of the app. `live`: a destroyed one past its retention answers 404, as Fly does."""
        machine = self.app(app_name).machines.get(machine_id)
        if machine is None:
            raise errors.not_found("machine")
        destroyed_at = machine.destroyed_at if machine.state == "destroyed" else None
        if (
            live
            and destroyed_at is not None
            and self.clock.now() - destroyed_at >= self.settings.destroyed_retention
        ):
            raise errors.not_found("machine")
        return machine

    def machine_by_ip(self, ip: str) -> Machine | None:
        for app in self.apps.values():
            for machine in app.machines.values():
                if machine.private_ip == ip and machine.state != "destroyed":
                    return machine
        return None

    def image_behaviour(self, image: str) -> ImageBehaviour:
        return self.images.get(image, ImageBehaviour())

    def outage_for(self, machine: Machine) -> Outage | None:
        return next((outage for outage in self.outages if outage.covers(machine)), None)

    def host_status(self, machine: Machine) -> str:
        return "unreachable" if self.outage_for(machine) else "ok"

    # ---------------------------------------------------------------- load and health

    def serving(self, machine: Machine) -> bool:
        """Does Fly Proxy send this machine traffic? Started, reachable, not cordoned."""
        return machine.state == "started" and not machine.cordoned and self.outage_for(machine) is None

    def _changed(self) -> None:
        """Something that shapes the load model changed: cached conditions are out of date."""
        self._generation += 1

    def app_conditions(self, app: App) -> dict[str, Conditions]:
        """What each serving machine of the app experiences right now, by machine id."""
        if app.cached_conditions is not None and app.cached_conditions[0] == self._generation:
            return app.cached_conditions[1]
        counts: dict[str, int] = {}
        for machine in app.machines.values():
            if self.serving(machine):
                counts[machine.region] = counts.get(machine.region, 0) + 1
        per_machine = spread(app.load, counts)
        result = {
            machine.id: conditions(
                per_machine[machine.region],
                app.capacity_rps,
                app.base_latency,
                self.image_behaviour(machine.image),
            )
            for machine in app.machines.values()
            if self.serving(machine)
        }
        app.cached_conditions = (self._generation, result)
        return result

    def integrate_traffic(self, app: App) -> None:
        """Bring the app's machines' counters up to now under the conditions that held until now."""
        now = self.clock.now()
        if app.integrated_at == now:
            return  # no time has passed: nothing was served since
        current = self.app_conditions(app)
        for machine in app.machines.values():
            machine.traffic.integrate(now, current.get(machine.id))
        app.integrated_at = now

    def set_load(self, app_name: str, load: dict[str, float]) -> None:
        app = self.app(app_name)
        self._reshaping([app], lambda: app.load.update(load))

    def _reshaping(self, apps: Iterable[App], change: Callable[[], None]) -> None:
        """Apply a change that alters who serves what, with counters integrated on both sides of it."""
        apps = list(apps)
        for app in apps:
            self.integrate_traffic(app)
        change()
        self._changed()

    def set_image(self, image: str, behaviour: ImageBehaviour) -> None:
        self._reshaping(self.apps.values(), lambda: self.images.__setitem__(image, behaviour))

    def set_outage(self, outage: Outage) -> None:
        self._reshaping(self.apps.values(), lambda: self.outages.append(outage))

    def clear_outages(self, region: str | None = None) -> bool:
        """End the outages (of one region, or all). True when there was one to end."""
        keep = [o for o in self.outages if region is not None and o.region != region]
        ended = len(keep) < len(self.outages)

        def change() -> None:
            self.outages = keep

        self._reshaping(self.apps.values(), change)
        return ended

    def check_statuses(self, machine: Machine) -> list[Json]:
        """Fly's own checks of a started machine: passing, warning (inside its grace period) or critical."""
        if machine.state != "started" or machine.started_at is None or self.outage_for(machine) is not None:
            return []  # Fly cannot read the checks of a machine it cannot reach
        names: list[tuple[str, Json]] = list((machine.config.get("checks") or {}).items())
        for service in machine.config.get("services") or []:
            for index, check in enumerate(service.get("checks") or []):
                port = check.get("port") or service.get("internal_port") or DEFAULT_INTERNAL_PORT
                names.append((f"servicecheck-{index:02d}-{check.get('type', 'tcp')}-{port}", check))
        behaviour = self.image_behaviour(machine.image)
        current = self.app_conditions(self.app(machine.app)).get(machine.id)
        failing = (
            behaviour.health_status >= 400
            or behaviour.error_rate >= 0.5
            or (current is not None and current.overload_share >= 0.5)
        )
        now = self.clock.now()
        statuses = []
        for name, check in names:
            grace = _duration(check.get("grace_period"), 0.0)
            if now - machine.started_at < grace:
                status, output = "warning", "waiting for status update"
            elif failing:
                status, output = "critical", "health check failed"
            else:
                status, output = "passing", "OK"
            statuses.append({"name": name, "status": status, "output": output, "updated_at": iso(now)})
        return statuses

    # ---------------------------------------------------------------- rendering

    def machine_json(self, machine: Machine, *, summary: bool = False) -> Json:
        body: Json = {
            "id": machine.id,
            "name": machine.name,
            "state": machine.state,
            "region": machine.region,
            "instance_id": machine.instance_id,
            "private_ip": machine.private_ip,
            "cordoned": machine.cordoned,
            "image_ref": image_ref(machine.image),
            "created_at": iso(machine.created_at),
            "updated_at": iso(machine.updated_at),
        }
        if summary:
            return body
        host_status = self.host_status(machine)
        body["host_status"] = host_status
        if host_status == "ok":
            body["config"] = copy.deepcopy(machine.config)
        else:
            body["incomplete_config"] = copy.deepcopy(machine.config)
        body["events"] = list(machine.events)
        body["checks"] = self.check_statuses(machine)
        return body

    def app_json(self, app: App) -> Json:
        live = [m for m in app.machines.values() if m.state != "destroyed"]
        return {
            "id": app.id,
            "name": app.name,
            "machine_count": len(live),
            "volume_count": len(app.volumes),
            "network": "default",
            "organization": {"name": app.org, "slug": app.org},
            "status": "deployed" if any(m.state == "started" for m in live) else "suspended",
            "internal_numeric_id": app.internal_numeric_id,
        }

    # ---------------------------------------------------------------- state machine

    def _event(
        self, machine: Machine, kind: str, status: str, source: str = "user", request: Json | None = None
    ) -> None:
        event = {
            "id": self.ids.ulid(self.clock.now()),
            "type": kind,
            "status": status,
            "source": source,
            "timestamp": int(self.clock.now() * 1000),
            "request": request or {},
        }
        machine.events.appendleft(event)

    def _set_state(self, machine: Machine, state: str) -> None:
        if machine.state == state:
            return
        app = self.app(machine.app)
        self.integrate_traffic(app)
        old = machine.state
        machine.state = state
        machine.updated_at = self.clock.now()
        if state == "started":
            machine.started_at = self.clock.now()
            # a new process: its counters start from zero, as a real app's do after a restart
            machine.traffic = Traffic(last=self.clock.now())
            machine.health_errors, machine.health_overload = Diffuser(), Diffuser()
        elif state == "destroyed":
            machine.destroyed_at = self.clock.now()
        self._changed()
        for listener in list(self.listeners):
            listener(machine, old)
        self._wake(machine)

    def _cancel_timer(self, machine: Machine) -> None:
        if machine.timer is not None:
            machine.timer.cancel()
            machine.timer = None

    def _after(self, machine: Machine, state: str, then: Callable[[], None]) -> None:
        """Put the machine in transient `state`, and run `then` when the state's delay has passed."""
        self._cancel_timer(machine)
        self._set_state(machine, state)

        def fire() -> None:
            machine.timer = None
            then()

        machine.timer = self.clock.call_later(self.settings.delay(state), fire)

    def _boot(self, machine: Machine, kind: str = "start") -> None:
        """starting -> started, or -> failed when the image crashes at boot."""

        def settle() -> None:
            machine.launching = False
            if self.image_behaviour(machine.image).crash:
                self._event(
                    machine, "exit", "failed", "flyd", {"exit_event": {"exit_code": 1, "oom_killed": False}}
                )
                self._set_state(machine, "failed")
            else:
                self._event(machine, kind, "started", "flyd")
                self._set_state(machine, "started")

        self._event(machine, kind, "starting")
        self._after(machine, "starting", settle)

    def _halt(self, machine: Machine, transient: str, final: str, kind: str) -> None:
        def settle() -> None:
            self._event(machine, kind, final, "flyd")
            self._set_state(machine, final)

        self._event(machine, kind, transient)
        self._after(machine, transient, settle)

    # ---------------------------------------------------------------- waiters

    def _wake(self, machine: Machine) -> None:
        pending = self._waiters.get(machine.id, [])
        keep = []
        for predicate, future in pending:
            if future.done():
                continue
            if predicate(machine):
                future.set_result(None)
            else:
                keep.append((predicate, future))
        self._waiters[machine.id] = keep

    async def wait(self, app_name: str, machine_id: str, query: dict[str, list[str]]) -> Json:
        states: list[str] = []
        for value in query.get("state", []) or ["started"]:
            states.extend(part.strip() for part in value.split(",") if part.strip())
        states = states or ["started"]
        unknown = [state for state in states if state not in WAITABLE_STATES]
        if unknown:
            raise errors.bad_request(
                f"invalid state {unknown[0]!r}; expected one of {sorted(WAITABLE_STATES)}"
            )
        raw_timeout = (query.get("timeout") or ["60"])[0]
        try:
            timeout = int(raw_timeout)
        except ValueError:
            raise errors.bad_request(
                f"timeout must be an integer number of seconds, got {raw_timeout!r}"
            ) from None
        if not 1 <= timeout <= 60:
            raise errors.bad_request(f"timeout must be between 1 and 60 seconds, got {timeout}")
        version = (query.get("version") or query.get("instance_id") or [""])[0]
        machine = self.machine(app_name, machine_id)
        if "stopped" in states and not version:
            raise errors.ApiError(400, "instance_id required when waiting for stopped machine")
        if version and version != machine.instance_id:
            if any(v == version for v, _ in machine.versions):
                raise errors.precondition(
                    f"machine failed to reach desired state, {','.join(states)}, currently replaced"
                )
            raise errors.bad_request(f"unknown machine version {version!r}")

        def reached(m: Machine) -> bool:
            if m.instance_id != (version or m.instance_id):
                return False
            return m.state in states or ("settled" in states and m.state in SETTLED_STATES)

        if not reached(machine):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(machine.id, []).append((reached, future))

            def expire() -> None:
                if not future.done():
                    future.set_exception(
                        errors.ApiError(
                            408,
                            "deadline_exceeded: machine failed to reach desired state, "
                            f"{','.join(states)}, currently {machine.state}",
                        )
                    )

            timer = self.clock.call_later(timeout, expire)
            try:
                await future
            finally:
                timer.cancel()
        return {
            "ok": True,
            "state": machine.state,
            "version": machine.instance_id,
            "event_id": machine.events[0]["id"],
        }

    # ---------------------------------------------------------------- leases

    def live_lease(self, machine: Machine) -> Lease | None:
        if machine.lease is not None and machine.lease.expires_at <= self.clock.now():
            machine.lease = None
        return machine.lease

    def _gate(self, machine: Machine, nonce: str | None) -> None:
        """Lease-gated calls fail with 409 unless they carry the live lease's nonce (machines-api.md §5)."""
        lease = self.live_lease(machine)
        if lease is not None and nonce != lease.nonce:
            held = f"lease currently held by {lease.owner}, expires at {iso(lease.expires_at)}"
            raise errors.conflict(f"machine ID {machine.id} {held}")

    def acquire_lease(
        self,
        app_name: str,
        machine_id: str,
        ttl: int | None,
        description: str,
        nonce: str | None,
        actor: Actor,
    ) -> Json:
        machine = self._mutable(app_name, machine_id)
        ttl = ttl if ttl is not None else self.settings.default_lease_ttl
        if ttl <= 0:
            raise errors.bad_request(f"ttl must be a positive number of seconds, got {ttl}")
        lease = self.live_lease(machine)
        now = self.clock.now()
        if lease is not None:
            if nonce != lease.nonce:
                message = (
                    f"machine ID {machine.id} lease currently held by {lease.owner}, "
                    f"expires at {iso(lease.expires_at)}"
                )
                raise errors.lease_envelope_error(409, message, "lease_currently_held")
            lease.expires_at = now + ttl  # a refresh keeps the nonce
            if description:
                lease.description = description
        else:
            lease = Lease(self.ids.nonce(), actor.owner, description, now + ttl, machine.instance_id)
            machine.lease = lease
        self._record(machine, "lease", actor)
        return lease.envelope()

    def show_lease(self, app_name: str, machine_id: str) -> Json:
        machine = self.machine(app_name, machine_id)
        lease = self.live_lease(machine)
        if lease is None:
            raise errors.lease_envelope_error(404, f"machine ID {machine.id} lease not found", "not_found")
        return lease.envelope()

    def release_lease(self, app_name: str, machine_id: str, nonce: str | None, actor: Actor) -> Json:
        machine = self.machine(app_name, machine_id)
        if not nonce:
            raise errors.lease_envelope_error(
                400, "fly-machine-lease-nonce header is required", "invalid_argument"
            )
        lease = self.live_lease(machine)
        if lease is None:
            raise errors.lease_envelope_error(404, f"machine ID {machine.id} lease not found", "not_found")
        if lease.nonce != nonce:
            raise errors.lease_envelope_error(
                400, "lease nonce does not match the current lease", "invalid_argument"
            )
        machine.lease = None
        self._record(machine, "release_lease", actor)
        return {"status": "success", "data": {"ok": True}}

    # ---------------------------------------------------------------- mutations

    def _record(self, machine: Machine, action: str, actor: Actor, **details: Any) -> None:
        self.mutations.append(
            {
                "time": self.clock.now(),
                "app": machine.app,
                "machine": machine.id,
                "region": machine.region,
                "action": action,
                "source": actor.source,
                "owner": actor.owner,
                "agent": actor.agent,
                **details,
            }
        )

    def _mutable(self, app_name: str, machine_id: str) -> Machine:
        machine = self.machine(app_name, machine_id)
        if machine.state == "destroyed":
            raise errors.not_found("machine")
        if self.outage_for(machine) is not None:
            raise errors.ApiError(503, "unavailable: the machine's host is unreachable")
        return machine

    def _validate_config(self, config: Any) -> Json:
        if not isinstance(config, dict):
            raise errors.bad_request("config is required and must be an object")
        image = config.get("image")
        if not isinstance(image, str) or not image.strip():
            raise errors.bad_request("config.image is required")
        metadata = config.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise errors.bad_request("config.metadata must map keys to strings")
        services = config.get("services")
        if services is not None and not isinstance(services, list):
            raise errors.bad_request("config.services must be a list")
        return copy.deepcopy(config)

    def _mount_volumes(self, app: App, region: str, config: Json, machine_id: str | None) -> list[Volume]:
        volumes = []
        for index, mount in enumerate(config.get("mounts") or []):
            volume_id = mount.get("volume") if isinstance(mount, dict) else None
            if not volume_id:
                raise errors.bad_request(f"config.mounts[{index}].volume is required")
            volume = app.volumes.get(volume_id)
            if volume is None:
                raise errors.not_found("volume")
            attached = volume.attached_machine_id
            if attached and attached != machine_id and app.machines[attached].state != "destroyed":
                raise errors.precondition(f"volume {volume_id} is already attached to machine {attached}")
            if volume.region != region:
                raise errors.precondition(f"volume {volume_id} is in region {volume.region}, not {region}")
            volumes.append(volume)
        return volumes

    def create_machine(self, app_name: str, body: Json, actor: Actor) -> Json:
        app = self.app(app_name)
        config = self._validate_config(body.get("config"))
        region = body.get("region") or self.settings.default_region
        if not isinstance(region, str) or not is_region(region):
            raise errors.bad_request(f"unknown region {region!r}")
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise errors.bad_request("name must be a string")
        if name and any(m.name == name and m.state != "destroyed" for m in app.machines.values()):
            raise errors.ApiError(409, f"aborted: a machine named {name!r} already exists in app {app.name}")
        lease_ttl = body.get("lease_ttl")
        if lease_ttl is not None and (not isinstance(lease_ttl, int) or lease_ttl <= 0):
            raise errors.bad_request("lease_ttl must be a positive integer")
        if region in self.capacity_errors:
            raise errors.insufficient_capacity(region)
        volumes = self._mount_volumes(app, region, config, None)
        machine = self._new_machine(app, region, config, name or None)
        for volume in volumes:
            volume.attached_machine_id = machine.id
        if body.get("skip_service_registration"):
            machine.cordoned = True
        self._event(machine, "launch", "created", request={"config": {"image": machine.image}})
        self._record(machine, "create", actor, image=machine.image)
        result = self.machine_json(machine)
        if lease_ttl:
            machine.lease = Lease(
                self.ids.nonce(), actor.owner, "", self.clock.now() + lease_ttl, machine.instance_id
            )
            result["nonce"] = machine.lease.nonce
        if not _truthy(body.get("skip_launch", False)):
            machine.launching = True

            def launch() -> None:
                machine.timer = None
                if machine.state == "created" and machine.launching:
                    self._boot(machine)

            machine.timer = self.clock.call_later(self.settings.delay("creating"), launch)
        return result

    def _new_machine(
        self, app: App, region: str, config: Json, name: str | None, state: str = "created"
    ) -> Machine:
        now = self.clock.now()
        instance_id = self.ids.ulid(now)
        machine = Machine(
            id=self.ids.machine_id(),
            name=name or self.ids.machine_name(),
            app=app.name,
            region=region,
            private_ip=self._ip_allocator(),
            created_at=now,
            updated_at=now,
            state=state,
            instance_id=instance_id,
            config=config,
            versions=[(instance_id, copy.deepcopy(config))],
            events=deque(maxlen=self.settings.events_retained),
            traffic=Traffic(last=now),
        )
        if state == "started":
            machine.started_at = now
        app.machines[machine.id] = machine
        return machine

    def update_machine(
        self, app_name: str, machine_id: str, body: Json, nonce: str | None, actor: Actor
    ) -> Json:
        machine = self._mutable(app_name, machine_id)
        config = self._validate_config(body.get("config"))
        for key in ("region", "name"):
            value = body.get(key)
            if value and value != getattr(machine, key):
                raise errors.bad_request(
                    f"{key} cannot be changed by an update ({getattr(machine, key)!r} -> {value!r})"
                )
        current_version = body.get("current_version")
        if current_version and current_version != machine.instance_id:
            raise errors.conflict(
                f"machine {machine.id} current version is {machine.instance_id}, not {current_version}"
            )
        self._gate(machine, nonce)
        if machine.state in TRANSIENT_STATES:
            raise errors.precondition(f"unable to update machine from current state: '{machine.state}'")
        old_mounts = [m.get("volume") for m in machine.config.get("mounts") or []]
        new_mounts = [m.get("volume") for m in config.get("mounts") or [] if isinstance(m, dict)]
        if old_mounts != new_mounts:
            raise errors.bad_request("mounts cannot be changed by an update")
        previous_state = machine.state
        launch = previous_state in {"started", "failed"} and not _truthy(body.get("skip_launch", False))
        self.integrate_traffic(self.app(app_name))  # what was served until now, under the old image
        machine.config = config
        self._changed()
        machine.instance_id = self.ids.ulid(self.clock.now())
        machine.versions.append((machine.instance_id, copy.deepcopy(config)))
        lease = self.live_lease(machine)
        if lease is not None:
            lease.version = machine.instance_id
        self._event(machine, "update", "replacing", request={"config": {"image": machine.image}})
        self._record(machine, "update", actor, image=machine.image, previous_state=previous_state)
        lease_ttl = body.get("lease_ttl")
        result_nonce = None
        if isinstance(lease_ttl, int) and lease_ttl > 0 and lease is None:
            machine.lease = Lease(
                self.ids.nonce(), actor.owner, "", self.clock.now() + lease_ttl, machine.instance_id
            )
            result_nonce = machine.lease.nonce

        previous_config = copy.deepcopy(machine.versions[-2][1])

        def settle() -> None:
            if self._take_revert(machine.app):
                # Fly can silently revert an update: the machine reports the new version, runs the old config
                machine.config = copy.deepcopy(previous_config)
                self._changed()
            if launch:
                self._boot(machine, "update")
            else:
                final = "created" if previous_state == "created" else "stopped"
                self._event(machine, "update", final, "flyd")
                self._set_state(machine, final)

        self._after(machine, "replacing", settle)
        result = self.machine_json(machine)
        if result_nonce:
            result["nonce"] = result_nonce
        return result

    def _take_revert(self, app_name: str) -> bool:
        for index, (app, count) in enumerate(self.revert_updates):
            if app in (None, app_name):
                if count > 1:
                    self.revert_updates[index] = (app, count - 1)
                else:
                    del self.revert_updates[index]
                return True
        return False

    def start_machine(self, app_name: str, machine_id: str, nonce: str | None, actor: Actor) -> Json:
        machine = self._mutable(app_name, machine_id)
        self._gate(machine, nonce)
        previous = machine.state
        if previous == "replacing":
            raise errors.precondition("machine getting replaced, refusing to start")
        if previous not in {"created", "stopped", "suspended", "failed"} or machine.launching:
            raise errors.precondition(f"unable to start machine from current state: '{previous}'")
        self._record(machine, "start", actor, previous_state=previous)
        self._boot(machine)
        return {"previous_state": previous, "migrated": False, "new_host": ""}

    def stop_machine(
        self, app_name: str, machine_id: str, body: Json, nonce: str | None, actor: Actor
    ) -> Json:
        machine = self._mutable(app_name, machine_id)
        signal = body.get("signal")
        if signal is not None and signal not in STOP_SIGNALS:
            raise errors.bad_request(f"unknown signal {signal!r}")
        self._gate(machine, nonce)
        previous = machine.state
        if previous in {"stopping", "stopped"}:
            return {"ok": True}  # already on its way down: nothing to do
        if previous not in {"started", "starting", "suspended", "created", "failed"}:
            raise errors.precondition(f"unable to stop machine from current state: '{previous}'")
        machine.launching = False
        self._record(machine, "stop", actor, previous_state=previous)
        self._halt(machine, "stopping", "stopped", "stop")
        return {"ok": True}

    def suspend_machine(self, app_name: str, machine_id: str, nonce: str | None, actor: Actor) -> Json:
        machine = self._mutable(app_name, machine_id)
        self._gate(machine, nonce)
        if machine.state != "started":
            raise errors.precondition(f"unable to suspend machine from current state: '{machine.state}'")
        self._record(machine, "suspend", actor, previous_state="started")
        self._halt(machine, "suspending", "suspended", "suspend")
        return {"ok": True}

    def restart_machine(self, app_name: str, machine_id: str, nonce: str | None, actor: Actor) -> Json:
        machine = self._mutable(app_name, machine_id)
        self._gate(machine, nonce)
        if machine.state != "started":
            raise errors.precondition(f"unable to restart machine from current state: '{machine.state}'")
        self._record(machine, "restart", actor, previous_state="started")
        self._event(machine, "restart", "restarting")
        self._after(machine, "restarting", lambda: self._boot(machine, "restart"))
        return {"ok": True}

    def cordon(self, app_name: str, machine_id: str, cordoned: bool, nonce: str | None, actor: Actor) -> Json:
        machine = self._mutable(app_name, machine_id)
        self._gate(machine, nonce)
        self._reshaping([self.app(app_name)], lambda: setattr(machine, "cordoned", cordoned))
        self._record(machine, "cordon" if cordoned else "uncordon", actor)
        return {"ok": True}

    def destroy_machine(
        self, app_name: str, machine_id: str, force: bool, nonce: str | None, actor: Actor
    ) -> Json:
        machine = self._mutable(app_name, machine_id)
        self._gate(machine, nonce)
        if machine.state == "destroying":
            raise errors.precondition("machine is already being destroyed")
        if machine.state not in {"stopped", "suspended", "created", "failed"} and not force:
            raise errors.precondition(
                f"unable to destroy machine, not currently stopped or suspended (state: '{machine.state}'); "
                "use force=true to kill it"
            )
        machine.launching = False
        self._record(machine, "destroy", actor, previous_state=machine.state, force=force)
        app = self.app(app_name)

        def settle() -> None:
            self._event(machine, "destroy", "destroyed", "flyd")
            machine.lease = None
            for volume in app.volumes.values():
                if volume.attached_machine_id == machine.id:
                    volume.attached_machine_id = None
            self._set_state(machine, "destroyed")

        self._event(machine, "destroy", "destroying")
        self._after(machine, "destroying", settle)
        return {"ok": True}

    # ---------------------------------------------------------------- reads

    def list_machines(self, app_name: str, query: dict[str, list[str]]) -> list[Json]:
        app = self.app(app_name)
        region = (query.get("region") or [""])[0]
        states: set[str] = set()
        for value in query.get("state", []):
            states.update(part.strip() for part in value.split(",") if part.strip())
        unknown = states - LIST_STATE_FILTERS
        if unknown:
            raise errors.bad_request(
                f"invalid state filter {min(unknown)!r}; expected {sorted(LIST_STATE_FILTERS)}"
            )
        include_deleted = _truthy((query.get("include_deleted") or ["false"])[0])
        summary = _truthy((query.get("summary") or ["false"])[0])
        meta_filters = {
            key.removeprefix("metadata."): values[0]
            for key, values in query.items()
            if key.startswith("metadata.")
        }
        result = []
        for machine in sorted(app.machines.values(), key=lambda m: (m.created_at, m.id)):
            if machine.state == "destroyed" and not include_deleted:
                continue
            if region and machine.region != region:
                continue
            if states and machine.state not in states:
                continue
            if any(machine.metadata.get(k) != v for k, v in meta_filters.items()):
                continue
            result.append(self.machine_json(machine, summary=summary))
        return result

    def list_events(self, app_name: str, machine_id: str, limit: str | None) -> list[Json]:
        machine = self.machine(app_name, machine_id)
        try:
            count = int(limit) if limit is not None else 20
        except ValueError:
            raise errors.bad_request(f"limit must be an integer, got {limit!r}") from None
        if not 1 <= count <= 50:
            raise errors.bad_request(f"limit must be between 1 and 50, got {count}")
        return list(machine.events)[:count]

    def list_versions(self, app_name: str, machine_id: str) -> list[Json]:
        machine = self.machine(app_name, machine_id)
        return [{"version": v, "user_config": copy.deepcopy(c)} for v, c in reversed(machine.versions)]

    # ---------------------------------------------------------------- metadata, which no lease gates

    def metadata_get(self, app_name: str, machine_id: str, key: str | None = None) -> Json:
        machine = self.machine(app_name, machine_id)
        if key is None:
            return dict(machine.metadata)
        if key not in machine.metadata:
            raise errors.not_found(f"metadata key {key!r}")
        return {"value": machine.metadata[key]}

    def metadata_set(self, app_name: str, machine_id: str, key: str, value: Any, actor: Actor) -> None:
        machine = self._mutable(app_name, machine_id)
        if not isinstance(value, str):
            raise errors.bad_request("value is required and must be a string")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", key):
            raise errors.bad_request(f"invalid metadata key {key!r}")
        machine.metadata[key] = value
        self._record(machine, "metadata_set", actor, key=key)

    def metadata_delete(self, app_name: str, machine_id: str, key: str, actor: Actor) -> None:
        machine = self._mutable(app_name, machine_id)
        machine.metadata.pop(key, None)
        self._record(machine, "metadata_delete", actor, key=key)

    def metadata_replace(self, app_name: str, machine_id: str, body: Json, merge: bool, actor: Actor) -> None:
        machine = self._mutable(app_name, machine_id)
        values = body.get("metadata")
        if not isinstance(values, dict) or not all(v is None or isinstance(v, str) for v in values.values()):
            raise errors.bad_request("metadata must map keys to strings (or null to remove)")
        version = body.get("machine_version")
        if version and version != machine.instance_id:
            raise errors.precondition(
                f"machine version {version} is not the current version {machine.instance_id}"
            )
        target = dict(machine.metadata) if merge else {}
        for key, value in values.items():
            if value:
                target[key] = value
            else:
                target.pop(key, None)
        machine.config["metadata"] = target
        self._record(machine, "metadata_update", actor)

    # ---------------------------------------------------------------- fleet set-up (control API)

    def create_app(
        self,
        name: str,
        *,
        org: str | None = None,
        capacity_rps: float = 50.0,
        base_latency: float = 0.1,
    ) -> App:
        if name in self.apps:
            raise errors.ApiError(409, f"app {name!r} already exists")
        if not re.fullmatch(r"[a-z0-9][a-z0-9\-]{1,62}", name):
            raise errors.bad_request(f"invalid app name {name!r}: lowercase letters, digits and dashes")
        app = App(
            name=name,
            id=self.ids.app_id(),
            org=org or self.settings.org_slug,
            internal_numeric_id=len(self.apps) + 1000,
            capacity_rps=capacity_rps,
            base_latency=base_latency,
        )
        self.apps[name] = app
        return app

    def place_machine(
        self, app: App, region: str, config: Json, state: str = "started", volume_gb: int = 0
    ) -> Machine:
        """Put a machine straight into a settled state, as if it had been there all along."""
        if not is_region(region):
            raise errors.bad_request(f"unknown region {region!r}")
        if state not in {"started", "stopped", "suspended", "created"}:
            raise errors.bad_request(
                f"a machine can be placed started, stopped, suspended or created, not {state!r}"
            )
        config = copy.deepcopy(config)
        if volume_gb:
            volume = Volume(self.ids.volume_id(), "data", region, volume_gb, self.clock.now())
            app.volumes[volume.id] = volume
            config["mounts"] = [{"volume": volume.id, "path": "/data", "name": "data", "size_gb": volume_gb}]
        machine = self._new_machine(app, region, config, None, state="created")
        for volume_id in [m["volume"] for m in config.get("mounts") or []]:
            app.volumes[volume_id].attached_machine_id = machine.id
        self._event(machine, "launch", "created", request={"config": {"image": machine.image}})
        if state != "created":
            self._event(machine, "start" if state == "started" else "stop", state, "flyd")
            self._set_state(machine, state)
        return machine

    def machines_of(self, app_name: str) -> Iterable[Machine]:
        return self.app(app_name).machines.values()


def _duration(value: Any, default: float) -> float:
    """A Go duration as Fly writes them (1s, 500ms, 1m30s), or a number of seconds."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    total = 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", str(value))
    if not parts:
        return default
    for number, unit in parts:
        total += float(number) * units[unit]
    return total
