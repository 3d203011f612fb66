"""Releases as `fly deploy` makes them (fly-platform.md §2): leases, in-place updates, waits, no rollback.

rolling: machines sorted by id, `max_parallel` at a time; each one leased, updated with the new image and
  fly_release_id / fly_release_version metadata (a new instance_id), then, if it was running, waited for
  until started and, when it has checks, until they pass. The first failure stops the rollout: machines
  already updated stay on the new image, the rest stay on the old one, as flyctl leaves them.
immediate: every machine updated at once, nothing waited for.
canary: one extra machine (metadata fly_canary=true) on the new image, waited for, destroyed, then rolling.
A machine leased by someone else fails the release ("lease currently held by"), as it fails flyctl.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from typing import Any

from daemon.sim.errors import ApiError
from daemon.sim.model import Actor, Machine, Platform, Release
from daemon.sim.specs import DeploySpec
from daemon.sim.tasks import Background

DEPLOYER = Actor(owner="deploy@tokens.fly.io", source="deploy")
_CHECK_POLL = 0.05


class DeployFailedError(Exception):
    pass


class Deployer:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._background = Background()

    def deploy(self, app_name: str, request: DeploySpec) -> Release:
        app = self.platform.app(app_name)
        if any(release.status == "running" for release in app.releases):
            raise ApiError(409, f"a release of {app_name} is already running")
        version = max((r.version for r in app.releases), default=self._current_version(app_name)) + 1
        release = Release(
            id=self.platform.ids.release_id(),
            version=version,
            image=request.image,
            strategy=request.strategy,
            created_at=self.platform.clock.now(),
        )
        app.releases.append(release)
        self._background.spawn(self._run(app_name, release, request))
        return release

    async def stop(self) -> None:
        await self._background.stop()

    async def idle(self) -> None:
        await self._background.idle()

    def _current_version(self, app_name: str) -> int:
        versions = [
            int(v)
            for m in self.platform.machines_of(app_name)
            if (v := m.metadata.get("fly_release_version", "")).isdigit()
        ]
        return max(versions, default=0)

    async def _run(self, app_name: str, release: Release, request: DeploySpec) -> None:
        try:
            targets = sorted(
                (
                    m
                    for m in self.platform.machines_of(app_name)
                    if m.state not in {"destroyed", "destroying"} and m.metadata.get("fly_canary") != "true"
                ),
                key=lambda m: m.id,
            )
            if request.strategy == "canary" and targets:
                await self._canary(app_name, release, request, targets[0])
            if request.strategy == "immediate":
                for machine in targets:
                    self._update(app_name, machine, release, nonce=None)
            else:
                for start in range(0, len(targets), request.max_parallel):
                    chunk = targets[start : start + request.max_parallel]
                    await asyncio.gather(*(self._roll_one(app_name, m, release, request) for m in chunk))
            release.status = "complete"
        except (DeployFailedError, ApiError) as exc:
            release.status = "failed"
            release.error = str(exc)

    def _config_for(self, machine: Machine, release: Release) -> dict[str, Any]:
        config = copy.deepcopy(machine.config)
        config["image"] = release.image
        metadata = config.setdefault("metadata", {})
        metadata["fly_release_id"] = release.id
        metadata["fly_release_version"] = str(release.version)
        metadata.setdefault("fly_platform_version", "v2")
        metadata.setdefault("fly_process_group", "app")
        return config

    def _update(self, app_name: str, machine: Machine, release: Release, nonce: str | None) -> bool:
        """Update one machine; True when it was running and so will boot the new version."""
        was_running = machine.state in {"started", "starting", "failed"}
        body: dict[str, Any] = {
            "config": self._config_for(machine, release),
            "current_version": machine.instance_id,
        }
        if not was_running:
            body["skip_launch"] = True
        self.platform.update_machine(app_name, machine.id, body, nonce, DEPLOYER)
        release.machines.append(machine.id)
        return was_running

    async def _roll_one(self, app_name: str, machine: Machine, release: Release, request: DeploySpec) -> None:
        try:
            lease = self.platform.acquire_lease(
                app_name, machine.id, request.lease_ttl, "fly deploy", None, DEPLOYER
            )
        except ApiError as exc:
            raise DeployFailedError(f"machine {machine.id}: {exc.message}") from None
        nonce = lease["data"]["nonce"]
        # flyctl refreshes its leases every (ttl - 1) / 3 seconds while it works on the machine
        refresher = asyncio.ensure_future(self._keep_lease(app_name, machine, nonce, request.lease_ttl))
        try:
            if self._update(app_name, machine, release, nonce):
                await self._await_healthy(machine, request)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            with contextlib.suppress(ApiError):
                self.platform.release_lease(app_name, machine.id, nonce, DEPLOYER)

    async def _keep_lease(self, app_name: str, machine: Machine, nonce: str, ttl: int) -> None:
        period = max((ttl - 1) / 3.0, 0.5)
        while True:
            await self.platform.clock.sleep(period)
            with contextlib.suppress(ApiError):
                self.platform.acquire_lease(app_name, machine.id, ttl, "fly deploy", nonce, DEPLOYER)

    async def _await_healthy(self, machine: Machine, request: DeploySpec) -> None:
        clock = self.platform.clock
        deadline = clock.now() + request.wait_timeout
        version = machine.instance_id
        while True:
            if machine.instance_id != version:
                raise DeployFailedError(f"machine {machine.id} was replaced while the release waited for it")
            if machine.state == "failed":
                raise DeployFailedError(
                    f"machine {machine.id} failed to start the new version (state failed)"
                )
            if machine.state == "started":
                checks = self.platform.check_statuses(machine)
                if not request.wait_checks or all(c["status"] == "passing" for c in checks):
                    return
            if clock.now() >= deadline:
                raise DeployFailedError(
                    f"machine {machine.id} did not become healthy within {request.wait_timeout:g}s "
                    f"(state {machine.state})"
                )
            await clock.sleep(_CHECK_POLL)

    async def _canary(self, app_name: str, release: Release, request: DeploySpec, model: Machine) -> None:
        config = self._config_for(model, release)
        config["metadata"]["fly_canary"] = "true"
        config.pop("mounts", None)
        created = self.platform.create_machine(
            app_name,
            {"config": config, "region": model.region, "skip_service_registration": True},
            DEPLOYER,
        )
        canary = self.platform.machine(app_name, created["id"])
        release.machines.append(canary.id)
        try:
            await self._await_healthy(canary, request)
        except DeployFailedError as exc:
            raise DeployFailedError(f"canary {exc}") from None
        self.platform.destroy_machine(app_name, canary.id, True, None, DEPLOYER)
