"""The only module that imports APScheduler: a thin adapter over its AsyncIOScheduler.

Every job runs at most one instance at a time, missed runs are coalesced into one, and a little jitter keeps
many apps' ticks from landing in the same instant. Tests do not drive APScheduler's timing: they call the
tick functions directly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler


class Scheduler:
    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler(
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        )

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
        """Run `job(*args)` every `seconds`, the first time at once. Replaces a job of the same id, keeping
        its next run time (a reload does not fire every job at once)."""
        existing = self._scheduler.get_job(job_id)
        first = (
            existing.next_run_time if existing is not None and existing.next_run_time else datetime.now(UTC)
        )
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

    def remove(self, job_id: str) -> None:
        if self._scheduler.get_job(job_id) is not None:
            self._scheduler.remove_job(job_id)

    def remove_all(self) -> None:
        self._scheduler.remove_all_jobs()

    def job_ids(self) -> list[str]:
        return [job.id for job in self._scheduler.get_jobs()]

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
