"""The simulator as one object: the platform, its fleet, its deployer and the HTTP server in front.

async with SimServer(settings, clock) as sim:   # Machines API at sim.api_url, control at sim.url/_sim
    sim.control.build_app({...})
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml
from aiohttp import web

from daemon.clock import Clock, SystemClock
from daemon.sim.api import Counters, Exchange, MachinesApi
from daemon.sim.control import Control
from daemon.sim.deploy import Deployer
from daemon.sim.errors import ApiError
from daemon.sim.faults import FaultBook
from daemon.sim.fleet import Fleet
from daemon.sim.model import Platform, SimSettings

log = logging.getLogger(__name__)
SCENARIO_FIELDS = {"settings", "apps", "images"}


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the key."""


class SimServer:
    def __init__(
        self, settings: SimSettings | None = None, clock: Clock | None = None, *, ip_seed: int | None = None
    ) -> None:
        self.clock = clock or SystemClock()
        self.platform = Platform(self.clock, settings)
        self.fleet = Fleet(self.platform, ip_seed=ip_seed)
        self.deployer = Deployer(self.platform)
        self.faults = FaultBook()
        self.counters = Counters()
        self.observers: list[Callable[[Exchange], None]] = []
        self.api = MachinesApi(self.platform, self.faults, self.counters, self.observers)
        self.control = Control(
            self.platform, self.fleet, self.deployer, self.faults, self.counters, self.api.endpoints()
        )
        self._web = web.Application(middlewares=[self.api.middleware, self.control.middleware])
        self._web.add_routes(self.api.routes())
        self._web.add_routes(self.control.routes())
        # A request held by a timeout fault never ends by itself: stop cancels it after a short grace.
        self._runner = web.AppRunner(
            self._web, access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=0.5
        )
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp exposes the bound port only here
        sockets = getattr(server, "sockets", None) or []
        self.host = host
        self.port = sockets[0].getsockname()[1] if sockets else port
        await self.fleet.start()

    async def stop(self) -> None:
        await self.deployer.stop()
        await self.fleet.stop()
        await self._runner.cleanup()
        for app in self.platform.apps.values():
            for machine in app.machines.values():
                if machine.timer is not None:
                    machine.timer.cancel()

    async def __aenter__(self) -> Self:
        await self.start(self.host, self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def settle(self) -> None:
        """Wait until listeners and rollouts have caught up with the world."""
        await self.fleet.idle()

    async def load_scenario(self, scenario: dict[str, Any], source: str = "<scenario>") -> None:
        """Build the apps and mark the images a scenario describes."""
        if not isinstance(scenario, dict):
            raise ScenarioError(f"{source}: the top level must be a mapping with {sorted(SCENARIO_FIELDS)}")
        unknown = set(scenario) - SCENARIO_FIELDS
        if unknown:
            raise ScenarioError(
                f"{source}: unknown key(s) {sorted(unknown)}; expected {sorted(SCENARIO_FIELDS)}"
            )
        for index, spec in enumerate(scenario.get("apps") or []):
            try:
                self.control.build_app(spec if isinstance(spec, dict) else {})
            except ApiError as exc:
                raise ScenarioError(f"{source}: apps[{index}]: {exc.message}") from None
        for index, spec in enumerate(scenario.get("images") or []):
            try:
                self.control.mark_image(spec if isinstance(spec, dict) else {})
            except ApiError as exc:
                raise ScenarioError(f"{source}: images[{index}]: {exc.message}") from None
        await self.fleet.idle()


def read_scenario(path: Path | None) -> tuple[dict[str, Any], str]:
    """The scenario at `path`, or the embedded default one. Errors name the file and the problem."""
    if path is None:
        text = resources.files("daemon.sim").joinpath("default.yaml").read_text(encoding="utf-8")
        source = "embedded default scenario"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: the top level must be a mapping with {sorted(SCENARIO_FIELDS)}")
    return data, source


def settings_from(scenario: dict[str, Any], source: str, **overrides: Any) -> SimSettings:
    raw = scenario.get("settings") or {}
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: settings must be a mapping")
    known = set(SimSettings.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ScenarioError(f"{source}: settings: unknown key(s) {sorted(unknown)}; expected {sorted(known)}")
    merged = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return SimSettings(**merged)
    except TypeError as exc:
        raise ScenarioError(f"{source}: settings: {exc}") from None
