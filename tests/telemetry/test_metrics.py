"""Metric definitions: known outcomes start at 0, and an app the policy dropped leaves no series behind."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from daemon.telemetry.metrics import ReconcilerMetrics, ReleaseMetrics


def test_known_counters_start_at_zero() -> None:
    """An app's tick errors, scaling actions per region and rollbacks exist at 0 from its first tick."""
    registry = CollectorRegistry()
    ReconcilerMetrics(registry).known("shop", ["iad", "cdg"])
    ReleaseMetrics(registry).known("shop")
    get = registry.get_sample_value
    assert get("flywatch_tick_errors_total", {"fly_app": "shop", "tick": "release"}) == 0.0
    assert (
        get(
            "flywatch_scaling_actions_total",
            {"fly_app": "shop", "fly_region": "cdg", "action": "scale_down", "result": "failed"},
        )
        == 0.0
    )
    assert get("flywatch_rollbacks_total", {"fly_app": "shop", "result": "done"}) == 0.0


def test_a_forgotten_app_leaves_no_gauge_series() -> None:
    """forget() removes the app's desired, machine and last-tick series, and only the app's."""
    registry = CollectorRegistry()
    metrics = ReconcilerMetrics(registry)
    metrics.desired.labels("shop", "iad").set(2)
    metrics.desired.labels("blog", "iad").set(1)
    metrics.machines.labels("shop", "iad", "started").set(2)
    metrics.last_tick.labels("shop", "probe").set(1.0)
    metrics.forget({"shop"})
    get = registry.get_sample_value
    assert get("flywatch_desired_machines", {"fly_app": "shop", "fly_region": "iad"}) is None
    assert get("flywatch_machines", {"fly_app": "shop", "fly_region": "iad", "state": "started"}) is None
    assert get("flywatch_last_tick_timestamp_seconds", {"fly_app": "shop", "tick": "probe"}) is None
    assert get("flywatch_desired_machines", {"fly_app": "blog", "fly_region": "iad"}) == 1.0
