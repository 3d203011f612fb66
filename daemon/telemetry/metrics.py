"""Metric definitions, always on an injected registry (tests build a fresh CollectorRegistry each).

The watched app and region are labels `fly_app` and `fly_region`, never `app` and `region`: Fly's managed
Prometheus sets `app`, `region`, `host` and `instance` on every series it scrapes (to flywatch's own app
and region), overwriting same-named labels; and `job` is Prometheus's own, so the loop is `tick`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

API_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _remove_series(gauges: Iterable[Gauge], apps: AbstractSet[str]) -> None:
    """Remove every series of `apps` (by its fly_app label) from `gauges`: one pass over each gauge's
    series however many apps go at once (thousands, when another instance takes a share over)."""
    if not apps:
        return
    for gauge in gauges:
        for metric in gauge.collect():
            for sample in metric.samples:
                if sample.labels.get("fly_app") in apps:
                    with contextlib.suppress(KeyError):
                        gauge.remove(*sample.labels.values())


class ApiMetrics:
    """What the Machines API client counts: every call by endpoint and answer, its duration, its retries."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "flywatch_api_requests",
            "Machines API requests, by endpoint (OpenAPI operationId) and HTTP code (or error, timeout).",
            ["endpoint", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "flywatch_api_request_duration_seconds",
            "Time from sending a Machines API request to its answer.",
            ["endpoint"],
            buckets=API_LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "flywatch_api_retries",
            "Machines API requests retried, by endpoint and reason (429, 5xx, timeout, connection).",
            ["endpoint", "reason"],
            registry=registry,
        )


PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HealthMetrics:
    """What the health watch exports: probes, their latency, and the verdicts per machine and region."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.probe_duration = Histogram(
            "flywatch_probe_duration_seconds",
            "Time to answer a health probe (or to give up on it).",
            ["fly_app", "fly_region"],
            buckets=PROBE_BUCKETS,
            registry=registry,
        )
        self.probes = Counter(
            "flywatch_probes",
            "Health probes by result: ok, failed (a wrong answer) or error (no answer).",
            ["fly_app", "fly_region", "result"],
            registry=registry,
        )
        self.machine_healthy = Gauge(
            "flywatch_machine_healthy",
            "1 when the machine is healthy, 0 when unhealthy; absent while unknown.",
            ["fly_app", "fly_region", "machine"],
            registry=registry,
        )
        self.region_health = Gauge(
            "flywatch_region_health",
            "1 for the region's current health state (healthy, degraded, down, unknown), 0 for the others.",
            ["fly_app", "fly_region", "state"],
            registry=registry,
        )


class SourceMetrics:
    """What the metric sources export: the values they read, and their errors."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.value = Gauge(
            "flywatch_metric_value",
            "The latest value of a policy metric per app and region (absent when missing or stale).",
            ["fly_app", "fly_region", "metric"],
            registry=registry,
        )
        self.errors = Counter(
            "flywatch_metric_errors",
            "Failed metric reads, by source (promql, scrape, machines).",
            ["fly_app", "source"],
            registry=registry,
        )


ROLLBACK_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class ReleaseMetrics:
    """What the release watch exports: the release each app runs, its verdict, and the rollbacks."""

    def known(self, app: str) -> None:
        """An app's rollback counters at 0 from its first tick (see ReconcilerMetrics.known)."""
        for result in ROLLBACK_RESULTS:
            self.rollbacks.labels(app, result)

    def forget(self, apps: AbstractSet[str]) -> None:
        """Remove every series of `apps` from the release gauges (the releases they ran and their
        verdicts); the rollback counters stay, as counters do (see ReconcilerMetrics.forget)."""
        _remove_series((self.info, self.verdict), apps)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.info = Gauge(
            "flywatch_release_info",
            "1 for the release an app's machines run now (the newest one seen), 0 for the ones before it.",
            ["fly_app", "version", "image"],
            registry=registry,
        )
        self.verdict = Gauge(
            "flywatch_release_verdict",
            "1 for the watched release's verdict (baking, healthy, failing, inconclusive), 0 for the others.",
            ["fly_app", "version", "verdict"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "flywatch_rollbacks",
            "Rollbacks by result (done, partial, failed).",
            ["fly_app", "result"],
            registry=registry,
        )
        self.rollback_duration = Histogram(
            "flywatch_rollback_duration_seconds",
            "Time from the start of a rollback (the failing verdict) to its end.",
            buckets=ROLLBACK_BUCKETS,
            registry=registry,
        )


class ReconcilerMetrics:
    def known(self, app: str, regions: Iterable[str] = ()) -> None:
        """An app's counters at 0 from its first tick: a counter that appears at its first increment,
        already at 1, is one increase() and rate() never see."""
        for tick in TICKS:
            self.tick_errors.labels(app, tick)
        for region in regions:
            for action in ("scale_up", "scale_down"):
                for result in ("done", "skipped", "failed", "dry_run"):
                    self.actions.labels(app, region, action, result)

    def forget(self, apps: AbstractSet[str]) -> None:
        """Remove every series of `apps` from the gauges (what they were is no longer true of anything)."""
        _remove_series((self.desired, self.machines, self.last_tick), apps)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.desired = Gauge(
            "flywatch_desired_machines",
            "Machines the policy wants per region.",
            ["fly_app", "fly_region"],
            registry=registry,
        )
        self.machines = Gauge(
            "flywatch_machines",
            "Machines of the process group by region and state.",
            ["fly_app", "fly_region", "state"],
            registry=registry,
        )
        self.actions = Counter(
            "flywatch_scaling_actions",
            "Scaling actions by result (done, skipped, failed, dry_run).",
            ["fly_app", "fly_region", "action", "result"],
            registry=registry,
        )
        self.tick_duration = Histogram(
            "flywatch_tick_duration_seconds",
            "Time one job's tick took.",
            ["tick"],
            registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
        )
        self.last_tick = Gauge(
            "flywatch_last_tick_timestamp_seconds",
            "When each app's job last finished a tick.",
            ["fly_app", "tick"],
            registry=registry,
        )
        self.tick_errors = Counter(
            "flywatch_tick_errors",
            "Ticks that failed, by app and tick (probe, reconcile).",
            ["fly_app", "tick"],
            registry=registry,
        )


ALERT_EVENTS = (
    "release_failing",
    "release_inconclusive",
    "rollback_started",
    "rollback_finished",
    "rollback_failed",
    "region_down",
    "region_recovered",
)
ROLLBACK_RESULTS = ("done", "partial", "failed")
TICKS = ("probe", "reconcile", "release")


class AlertMetrics:
    """What the alert sender counts: every delivery of an alert to one webhook, by how it ended."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "flywatch_alerts",
            "Alert deliveries to webhooks, by event and result (sent, failed, dropped).",
            ["event", "result"],
            registry=registry,
        )
        for event in ALERT_EVENTS:  # at 0 from the start, so increase() sees the first one
            for result in ("sent", "failed", "dropped"):
                self.deliveries.labels(event, result)


class ClusterMetrics:
    """What an instance says of its place among the instances sharing one state (cluster.py): only of
    itself, so N instances scraped side by side never repeat one another's series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "flywatch_instance_up",
            "1 while this instance is a live member (alone, or its membership renewed in the database in"
            " time), 0 while it is cut off and acts on nothing.",
            ["member", "fly_region"],
            registry=registry,
        )
        self.owned = Gauge(
            "flywatch_owned_apps",
            "The apps this instance holds the lease of, and so watches and acts on.",
            ["member"],
            registry=registry,
        )
        self.members = Gauge(
            "flywatch_cluster_members",
            "The live members this instance saw at its last heartbeat (itself included).",
            registry=registry,
        )
        self.unowned = Gauge(
            "flywatch_unowned_apps",
            "Apps of the policy no live member held a lease of at this instance's last heartbeat: no one"
            " watches them (for a heartbeat or two during a handover; longer is an outage of flywatch).",
            registry=registry,
        )
        self.changes = Counter(
            "flywatch_ownership_changes",
            "Apps that changed hands here: gained, released (handed over to a new owner), lost (lapsed,"
            " or taken by another member).",
            ["change"],
            registry=registry,
        )
        for change in ("gained", "released", "lost"):
            self.changes.labels(change)  # at 0 from the start, so increase() sees the first one
        self.heartbeat_failures = Counter(
            "flywatch_cluster_heartbeat_failures",
            "Heartbeats the database did not answer (the leases lapse if it goes on).",
            registry=registry,
        )
        self._shown: tuple[str, str] | None = None

    def show(self, member: str, region: str, *, up: bool, owned: int, members: int, unowned: int = 0) -> None:
        if self._shown is not None and self._shown != (member, region):
            self.up.remove(*self._shown)
            self.owned.remove(self._shown[0])
        self._shown = (member, region)
        self.up.labels(member, region).set(1 if up else 0)
        self.owned.labels(member).set(owned)
        self.members.set(members)
        self.unowned.set(unowned)
