"""Fly's documented rate-limit buckets (core/ratelimit.py)."""

from __future__ import annotations

import pytest

from daemon.core.ratelimit import TokenBuckets, limit_for


def test_burst_then_one_per_second() -> None:
    """An action allows a burst of 3, then one more each second; the wait says when."""
    buckets = TokenBuckets()
    assert [buckets.take("Machines_start", "m1", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("Machines_start", "m1", 100.0) == pytest.approx(1.0)
    assert buckets.take("Machines_start", "m1", 100.5) == pytest.approx(0.5)
    assert buckets.take("Machines_start", "m1", 101.0) == 0.0


def test_buckets_are_per_action_and_scope() -> None:
    """Another machine, or another action on the same machine, has its own bucket."""
    buckets = TokenBuckets()
    for _ in range(3):
        buckets.take("Machines_start", "m1", 0.0)
    assert buckets.take("Machines_start", "m2", 0.0) == 0.0
    assert buckets.take("Machines_stop", "m1", 0.0) == 0.0


def test_get_machine_has_its_own_limit() -> None:
    """Get Machine allows 5/s with a burst of 10."""
    assert limit_for("Machines_show").burst == 10
    buckets = TokenBuckets()
    assert all(buckets.take("Machines_show", "m", 0.0) == 0.0 for _ in range(10))
    assert buckets.take("Machines_show", "m", 0.0) == pytest.approx(0.2)
