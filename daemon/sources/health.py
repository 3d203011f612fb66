"""The health watch: probes every started machine of an app, keeps each machine's history, and judges
machines and regions (core/health.py), with the machines' own Fly checks and host status from the list call.

One `observe()` per app per probe interval. It keeps the probe history between rounds (hysteresis) and
forgets machines that are gone. `judge()` applies the rule that spans apps: when every region
everywhere failed with no answer, flywatch doubts its own connectivity rather than the world.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from daemon.clock import Clock
from daemon.core.health import (
    Doubt,
    Hysteresis,
    MachineHealth,
    MachineSignals,
    MachineVerdict,
    ProbeConditions,
    RegionHealth,
    RegionState,
    Verdict,
    doubted,
    machine_verdict,
    region_health,
    step,
)
from daemon.fly.models import Machine
from daemon.sources.fleet import in_group
from daemon.sources.probes import Prober, ProbeTarget, probe_url
from daemon.telemetry.metrics import HealthMetrics


@dataclass(frozen=True)
class HealthSpec:
    """How to probe one app's machines."""

    port: int = 8080
    path: str = "/health"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 2.0
    conditions: ProbeConditions = field(default_factory=ProbeConditions)
    rules: Hysteresis = field(default_factory=Hysteresis)
    process_group: str = "app"


@dataclass(frozen=True)
class AppHealth:
    app: str
    at: float
    machines: dict[str, MachineVerdict]
    regions: dict[str, RegionHealth]


class HealthWatch:
    def __init__(self, prober: Prober, clock: Clock, metrics: HealthMetrics | None = None) -> None:
        self._prober = prober
        self._clock = clock
        self._metrics = metrics
        self._history: dict[str, dict[str, MachineHealth]] = {}
        self._regions_seen: dict[str, set[str]] = {}
        self._machines_seen: dict[str, dict[str, str]] = {}
        self._observed: dict[str, AppHealth] = {}  # each app's latest health, as observed (not doubted)
        self._doubt = Doubt()

    async def observe(self, app: str, machines: Iterable[Machine], spec: HealthSpec) -> AppHealth:
        """Probe the app's started machines once and judge them and their regions."""
        members = in_group(machines, spec.process_group)
        started = [m for m in members if m.state == "started"]
        reachable = [m for m in started if m.host_status == "ok"]
        targets = [
            ProbeTarget(app, m.id, m.region, probe_url(m.private_ip, spec.port, spec.path), spec.headers)
            for m in reachable
        ]
        results = await self._prober.probe_all(targets, spec.conditions, spec.timeout)
        history = self._history.setdefault(app, {})
        now = self._clock.now()
        verdicts: dict[str, MachineVerdict] = {}
        for machine in started:
            # the history is a process's: an update or a restart into a new instance starts it afresh, so
            # the verdicts of the release before never stick to the one after
            key = f"{machine.id}/{machine.instance_id}"
            result = results.get(machine.id)
            if result is not None:
                history[key] = step(history.get(key, MachineHealth()), result, spec.rules)
                self._count(app, machine.region, result.label, result.outcome.latency)
            signals = MachineSignals(
                machine_id=machine.id,
                region=machine.region,
                probe=history.get(key, MachineHealth()),
                host_ok=machine.host_status == "ok",
                fly_checks=machine.checks_passing,
            )
            verdicts[machine.id] = machine_verdict(signals, now, spec.rules)
        for gone in set(history) - {f"{m.id}/{m.instance_id}" for m in started}:
            del history[gone]  # a stopped machine starts afresh when it comes back
        regions_now = {m.region for m in members}
        regions = {
            region: region_health(region, [v for v in verdicts.values() if v.region == region])
            for region in sorted(regions_now | {v.region for v in verdicts.values()})
        }
        return AppHealth(app=app, at=now, machines=verdicts, regions=regions)

    def judge(self, health: AppHealth) -> dict[str, AppHealth]:
        """Apply the rule that spans apps (doubt of our own connectivity) to an app just observed, and
        export the verdicts: the apps whose judged health is new, with their health. That is the app
        alone, unless it turned the doubt on or off: then every app seen, each judged again."""
        self._observed[health.app] = health
        flipped = self._doubt.update(health.app, health.regions.values())
        return self._judged(self._observed.values() if flipped else [health])

    def _judged(self, apps: Iterable[AppHealth]) -> dict[str, AppHealth]:
        result = {}
        for observed in apps:
            regions = doubted(observed.regions) if self._doubt.active else dict(observed.regions)
            result[observed.app] = judged = replace(observed, regions=regions)
            self._export(judged)
        return result

    def forget(self, app: str) -> dict[str, AppHealth]:
        """Drop everything kept of `app` (probe history, exported verdict series): watched again later, its
        machines start afresh, as after a restart, and no verdict of the time before stays exported. The
        other apps judged again if that turned the doubt on or off (as `judge`), else none."""
        self._history.pop(app, None)
        self._observed.pop(app, None)
        before = self._doubt.active
        self._doubt.forget(app)
        rejudged = self._judged(self._observed.values()) if self._doubt.active != before else {}
        machines = self._machines_seen.pop(app, {})
        regions = self._regions_seen.pop(app, set())
        metrics = self._metrics
        if metrics is not None:
            for machine_id, region in machines.items():
                metrics.machine_healthy.remove(app, region, machine_id)
            for region in regions:
                for state in RegionState:
                    metrics.region_health.remove(app, region, state.value)
        return rejudged

    def _count(self, app: str, region: str, label: str, latency: float) -> None:
        if self._metrics is not None:
            self._metrics.probes.labels(app, region, label).inc()
            self._metrics.probe_duration.labels(app, region).observe(latency)

    def _export(self, health: AppHealth) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        seen = self._machines_seen.setdefault(health.app, {})
        for machine_id, region in list(seen.items()):
            verdict = health.machines.get(machine_id)
            if verdict is None or verdict.verdict is Verdict.UNKNOWN:
                metrics.machine_healthy.remove(health.app, region, machine_id)
                del seen[machine_id]
        for machine_id, verdict in health.machines.items():
            if verdict.verdict is not Verdict.UNKNOWN:
                healthy = 1.0 if verdict.verdict is Verdict.HEALTHY else 0.0
                metrics.machine_healthy.labels(health.app, verdict.region, machine_id).set(healthy)
                seen[machine_id] = verdict.region
        regions = self._regions_seen.setdefault(health.app, set())
        for region in regions - set(health.regions):
            for state in RegionState:
                metrics.region_health.remove(health.app, region, state.value)
        regions.clear()
        regions.update(health.regions)
        for region, region_verdict in health.regions.items():
            for state in RegionState:
                metrics.region_health.labels(health.app, region, state.value).set(
                    1.0 if region_verdict.state is state else 0.0
                )
