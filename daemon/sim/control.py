"""The simulator's control API under /_sim/, for tests and the demo (documented in the README).

It sets the world up (apps and their machines per region), moves it (load, releases, bad images) and
breaks it (API faults, region outages, capacity errors); and it reports what happened (counters, the
log of every mutation). It needs no token: it is the test bench, not Fly.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable

from aiohttp import web

from daemon.sim import errors
from daemon.sim.api import Counters, json_response, read_json
from daemon.sim.deploy import Deployer
from daemon.sim.errors import ApiError
from daemon.sim.faults import FaultBook
from daemon.sim.fleet import Fleet
from daemon.sim.load import ImageBehaviour
from daemon.sim.model import App, Json, Outage, Platform
from daemon.sim.specs import (
    ApiFaultSpec,
    AppSpec,
    CapacitySpec,
    DeploySpec,
    ImageSpec,
    LoadSpec,
    OutageSpec,
    parse,
    parse_fault,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


class Control:
    def __init__(
        self,
        platform: Platform,
        fleet: Fleet,
        deployer: Deployer,
        faults: FaultBook,
        counters: Counters,
        endpoints: frozenset[str] = frozenset(),
    ) -> None:
        self.endpoints = endpoints  # the operationIds an API fault may name
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
            web.get("/_sim", self.index),
            web.get("/_sim/", self.index),
            web.route("*", "/_sim/{tail:.*}", self.unknown),
        ]

    async def unknown(self, request: web.Request) -> web.Response:
        raise ApiError(404, f"no such control endpoint: {request.method} {request.path}")

    async def index(self, _request: web.Request) -> web.Response:
        """What the control API offers (the README documents each call)."""
        return json_response({"endpoints": list(self.ENDPOINTS), "docs": "README.md, section 'Control API'"})

    ENDPOINTS = (
        "GET /_sim/apps",
        "POST /_sim/apps",
        "GET /_sim/apps/{app}",
        "PUT /_sim/apps/{app}/load",
        "POST /_sim/apps/{app}/deploy",
        "GET /_sim/apps/{app}/releases",
        "GET /_sim/images",
        "POST /_sim/images",
        "GET /_sim/faults",
        "POST /_sim/faults",
        "DELETE /_sim/faults",
        "DELETE /_sim/faults/{id or region}",
        "GET /_sim/counters",
        "DELETE /_sim/counters",
        "GET /_sim/health",
    )

    async def health(self, _request: web.Request) -> web.Response:
        return json_response({"ok": True, "apps": len(self.platform.apps)})

    # ------------------------------------------------------------ apps and load

    async def create_app(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        app = self.build_app(body)
        await self.fleet.idle()
        return json_response(self.app_summary(app.name), 201)

    def build_app(self, body: Json) -> App:
        """Create an app and place its machines, from a spec like the README's."""
        spec = parse(AppSpec, body, "app")
        app = self.platform.create_app(
            spec.name, org=spec.org, capacity_rps=spec.capacity_rps, base_latency=spec.base_latency
        )
        metadata = {
            "fly_platform_version": "v2",
            "fly_process_group": "app",
            "fly_release_id": self.platform.ids.release_id(),
            "fly_release_version": str(spec.release_version),
            **spec.metadata,
        }
        config = machine_config(
            spec.image or f"registry.fly.io/{spec.name}:deployment-{spec.release_version}",
            internal_port=spec.internal_port,
            health_path=spec.health_path,
            metadata=metadata,
            guest=spec.guest,
        )
        for region, state in spec.placements():
            self.platform.place_machine(app, region, config, state, spec.volume_gb)
        if spec.load:
            self.platform.set_load(spec.name, dict(spec.load))
        return app

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
                    "config": copy.deepcopy(machine.config),  # the truth, whatever the API may show
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
        load = parse(LoadSpec, {"load": await read_json(request)}, "load").load
        self.platform.set_load(name, dict(load))
        return json_response({"load": self.platform.app(name).load})

    # ------------------------------------------------------------ releases and images

    async def deploy(self, request: web.Request) -> web.Response:
        spec = parse(DeploySpec, await read_json(request), "deploy request")
        release = self.deployer.deploy(request.match_info["app"], spec)
        return json_response(release.to_json(), 202)

    async def releases(self, request: web.Request) -> web.Response:
        app = self.platform.app(request.match_info["app"])
        return json_response([release.to_json() for release in app.releases])

    async def list_images(self, _request: web.Request) -> web.Response:
        return json_response({image: vars(b) for image, b in self.platform.images.items()})

    async def set_image(self, request: web.Request) -> web.Response:
        image, behaviour = self.mark_image(await read_json(request))
        return json_response({"image": image, **vars(behaviour)})

    def mark_image(self, body: Json) -> tuple[str, ImageBehaviour]:
        """Say how an image's instances behave: {image, mode, and any ImageBehaviour field}."""
        spec = parse(ImageSpec, body, "image behaviour")
        behaviour = ImageBehaviour(**spec.behaviour_fields())
        self.platform.set_image(spec.image, behaviour)
        return spec.image, behaviour

    # ------------------------------------------------------------ faults

    async def list_faults(self, _request: web.Request) -> web.Response:
        return json_response(self.fault_list())

    def fault_list(self) -> list[Json]:
        outages = [
            {"kind": "region_outage", "region": o.region, "app": o.app, "mode": o.mode}
            for o in self.platform.outages
        ]
        capacity = [{"kind": "capacity", "region": r} for r in sorted(self.platform.capacity_errors)]
        reverts = [{"kind": "revert_update", "app": a, "count": n} for a, n in self.platform.revert_updates]
        return [f.to_json() for f in self.faults.faults] + outages + capacity + reverts

    async def add_fault(self, request: web.Request) -> web.Response:
        spec = parse_fault(await read_json(request))
        if isinstance(spec, ApiFaultSpec):
            if spec.endpoint != "*" and spec.endpoint not in self.endpoints:
                raise errors.bad_request(
                    f"bad fault: endpoint {spec.endpoint!r} is not one the simulator serves; "
                    f"expected * or one of {sorted(self.endpoints)}"
                )
            return json_response(self.faults.add(spec).to_json(), 201)
        if isinstance(spec, OutageSpec):
            self.platform.set_outage(Outage(region=spec.region, app=spec.app, mode=spec.mode))
            self.fleet.resync()
            await self.fleet.idle()
        elif isinstance(spec, CapacitySpec):
            self.platform.capacity_errors.add(spec.region)
        else:
            self.platform.revert_updates.append((spec.app, spec.count))
        return json_response(spec.model_dump(), 201)

    async def clear_faults(self, _request: web.Request) -> web.Response:
        self.faults.faults.clear()
        self.platform.clear_outages()
        self.platform.capacity_errors.clear()
        self.platform.revert_updates.clear()
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
