"""One tick for one app: observe (one snapshot, one `now`) -> decide (core/scaling.py) -> act (actuator)
-> record (state store, one `decision` log event, metrics, the /status view).

A failing tick is logged and counted, and the next one tries again; nothing here ever stops the daemon.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from daemon.actuator import Actuator
from daemon.alerts import Alert, Alerter
from daemon.clock import Clock
from daemon.config import AppPolicy, ScalingPolicy
from daemon.core.health import Hysteresis, ProbeConditions, RegionState
from daemon.core.plan import Action, ActionResult, Outcome, ScaleDown, ScaleDownMode, ScaleUp
from daemon.core.release_watch import Hold
from daemon.core.samples import Aggregate
from daemon.core.scaling import (
    HOLD,
    SCALE_DOWN,
    SCALE_UP,
    Bounds,
    Decision,
    Direction,
    Memory,
    RegionInput,
    Rules,
    ScheduleWindow,
    after_action,
    decide,
)
from daemon.fly import errors
from daemon.fly.client import MachinesClient
from daemon.fly.models import Machine
from daemon.releases import ReleaseWatch
from daemon.sources.fleet import in_group
from daemon.sources.health import AppHealth, HealthSpec, HealthWatch
from daemon.sources.metrics import MachineCountSpec, MetricSpec, MetricWatch, PromQuerySpec, machine_counts
from daemon.sources.scrape import ScrapeSpec
from daemon.store.base import FencedError, Fences, Store, no_fence
from daemon.telemetry.metrics import ReconcilerMetrics

log = logging.getLogger("flywatch.reconciler")
SCALING = "scaling"
DECISIONS = "decisions"
TRANSITIONS = ("starting", "stopping", "suspending", "replacing", "updating", "restarting")
IN_FLIGHT = "in_flight"  # in a region's scaling memory: the action under way when it was written


def health_spec(policy: AppPolicy) -> HealthSpec:
    health = policy.health
    json_field = (health.json_field.path, health.json_field.equals) if health.json_field else None
    return HealthSpec(
        port=health.port,
        path=health.path,
        headers=dict(health.headers),
        timeout=health.timeout,
        conditions=ProbeConditions(
            expect_status=frozenset(health.expect_status),
            max_latency=health.max_latency,
            body_contains=health.body_contains,
            json_field=json_field,
        ),
        rules=Hysteresis(
            unhealthy_after=health.unhealthy_after,
            healthy_after=health.healthy_after,
            stale_after=max(3 * health.interval, 10.0),
        ),
        process_group=policy.process_group,
    )


def metric_spec(scaling: ScalingPolicy, process_group: str) -> MetricSpec:
    metric = scaling.metric
    source: ScrapeSpec | PromQuerySpec | MachineCountSpec
    if metric.scrape is not None:
        scrape = metric.scrape
        source = ScrapeSpec(
            name=scrape.name,
            port=scrape.port,
            path=scrape.path,
            labels=dict(scrape.labels),
            aggregate=Aggregate(scrape.aggregate),
            timeout=min(scaling.interval, 5.0),
            min_coverage=scrape.min_coverage,
        )
        name = scrape.name
    elif metric.promql is not None:
        source, name = PromQuerySpec(metric.promql), "promql"
    else:
        state = metric.machines.state if metric.machines else "started"
        source, name = MachineCountSpec(state), f"machines_{state}"
    return MetricSpec(name=name, source=source, max_age=scaling.metric_max_age, process_group=process_group)


def rules_of(scaling: ScalingPolicy) -> Rules:
    return Rules(
        target_per_machine=scaling.target_per_machine,
        tolerance=scaling.tolerance,
        up=Direction(scaling.scale_up.stabilization, scaling.scale_up.cooldown, scaling.scale_up.max_step),
        down=Direction(
            scaling.scale_down.stabilization, scaling.scale_down.cooldown, scaling.scale_down.max_step
        ),
        on_missing_metric=scaling.on_missing_metric,
        schedules=tuple(
            ScheduleWindow(
                cron=s.cron,
                duration=s.duration,
                timezone=s.timezone,
                regions={region: (b.min, b.max) for region, b in s.regions.items()},
            )
            for s in scaling.schedules
        ),
    )


def rollout_activity(machines: list[Machine]) -> str:
    """Why a rollout is under way now ("" if none): mixed release versions, or machines being replaced."""
    versions = {m.release_version for m in machines if m.release_version is not None}
    if len(versions) > 1:
        return f"machines run releases {', '.join(str(v) for v in sorted(versions))}: a rollout is under way"
    if any(m.state in {"replacing", "updating"} for m in machines):
        return "machines are being replaced"
    return ""


def memory_to_json(memory: Memory) -> dict[str, Any]:
    return {
        "recommendations": [list(r) for r in memory.recommendations],
        "last_scale_up": memory.last_scale_up,
        "last_scale_down": memory.last_scale_down,
        "last_demand": memory.last_demand,
    }


def memory_from_json(data: dict[str, Any] | None) -> Memory:
    if not data:
        return Memory()
    return Memory(
        recommendations=tuple((float(at), int(d)) for at, d in data.get("recommendations", [])),
        last_scale_up=data.get("last_scale_up"),
        last_scale_down=data.get("last_scale_down"),
        last_demand=data.get("last_demand"),
    )


@dataclass
class AppStatus:
    last_tick: float | None = None
    tick_error: str = ""
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)


class Reconciler:
    def __init__(
        self,
        client: MachinesClient,
        actuator: Actuator,
        health: HealthWatch,
        metrics_watch: MetricWatch,
        store: Store,
        clock: Clock,
        metrics: ReconcilerMetrics,
        releases: ReleaseWatch | None = None,
        alerter: Alerter | None = None,
        fence: Fences = no_fence,
    ) -> None:
        self._fence = fence  # every write about an app is fenced: only its owner's land
        self._releases = releases
        self._alerter = alerter
        self._region_states: dict[tuple[str, str], RegionState] = {}
        self._client = client
        self._actuator = actuator
        self._health = health
        self._watch = metrics_watch
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self.latest_health: dict[str, AppHealth] = {}
        self._states_shown: dict[tuple[str, str], set[str]] = {}
        # a dry run keeps its own memory: it must never move the cooldowns of a live daemon on the same store
        self._scaling_ns = f"{SCALING}-dry-run" if actuator.dry_run else SCALING
        self.status: dict[str, AppStatus] = {}
        self.first_tick_done = False

    # ------------------------------------------------------------------ the probe job

    async def probe(self, app: str, policy: AppPolicy) -> None:
        started = time.perf_counter()
        self._metrics.known(app, policy.regions)
        try:
            machines = await self._client.list_machines(app)
            health = await self._health.observe(app, machines, health_spec(policy))
            self.latest_health.update(self._health.judge(health))
            self._tell_regions(app, self.latest_health[app])
            self._metrics.last_tick.labels(app, "probe").set(self._clock.now())
        except Exception:
            self._metrics.tick_errors.labels(app, "probe").inc()
            log.exception("probe tick of %s failed", app)
        finally:
            self._metrics.tick_duration.labels("probe").observe(time.perf_counter() - started)

    def forget(self, apps: AbstractSet[str]) -> None:
        """Apps this instance no longer watches (gone from the policy, or taken over by another
        instance): their status, their gauges' series and everything kept of them in memory here and in
        the health, metric and release watches are dropped, so that if one comes back it is judged afresh,
        as after a restart (no old probe history, samples, counters or baselines). What is in the store
        stays. All at once: thousands go when another instance takes a share over, in one pass over what
        is kept, not one pass each."""
        if not apps:
            return
        for app in apps:
            self.status.pop(app, None)
            self.latest_health.pop(app, None)
            self.latest_health.update(self._health.forget(app))  # the others, if the doubt turned
        self._metrics.forget(apps)
        for key in [k for k in self._states_shown if k[0] in apps]:
            del self._states_shown[key]
        for key in [k for k in self._region_states if k[0] in apps]:
            del self._region_states[key]  # back later, a region is not "recovered" from a state long gone
        self._watch.forget(apps)
        if self._releases is not None:
            self._releases.forget(apps)

    def _tell_regions(self, app: str, health: AppHealth) -> None:
        """Alert when a region goes down, and when it comes back. Unknown says nothing either way: a region
        that was down, then unknown (our own connectivity in doubt), then healthy has recovered."""
        for region, verdict in health.regions.items():
            if verdict.state is RegionState.UNKNOWN:
                continue
            before = self._region_states.get((app, region))
            self._region_states[(app, region)] = verdict.state
            if self._alerter is None or self._actuator.dry_run or before is verdict.state:
                continue  # a dry run tells its log, not the webhooks a live daemon alerts
            if verdict.state is RegionState.DOWN:
                event, summary = "region_down", f"{app}: {region} is down: {verdict.reason}"
            elif before is RegionState.DOWN:
                event, summary = "region_recovered", f"{app}: {region} recovered: {verdict.reason}"
            else:
                continue
            log.warning("%s", summary)
            self._alerter.notify(Alert(event=event, app=app, summary=summary, at=health.at, region=region))

    # ------------------------------------------------------------------ the reconcile job

    async def reconcile(self, app: str, policy: AppPolicy) -> list[Decision]:
        """One tick of one app. Never raises: a failing tick is recorded and the next one tries again."""
        started = time.perf_counter()
        status = self.status.setdefault(app, AppStatus())
        try:
            decisions = await self._tick(app, policy, status)
            status.tick_error = ""
        except (FencedError, errors.NotOwner) as exc:
            # the app changed hands during the tick: nothing more was written or sent; its new owner goes on
            status.tick_error = f"{type(exc).__name__}: {exc}"
            log.warning("reconcile tick of %s stopped: this instance no longer holds it: %s", app, exc)
            decisions = []
        except Exception as exc:
            status.tick_error = f"{type(exc).__name__}: {exc}"
            self._metrics.tick_errors.labels(app, "reconcile").inc()
            log.exception("reconcile tick of %s failed", app)
            decisions = []
        finally:
            self._metrics.tick_duration.labels("reconcile").observe(time.perf_counter() - started)
        return decisions

    async def _tick(self, app: str, policy: AppPolicy, status: AppStatus) -> list[Decision]:
        now = self._clock.now()
        all_machines = await self._client.list_machines(app)
        machines = in_group(all_machines, policy.process_group)
        counts = machine_counts(all_machines, policy.process_group)
        health = self.latest_health.get(app)
        health_note = "no health verdict yet"
        limit = 3 * policy.health.interval + policy.health.timeout
        if health is not None and now - health.at > limit:
            # an old verdict says nothing of now (the probe job failing, or stalled): the regions are unknown
            health_note = f"last probe round {now - health.at:.0f}s ago (more than {limit:g}s)"
            health = None
        regions = list(policy.regions)
        scaling = policy.scaling
        reading = None
        if scaling is not None:
            reading = await self._watch.read(
                app, all_machines, regions, metric_spec(scaling, policy.process_group)
            )
        release_hold = await self._release_activity(app, policy, all_machines, health)
        scrape = scaling.metric.scrape if scaling is not None else None
        per_machine = scrape is not None and scrape.aggregate in {"avg", "max"}
        inputs = []
        for region in regions:
            region_counts = counts.get(region, Counter())
            region_health = health.regions.get(region) if health else None
            sample = reading.samples.get(region) if reading else None
            inputs.append(
                RegionInput(
                    region=region,
                    bounds=Bounds(policy.regions[region].min, policy.regions[region].max),
                    started=region_counts.get("started", 0),
                    pending=sum(region_counts.get(state, 0) for state in TRANSITIONS),
                    per_machine=per_machine,
                    machines=dict(region_counts),
                    metric=reading.values.get(region) if reading else None,
                    metric_age=sample.age(now) if sample else None,
                    health=region_health.state.value if region_health else "unknown",
                    health_reason=region_health.reason if region_health else health_note,
                    reachable=not (region_health is not None and region_health.no_answer),
                )
            )
        decisions: list[Decision] = []
        results: dict[str, ActionResult] = {}
        if scaling is not None:
            memories = {}
            for region in regions:
                stored = await self._store.get(self._scaling_ns, f"{app}/{region}")
                memories[region] = memory_from_json(stored)
                if stored and stored.get(IN_FLIGHT) in {SCALE_UP, SCALE_DOWN}:
                    # the daemon died in the middle of this action (kill -9, a crash), after what it did
                    # and before it was recorded: count it as done now, so that its cooldown is not lost
                    memories[region] = after_action(memories[region], stored[IN_FLIGHT], now)
            # mixed releases or replacing: a rollout under way; a rollback or a failing release: the same
            rollout = release_hold.all or rollout_activity(machines)
            decisions = decide(
                now,
                inputs,
                rules_of(scaling),
                memories,
                release_active=release_hold.down,
                rollout_active=rollout,
            )
            if not self._actuator.dry_run:
                for decision in decisions:
                    if decision.acts:  # the intent is durable before anything is changed
                        intent = {**memory_to_json(decision.memory), IN_FLIGHT: decision.action}
                        await self._store.put(
                            self._scaling_ns, f"{app}/{decision.region}", intent, fence=self._fence(app)
                        )
            results = await self._act(app, policy, scaling, decisions)
            for decision in decisions:
                result = results.get(decision.region)
                memory = decision.memory
                if (
                    result is not None
                    and not result.dry_run
                    and (result.done_count > 0 or result.outcome is Outcome.FAILED)
                ):
                    # a failed action starts the cooldown too: the next tick must not hammer a full region
                    # the cooldown runs from the end of the action (its machines started or stopped), not
                    # from the start of the tick, which can be long before it (rate-limited calls, boots)
                    memory = after_action(memory, decision.action, self._clock.now())
                await self._store.put(
                    self._scaling_ns,
                    f"{app}/{decision.region}",
                    memory_to_json(memory),
                    fence=self._fence(app),
                )
                await self._record(app, now, decision, result, reading.error if reading else "")
        name = metric_spec(scaling, policy.process_group).name if scaling is not None else ""
        self._report(app, now, status, inputs, decisions, reading.error if reading else "", name, results)
        self.first_tick_done = True
        return decisions

    async def _release_activity(
        self, app: str, policy: AppPolicy, machines: list[Machine], health: AppHealth | None
    ) -> Hold:
        """The release watch's turn in the tick (it may roll a release back); why scaling must hold."""
        if self._releases is None:
            return Hold()
        try:
            return await self._releases.tick(app, policy, machines, health)
        except (FencedError, errors.NotOwner):
            raise  # the app changed hands: the whole tick stops (reconcile says so)
        except Exception as exc:
            # with the release watch blind, nothing says a release is not failing: scaling holds too
            self._metrics.tick_errors.labels(app, "release").inc()
            log.exception("release watch of %s failed", app)
            why = f"release watch failed: {type(exc).__name__}: {exc}"
            return Hold(why, why)

    async def _act(
        self, app: str, policy: AppPolicy, scaling: ScalingPolicy, decisions: list[Decision]
    ) -> dict[str, ActionResult]:
        plan: list[Action] = []
        for decision in decisions:
            reason = f"{decision.rule}: {decision.reason}"
            if decision.action == SCALE_UP and decision.acts:
                plan.append(ScaleUp(app, decision.region, decision.count, reason, policy.process_group))
            elif decision.action == SCALE_DOWN and decision.acts:
                plan.append(
                    ScaleDown(
                        app,
                        decision.region,
                        decision.count,
                        reason,
                        mode=ScaleDownMode(scaling.scale_down_action),
                        min_machines=policy.regions[decision.region].min,
                        process_group=policy.process_group,
                    )
                )
        results = await self._actuator.execute(plan)
        by_region = {result.action.region: result for result in results}
        for result in results:
            outcome = "dry_run" if result.dry_run else result.outcome.value
            self._metrics.actions.labels(app, result.action.region, result.action.kind, outcome).inc()
        return by_region

    async def _record(
        self, app: str, now: float, decision: Decision, result: ActionResult | None, metric_error: str
    ) -> None:
        outcome = "none" if result is None else ("dry_run" if result.dry_run else result.outcome.value)
        record = {
            "at": now,
            "app": app,
            "region": decision.region,
            "action": decision.action,
            "count": decision.count,
            "from": decision.current,
            "to": decision.current + (decision.count if decision.action == SCALE_UP else -decision.count)
            if decision.acts
            else decision.current,
            "desired": decision.desired,
            "rule": decision.rule,
            "reason": decision.reason,
            "outcome": outcome,
            "result": result.reason if result is not None else "",
            "inputs": {**dict(decision.inputs), "metric_error": metric_error},
            "not_acting": dict(decision.not_acting),
        }
        await self._store.append(DECISIONS, record, at=now, key=app, fence=self._fence(app))
        log.info(
            "decision %s/%s: %s %s (%s) -> %s",
            app,
            decision.region,
            decision.action,
            decision.count,
            decision.rule,
            outcome,
            extra={"decision": record},
        )

    def _report(
        self,
        app: str,
        now: float,
        status: AppStatus,
        inputs: list[RegionInput],
        decisions: list[Decision],
        metric_error: str,
        metric_name: str = "",
        results: dict[str, ActionResult] | None = None,
    ) -> None:
        by_region = {d.region: d for d in decisions}
        status.last_tick = now
        for region in inputs:
            decision = by_region.get(region.region)
            result = (results or {}).get(region.region)
            shown = self._states_shown.setdefault((app, region.region), set())
            for state in shown - set(region.machines):
                self._metrics.machines.labels(app, region.region, state).set(0)  # none left in that state
            for state, count in region.machines.items():
                self._metrics.machines.labels(app, region.region, state).set(count)
            shown.update(region.machines)
            if decision is not None:
                self._metrics.desired.labels(app, region.region).set(decision.desired)
            status.regions[region.region] = {
                "min": region.bounds.min,
                "max": region.bounds.max,
                "desired": decision.desired if decision else None,
                "machines": dict(region.machines),
                "health": region.health,
                "health_reason": region.health_reason,
                "metric": {
                    "name": metric_name,
                    "value": region.metric,
                    "age": region.metric_age,
                    "error": metric_error,
                },
                "last_decision": None
                if decision is None
                else {
                    "at": now,
                    "action": decision.action if decision.acts else HOLD,
                    "count": decision.count,
                    "rule": decision.rule,
                    "reason": decision.reason,
                    "not_acting": dict(decision.not_acting),
                    "outcome": "none"
                    if result is None
                    else ("dry_run" if result.dry_run else result.outcome.value),
                    "result": result.reason if result is not None else "",
                },
            }
        self._metrics.last_tick.labels(app, "reconcile").set(now)

    def status_json(self) -> dict[str, Any]:
        return {
            app: {"last_tick": s.last_tick, "tick_error": s.tick_error, "regions": s.regions}
            for app, s in self.status.items()
        }
