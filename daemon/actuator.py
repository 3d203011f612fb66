"""Carries out a plan through the Machines API client, under leases, with dry-run.

The choices (which machines, from what to clone) come from core/machines.py; this module only does
the I/O, in the safe order:
- every mutation happens under a short lease; a machine whose lease someone else holds (a deploy, a
  human) is skipped and reported, never fought;
- scale up starts parked machines of the current release, then creates clones of a healthy machine of the
  current release (mounts of attached volumes and standbys dropped), created already leased so that no one
  else touches them while they boot; capacity errors end the creates in that region and are reported;
- scale down stops (or suspends) the least useful machines; destroys only when the policy says so and the
  machine has no volume (one with a volume is stopped instead), and only after a graceful stop;
- a rollout updates machines to target configs `max_parallel` at a time, waits for started, passing checks
  and the new instance, then verifies the machine really runs the target image (Fly can silently revert an
  update); the first failure stops it;
- dry run reads, decides and reports what it would do, and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, assert_never

from daemon.clock import Clock
from daemon.core.machines import (
    MachineView,
    clone_source,
    current_release,
    eligible,
    to_start,
    to_take_down,
)
from daemon.core.plan import (
    Action,
    ActionResult,
    Destroy,
    MachineStep,
    Outcome,
    Rollout,
    RolloutTarget,
    ScaleDown,
    ScaleDownMode,
    ScaleUp,
    summarise,
)
from daemon.fly import errors
from daemon.fly.client import IDEMPOTENCY_KEY, HeldLease, MachinesClient
from daemon.fly.models import ImageRef, Lease, Machine, MachineConfig

log = logging.getLogger(__name__)


LEASED_BY_OTHERS = "leased by someone else"
ALREADY_AT_TARGET = "already runs the target config"


def _held_by_others(steps: Sequence[MachineStep]) -> bool:
    return any(s.outcome is Outcome.SKIPPED and s.reason.startswith(LEASED_BY_OTHERS) for s in steps)


class VerificationFailedError(Exception):
    """The machine does not run what it was just updated to."""


class BootFailedError(Exception):
    """The machine ended `failed` instead of started (its image crashed at boot)."""


CREATED_BY = "flywatch_created"  # metadata on machines flywatch created, so later steps can tell them apart
_CHECK_POLL = 1.0
# Fly boots these after an update (flyctl's shouldSkipLaunch); stopped, suspended and created ones stay parked
_LAUNCHED_BY_UPDATE = frozenset({"started", "starting", "failed"})


def view_of(machine: Machine) -> MachineView:
    return MachineView(
        id=machine.id,
        region=machine.region,
        state=machine.state,
        image=machine.image,
        release_version=machine.release_version,
        created_at=machine.created_at,
        # a machine whose config declares no checks has no Fly verdict to wait for: it counts as healthy
        healthy=machine.checks_passing if machine.declares_checks else True,
        has_volume=machine.has_volume,
        process_group=machine.process_group or "app",
        host_ok=machine.host_status == "ok",
        canary=machine.is_canary,
    )


def _effective_mode(action: ScaleDown, has_volume: bool) -> ScaleDownMode:
    if action.mode is ScaleDownMode.DESTROY and has_volume:
        return ScaleDownMode.STOP  # a machine with a volume is never destroyed: its data would go with it
    return action.mode


def _declares_checks(config: MachineConfig | None) -> bool:
    if config is None:
        return False
    return bool(config.checks) or any(service.get("checks") for service in config.services)


def clone_config(source: MachineConfig) -> MachineConfig:
    """The source's config for a new machine: its volumes' mounts and standbys dropped, our marks set."""
    metadata = {k: v for k, v in source.metadata.items() if k != IDEMPOTENCY_KEY}
    metadata[CREATED_BY] = "true"
    return source.copy_with(mounts=[], standbys=[], metadata=metadata)


class Actuator:
    def __init__(
        self,
        client: MachinesClient,
        clock: Clock,
        *,
        dry_run: bool = False,
        lease_ttl: int = 30,
        wait_timeout: float = 120.0,
        max_concurrency: int = 8,
    ) -> None:
        self._client = client
        self._clock = clock
        self.dry_run = dry_run
        self._lease_ttl = lease_ttl
        self._wait_timeout = wait_timeout
        self._slots = asyncio.Semaphore(max_concurrency)

    async def execute(self, plan: Sequence[Action]) -> list[ActionResult]:
        """Carry out every action, in plan order. Apps run at once; one app's actions run one after the
        other, because the app-wide rules (the last machine of the current release, region minimums) hold
        only if no two of its actions choose machines at the same time. Never raises, but NotOwner (as
        run)."""
        by_app: dict[str, list[int]] = {}
        for index, action in enumerate(plan):
            by_app.setdefault(action.app, []).append(index)
        results: list[ActionResult | None] = [None] * len(plan)

        not_ours: list[errors.NotOwner] = []

        async def run_app(indexes: list[int]) -> None:
            for index in indexes:
                try:
                    results[index] = await self.run(plan[index])
                except errors.NotOwner as exc:
                    not_ours.append(exc)  # the app is no longer ours: none of its actions go on
                    return

        await asyncio.gather(*(run_app(indexes) for indexes in by_app.values()))
        if not_ours:
            raise not_ours[0]
        return [result for result in results if result is not None]

    async def run(self, action: Action) -> ActionResult:
        """One action, to its end. Whatever goes wrong is the action's failure, with why; but an app that
        is no longer this instance's (NotOwner, raised before anything was sent) ends the action at once,
        raised: no step after it is tried, and nothing of it is this instance's to record."""
        try:
            if isinstance(action, ScaleUp):
                result = await self._scale_up(action)
            elif isinstance(action, ScaleDown):
                result = await self._scale_down(action)
            elif isinstance(action, Rollout):
                result = await self._rollout(action)
            elif isinstance(action, Destroy):
                result = await self._destroy(action)
            else:
                assert_never(action)
        except errors.NotOwner as exc:
            where = f"{action.app}/{action.region or '-'}"
            log.info("action %s %s: stopped, not sent: %s", action.kind, where, exc)
            raise
        except errors.FlyApiError as exc:
            result = ActionResult(action=action, outcome=Outcome.FAILED, reason=f"Machines API: {exc}")
        except Exception as exc:
            log.exception("action %s on %s failed unexpectedly", action.kind, action.app)
            result = ActionResult(action=action, outcome=Outcome.FAILED, reason=f"internal error: {exc!r}")
        log.info(
            "action %s %s/%s: %s (%s)",
            action.kind,
            action.app,
            action.region or "-",
            result.outcome.value,
            result.reason,
        )
        return result

    # ------------------------------------------------------------------ helpers

    async def _observe(self, app: str, process_group: str) -> tuple[list[Machine], list[MachineView]]:
        machines = await self._client.list_machines(app, metadata={"fly_process_group": process_group})
        if not machines:
            # older machines may lack the metadata: list them all and filter ourselves
            machines = await self._client.list_machines(app)
        by_id = {m.id: m for m in machines}
        views = eligible((view_of(m) for m in machines), process_group)
        return [by_id[v.id] for v in views], views

    async def _leased(
        self,
        app: str,
        machine: Machine,
        operation: str,
        work: Callable[[HeldLease], Awaitable[str]],
    ) -> MachineStep:
        """Run `work(held)` under the machine's lease. A lease someone else holds when we ask for it skips
        the machine (never fought); `work` calls `held.check()` before each change it makes."""
        try:
            async with self._slots:
                try:
                    lease = await self._client.acquire_lease(app, machine.id, ttl=self._lease_ttl)
                except errors.LeaseHeld as exc:
                    why = f"{LEASED_BY_OTHERS}: {exc.message}"
                    return MachineStep(machine.id, operation, Outcome.SKIPPED, why, machine.region)
                async with self._client.holding(app, machine.id, lease, ttl=self._lease_ttl) as held:
                    detail = await work(held)
                    held.check()
                    return MachineStep(machine.id, operation, Outcome.DONE, detail, machine.region)
        except (errors.FlyApiError, VerificationFailedError, BootFailedError) as exc:
            return MachineStep(
                machine.id, operation, Outcome.FAILED, str(exc), machine.region, retryable=_passing(exc)
            )

    def _dry(self, action: Action, would: list[str]) -> ActionResult:
        text = "; ".join(would) if would else "nothing to do"
        return ActionResult(
            action=action, outcome=Outcome.SKIPPED, reason=f"dry run: would {text}", dry_run=True
        )

    # ------------------------------------------------------------------ scale up

    async def _scale_up(self, action: ScaleUp) -> ActionResult:
        machines, views = await self._observe(action.app, action.process_group)
        release = current_release(views)
        if release is None or action.count <= 0:
            return ActionResult(action, Outcome.SKIPPED, "no machine of the app to start or clone from")
        by_id = {m.id: m for m in machines}
        starts = to_start(views, action.region, release, action.count)
        missing = action.count - len(starts)
        source = clone_source(views, action.region, release) if missing > 0 else None
        if self.dry_run:
            would = [f"start {m.id} ({m.state})" for m in starts]
            if missing > 0:
                origin = (
                    f"clones of {source.id}" if source else "clones (but no healthy machine to clone from)"
                )
                would.append(f"create {missing} {origin} in {action.region}")
            return self._dry(action, would)
        steps = await _each(self._start(action.app, by_id[m.id]) for m in starts)
        missing = action.count - sum(1 for s in steps if s.outcome is Outcome.DONE)
        if _held_by_others(steps):
            # someone (a deploy) is working on this app: clones made now would race it; wait a tick
            return summarise(action, steps, action.count, "not creating machines while others hold leases")
        if missing > 0:
            if source is None:
                source = clone_source(views, action.region, release)
            if source is None:
                # machines are needed and none can be made safely: that is a failure, not a skip
                why = (
                    f"no healthy started machine of release {release.version} ({release.image}) to clone from"
                )
                steps.append(MachineStep("", "create", Outcome.FAILED, why, action.region))
            else:
                steps.extend(await self._create(action, by_id[source.id], missing))
        return summarise(action, steps, action.count)

    async def _start(self, app: str, machine: Machine) -> MachineStep:
        async def work(held: HeldLease) -> str:
            held.check()
            try:
                await self._client.start_machine(app, machine.id, nonce=held.nonce)
            except errors.PreconditionFailed as exc:
                # a retried start whose first try worked is refused as "already started": that is done
                if "current state: 'started'" not in exc.message:
                    raise
            await self._await_started(app, machine.id, None)
            return f"started from {machine.state}"

        return await self._leased(app, machine, "start", work)

    async def _create(self, action: ScaleUp, source: Machine, count: int) -> list[MachineStep]:
        config = source.config
        if config is None:
            return [
                MachineStep(
                    "", "create", Outcome.FAILED, f"clone source {source.id} has no config", action.region
                )
            ]
        steps = []
        for _ in range(count):
            step = await self._create_one(action, source, clone_config(config))
            steps.append(step)
            if step.outcome is Outcome.FAILED and "capacity" in step.reason:
                # the region is full: more creates would fail the same way
                left = count - len(steps)
                if left:
                    why = f"not tried: {action.region} has no capacity"
                    steps.extend(
                        MachineStep("", "create", Outcome.FAILED, why, action.region) for _ in range(left)
                    )
                break
        return steps

    async def _create_one(self, action: ScaleUp, source: Machine, config: MachineConfig) -> MachineStep:
        try:
            async with self._slots:
                created = await self._client.create_machine(
                    action.app, config, region=action.region, lease_ttl=self._lease_ttl
                )
        except errors.InsufficientCapacity as exc:
            why = f"insufficient capacity in {action.region}: {exc.message}"
            return MachineStep("", "create", Outcome.FAILED, why, action.region)
        except errors.FlyApiError as exc:
            return MachineStep("", "create", Outcome.FAILED, str(exc), action.region)
        if created.nonce is None:
            # created, but the lease it was created with is unknown: it boots on its own all the same
            return await self._boot_clone(action, source, created, None)
        lease = Lease(nonce=created.nonce, version=created.instance_id)
        async with self._client.holding(action.app, created.id, lease, ttl=self._lease_ttl) as held:
            return await self._boot_clone(action, source, created, held.nonce)

    async def _boot_clone(
        self, action: ScaleUp, source: Machine, created: Machine, nonce: str | None
    ) -> MachineStep:
        """Wait for a new clone to start; one that cannot boot is ours to clean up (left behind, failed
        clones would pile up)."""
        try:
            await self._await_started(action.app, created.id, created.instance_id)
        except (errors.FlyApiError, BootFailedError) as exc:
            why = f"created but not started: {exc}"
            try:
                await self._client.destroy_machine(action.app, created.id, force=True, nonce=nonce)
                why += "; destroyed it"
            except errors.FlyApiError as cleanup:
                why += f"; could not destroy it: {cleanup}"
            return MachineStep(created.id, "create", Outcome.FAILED, why, action.region)
        return MachineStep(created.id, "create", Outcome.DONE, f"cloned from {source.id}", action.region)

    # ------------------------------------------------------------------ scale down

    async def _scale_down(self, action: ScaleDown) -> ActionResult:
        machines, views = await self._observe(action.app, action.process_group)
        release = current_release(views)
        victims, note = to_take_down(views, action.region, action.count, action.min_machines, release)
        by_id = {m.id: m for m in machines}
        if self.dry_run:
            would = [f"{_effective_mode(action, v.has_volume).value} {v.id}" for v in victims]
            return self._dry(action, would + ([note] if note else []))
        # a machine someone else holds is skipped, and no other goes in its place: never work around a deploy
        steps = await _each(self._take_down(action, by_id[v.id]) for v in victims)
        if victims and len(victims) < action.count:
            # a safety rule held some back: taking down the rest is all this action may do, not a failure
            note = f"only {len(victims)} of {action.count} may go: {note}"
            return summarise(action, steps, len(victims), note)
        return summarise(action, steps, action.count, note)

    async def _take_down(self, action: ScaleDown, machine: Machine) -> MachineStep:
        app = action.app
        mode = _effective_mode(action, machine.has_volume)

        async def work(held: HeldLease) -> str:
            # what was listed may have changed before the lease was ours: look again before acting
            now = await self._client.get_machine(app, machine.id)
            if now.state != "started" or now.instance_id != machine.instance_id:
                raise VerificationFailedError(
                    f"changed since it was chosen (now {now.state}, instance {now.instance_id}): left alone"
                )
            if mode is ScaleDownMode.SUSPEND:
                try:
                    held.check()
                    await self._client.suspend_machine(app, machine.id, nonce=held.nonce)
                    await self._client.wait(
                        app, machine.id, "suspended", timeout=self._wait_timeout, version=machine.instance_id
                    )
                except errors.PreconditionFailed as exc:
                    await self._stop(app, machine, held)
                    return f"stopped (suspend refused: {exc.message})"
                else:
                    return "suspended"
            await self._stop(app, machine, held)
            if mode is ScaleDownMode.DESTROY:
                held.check()
                # NotFound: a retried destroy whose first try worked; it is gone, as asked
                with contextlib.suppress(errors.NotFound):
                    await self._client.destroy_machine(app, machine.id, nonce=held.nonce)
                return "stopped, then destroyed"
            if action.mode is ScaleDownMode.DESTROY:
                return "stopped (it has a volume, so it is not destroyed)"
            return "stopped"

        return await self._leased(app, machine, mode.value, work)

    async def _stop(self, app: str, machine: Machine, held: HeldLease) -> None:
        held.check()
        await self._client.stop_machine(app, machine.id, nonce=held.nonce)
        await self._client.wait(
            app, machine.id, "stopped", timeout=self._wait_timeout, version=machine.instance_id
        )

    # ------------------------------------------------------------------ rollout

    async def _rollout(self, action: Rollout) -> ActionResult:
        if self.dry_run:
            return self._dry(action, [f"update {t.machine_id} to {t.image}" for t in action.targets])
        steps: list[MachineStep] = []
        stopped_by: str = ""
        for start in range(0, len(action.targets), max(action.max_parallel, 1)):
            chunk = action.targets[start : start + max(action.max_parallel, 1)]
            if stopped_by:
                steps.extend(MachineStep(t.machine_id, "update", Outcome.SKIPPED, stopped_by) for t in chunk)
                continue
            results = await _each(self._update_one(action.app, target) for target in chunk)
            steps.extend(results)
            failed = [s for s in results if s.outcome is Outcome.FAILED]
            if failed:
                stopped_by = f"not tried: the rollout stopped after {failed[0].machine_id} failed"
        return summarise(action, steps, len(action.targets))

    async def _update_one(self, app: str, target: RolloutTarget) -> MachineStep:
        try:
            machine = await self._client.get_machine(app, target.machine_id)
        except errors.FlyApiError as exc:
            return MachineStep(target.machine_id, "update", Outcome.FAILED, str(exc), retryable=_passing(exc))
        wanted = MachineConfig.model_validate(dict(target.config))
        launches = machine.state in _LAUNCHED_BY_UPDATE
        if machine.config is None:
            # Fly cannot reach its host and shows only part of its config: an update sends the whole
            # config, so nothing is sent until the host answers again
            why = f"host {machine.host_status}: its config is not known"
            return MachineStep(machine.id, "update", Outcome.SKIPPED, why, machine.region)
        if machine.config.to_api() == wanted.to_api():
            try:
                await self._see_through(app, machine, target)
            except (errors.FlyApiError, VerificationFailedError, BootFailedError) as exc:
                return MachineStep(
                    machine.id, "update", Outcome.FAILED, str(exc), machine.region, retryable=_passing(exc)
                )
            return MachineStep(machine.id, "update", Outcome.SKIPPED, ALREADY_AT_TARGET, machine.region)

        async def work(held: HeldLease) -> str:
            held.check()
            updated = await self._client.update_machine(
                app, machine.id, wanted, current_version=machine.instance_id, nonce=held.nonce
            )
            if launches:
                await self._await_started(app, machine.id, updated.instance_id)
                await self._await_checks(app, machine.id)
            else:
                # it stays parked, but only once the update has settled does the machine say what it runs
                await self._client.wait(
                    app, machine.id, "settled", timeout=self._wait_timeout, version=updated.instance_id
                )
            return await self._verify(app, machine.id, updated.instance_id, target.image)

        return await self._leased(app, machine, "update", work)

    # ------------------------------------------------------------------ destroy

    async def _destroy(self, action: Destroy) -> ActionResult:
        if self.dry_run:
            return self._dry(action, [f"destroy {mid}" for mid in action.machine_ids])
        steps = await _each(self._destroy_one(action.app, mid) for mid in action.machine_ids)
        return summarise(action, steps, len(action.machine_ids))

    async def _destroy_one(self, app: str, machine_id: str) -> MachineStep:
        try:
            machine = await self._client.get_machine(app, machine_id)
        except errors.NotFound:
            return MachineStep(machine_id, "destroy", Outcome.DONE, "already gone")
        except errors.FlyApiError as exc:
            return MachineStep(machine_id, "destroy", Outcome.FAILED, str(exc))
        if machine.state in {"destroyed", "destroying"}:
            return MachineStep(machine_id, "destroy", Outcome.DONE, "already gone", machine.region)

        async def work(held: HeldLease) -> str:
            held.check()
            # NotFound: a retried destroy whose first try worked; it is gone, as asked
            with contextlib.suppress(errors.NotFound):
                await self._client.destroy_machine(app, machine_id, force=True, nonce=held.nonce)
            return f"destroyed (was {machine.state})"

        return await self._leased(app, machine, "destroy", work)

    async def _see_through(self, app: str, machine: Machine, target: RolloutTarget) -> None:
        """A machine updated already (by us before a restart, say) but perhaps never seen through: done only
        once it has settled, and, if it runs, is started with passing checks, on the target image. Nothing
        is changed."""
        if machine.state == "replacing":
            await self._client.wait(
                app, machine.id, "settled", timeout=self._wait_timeout, version=machine.instance_id
            )
            machine = await self._client.get_machine(app, machine.id)
        if machine.state in _LAUNCHED_BY_UPDATE:
            await self._await_started(app, machine.id, machine.instance_id)
            await self._await_checks(app, machine.id)
        await self._verify(app, machine.id, machine.instance_id, target.image)

    async def _await_started(self, app: str, machine_id: str, version: str | None) -> None:
        """Until this version of the machine is started; if it ends `failed`, fail now, not at the timeout."""
        result = await self._client.wait(
            app, machine_id, ("started", "failed"), timeout=self._wait_timeout, version=version
        )
        state = result.state or (await self._client.get_machine(app, machine_id)).state  # docs answer {ok}
        if state != "started":
            raise BootFailedError(
                f"machine {machine_id} did not start: it is {state} (instance {version or '-'})"
            )

    async def _await_checks(self, app: str, machine_id: str) -> None:
        """Until every Fly check of the machine passes. Checks that the config declares must have reported:
        just after a start Fly shows none yet, and that is not a pass. A machine with no checks passes."""
        deadline = self._clock.now() + self._wait_timeout
        while True:
            machine = await self._client.get_machine(app, machine_id)
            declared = _declares_checks(machine.config)
            if machine.checks_passing is True or (not machine.checks and not declared):
                return
            if self._clock.now() >= deadline:
                states = ", ".join(f"{c.name}={c.status}" for c in machine.checks)
                raise errors.RequestTimeout(
                    "Machines_show", f"checks not passing after {self._wait_timeout:g}s: {states}"
                )
            await self._clock.sleep(_CHECK_POLL)

    async def _verify(self, app: str, machine_id: str, instance_id: str, image: str) -> str:
        """Fly can silently revert an update: read the machine back and check what it really runs."""
        machine = await self._client.get_machine(app, machine_id)
        running = machine.image_ref.ref if machine.image_ref is not None else ""
        if running and machine.image_ref is not None and not _same_image(machine.image_ref, image):
            # image_ref is what the machine really runs, whatever its config says
            raise VerificationFailedError(
                f"update reverted: Fly reports it runs {running}, not {image} "
                f"(instance {machine.instance_id})"
            )
        if machine.image != image:
            raise VerificationFailedError(
                f"update reverted: Fly reports image {machine.image}, not {image} "
                f"(instance {machine.instance_id})"
            )
        if machine.instance_id != instance_id:
            raise VerificationFailedError(
                f"update reverted: instance {machine.instance_id} is not the updated {instance_id}"
            )
        return f"runs {image} as instance {instance_id}"


_PASSING = (
    errors.ServerError,
    errors.RateLimited,
    errors.TransportError,
    errors.BadResponse,
    errors.LeaseLost,
    errors.VersionConflict,
)


async def _each(steps: Iterable[Awaitable[MachineStep]]) -> list[MachineStep]:
    """Run steps at once and wait for every one of them, also when one raises (NotOwner: the app is no
    longer ours): no step is left running on its own once its action is over, and the first error raised
    is raised then."""
    done = await asyncio.gather(*steps, return_exceptions=True)
    for result in done:
        if isinstance(result, BaseException):
            raise result
    return [result for result in done if not isinstance(result, BaseException)]


def _passing(exc: Exception) -> bool:
    """A failure of the way to the machine, not of the machine: tried again later, it may well work."""
    return isinstance(exc, _PASSING)


def _same_image(ref: ImageRef, image: str) -> bool:
    """Whether `image_ref` names `image`: the same repository and tag (or digest), the registry written
    out or not (Fly writes docker.io out; a config may leave it implicit)."""
    name, _, digest = image.partition("@")
    if digest and ref.digest:
        return ref.digest == digest
    registry, slash, rest = name.partition("/")
    if not (slash and ("." in registry or ":" in registry or registry == "localhost")):
        registry, rest = "docker.io", name
    repository, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        repository, tag = rest, "latest"
    if digest:
        repository, tag = rest, ""  # pinned by digest, which Fly did not report: the name is all to compare
    if registry == "docker.io" and "/" not in repository:
        repository = f"library/{repository}"
    ref_repository = ref.repository
    if (ref.registry or "docker.io") == "docker.io" and "/" not in ref_repository:
        ref_repository = f"library/{ref_repository}"
    if digest:
        return (ref.registry or "docker.io", ref_repository) == (registry, repository)
    return (ref.registry or "docker.io", ref_repository, ref.tag or "latest") == (registry, repository, tag)


def results_json(results: Sequence[ActionResult]) -> list[dict[str, Any]]:
    """Plain JSON of results, for logs and the state store."""
    return [
        {
            "kind": r.action.kind,
            "app": r.action.app,
            "region": r.action.region,
            "outcome": r.outcome.value,
            "reason": r.reason,
            "dry_run": r.dry_run,
            "steps": [
                {
                    "machine": s.machine_id,
                    "operation": s.operation,
                    "outcome": s.outcome.value,
                    "reason": s.reason,
                }
                for s in r.steps
            ],
        }
        for r in results
    ]
