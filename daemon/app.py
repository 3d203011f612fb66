"""The composition root and the daemon's lifecycle: start, reload, graceful stop.

Only this module decides that the process ends. Start: load the policy (a bad one at start is fatal: exit 1),
open the store, build the client, watches and actuator, serve /metrics and friends, schedule one probe job
and one reconcile job per app. Reload (SIGHUP, or the policy file changing on disk): a valid new policy
applies between ticks; an invalid one is logged and counted, and the old one keeps running. Stop (SIGTERM,
SIGINT): no new ticks, the ticks in flight finish (their leases are released as their actions end), then
everything is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import logging
import platform
import secrets
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from daemon import __version__
from daemon.actuator import Actuator
from daemon.alerts import Alerter, WebhookTarget
from daemon.clock import Clock, SystemClock
from daemon.cluster import DRY_RUN, Cluster, Ownership, Scoped, SoleOwnership, member_name
from daemon.config import LoadedPolicy, PolicyError, load_policy
from daemon.fly.client import MachinesClient
from daemon.reconciler import DECISIONS, Reconciler
from daemon.releases import ReleaseWatch
from daemon.scheduler import Scheduler
from daemon.settings import Settings
from daemon.sources.health import HealthWatch
from daemon.sources.metrics import MetricWatch
from daemon.sources.probes import Prober
from daemon.sources.prometheus import PromQL
from daemon.sources.scrape import Scraper
from daemon.sources.traffic import TrafficReader
from daemon.store import PostgresStore, StoreError, open_store
from daemon.store.base import Fence, Store
from daemon.store.postgres import PostgresLeases
from daemon.telemetry.logging import register_secret
from daemon.telemetry.metrics import (
    AlertMetrics,
    ApiMetrics,
    ClusterMetrics,
    HealthMetrics,
    ReconcilerMetrics,
    ReleaseMetrics,
    SourceMetrics,
)
from daemon.telemetry.server import TelemetryServer

log = logging.getLogger("flywatch")
# The lease a tick began under (None alone): its writes carry that fence and its requests need that epoch,
# so a tick that outlived a lapse of its lease never acts or writes under the lease taken afresh after it.
# A context variable: set in the tick's own task, inherited by the tasks it starts.
_TICK: contextvars.ContextVar[Fence | None] = contextvars.ContextVar("flywatch_tick_lease", default=None)
_STOP_GRACE = 60.0  # seconds the ticks in flight get to finish on SIGTERM
# Ticks running at once, at most. Thousands of apps due together would otherwise all run at once and flood the
# event loop: each turn of it would take seconds, and the cluster's heartbeat, waiting its turn, would let the
# leases lapse (measured: 5,000 apps on one instance lost every lease again and again). A tick waiting for a
# slot costs nothing; APScheduler skips its next run while it waits, as while it runs.
_TICK_SLOTS = 64
_UNWIND_GRACE = 5.0  # seconds the ticks cancelled after it get to unwind
_WATCH_EVERY = 2.0  # seconds between looks at the policy file
_HOUSEKEEPING = "housekeeping"  # the job that removes old decisions
_HOUSEKEEPING_EVERY = 3600.0  # seconds between its rounds
_FORGET_AFTER = 0.5  # seconds the apps let go of whose ticks end are gathered, to be forgotten together


class Daemon:
    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.registry = CollectorRegistry()
        self.reloads = Counter(
            "flywatch_config_reloads",
            "Policy reloads by result (ok, error).",
            ["result"],
            registry=self.registry,
        )
        for result in ("ok", "error"):
            self.reloads.labels(result)  # at 0 from the start, so increase() sees the first reload
        self.loaded: LoadedPolicy | None = None
        self.policy_error = ""
        self.loaded_at: float | None = None
        self.started_at = self.clock.now()
        self._stopping = asyncio.Event()
        self._in_flight: dict[asyncio.Task[Any], str] = {}  # each tick running, and its app
        self._slots = asyncio.Semaphore(_TICK_SLOTS)
        self._unforgotten: set[str] = set()  # apps let go of while a tick of theirs still ran
        self._forgetting: asyncio.Task[None] | None = None  # forgets those whose ticks have ended, together
        self._scheduler = Scheduler()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._mtime: float | None = None
        self.store: Store | None = None
        self.reconciler: Reconciler | None = None
        self.releases: ReleaseWatch | None = None
        self.alerter: Alerter | None = None
        self.server: TelemetryServer | None = None
        self.ownership: Ownership = SoleOwnership("flywatch", settings.region)

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        self.loaded = load_policy(self.settings.config)  # a bad policy at start is fatal: PolicyError
        self.loaded_at = self.clock.now()
        self._mtime = _mtime(self.settings.config)
        token = self.settings.fly_api_token.get_secret_value() if self.settings.fly_api_token else ""
        if not token:
            log.warning("FLY_API_TOKEN is not set: every call to the Machines API will be refused")
        self.store = open_store(self.settings.state_url)
        self._closers.append(self.store.close)
        self.ownership = self._ownership(self.store)
        client = MachinesClient(
            self.settings.machines_api_url,
            token,
            clock=self.clock,
            metrics=ApiMetrics(self.registry),
            guard=self._may_act,  # nothing is changed on an app this instance does not hold
            user_agent=f"flywatch/{__version__} ({self.ownership.member})",
        )
        self._closers.append(client.aclose)
        prober = Prober(self.clock)
        self._closers.append(prober.aclose)
        scraper = Scraper(self.clock)
        self._closers.append(scraper.aclose)
        promql = None
        if self.settings.effective_prometheus_url:
            promql = PromQL(
                self.settings.effective_prometheus_url,
                self.clock,
                token=self.settings.prometheus_credential(),
            )
            self._closers.append(promql.aclose)
        source_metrics = SourceMetrics(self.registry)
        traffic = TrafficReader(self.clock, promql, source_metrics)
        self._closers.append(traffic.aclose)
        self.alerter = Alerter(_webhooks(self.loaded), self.clock, AlertMetrics(self.registry))
        self._closers.append(self.alerter.aclose)
        actuator = Actuator(client, self.clock, dry_run=self.settings.dry_run)
        self.releases = ReleaseWatch(
            client,
            actuator,
            traffic,
            self.store,
            self.clock,
            ReleaseMetrics(self.registry),
            self.alerter,
            fence=self._fence,
        )
        self.reconciler = Reconciler(
            client,
            actuator,
            HealthWatch(prober, self.clock, HealthMetrics(self.registry)),
            MetricWatch(self.clock, scraper, promql, source_metrics),
            self.store,
            self.clock,
            ReconcilerMetrics(self.registry),
            self.releases,
            self.alerter,
            fence=self._fence,
        )
        self.server = TelemetryServer(
            self.registry,
            self.settings.listen,
            alive=lambda: True,  # the loop answers: alive, also while it drains (readiness says the rest)
            ready=self._ready,
            status=self.status,
            decisions=self.decisions,
            releases=self.release_history,
            rollback=self.request_rollback,
            authorize=self._authorize,
        )
        await self.server.start()
        self._closers.append(self.server.stop)
        self.ownership.set_apps(self.loaded.policy.apps)
        await self.ownership.start(self._owners_changed)  # its first look is over: we know our share
        self._schedule()
        self._scheduler.start()
        self._watcher = asyncio.ensure_future(self._watch_policy())
        log.info(
            "flywatch %s started as %s: %d app(s), %d of them ours, serving on %s%s",
            __version__,
            self.ownership.member,
            len(self.loaded.policy.apps),
            len(self.ownership.owned()),
            self.server.url,
            " (dry run: nothing will be changed)" if self.settings.dry_run else "",
        )

    def _ownership(self, store: Store) -> Ownership:
        """Alone on a SQLite store; a member of a cluster on PostgreSQL (cluster.py)."""
        settings = self.settings
        member = member_name(settings.instance, settings.machine_id, platform.node(), secrets.token_hex(3))
        if settings.dry_run and isinstance(store, PostgresStore):
            member = DRY_RUN + member  # a dry run shares the apps with other dry runs only (cluster.Scoped)
        metrics = ClusterMetrics(self.registry)
        if not isinstance(store, PostgresStore):
            if settings.cluster:
                raise StoreError(
                    "FLYWATCH_CLUSTER is set, so this instance is one of several, but its state is"
                    f" {store!r}: set FLYWATCH_STATE_URL to the PostgreSQL they share (alone on this store,"
                    " every instance would act on every app)"
                )
            return SoleOwnership(member, settings.region, metrics)
        leases = PostgresLeases.open(settings.state_url)  # a connection of its own: heartbeats never queue
        self._closers.append(leases.close)
        return Cluster(
            Scoped(leases, dry_run=settings.dry_run),
            self.clock,
            member=member,
            region=settings.region,
            takeover=settings.takeover,
            busy=self._busy,
            metrics=metrics,
        )

    def _owners_changed(self, gained: set[str], lost: set[str]) -> None:
        """The apps this instance may act on changed: their jobs follow at once."""
        if self.loaded is None or self._stopping.is_set():
            return
        log.debug("ownership changed: +%d -%d app(s)", len(gained), len(lost))
        self._schedule()

    def _may_act(self, app: str) -> str | None:
        tick = _TICK.get()
        return self.ownership.may_act(app, tick.epoch if tick is not None and tick.app == app else None)

    def _fence(self, app: str) -> Fence | None:
        tick = _TICK.get()
        return tick if tick is not None and tick.app == app else self.ownership.fence(app)

    def _busy(self, app: str) -> bool:
        return app in self._in_flight.values()

    def _forget(self, apps: set[str]) -> None:
        """Drop what this instance knew of apps it no longer watches, each once no tick of it is running (a
        tick still running would write some of it back)."""
        busy = {app for app in apps if self._busy(app)}
        self._unforgotten |= busy
        idle = apps - busy
        self._unforgotten -= idle
        if self.reconciler is not None:
            # their series go too: a last tick that stays forever would read as a loop that stopped
            self.reconciler.forget(idle)

    async def _forget_ended(self) -> None:
        """Forget, a moment after the first of them ends, the apps let go of whose ticks have ended since:
        one pass for them all (thousands of ticks end one after another when a share is handed over)."""
        try:
            await self.clock.sleep(_FORGET_AFTER)
        finally:
            self._forgetting = None
        self._forget({app for app in self._unforgotten if not self._busy(app)})

    def _schedule(self) -> None:
        assert self.loaded is not None  # noqa: S101 - start() loads it first
        self.ownership.set_apps(self.loaded.policy.apps)
        owned = self.ownership.owned()
        # held again before the tick that kept it from being forgotten ended: what is known of it stays
        self._unforgotten -= owned
        wanted = set()
        if self.settings.decision_retention > 0:
            wanted.add(_HOUSEKEEPING)
            self._scheduler.every(_HOUSEKEEPING, _HOUSEKEEPING_EVERY, self.housekeep)
        for app, policy in self.loaded.policy.apps.items():
            if app not in owned:
                continue  # another instance's, or not yet ours
            wanted.add(f"probe:{app}")
            self._scheduler.every(f"probe:{app}", policy.health.interval, self._job, "probe", app)
            # every app has a tick: the release watch runs in it, scaling too when the app has a policy for it
            wanted.add(f"reconcile:{app}")
            interval = policy.scaling.interval if policy.scaling is not None else policy.health.interval
            self._scheduler.every(f"reconcile:{app}", interval, self._job, "reconcile", app)
        gone = set()
        for job_id in set(self._scheduler.job_ids()) - wanted:
            # an app that the new policy no longer has, or that is no longer this instance's
            self._scheduler.remove(job_id)
            gone.add(job_id.partition(":")[2])
        self._forget(gone)
        for webhook in self.loaded.policy.alerts.webhooks:
            register_secret(webhook.url.get_secret_value())  # a webhook URL never appears in a log line
        if self.alerter is not None:
            self.alerter.configure(_webhooks(self.loaded))

    async def housekeep(self) -> int:
        """Remove the decisions older than FLYWATCH_DECISION_RETENTION; how many went. Any instance of a
        cluster may (the same rows go whoever removes them); a store that fails is tried at the next round."""
        retention = self.settings.decision_retention
        if self.store is None or retention <= 0 or self._stopping.is_set():
            return 0
        try:
            gone = await self.store.expire(DECISIONS, self.clock.now() - retention)
        except StoreError as exc:
            log.warning("could not remove the old decisions (tried again in an hour): %s", exc)
            return 0
        if gone:
            log.info(
                "removed %d decision(s) older than %s (FLYWATCH_DECISION_RETENTION)", gone, _days(retention)
            )
        return gone

    async def _job(self, kind: str, app: str) -> None:
        """A scheduled tick, once a slot is free; it reads the policy in force when it starts, and is waited
        for on stop."""
        if self._stopping.is_set():
            return
        async with self._slots:
            await self._tick(kind, app)

    async def _tick(self, kind: str, app: str) -> None:
        if self._stopping.is_set() or self.loaded is None or self.reconciler is None:
            return
        policy = self.loaded.policy.apps.get(app)
        if policy is None:
            return  # removed by a reload since it was scheduled
        if self.ownership.may_act(app) is not None:
            return  # let go of since it was scheduled (its job is being removed), or our lease lapsed
        task = asyncio.current_task()
        if task is not None:
            self._in_flight[task] = app
        lease = _TICK.set(self.ownership.fence(app))
        try:
            if kind == "probe":
                await self.reconciler.probe(app, policy)
            else:
                await self.reconciler.reconcile(app, policy)
        finally:
            _TICK.reset(lease)
            if task is not None:
                self._in_flight.pop(task, None)
            self.ownership.ended(app)
            if app in self._unforgotten and self._forgetting is None and not self._stopping.is_set():
                self._forgetting = asyncio.ensure_future(self._forget_ended())

    # ------------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Load the policy file again; keep the old policy if the new one is not valid."""
        self._mtime = _mtime(self.settings.config)  # this version has been looked at, whatever it holds
        try:
            loaded = load_policy(self.settings.config)
        except PolicyError as exc:
            self.policy_error = "; ".join(exc.problems)
            self.reloads.labels("error").inc()
            log.error("policy reload rejected, the previous policy stays in force: %s", self.policy_error)  # noqa: TRY400 - the problems say it all; no traceback
            return False
        self.loaded = loaded
        self.loaded_at = self.clock.now()
        self.policy_error = ""
        self.reloads.labels("ok").inc()
        self._schedule()
        log.info("policy reloaded from %s: %d app(s)", loaded.source, len(loaded.policy.apps))
        return True

    async def _watch_policy(self) -> None:
        """Reload when the file has changed and then stayed the same for one more look (an editor or a deploy
        writing it is given time to finish: a file caught half-written is never loaded)."""
        seen: float | None = None
        while not self._stopping.is_set():
            await self.clock.sleep(_WATCH_EVERY)
            mtime = _mtime(self.settings.config)
            if mtime is None or mtime == self._mtime:
                seen = None
            elif mtime == seen:
                try:
                    self.reload()
                except Exception:  # a bug must not end the watch: later edits would never be loaded
                    self.reloads.labels("error").inc()
                    log.exception("policy reload failed unexpectedly, the previous policy stays in force")
            else:
                seen = mtime

    # ------------------------------------------------------------------ views

    def _ready(self) -> tuple[bool, str]:
        if self._stopping.is_set():
            return False, "stopping"
        if self.loaded is None:
            return False, "no policy loaded"
        if isinstance(self.ownership, Cluster) and not self.ownership.joined:
            return False, "not a live member of the cluster (its database does not answer)"
        if self.reconciler is None or (self.ownership.owned() and not self.reconciler.first_tick_done):
            return False, "waiting for the first tick"
        return True, ""

    def status(self) -> dict[str, Any]:
        ready, why = self._ready()
        return {
            "version": __version__,
            "dry_run": self.settings.dry_run,
            "ready": ready,
            "ready_reason": why,
            "started_at": self.started_at,
            "policy": {
                "path": str(self.settings.config),
                "loaded_at": self.loaded_at,
                "apps": list(self.loaded.policy.apps) if self.loaded else [],
                "last_error": self.policy_error,
            },
            "cluster": self.ownership.status_json(),
            "apps": self.reconciler.status_json() if self.reconciler else {},
            "releases": dict(self.releases.status) if self.releases else {},
        }

    async def release_history(self, app: str | None, limit: int) -> list[dict[str, Any]]:
        if self.releases is None:
            return []
        return await self.releases.history(app, limit)

    async def request_rollback(self, app: str, to: int | None, by: str) -> dict[str, Any]:
        if self.loaded is None or self.releases is None or app not in self.loaded.policy.apps:
            raise LookupError(f"{app} is not an app of the policy")
        if self.loaded.policy.apps[app].release.on_failure == "none":
            log.info("rollback of %s asked for by hand (its policy rolls nothing back by itself)", app)
        return await self.releases.request_rollback(app, to, by)

    def _authorize(self, header: str) -> bool:
        """A rollback by hand needs the daemon's own Fly token: whoever holds it could change the machines
        through Fly's API anyway; anyone else on the private network cannot."""
        token = self.settings.fly_api_token.get_secret_value() if self.settings.fly_api_token else ""
        token = token.strip().removeprefix("FlyV1 ").strip()
        scheme, _, given = header.strip().partition(" ")
        given = given.strip()
        if scheme.lower() == "bearer":
            given = given.removeprefix("FlyV1 ").strip()  # "Bearer FlyV1 fm2_...": the token as it is set
        elif scheme.lower() != "flyv1":
            return False
        return bool(token) and hmac.compare_digest(given.encode(), token.encode())

    async def decisions(self, app: str | None, limit: int) -> list[dict[str, Any]]:
        if self.store is None:
            return []
        entries = await self.store.read(DECISIONS, key=app, limit=limit)
        return [entry.record for entry in entries]

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info("stopping: waiting for %d tick(s) in flight", len(self._in_flight))
        # the apps with no tick running go to the other instances now, not once every tick is over
        await self.ownership.drain()
        for task in (self._watcher, self._forgetting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # its end is not ours to judge
                    await task
        # the ticks in flight finish before the scheduler shuts down: APScheduler's shutdown cancels the
        # jobs it is running (an action cut short, its decision and its cooldown never recorded); until
        # then the jobs it still starts return at once, as _stopping is set
        if self._in_flight:
            _, pending = await asyncio.wait(list(self._in_flight), timeout=_STOP_GRACE)
            for task in pending:
                task.cancel()
            if pending:  # let them unwind (and release their leases) while the client is still open
                await asyncio.wait(pending, timeout=_UNWIND_GRACE)
        self._scheduler.shutdown()
        await self.ownership.stop()  # the others take our apps over now, not when our leases run out
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:
                log.exception("error while closing")
        log.info("stopped")

    async def run(self) -> int:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the policy. The exit code."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        installed = []
        for sig, handler in (
            (signal.SIGTERM, done.set),
            (signal.SIGINT, done.set),
            (signal.SIGHUP, self.reload),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
        try:
            await self.start()
            await done.wait()
            return 0
        finally:
            await self.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)


def _webhooks(loaded: LoadedPolicy) -> list[WebhookTarget]:
    return [WebhookTarget(w.url.get_secret_value(), w.format) for w in loaded.policy.alerts.webhooks]


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds / 3600:g} hours"


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
