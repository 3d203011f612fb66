"""The simulator's control API under /_sim/, for tests and the demo (documented in the README).

It sets the world up (apps and their machines per region), moves it (load, releases, bad images) and
breaks it (API faults, region outages, capacity errors); and it reports what happened (counters, the
log of every mutation). It needs no token: it is the test bench, not Fly.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon.sim import errors
from daemon.sim.api import Counters, json_response, read_json
from daemon.sim.deploy import Deployer, DeployRequest
from daemon.sim.errors import ApiError
from daemon.sim.faults import FaultBook
from daemon.sim.fleet import Fleet
from daemon.sim.load import ImageBehaviour
from daemon.sim.model import Json, Outage, Platform

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IMAGE_MODES: dict[str, dict[str, Any]] = {
    "healthy": {},
    "unhealthy": {"health_status": 500},
    "errors": {"error_rate": 0.2},
    "slow": {"extra_latency": 1.0},
    "crash": {"crash": True},
}
APP_FIELDS = {
    "name",
    "org",
    "image",
    "regions",
    "internal_port",
    "health_path",
    "capacity_rps",
    "base_latency",
    "volume_gb",
    "metadata",
    "release_version",
    "guest",
    "load",
}


def machine_config(
    image: str,
    *,
    internal_port: int = 8080,
    health_path: str = "/health",
    metadata: dict[str, str] | None = None,
    guest: Json | None = None,
) -> Json:
    """A machine config as `fly deploy` writes it for a private app with an HTTP check."""
    return {
        "image": image,
        "guest": guest or {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
        "restart": {"policy": "on-failure", "max_retries": 10},
        "services": [
            {
                "protocol": "tcp",
                "internal_port": internal_port,
                "autostop": "off",
                "autostart": True,
                "ports": [{"port": 80, "handlers": ["http"]}],
                "concurrency": {"type": "requests", "soft_limit": 20, "hard_limit": 25},
            }
        ],
        "checks": {
            "health": {
                "type": "http",
                "port": internal_port,
                "path": health_path,
                "interval": "15s",
                "timeout": "2s",
                "grace_period": "0s",
            }
        },
        "metadata": dict(metadata or {}),
    }


def _behaviour_problem(key: str, value: Any) -> str | None:
    """What an ImageBehaviour field should be, when `value` is not that; None when it is fine."""
    if key == "crash":
        return None if isinstance(value, bool) else "true or false"
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if key == "health_status":
        return None if number and isinstance(value, int) and 100 <= value <= 599 else "an HTTP status"
    return None if number and value >= 0 else "a number >= 0"


class Control:
    def __init__(
        self, platform: Platform, fleet: Fleet, deployer: Deployer, faults: FaultBook, counters: Counters
    ) -> None:
        self.platform = platform
        self.fleet = fleet
        self.deployer = deployer
        self.faults = faults
        self.counters = counters

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/_sim"):
            return await handler(request)
        try:
            return await handler(request)
        except ApiError as exc:
            return json_response(exc.body, exc.status)
        except web.HTTPException as exc:
            return json_response({"error": exc.reason.lower()}, exc.status)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_sim/apps", self.list_apps),
            web.post("/_sim/apps", self.create_app),
            web.get("/_sim/apps/{app}", self.show_app),
            web.put("/_sim/apps/{app}/load", self.set_load),
            web.post("/_sim/apps/{app}/deploy", self.deploy),
            web.get("/_sim/apps/{app}/releases", self.releases),
            web.get("/_sim/images", self.list_images),
            web.post("/_sim/images", self.set_image),
            web.get("/_sim/faults", self.list_faults),
            web.post("/_sim/faults", self.add_fault),
            web.delete("/_sim/faults", self.clear_faults),
            web.delete("/_sim/faults/{id}", self.remove_fault),
            web.get("/_sim/counters", self.get_counters),
            web.delete("/_sim/counters", self.reset_counters),
            web.get("/_sim/health", self.health),
            web.route("*", "/_sim/{tail:.*}", self.unknown),
        ]

    async def unknown(self, request: web.Request) -> web.Response:
        raise ApiError(404, f"no such control endpoint: {request.method} {request.path}")

    async def health(self, _request: web.Request) -> web.Response:
        return json_response({"ok": True, "apps": len(self.platform.apps)})

    # ------------------------------------------------------------ apps and load

    async def create_app(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        app = self.build_app(body)
        await self.fleet.idle()
        return json_response(self.app_summary(app.name), 201)

    def build_app(self, spec: Json) -> Any:
        """Create an app and place its machines, from a spec like the README's. Returns the App."""
        unknown = set(spec) - APP_FIELDS
        if unknown:
            raise errors.bad_request(f"unknown app field(s) {sorted(unknown)}; expected {sorted(APP_FIELDS)}")
        name = spec.get("name")
        if not isinstance(name, str):
            raise errors.bad_request("name is required")
        regions = spec.get("regions") or {}
        if not isinstance(regions, dict) or not regions:
            raise errors.bad_request(
                "regions is required: {region: count} or {region: {started: n, stopped: m}}"
            )
        try:
            capacity = float(spec.get("capacity_rps", 50.0))
            latency = float(spec.get("base_latency", 0.1))
            port = int(spec.get("internal_port", 8080))
            volume_gb = int(spec.get("volume_gb", 0))
            version = int(spec.get("release_version", 1))
        except (TypeError, ValueError) as exc:
            raise errors.bad_request(f"bad app field: {exc}") from None
        placements: list[tuple[str, str]] = []
        for region, counts in regions.items():
            wanted = {"started": counts} if isinstance(counts, int) else counts
            if not isinstance(wanted, dict) or not all(
                isinstance(n, int) and n >= 0 for n in wanted.values()
            ):
                raise errors.bad_request(f"regions.{region} must be a count or {{state: count}}")
            placements.extend((region, state) for state, n in wanted.items() for _ in range(n))
        # metadata and load are checked before anything is built, so a bad spec leaves no app behind
        extra_metadata = spec.get("metadata") or {}
        values = extra_metadata.values() if isinstance(extra_metadata, dict) else [None]
        if not all(isinstance(v, str) for v in values):
            raise errors.bad_request("metadata must map keys to strings")
        load = self._parse_load(spec["load"]) if spec.get("load") else None
        app = self.platform.create_app(name, org=spec.get("org"), capacity_rps=capacity, base_latency=latency)
        release_id = self.platform.ids.release_id()
        image = str(spec.get("image") or f"registry.fly.io/{name}:deployment-{version}")
        metadata = {
            "fly_platform_version": "v2",
            "fly_process_group": "app",
            "fly_release_id": release_id,
            "fly_release_version": str(version),
            **extra_metadata,
        }
        config = machine_config(
            image,
            internal_port=port,
            health_path=str(spec.get("health_path", "/health")),
            metadata=metadata,
            guest=spec.get("guest"),
        )
        try:
            for region, state in placements:
                self.platform.place_machine(app, region, config, state, volume_gb)
        except ApiError:
            del self.platform.apps[name]
            raise
        if load:
            self.platform.set_load(name, load)
        return app

    @staticmethod
    def _parse_load(body: Any) -> dict[str, float]:
        if not isinstance(body, dict):
            raise errors.bad_request("load must map region codes to requests per second")
        try:
            load = {str(region): float(rps) for region, rps in body.items()}
        except (TypeError, ValueError):
            raise errors.bad_request("load values must be numbers (requests per second)") from None
        if not all(math.isfinite(rps) for rps in load.values()):
            raise errors.bad_request("load values must be finite numbers (requests per second)")
        if any(rps < 0 for rps in load.values()):
            raise errors.bad_request("load cannot be negative")
        return load

    def app_summary(self, name: str) -> Json:
        app = self.platform.app(name)
        current = self.platform.app_conditions(app)
        machines = []
        for machine in app.machines.values():
            cond = current.get(machine.id)
            machines.append(
                {
                    "id": machine.id,
                    "region": machine.region,
                    "state": machine.state,
                    "private_ip": machine.private_ip,
                    "port": machine.internal_port(),
                    "health_path": machine.health_path(),
                    "image": machine.image,
                    "release_version": machine.metadata.get("fly_release_version"),
                    "listening": self.fleet.listening(machine.id),
                    "host_status": self.platform.host_status(machine),
                    "lease_owner": lease.owner if (lease := self.platform.live_lease(machine)) else None,
                    "offered_rps": cond.offered_rps if cond else 0.0,
                    "latency": cond.latency if cond else None,
                    "inflight": cond.inflight if cond else 0.0,
                }
            )
        return {
            "name": app.name,
            "org": app.org,
            "capacity_rps": app.capacity_rps,
            "base_latency": app.base_latency,
            "load": dict(app.load),
            "machines": machines,
            "releases": [release.to_json() for release in app.releases],
        }

    async def list_apps(self, _request: web.Request) -> web.Response:
        return json_response([self.app_summary(name) for name in self.platform.apps])

    async def show_app(self, request: web.Request) -> web.Response:
        return json_response(self.app_summary(request.match_info["app"]))

    async def set_load(self, request: web.Request) -> web.Response:
        name = request.match_info["app"]
        self.platform.set_load(name, self._parse_load(await read_json(request)))
        return json_response({"load": self.platform.app(name).load})

    # ------------------------------------------------------------ releases and images

    async def deploy(self, request: web.Request) -> web.Response:
        release = self.deployer.deploy(
            request.match_info["app"], DeployRequest.parse(await read_json(request))
        )
        return json_response(release.to_json(), 202)

    async def releases(self, request: web.Request) -> web.Response:
        app = self.platform.app(request.match_info["app"])
        return json_response([release.to_json() for release in app.releases])

    async def list_images(self, _request: web.Request) -> web.Response:
        return json_response({image: vars(b) for image, b in self.platform.images.items()})

    async def set_image(self, request: web.Request) -> web.Response:
        image, behaviour = self.mark_image(await read_json(request))
        return json_response({"image": image, **vars(behaviour)})

    def mark_image(self, spec: Json) -> tuple[str, ImageBehaviour]:
        """Say how an image's instances behave: {image, mode, and any ImageBehaviour field}."""
        body = dict(spec)
        image = body.pop("image", None)
        if not isinstance(image, str) or not image:
            raise errors.bad_request("image is required")
        mode = str(body.pop("mode", "healthy"))
        if mode not in IMAGE_MODES:
            raise errors.bad_request(f"mode must be one of {sorted(IMAGE_MODES)}, got {mode!r}")
        fields: dict[str, Any] = {**IMAGE_MODES[mode], **body}
        try:
            behaviour = ImageBehaviour(**fields)
        except TypeError as exc:
            raise errors.bad_request(f"bad image behaviour: {exc}") from None
        for key, value in fields.items():  # the load model computes with these: a wrong type breaks it later
            problem = _behaviour_problem(key, value)
            if problem:
                raise errors.bad_request(f"bad image behaviour: {key} must be {problem}, got {value!r}")
        self.platform.set_image(image, behaviour)
        return image, behaviour

    # ------------------------------------------------------------ faults

    async def list_faults(self, _request: web.Request) -> web.Response:
        return json_response(self.fault_list())

    def fault_list(self) -> list[Json]:
        outages = [
            {"kind": "region_outage", "region": o.region, "app": o.app, "mode": o.mode}
            for o in self.platform.outages
        ]
        capacity = [{"kind": "capacity", "region": r} for r in sorted(self.platform.capacity_errors)]
        return [f.to_json() for f in self.faults.faults] + outages + capacity

    async def add_fault(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        kind = body.get("kind", "api")
        if kind == "api":
            return json_response(self.faults.add(body).to_json(), 201)
        region = body.get("region")
        if not isinstance(region, str) or not region:
            raise errors.bad_request(f"a {kind} fault needs a region")
        if kind == "region_outage":
            mode = body.get("mode", "blackhole")
            if mode not in ("blackhole", "refuse"):
                raise errors.bad_request("mode must be blackhole or refuse")
            self.platform.set_outage(Outage(region=region, app=body.get("app"), mode=mode))
            self.fleet.resync()
            await self.fleet.idle()
        elif kind == "capacity":
            self.platform.capacity_errors.add(region)
        else:
            raise errors.bad_request(f"kind must be api, region_outage or capacity, got {kind!r}")
        return json_response({"kind": kind, **body}, 201)

    async def clear_faults(self, _request: web.Request) -> web.Response:
        self.faults.faults.clear()
        self.platform.clear_outages()
        self.platform.capacity_errors.clear()
        self.fleet.resync()
        await self.fleet.idle()
        return json_response({"ok": True})

    async def remove_fault(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        if raw.isdigit() and self.faults.remove(int(raw)):
            return json_response({"ok": True})
        if self.platform.clear_outages(region=raw) or raw in self.platform.capacity_errors:
            self.platform.capacity_errors.discard(raw)
            self.fleet.resync()
            await self.fleet.idle()
            return json_response({"ok": True})
        raise ApiError(404, f"no fault {raw!r} (give an API fault's id or a region)")

    # ------------------------------------------------------------ counters

    async def get_counters(self, request: web.Request) -> web.Response:
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            raise errors.bad_request("since must be a unix timestamp") from None
        body = self.counters.to_json()
        body["mutations"] = [m for m in self.platform.mutations if m["time"] >= since]
        return json_response(body)

    async def reset_counters(self, _request: web.Request) -> web.Response:
        self.counters.reset()
        self.platform.mutations.clear()
        return json_response({"ok": True})
