"""The only module that imports APScheduler: a thin adapter over its AsyncIOScheduler.

Every job runs at most one instance at a time, missed runs are coalesced into one, and a little jitter keeps
many apps' ticks from landing in the same instant. Tests do not drive APScheduler's timing: they call the
tick functions directly.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler

# A new job's first run comes at a random moment within this many seconds (or its interval, if shorter):
# thousands of apps scheduled at once (a start, or a share of apps taken over) do not all fall due in the
# same instant, yet every app is looked at soon.
FIRST_RUN_SPREAD = 1.0


class Scheduler:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._scheduler = AsyncIOScheduler(
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        )
        self._rng = rng or random.Random()
        # what each job was last given: a job given the same again is left as it is (scheduling thousands
        # of apps again on every change of ownership, each looked up in APScheduler, was quadratic)
        self._jobs: dict[str, tuple[float, Callable[..., Awaitable[Any]], tuple[Any, ...], float | None]] = {}

    def start(self) -> None:
        self._scheduler.start()

    def every(
        self,
        job_id: str,
        seconds: float,
        job: Callable[..., Awaitable[Any]],
        *args: Any,
        jitter: float | None = None,
    ) -> None:
        """Run `job(*args)` every `seconds`, the first time soon (within FIRST_RUN_SPREAD). The same job
        given again is left alone; given other times or arguments, it is replaced, keeping its next run
        time (a reload does not fire every job at once)."""
        wanted = (seconds, job, args, jitter)
        if self._jobs.get(job_id) == wanted:
            return
        if job_id in self._jobs and (existing := self._scheduler.get_job(job_id)) is not None:
            first = existing.next_run_time or datetime.now(UTC)
        else:
            spread = self._rng.uniform(0.0, min(seconds, FIRST_RUN_SPREAD))
            first = datetime.now(UTC) + timedelta(seconds=spread)
        self._scheduler.add_job(
            job,
            "interval",
            args=args,
            seconds=seconds,
            id=job_id,
            replace_existing=True,
            jitter=jitter if jitter is not None else min(seconds * 0.1, 1.0),
            next_run_time=first,
        )
        self._jobs[job_id] = wanted

    def remove(self, job_id: str) -> None:
        if self._jobs.pop(job_id, None) is not None:
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(job_id)

    def job_ids(self) -> list[str]:
        return list(self._jobs)

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
