"""The scheduler adapter (daemon/scheduler.py) on a real APScheduler and event loop: first runs spread over
a moment, the same job given again left alone, a changed one keeping its next run, removal."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest

from daemon.scheduler import FIRST_RUN_SPREAD, Scheduler

HOUR = 3600.0  # an interval no test waits out: each job of it runs once, its first time


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    made = Scheduler(random.Random(4))
    made.start()
    yield made
    made.shutdown()


class Runs:
    """When each job ran (by the event loop's clock), and an event per run."""

    def __init__(self) -> None:
        self.at: dict[str, list[float]] = {}
        self.ran = asyncio.Event()

    async def run(self, name: str) -> None:
        self.at.setdefault(name, []).append(time.monotonic())
        self.ran.set()

    async def until(self, count: int, deadline: float = 10.0) -> None:
        end = time.monotonic() + deadline
        while sum(len(v) for v in self.at.values()) < count:
            self.ran.clear()
            left = end - time.monotonic()
            assert left > 0, f"{sum(len(v) for v in self.at.values())} of {count} runs in {deadline}s"
            try:
                await asyncio.wait_for(self.ran.wait(), timeout=left)
            except TimeoutError:
                continue


async def test_new_jobs_first_run_soon_spread_over_a_moment_not_all_at_once(scheduler: Scheduler) -> None:
    """Two hundred jobs scheduled together: each runs within FIRST_RUN_SPREAD, and not in one instant."""
    runs = Runs()
    begun = time.monotonic()
    for i in range(200):
        scheduler.every(f"job:{i}", HOUR, runs.run, f"job:{i}", jitter=0)
    await runs.until(200)
    firsts = sorted(at[0] - begun for at in runs.at.values())
    assert len(firsts) == 200
    assert firsts[-1] <= FIRST_RUN_SPREAD + 0.5  # a loaded machine's lateness on top
    assert firsts[-1] - firsts[0] >= FIRST_RUN_SPREAD / 4  # spread, not a burst


async def test_the_same_job_again_is_left_alone_and_a_changed_one_keeps_its_next_run(
    scheduler: Scheduler,
) -> None:
    """Given again as it is (every ownership change gives every job again), a job is not touched; given a
    new interval, it is replaced but does not run again at once; removed, it is gone from job_ids."""
    runs = Runs()
    scheduler.every("a", HOUR, runs.run, "a", jitter=0)
    scheduler.every("b", HOUR, runs.run, "b", jitter=0)
    await runs.until(2)
    for _ in range(1000):
        scheduler.every("a", HOUR, runs.run, "a", jitter=0)
    scheduler.every("b", HOUR / 2, runs.run, "b", jitter=0)  # next run in half an hour, not now
    scheduler.every("c", HOUR, runs.run, "c", jitter=0)  # a new one: its first run comes
    await runs.until(3)
    # what must not happen has no event: a rerun of b (or a) would come within the spread, as c's first did
    await asyncio.sleep(FIRST_RUN_SPREAD)
    assert {name: len(at) for name, at in runs.at.items()} == {"a": 1, "b": 1, "c": 1}
    scheduler.remove("b")
    scheduler.remove("b")  # removing what is gone is nothing
    assert sorted(scheduler.job_ids()) == ["a", "c"]
