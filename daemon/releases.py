"""The release watch and rollback orchestration: the I/O around core/release_watch.py.

Once per app tick, with the tick's machine list and health verdicts: count each machine's traffic for the
release it runs (the new release's and the known-good one's, as its baseline), keep the known-good record
complete (a machine already updated by the next release has its old config fetched from GET /versions), let
the core judge, then carry out what it says: a rollback as chunks of `max_parallel` in-place updates back to
each machine's known-good config through the actuator (under leases, waiting for started and checks,
verifying the image), and the bad release's canaries destroyed.

Durability: the watch's state (known-good record, verdicts, the rollback and its progress) is one document
per app in the state store, written before each chunk is changed and after it. A daemon killed mid-rollback
resumes from it: the machine list says which machines still run the bad release, so a machine already
reverted is never touched again (the actuator also skips one that already runs its target config).

A deploy that still holds leases on machines to revert is waited for (`lease_wait`); then only the machines
nobody else holds are reverted and the report says which were not (they are reverted once they are free).
Every event goes to the release history (`flywatch releases APP`), the log, and the alert webhooks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import Any

from daemon.actuator import ALREADY_AT_TARGET, LEASED_BY_OTHERS, Actuator
from daemon.alerts import Alert, Alerter
from daemon.clock import Clock
from daemon.config import AppPolicy
from daemon.core.health import Verdict
from daemon.core.plan import Destroy, Outcome, Rollout, RolloutTarget
from daemon.core.release_watch import (
    FINAL,
    Event,
    Hold,
    Policy,
    Rollback,
    RollbackState,
    WatchState,
    advance,
    finish_rollback,
    hold,
    start_rollback,
)
from daemon.core.releases import Thresholds
from daemon.core.rollback import (
    KnownGood,
    MachineRelease,
    ReleaseKey,
    RevertTarget,
    config_from_versions,
    known_good,
    missing_configs,
    plan_rollback,
    release_of,
    runs,
)
from daemon.core.traffic import Traffic
from daemon.fly import errors
from daemon.fly.client import MachinesClient
from daemon.fly.models import Machine
from daemon.sources.health import AppHealth
from daemon.sources.traffic import TrafficReader, TrafficSpec
from daemon.store.base import FencedError, Fences, Store, no_fence
from daemon.telemetry.metrics import ReleaseMetrics

log = logging.getLogger("flywatch.releases")
RELEASES = "releases"  # store namespace: one WatchState document per app
HISTORY = "release_history"  # store stream: every release event, keyed by app
_CRASH_GRACE = 60.0  # seconds before a release's first sighting in which its machines' exits count
_BASELINE_WINDOW = 600.0  # seconds of the known-good release's traffic kept as its baseline


class RollbackRequestError(ValueError):
    """A rollback asked for by hand that cannot be taken; the message says why."""


def thresholds(policy: AppPolicy) -> Thresholds:
    release = policy.release
    return Thresholds(
        bake=release.bake,
        max_error_ratio=release.max_error_ratio,
        max_p95_latency=release.max_p95_latency,
        max_unhealthy_ratio=release.max_unhealthy_ratio,
        min_requests=release.min_requests,
    )


def traffic_spec(policy: AppPolicy) -> TrafficSpec:
    traffic = policy.release.traffic
    return TrafficSpec(
        source=traffic.source,
        port=traffic.port,
        path=traffic.path,
        requests=traffic.requests,
        status_label=traffic.status_label,
        latency=traffic.latency,
    )


def crashed(machine: Machine, since: float) -> bool:
    """Failed, or exited non-zero since its current config was launched and no earlier than `since` (the
    release's first sighting, less a grace): an old exit of a machine a rollback never touched, or an OOM
    weeks ago, is no crash of the release judged now. Events are newest first."""
    if machine.state == "failed":
        return True
    for event in machine.events:
        if event.type in {"update", "launch"} or event.timestamp / 1000.0 < since:
            return False
        if event.type == "exit":
            exit_event = event.request.get("exit_event") or {}
            if not isinstance(exit_event, dict) or exit_event.get("requested_stop"):
                continue  # a stop someone asked for (autostop, a scale-down) ends with a signal: no crash
            code = exit_event.get("exit_code")
            if isinstance(code, int) and code != 0:
                return True
    return False


def view(machine: Machine, health: AppHealth | None, since: float) -> MachineRelease:
    config = machine.known_config
    verdict = health.machines.get(machine.id) if health is not None else None
    healthy = None
    if verdict is not None and not verdict.unreachable:  # an unreachable host is an outage, not the release
        healthy = {Verdict.HEALTHY: True, Verdict.UNHEALTHY: False}.get(verdict.verdict)
    elif verdict is None and machine.host_status == "ok" and machine.state == "started":
        # not probed (a deploy's canary, which the health watch leaves out): Fly's own checks say it
        healthy = machine.checks_passing
    return MachineRelease(
        id=machine.id,
        region=machine.region,
        state=machine.state,
        config=config.to_api() if config is not None else {"image": machine.image},
        process_group=machine.process_group or "app",
        healthy=healthy,
        crashed=crashed(machine, since),
        complete=machine.config is not None,
    )


class ReleaseWatch:
    def __init__(
        self,
        client: MachinesClient,
        actuator: Actuator,
        traffic: TrafficReader,
        store: Store,
        clock: Clock,
        metrics: ReleaseMetrics,
        alerter: Alerter | None = None,
        fence: Fences = no_fence,
    ) -> None:
        self._fence = fence  # every write about an app, but a rollback asked for by hand, is fenced
        self._client = client
        self._actuator = actuator
        self._traffic = traffic
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._alerter = alerter
        self._baseline: dict[str, deque[tuple[float, int, str, Traffic]]] = {}
        self._looked_up: set[tuple[str, str, int]] = set()  # (app, machine, version) searched in /versions
        self._shown: dict[str, tuple[str, str, str]] = {}  # app -> (version, image, verdict) in the gauges
        self._shown_before: dict[str, tuple[str, str, str]] = {}
        self._traffic_errors: dict[str, dict[str, str]] = {}
        # traffic of a release counted in the tick that first sees it, before it is the watched one
        self._unclaimed: dict[str, dict[int, dict[str, Traffic]]] = {}
        self._pending: list[tuple[str, dict[str, Any]]] = []  # events told, not yet in the history
        self.status: dict[str, dict[str, Any]] = {}
        # a dry run keeps its own record: it must never mark releases bad for a live daemon on the same store
        self._namespace = f"{RELEASES}-dry-run" if actuator.dry_run else RELEASES
        self._requests = f"{self._namespace}-requests"  # rollbacks asked for by hand, one per app

    # ------------------------------------------------------------------ the tick

    async def tick(
        self, app: str, policy: AppPolicy, machines: Sequence[Machine], health: AppHealth | None
    ) -> Hold:
        """One look at the app's releases, and whatever it calls for. Returns why scaling must hold.
        Errors propagate to the reconciler, which logs and counts them; the state written so far stays, so
        the next tick goes on from there."""
        now = self._clock.now()
        self._metrics.known(app)
        stored = await self._store.get(self._namespace, app)
        state = WatchState.from_json(stored)
        group = [
            m
            for m in machines
            if (m.process_group or "app") == policy.process_group
            and m.state not in {"destroyed", "destroying"}
        ]
        # crashes count from the watched release's first sighting (a release first seen now: the last minute)
        since = (state.watched.first_seen if state.watched is not None else now) - _CRASH_GRACE
        views = [view(m, health, since) for m in group]
        events: list[Event] = []
        state = await self._count_traffic(app, policy, group, views, state, now)
        request = await self._store.get(self._requests, app)
        if request is not None and not (state.rollback is not None and state.rollback.state.active):
            state, more = await self._manual(app, state, views, now, request)
            events.extend(more)
            await self._save(app, state, stored)  # started (or refused) and told, then the request goes
            stored = state.to_json()
            self._emit(app, events, now)
            await self.flush()
            events = []
            await self._store.delete(self._requests, app, fence=self._fence(app))
        if state.good is not None:
            state = await self._complete_good(app, state, views)
        watch_policy = Policy(thresholds(policy), policy.release.on_failure, policy.release.lease_wait)
        if not self._rollback_pending(state, views):
            step = advance(state, views, self._baseline_of(app, state, now), watch_policy, now)
            state = self._claim(app, step.state)
            events.extend(step.events)
            self._export(app, state)  # the release judged now is shown, even if rolled back in this tick
        if self._rollback_pending(state, views):
            await self._save(app, state, stored)
            stored = state.to_json()
            self._emit(app, events, now)
            await self.flush()  # what is about to happen is in the history before it happens
            events = []
            state, more = await self._roll_back(app, policy, state, views, now, stored)
            events.extend(more)
        await self._save(app, state, stored)
        self._emit(app, events, now)
        await self.flush()
        self._export(app, state)
        return hold(state, now, policy.release.bake)

    def _rollback_pending(self, state: WatchState, views: Sequence[MachineRelease]) -> bool:
        rollback = state.rollback
        if rollback is None or state.good is None:
            return False
        if rollback.state.active:
            return True
        # a partial rollback goes on reverting the machines that others held, once they are free
        newer = any(m.version is not None and m.version > rollback.from_release.version for m in views)
        return (
            rollback.state is RollbackState.PARTIAL
            and not newer
            and any(runs(m, rollback.from_release) for m in views)
        )

    async def _save(self, app: str, state: WatchState, stored: dict[str, Any] | None) -> None:
        document = state.to_json()
        if document != stored:
            await self._store.put(self._namespace, app, document, fence=self._fence(app))

    # ------------------------------------------------------------------ traffic

    async def _count_traffic(
        self,
        app: str,
        policy: AppPolicy,
        group: Sequence[Machine],
        views: Sequence[MachineRelease],
        state: WatchState,
        now: float,
    ) -> WatchState:
        """Read each started machine's traffic since the last read and count it for the release it runs:
        the watched release's into its record, the known-good one's into the baseline window."""
        started = [m for m in group if m.state == "started"]
        if not started:
            return state
        reading = await self._traffic.read(app, started, traffic_spec(policy))
        # why a release may have too little traffic to judge: said in /status, next to the verdict
        self._traffic_errors[app] = dict(sorted(reading.errors.items())[:5])
        by_id = {v.id: v for v in views}
        watched = state.watched
        window = self._baseline.setdefault(app, deque())
        added: dict[str, Traffic] = {}
        for machine_id, traffic in reading.machines.items():
            machine = by_id.get(machine_id)
            if machine is None or machine.version is None:
                continue
            mine = watched is not None and runs(machine, watched.release)
            if mine and watched is not None and watched.verdict not in FINAL:
                # counted for the release it runs; a final verdict needs no more counting (nor writes)
                added[machine.region] = added.get(machine.region, Traffic()) + traffic
            # the window the baseline comes from, steady state included (an immediate deploy replaces
            # every machine between two ticks, and then only what came before can be the baseline)
            window.append((now, machine.version, machine.region, traffic))
            if not mine and (watched is None or machine.version > watched.release.version):
                # a release newer than the watched one: the tick is about to watch it; kept for it
                early = self._unclaimed.setdefault(app, {}).setdefault(machine.version, {})
                early[machine.region] = early.get(machine.region, Traffic()) + traffic
        while window and window[0][0] < now - _BASELINE_WINDOW:
            window.popleft()
        if watched is None or not added:
            return state
        merged = dict(watched.traffic)
        for region, traffic in added.items():
            merged[region] = merged.get(region, Traffic()) + traffic
        return replace(state, watched=replace(watched, traffic=merged))

    def _claim(self, app: str, state: WatchState) -> WatchState:
        """The watched release takes the traffic counted for it before it was watched (its first tick)."""
        early = self._unclaimed.pop(app, {})
        watched = state.watched
        if watched is None or watched.release.version not in early or watched.verdict in FINAL:
            return state
        merged = dict(watched.traffic)
        for region, traffic in early[watched.release.version].items():
            merged[region] = merged.get(region, Traffic()) + traffic
        return replace(state, watched=replace(watched, traffic=merged))

    def _baseline_of(self, app: str, state: WatchState, now: float) -> dict[str, Traffic]:
        """The previous release's own traffic over the last minutes, per region: the newest release older
        than the watched one (a release rolled back as bad aside), whether or not it was judged good: a
        release is not blamed for errors the one before it had too."""
        watched = state.watched
        if watched is None:
            return {}
        recent = [
            entry
            for entry in self._baseline.get(app, ())
            if entry[0] >= now - _BASELINE_WINDOW
            and entry[1] < watched.release.version
            and str(entry[1]) not in state.bad
        ]
        if not recent:
            return {}
        previous = max(version for _, version, _, _ in recent)
        result: dict[str, Traffic] = {}
        for _, version, region, traffic in recent:
            if version == previous:
                result[region] = result.get(region, Traffic()) + traffic
        return result

    # ------------------------------------------------------------------ the known-good record

    async def _complete_good(
        self, app: str, state: WatchState, views: Sequence[MachineRelease]
    ) -> WatchState:
        """Machines updated by a new release before their known-good config was recorded: from /versions."""
        good = state.good
        assert good is not None  # noqa: S101 - the caller checked
        found: dict[str, dict[str, Any]] = {}
        for machine_id in missing_configs(views, good):
            key = (app, machine_id, good.release.version)
            if key in self._looked_up:
                continue
            self._looked_up.add(key)
            try:
                versions = await self._client.list_versions(app, machine_id)
            except errors.FlyApiError as exc:
                self._looked_up.discard(key)  # try again next tick
                log.warning("versions of %s/%s: %s", app, machine_id, exc)
                continue
            config = config_from_versions(
                [{"user_config": v.user_config.to_api()} for v in versions], good.release
            )
            if config is not None:
                found[machine_id] = dict(config)
        if not found:
            return state
        return replace(state, good=replace(good, configs={**good.configs, **found}))

    # ------------------------------------------------------------------ by hand

    async def request_rollback(self, app: str, to: int | None, by: str = "cli") -> dict[str, Any]:
        """Record a rollback asked for by hand; the app's next tick carries it out. What can be refused now
        is refused now; the request has a document of its own, so a tick writing the app's state at the
        same moment can neither lose it nor be overwritten by it."""
        state = WatchState.from_json(await self._store.get(self._namespace, app))
        if state.rollback is not None and state.rollback.state.active:
            raise RollbackRequestError(f"a rollback of {app} is already under way")
        current = state.watched.release if state.watched is not None else None
        if current is None:
            raise RollbackRequestError(f"no release of {app} seen yet")
        if to is not None and to >= current.version:
            raise RollbackRequestError(f"v{to} is not older than {current.label}, the release running now")
        if to is not None and str(to) in state.bad:
            raise RollbackRequestError(f"v{to} was rolled back as failing: it is never returned to")
        records = [g for g in (state.good, *state.previous) if g is not None]
        if to is None and not any(g.release.version < current.version for g in records):
            raise RollbackRequestError(f"no known-good release older than {current.label} on record")
        if await self._store.get(self._requests, app) is not None:
            raise RollbackRequestError(f"a rollback of {app} was already asked for and is about to start")
        request = {"to": to, "from": current.version, "at": self._clock.now(), "by": by}
        await self._store.put(self._requests, app, request)
        self.status.setdefault(app, {})["pending_request"] = request
        return request

    async def _manual(
        self,
        app: str,
        state: WatchState,
        views: Sequence[MachineRelease],
        now: float,
        request: dict[str, Any],
    ) -> tuple[WatchState, list[Event]]:
        to = request.get("to")
        current = state.watched.release if state.watched is not None else None
        asked = request.get("from")
        if current is not None and asked not in (None, current.version):
            # asked of another release than the one running now (an automatic rollback came first)
            why = (
                f"rollback asked for by hand refused: it was asked of v{asked}, and {current.label} runs now"
            )
            return state, [Event("rollback_refused", why, current)]
        try:
            target = await self._target(app, state, views, to, current)
        except (RollbackRequestError, errors.FlyApiError) as exc:
            event = Event(
                "rollback_refused", f"rollback asked for by hand refused: {exc}", current, alert=False
            )
            return state, [event]
        assert current is not None  # noqa: S101 - _target refuses without a current release
        reason = f"asked for by hand ({request.get('by', 'cli')})"
        good = state.good
        previous = state.previous
        if good is not None and good.release != target.release:
            previous = (good, *[p for p in previous if p.release != good.release])[:3]
        state = replace(state, previous=tuple(p for p in previous if p.release != target.release), halted="")
        return start_rollback(state, current, target, now, by="manual", reason=reason)

    async def _target(
        self,
        app: str,
        state: WatchState,
        views: Sequence[MachineRelease],
        to: int | None,
        current: ReleaseKey | None,
    ) -> KnownGood:
        if current is None:
            raise RollbackRequestError("no release is running")
        records = [g for g in (state.good, *state.previous) if g is not None]
        if to is None:
            older = [g for g in records if g.release.version < current.version]
            if not older:
                raise RollbackRequestError(f"no known-good release older than {current.label} on record")
            return max(older, key=lambda g: g.release.version)
        if to >= current.version:
            raise RollbackRequestError(f"v{to} is not older than {current.label}, the release running now")
        if str(to) in state.bad:
            raise RollbackRequestError(f"v{to} was rolled back as failing: it is never returned to")
        for record in records:
            if record.release.version == to:
                return record
        # not on record: each machine's own history may still hold it
        configs: dict[str, dict[str, Any]] = {}
        for machine in views:
            if machine.canary:
                continue
            versions = await self._client.list_versions(app, machine.id)
            config = config_from_versions(
                [{"user_config": v.user_config.to_api()} for v in versions], ReleaseKey(to)
            )
            if config is not None:
                configs[machine.id] = dict(config)
        if not configs:
            raise RollbackRequestError(f"release v{to} is in no machine's history")
        holders = [replace(m, config=configs[m.id]) for m in views if m.id in configs]
        release = release_of(to, holders)
        record = known_good(holders, release, self._clock.now(), "from history")
        return replace(record, configs=configs)

    # ------------------------------------------------------------------ the rollback

    async def _leased_by_others(self, app: str, machine_ids: Sequence[str]) -> dict[str, str]:
        """Machines whose lease someone else holds (looked up at once: each has its own rate-limit bucket)."""

        async def holder(machine_id: str) -> str | None:
            try:
                lease = await self._client.get_lease(app, machine_id)
            except errors.NotFound:
                return None
            if lease is None:
                return None
            # this tick holds no lease yet: a flywatch lease now is an earlier process's (killed mid-
            # rollback) or another instance's, and is waited for like anyone's until it expires
            return f"{lease.owner or 'someone'} ({lease.description or 'no description'})"

        holders = await asyncio.gather(*(holder(mid) for mid in machine_ids))
        return {mid: who for mid, who in zip(machine_ids, holders, strict=True) if who is not None}

    async def _roll_back(
        self,
        app: str,
        policy: AppPolicy,
        state: WatchState,
        views: Sequence[MachineRelease],
        now: float,
        stored: dict[str, Any],
    ) -> tuple[WatchState, list[Event]]:
        rollback, good = state.rollback, state.good
        assert rollback is not None  # noqa: S101 - _rollback_pending said so
        assert good is not None  # noqa: S101
        stopped = self._cannot_go_on(app, state, rollback, views, now)
        if stopped is not None:
            return stopped
        plan = plan_rollback(views, good, rollback.from_release)
        if plan.stuck:
            rollback = replace(rollback, failed={**rollback.failed, **plan.stuck})
        held = await self._leased_by_others(app, [t.machine_id for t in plan.updates] + list(plan.destroys))
        waited = now - rollback.started_at
        if held and rollback.state is RollbackState.WAITING and waited < policy.release.lease_wait:
            note = (
                f"waiting for leases held by others on {', '.join(sorted(held))} "
                f"({waited:.0f}s of {policy.release.lease_wait:g}s)"
            )
            return replace(state, rollback=replace(rollback, note=note)), []
        if rollback.state is RollbackState.WAITING:
            rollback = replace(rollback, state=RollbackState.RUNNING, note="")
        targets = self._resumed(rollback, good, views) + [t for t in plan.updates if t.machine_id not in held]
        step = max(policy.release.max_parallel, 1)
        for start in range(0, len(targets), step):
            if rollback.failed:
                break
            chunk = targets[start : start + step]
            rollback = replace(rollback, in_flight=tuple(t.machine_id for t in chunk))
            state = replace(state, rollback=rollback)
            await self._save(app, state, stored)  # the intent is durable before any machine is changed
            stored = state.to_json()
            result = await self._actuator.run(
                Rollout(
                    app,
                    tuple(RolloutTarget(t.machine_id, t.config) for t in chunk),
                    f"rollback of {rollback.from_release.label} to {rollback.to.label}: {rollback.reason}",
                    max_parallel=step,
                )
            )
            rollback = _after_steps(rollback, result.steps, "update")
            state = replace(state, rollback=rollback)
            await self._save(app, state, stored)
            stored = state.to_json()
        destroys = [mid for mid in plan.destroys if mid not in held]
        if destroys and not rollback.failed:
            result = await self._actuator.run(
                Destroy(app, tuple(destroys), f"canary of {rollback.from_release.label}, rolled back")
            )
            rollback = _after_steps(rollback, result.steps, "destroy")
        rollback = replace(rollback, in_flight=())
        # whatever was not reverted is left: held when looked at, or taken by someone since (the actuator
        # skipped it); a rollback is done only when no machine of the bad release is left
        wanted = [t.machine_id for t in plan.updates] + list(plan.destroys) + list(plan.unreachable)
        held.update(dict.fromkeys(plan.unreachable, "host unreachable: its config is not known"))
        done = set(rollback.updated) | set(rollback.destroyed)
        left = {
            mid: held.get(mid) or rollback.skipped.get(mid) or "not reverted"
            for mid in wanted
            if mid not in done
        }
        return self._conclude(app, state, rollback, left)

    def _conclude(
        self, app: str, state: WatchState, rollback: Rollback, left: dict[str, str]
    ) -> tuple[WatchState, list[Event]]:
        """After a pass: failed, still waiting, partial (some left to others), or done."""
        if rollback.failed:
            rollback = replace(rollback, state=RollbackState.FAILED)
        elif left and not rollback.updated and not rollback.destroyed:
            # nothing reverted yet, everything held (a deploy with every lease): waiting, not finished
            note = "waiting for " + ", ".join(f"{mid} ({why})" for mid, why in sorted(left.items()))
            return replace(
                state, rollback=replace(rollback, skipped={**rollback.skipped, **left}, note=note)
            ), []
        elif left:
            rollback = replace(rollback, skipped={**rollback.skipped, **left})
            if rollback.state is RollbackState.RUNNING:
                rollback = replace(rollback, state=RollbackState.PARTIAL)
            else:
                return replace(state, rollback=rollback), []  # partial already: still waiting for them
        else:
            finished_partial = rollback.state is RollbackState.PARTIAL
            rollback = replace(rollback, state=RollbackState.DONE, skipped={})
            if finished_partial:
                self._count_rollback(app, rollback)  # counted once, at its real end
                event = Event(
                    "rollback_finished",
                    f"the machines others held are reverted too: {rollback.from_release.label} is gone",
                    rollback.from_release,
                    alert=True,
                )
                return replace(state, rollback=rollback), [event]
        state, events = finish_rollback(state, rollback, self._clock.now())
        if rollback.state is not RollbackState.PARTIAL:
            self._count_rollback(app, rollback)  # a partial one is counted when the rest is reverted
        return state, events

    @staticmethod
    def _resumed(rollback: Rollback, good: KnownGood, views: Sequence[MachineRelease]) -> list[RevertTarget]:
        """Machines a rollback was changing when the daemon died, and that already run the known-good
        release: not changed again, but seen through (started, checks passing, the image verified) and
        counted, by handing the actuator the config they already run."""
        by_id = {v.id: v for v in views}
        return [
            RevertTarget(mid, by_id[mid].region, by_id[mid].config, "resumed")
            for mid in rollback.in_flight
            if mid in by_id
            and by_id[mid].complete
            and runs(by_id[mid], good.release)
            and mid not in rollback.updated
        ]

    def _cannot_go_on(
        self, app: str, state: WatchState, rollback: Rollback, views: Sequence[MachineRelease], now: float
    ) -> tuple[WatchState, list[Event]] | None:
        if not views:
            # an empty list (Fly's list lags, or the app is being recreated) says nothing: never "done"
            return replace(state, rollback=replace(rollback, note="no machines listed: waiting")), []
        newest = max((m.version for m in views if m.version is not None), default=0)
        if newest > rollback.from_release.version:
            # someone deploys forward: the rollback stops here, and the watch judges the new release
            note = f"superseded by v{newest} being deployed: the rollback stopped"
            rollback = replace(rollback, state=RollbackState.PARTIAL, note=note, in_flight=())
            self._count_rollback(app, rollback)
            return finish_rollback(replace(state, rollback=rollback), rollback, now)
        return None

    def _count_rollback(self, app: str, rollback: Rollback) -> None:
        if self._actuator.dry_run:
            return  # nothing was rolled back
        self._metrics.rollbacks.labels(app, rollback.state.value).inc()
        self._metrics.rollback_duration.observe(max(self._clock.now() - rollback.started_at, 0.0))

    # ------------------------------------------------------------------ telling

    def _emit(self, app: str, events: Sequence[Event], now: float) -> None:
        for event in events:
            record = {
                "at": now,
                "app": app,
                "kind": event.kind,
                "summary": event.summary,
                "release": event.release.to_json() if event.release else None,
                "numbers": dict(event.numbers),
                "details": dict(event.details),
            }
            self._pending.append((app, record))
            level = logging.WARNING if event.alert else logging.INFO
            log.log(
                level, "release %s %s: %s", app, event.kind, event.summary, extra={"release_event": record}
            )
            if event.alert and self._alerter is not None and not self._actuator.dry_run:
                self._alerter.notify(
                    Alert(
                        event=event.kind,
                        app=app,
                        summary=f"{app}: {event.summary}",
                        at=now,
                        version=event.release.version if event.release else None,
                        numbers=dict(event.numbers),
                        details=dict(event.details),
                    )
                )

    def forget(self, apps: AbstractSet[str]) -> None:
        """Drop everything kept in memory of `apps` (baseline window, early traffic, lookups, traffic
        errors, /status entries, release gauges' series, the traffic reader's totals): watched again later,
        each starts as after a restart, from its stored state alone. Events already told but not yet
        written stay pending: they are history, and the next flush writes them."""
        for app in apps:
            self._baseline.pop(app, None)
            self._shown.pop(app, None)
            self._shown_before.pop(app, None)
            self._traffic_errors.pop(app, None)
            self._unclaimed.pop(app, None)
            self.status.pop(app, None)
        self._looked_up = {key for key in self._looked_up if key[0] not in apps}
        self._metrics.forget(apps)
        self._traffic.forget(apps)

    async def flush(self) -> None:
        """Write the events told since the last flush to the release history."""
        pending, self._pending = self._pending, []
        for app, record in pending:
            try:
                await self._store.append(
                    HISTORY, record, at=float(record["at"]), key=app, fence=self._fence(app)
                )
            except FencedError as exc:  # the app changed hands: its new owner writes its history now
                log.warning("release history of %s not written: %s", app, exc)

    def _export(self, app: str, state: WatchState) -> None:
        watched = state.watched
        status: dict[str, Any] = {
            "watched": None,
            "good": state.good.release.to_json() | {"verdict": state.good.verdict} if state.good else None,
            "rollback": state.rollback.to_json() if state.rollback else None,
            "halted": state.halted,
            "bad": sorted(int(v) for v in state.bad),
            "traffic_errors": self._traffic_errors.get(app, {}),
        }
        if watched is not None:
            status["watched"] = {
                **watched.release.to_json(),
                "verdict": watched.verdict.value,
                "reason": watched.reason,
                "numbers": dict(watched.numbers),
                "first_seen": watched.first_seen,
                "rollout_done_at": watched.rollout_done_at,
                "after_rollback": watched.after_rollback,
            }
            shown = (str(watched.release.version), watched.release.image, watched.verdict.value)
            before = self._shown.get(app)
            if before is not None and before[:2] != shown[:2]:
                older = self._shown_before.get(app)
                if older is not None and older[:2] != shown[:2]:
                    self._metrics.info.remove(app, older[0], older[1])  # one release before is kept, at 0
                self._shown_before[app] = before
                self._metrics.info.labels(app, before[0], before[1]).set(0)
                for verdict in ("baking", "healthy", "failing", "inconclusive"):
                    self._metrics.verdict.remove(app, before[0], verdict)
            self._metrics.info.labels(app, shown[0], shown[1]).set(1)
            for verdict in ("baking", "healthy", "failing", "inconclusive"):
                self._metrics.verdict.labels(app, shown[0], verdict).set(1.0 if verdict == shown[2] else 0.0)
            self._shown[app] = shown
        self.status[app] = status

    async def history(self, app: str | None, limit: int) -> list[dict[str, Any]]:
        entries = await self._store.read(HISTORY, key=app, limit=limit)
        return [entry.record for entry in entries]


def _after_steps(rollback: Rollback, steps: Sequence[Any], operation: str) -> Rollback:
    updated, destroyed = list(rollback.updated), list(rollback.destroyed)
    failed, skipped = dict(rollback.failed), dict(rollback.skipped)
    for step in steps:
        done = step.outcome is Outcome.DONE or (
            step.outcome is Outcome.SKIPPED and step.reason == ALREADY_AT_TARGET
        )
        if done:
            (updated if operation == "update" else destroyed).append(step.machine_id)
            skipped.pop(step.machine_id, None)
        elif step.outcome is Outcome.SKIPPED and step.reason.startswith(LEASED_BY_OTHERS):
            skipped[step.machine_id] = step.reason
        elif step.outcome is Outcome.FAILED and (step.retryable or operation == "destroy"):
            # a canary that will not go is a leftover to retry, never a reason to give up the rollback
            # the API, not the machine, failed: the machine is left for the next tick, not given up on
            skipped[step.machine_id] = f"{step.operation} to be tried again: {step.reason}"
        elif step.outcome is Outcome.FAILED:
            failed[step.machine_id] = f"{step.operation}: {step.reason}"
        # skipped because the chunk stopped after a failure: left for the report as not tried
    return replace(
        rollback,
        updated=tuple(dict.fromkeys(updated)),
        destroyed=tuple(dict.fromkeys(destroyed)),
        failed=failed,
        skipped=skipped,
    )
