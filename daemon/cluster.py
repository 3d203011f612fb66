"""Who may act on which app: one instance alone, or several sharing one PostgreSQL.

Alone (a SQLite store): `SoleOwnership`, every app of the policy is this instance's, always.

Several (a PostgreSQL store): `Cluster`. Each instance is a member: it renews its row in flywatch_members
every `heartbeat` seconds, and from the live members it works out, by rendezvous hashing (core/ring.py), which
apps are its share. It holds a lease row per app in flywatch_leases (owner, epoch, expiry by the database's
clock), taking the free or expired ones of its share, renewing those it keeps and releasing those that
now belong to another member. Three rules make "exactly one instance acts on an app at a time" hold, even
for an instance that is frozen or cut off and comes back:

1. Locally, a lease counts as held only until `sent + lease - margin` on the monotonic clock, where `sent` is
   when the statement that renewed it was sent. The database set its expiry at `now() + lease` when it ran the
   statement, which is later than `sent`: the instance stops acting at least `margin` seconds before anyone
   may take the app over, whatever happens to it (SIGSTOP, a lost network, a database that no longer answers).
2. Every mutating request to the Machines API asks first (fly/client.py's guard, the last thing before the
   request goes out): a request for an app not held, or whose lease has lapsed here, is never sent.
3. Every state write for an app carries a Fence (app, owner, epoch), checked by the database in the write's
   own transaction: a write that arrives after the app changed hands is refused, however late it arrives.

Takeover: the lease lasts `takeover - 1.25 * heartbeat` (heartbeat = takeover / 5), so once an owner stops,
its leases have expired and another member has looked again within `takeover` seconds (15 s by default).

Handover between live members is quicker: a member that joins anew, leaves, or releases leases tells the
others (PostgreSQL's NOTIFY; each member listens on a connection of its own), and they look at once, so a
graceful stop or a newcomer moves apps in a few round trips rather than a heartbeat or two. Telling is only
ever a hint: a member whose listener is down (logged) still looks every heartbeat, and one that has apps of
its share it could not take yet looks again sooner (every second, or every heartbeat if that is shorter).
Looks woken early are never closer together than a tenth of a second, and renew the leases only when
that falls due (every heartbeat), so a burst of releases (thousands of ticks ending one after another)
costs a few small looks, not a renewal of every lease each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.clock import Clock
from daemon.core import ring
from daemon.store.base import Fence, StoreError
from daemon.store.postgres import Member, Roster
from daemon.telemetry.metrics import ClusterMetrics

log = logging.getLogger("flywatch.cluster")

DEFAULT_TAKEOVER = 15.0  # seconds: at most this long from an owner's end to another member acting
_PENDING_EVERY = 1.0  # seconds between looks while apps of our share are still held by another member
_SOONEST = 0.1  # seconds: the least time between the starts of two looks, however often woken

# (gained, lost): apps this instance may now act on, and apps it may no longer act on
OnChange = Callable[[set[str], set[str]], None]


class Ownership(Protocol):
    """What the daemon asks of whoever decides which apps are this instance's."""

    member: str

    def owned(self) -> set[str]:
        """The apps this instance may act on now."""
        ...

    def may_act(self, app: str, epoch: int | None = None) -> str | None:
        """None when this instance may act on `app` now (and, given `epoch`, still holds it at that epoch:
        a tick begun under one lease never acts under the next); else why not."""
        ...

    def fence(self, app: str) -> Fence | None:
        """The fence for a state write about `app` (None: writes need none, there is no one else)."""
        ...

    def set_apps(self, apps: Iterable[str]) -> None:
        """The apps of the policy (at start, and after every reload)."""
        ...

    async def start(self, on_change: OnChange) -> None:
        """Take this instance's share (the first look is over when it returns), then keep it up to date."""
        ...

    async def drain(self) -> None:
        """On the way out, while the ticks in flight finish: give up at once every app with no tick
        running, so that the others take them now, and each of the rest as soon as its tick ends."""
        ...

    def ended(self, app: str) -> None:
        """A tick of `app` has ended (one that is no longer ours is released now, not at the next look)."""
        ...

    async def stop(self) -> None:
        """Give up everything at once, so the others take over now rather than at the lease's end."""
        ...

    def status_json(self) -> dict[str, Any]: ...


class SoleOwnership:
    """One instance alone: every app of the policy is its own, no fencing needed."""

    def __init__(self, member: str, region: str, metrics: ClusterMetrics | None = None) -> None:
        self.member = member
        self.region = region
        self._apps: set[str] = set()
        self._metrics = metrics

    def owned(self) -> set[str]:
        return set(self._apps)

    def may_act(self, app: str, epoch: int | None = None) -> str | None:  # noqa: ARG002 - no one else
        return None if app in self._apps else f"{app} is not an app of the policy"

    def fence(self, app: str) -> Fence | None:  # noqa: ARG002 - no one else to fence off
        return None

    def set_apps(self, apps: Iterable[str]) -> None:
        self._apps = set(apps)
        if self._metrics is not None:
            self._metrics.show(self.member, self.region, up=True, owned=len(self._apps), members=1)

    async def start(self, on_change: OnChange) -> None:
        on_change(set(self._apps), set())

    async def drain(self) -> None:
        return None

    def ended(self, app: str) -> None:  # noqa: ARG002 - nothing is handed over
        return None

    async def stop(self) -> None:
        return None

    def status_json(self) -> dict[str, Any]:
        return {
            "mode": "single",
            "member": self.member,
            "region": self.region,
            "owned": len(self._apps),
            "members": [
                {
                    "member": self.member,
                    "region": self.region,
                    "live": True,
                    "apps": len(self._apps),
                    "me": True,
                }
            ],
        }


class LeaseTable(Protocol):
    """The membership and lease tables (store/postgres.py's PostgresLeases)."""

    def key(self, app: str) -> str:
        """The lease row of `app` (its name, but for a dry run's: Scoped)."""
        ...

    async def join(self, member: str, region: str, started_at: float, ttl: float) -> Roster: ...

    async def exchange(
        self,
        member: str,
        ttl: float,
        *,
        renew: dict[str, int],
        release: dict[str, int],
        acquire: list[str],
    ) -> tuple[set[str], dict[str, int]]: ...

    async def withdraw(self, member: str) -> Roster: ...

    async def leave(self, member: str) -> None: ...

    def changes(self, member: str) -> AsyncIterator[str]:
        """ "" once listening, then each other member that changed the tables; StoreError when it fails."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Held:
    epoch: int
    until: float  # monotonic: held locally until then (see rule 1)


@dataclass(frozen=True)
class Timing:
    """The cluster's times, all from the one setting `takeover`."""

    takeover: float

    @property
    def heartbeat(self) -> float:
        """Seconds between looks at the tables."""
        return self.takeover / 5

    @property
    def lease(self) -> float:
        """Seconds a renewal holds an app (and a member's row) in the database."""
        return self.takeover - 1.25 * self.heartbeat

    @property
    def margin(self) -> float:
        """Seconds before the database's expiry that the instance stops acting itself: a request that passed
        the guard has that long to reach Fly before anyone else may act."""
        return self.heartbeat


class Cluster:
    """One member of a cluster of instances on one PostgreSQL (see the module's docstring)."""

    def __init__(
        self,
        leases: LeaseTable,
        clock: Clock,
        *,
        member: str,
        region: str,
        takeover: float = DEFAULT_TAKEOVER,
        busy: Callable[[str], bool] = lambda _app: False,
        metrics: ClusterMetrics | None = None,
    ) -> None:
        self.member = member
        self.region = region
        self.timing = Timing(takeover)
        self._leases = leases
        self._clock = clock
        self._busy = busy  # an app with a tick still running: its lease is released once that ends
        self._metrics = metrics
        self._started_at = clock.now()
        self._apps: set[str] = set()
        self._held: dict[str, _Held] = {}
        self._epochs: dict[str, int] = {}  # the last epoch held of each app, for the fence of a late write
        self._releasing: dict[str, int] = {}  # given up locally, to release in the database when idle
        self._joined_until = 0.0  # monotonic: our membership row is current until then
        self._roster = Roster((), {})
        self._wants: set[str] = set()
        self._on_change: OnChange = lambda _gained, _lost: None
        self._loop: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._look_began = float("-inf")  # monotonic
        self._renew_due = float("-inf")  # monotonic: when the leases are renewed next
        self._draining = False  # on the way out: no longer a member, keeping only apps with a tick running
        self._begun = 0  # looks begun, and the number of the last one ended
        self._ended = 0
        self._looked = asyncio.Event()
        self.last_beat: float | None = None
        self.last_error = ""
        self.beats = 0

    # ------------------------------------------------------------------ asked by the daemon

    def owned(self) -> set[str]:
        now = self._clock.monotonic()
        return {app for app, held in self._held.items() if held.until > now}

    def may_act(self, app: str, epoch: int | None = None) -> str | None:
        held = self._held.get(app)
        if held is None:
            owner = self._roster.owners.get(app)
            return f"{app} is not ours: " + (f"{owner} owns it" if owner else "no lease held")
        if epoch is not None and held.epoch != epoch:
            return f"{app}'s lease changed hands since this tick began (epoch {epoch}, now {held.epoch})"
        left = held.until - self._clock.monotonic()
        if left <= 0:
            return f"{app}'s lease was renewed too long ago to act on (the database may not be answering)"
        return None

    def fence(self, app: str) -> Fence:
        held = self._held.get(app)
        # not held: the last epoch we had, which the database refuses now that the lease is not ours
        epoch = held.epoch if held is not None else self._epochs.get(app, 0)
        key = self._leases.key(app)
        return Fence(app, self.member, epoch, lease="" if key == app else key)

    def set_apps(self, apps: Iterable[str]) -> None:
        apps = set(apps)
        if apps != self._apps:
            self._apps = apps
            self._wake.set()  # a new policy is looked at now, not at the next heartbeat

    async def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        await self.beat()
        self._loop = asyncio.ensure_future(self._run())
        self._listener = asyncio.ensure_future(self._listen())

    async def drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        if self._loop is None or self._loop.done():
            await self.beat()
            return
        # the next look (begun after this, by the heartbeat: never two at once on its connection) takes us
        # off the members and releases the idle apps; the others take them at their next look
        after = self._begun
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * self.timing.heartbeat):  # a database not answering: go on
                while self._ended <= after:
                    self._looked.clear()
                    await self._looked.wait()

    def ended(self, app: str) -> None:
        if app in self._releasing or (self._draining and app in self._held):
            self._wake.set()  # its new owner waits for this release

    async def stop(self) -> None:
        for task in (self._loop, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop = self._listener = None
        lost = set(self._held)
        self._held.clear()
        self._joined_until = 0.0
        if lost:
            self._on_change(set(), lost)
        try:
            await self._leases.leave(self.member)
        except StoreError as exc:
            log.warning("could not give up the leases on the way out (they expire by themselves): %s", exc)
        self._show()

    # ------------------------------------------------------------------ the heartbeat

    async def _run(self) -> None:
        while True:
            heartbeat = self.timing.heartbeat
            waiting = self._draining or self._wants - set(self._held)  # for ticks to end, or for apps
            pause = min(_PENDING_EVERY, heartbeat) if waiting else heartbeat
            if not self.last_error:  # after a failure: that long, a database in trouble is not pressed
                pause = min(pause, self._renew_due - self._clock.monotonic())
            await self._pause(pause)
            await self._clock.sleep(self._look_began + _SOONEST - self._clock.monotonic())
            self._wake.clear()  # here, not before the pause: a wake during a look starts the next at once
            try:
                await self.beat()
            except Exception as exc:  # a bug must not end the heartbeat: the leases would lapse one by one
                log.exception("cluster heartbeat failed unexpectedly")
                self.last_error = f"unexpected {type(exc).__name__} (logged)"  # in /status: no message

    async def _listen(self) -> None:
        """Look at once whenever another member tells of a change (see the module's docstring), and once
        each time listening (re)starts, for what was said while no one listened. Down, it tries again every
        heartbeat; the heartbeat's looks go on meanwhile."""
        down = False
        while True:
            try:
                async for _teller in self._leases.changes(self.member):
                    if down:
                        log.info("listening to the other members again")
                        down = False
                    self._wake.set()
            except StoreError as exc:
                if not down:
                    log.warning(
                        "cannot listen to the other members (handovers wait for a heartbeat, %gs): %s",
                        self.timing.heartbeat,
                        exc,
                    )
                down = True
            except Exception:  # a bug must not end the listening for good
                log.exception("listening to the other members failed unexpectedly")
            await self._clock.sleep(self.timing.heartbeat)

    async def _pause(self, seconds: float) -> None:
        """Sleep on the clock for `seconds`, or until woken (a new policy, another member telling, a tick
        ended that holds an app we give up, drain)."""
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({timer, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (timer, woken):
                task.cancel()
            await asyncio.gather(timer, woken, return_exceptions=True)

    async def beat(self) -> None:
        """One look: renew the membership, work out our share, give up, renew and take leases."""
        self._begun += 1
        number = self._begun
        self._look_began = self._clock.monotonic()
        try:
            await self._look()
        finally:
            self._ended = number
            self._looked.set()

    async def _look(self) -> None:
        timing = self.timing
        sent = self._clock.monotonic()
        try:
            if self._draining:
                roster = await self._leases.withdraw(self.member)
            else:
                roster = await self._leases.join(self.member, self.region, self._started_at, timing.lease)
        except StoreError as exc:
            self._failed(exc)
            return
        if self._draining:
            self._joined_until = 0.0
            # kept while a tick of it runs (and its lease has not lapsed here); nothing is taken any more
            now = self._clock.monotonic()
            wanted = {app for app, held in self._held.items() if held.until > now and self._busy(app)}
        else:
            self._joined_until = sent + timing.lease - timing.margin
            wanted = ring.share(self._apps, [m.member for m in roster.members if m.live], self.member)
        self._let_go(wanted)
        release = {app: epoch for app, epoch in self._releasing.items() if not self._busy(app)}
        # renewed every heartbeat; a look woken early in between renews only if that is nearly due
        renewing = self._renew_due - sent <= timing.heartbeat / 2 or bool(self.last_error)  # or retried
        renew = {app: held.epoch for app, held in self._held.items()} if renewing else {}
        sent = self._clock.monotonic()
        try:
            renewed, acquired = await self._leases.exchange(
                self.member,
                timing.lease,
                renew=renew,
                release=release,
                acquire=[] if self._draining else sorted(wanted - set(self._held)),
            )
        except StoreError as exc:
            self._failed(exc)
            return
        if renewing:
            self._renew_due = sent + timing.heartbeat
        taken = self._keep(sent + timing.lease - timing.margin, set(renew) - renewed, renewed, acquired)
        for app in release:
            self._releasing.pop(app, None)
        owners = {app: owner for app, owner in roster.owners.items() if owner != self.member}
        owners.update(dict.fromkeys(self._held, self.member))
        self._roster = Roster(roster.members, {a: o for a, o in owners.items() if a not in release})
        self._wants = wanted
        self.last_beat = self._clock.now()
        self.last_error = ""
        self.beats += 1
        if acquired or taken:
            self._on_change(set(acquired), taken)
        self._show()

    def _let_go(self, wanted: set[str]) -> None:
        """Stop acting at once on the apps whose leases lapsed here and on those that are no longer our
        share (to be released in the database once no tick of theirs is running)."""
        now = self._clock.monotonic()
        lapsed = {app for app, held in self._held.items() if held.until <= now}
        moved = set(self._held) - wanted - lapsed
        for app in lapsed | moved:
            held = self._held.pop(app)
            if app in moved:
                self._releasing[app] = held.epoch
        for app in wanted:
            self._releasing.pop(app, None)  # taken back (the policy, or the members, changed again)
        self._tell("lost", lapsed, "lost %d app(s) whose leases lapsed: %s", logging.WARNING)
        self._tell("released", moved, "handing %d app(s) over to their new owners: %s")
        if lapsed or moved:
            self._on_change(set(), lapsed | moved)

    def _keep(self, until: float, taken: set[str], renewed: set[str], acquired: dict[str, int]) -> set[str]:
        """Record what the exchange gave: the renewed and acquired leases held `until`; `taken` (renewals
        the database refused: expired there, or another member's now) dropped. Returns those dropped."""
        taken = {app for app in taken if self._held.pop(app, None) is not None}
        for app in renewed:
            if app in self._held:
                self._held[app].until = until
        for app, epoch in acquired.items():
            self._held[app] = _Held(epoch, until)
            self._epochs[app] = epoch
        self._tell("lost", taken, "lost %d app(s) another member holds now: %s", logging.WARNING)
        self._tell("gained", set(acquired), "took %d app(s): %s")
        return taken

    def _failed(self, exc: StoreError) -> None:
        self.last_error = str(exc)  # the next look, a heartbeat (or a second) away, renews whatever is due
        log.warning("cluster heartbeat failed (leases held locally until they lapse): %s", exc)
        if self._metrics is not None:
            self._metrics.heartbeat_failures.inc()
        self._show()

    def _tell(self, change: str, apps: set[str], message: str, level: int = logging.INFO) -> None:
        """Log and count apps changing hands (`message` takes their number and some of their names)."""
        if not apps:
            return
        log.log(level, message, len(apps), _some(apps))
        if self._metrics is not None:
            self._metrics.changes.labels(change).inc(len(apps))

    def _show(self) -> None:
        if self._metrics is not None:
            live = sum(1 for m in self._roster.members if m.live)
            self._metrics.show(
                self.member,
                self.region,
                up=self.joined,
                owned=len(self.owned()),
                members=live,
                unowned=len(self._apps - set(self._roster.owners)),
            )

    @property
    def joined(self) -> bool:
        """Our membership row is current: the others count us among the live members."""
        return self._joined_until > self._clock.monotonic()

    def status_json(self) -> dict[str, Any]:
        owned = self.owned()
        counts: dict[str, int] = {}
        for owner in self._roster.owners.values():
            counts[owner] = counts.get(owner, 0) + 1
        members: list[Member] = list(self._roster.members)
        return {
            "mode": "cluster",
            "member": self.member,
            "region": self.region,
            "joined": self.joined,
            "takeover_seconds": self.timing.takeover,
            "heartbeat_seconds": self.timing.heartbeat,
            "lease_seconds": self.timing.lease,
            "last_heartbeat": self.last_beat,
            "last_error": self.last_error,
            "owned": len(owned),
            "members": [
                {
                    "member": m.member,
                    "region": m.region,
                    "live": m.live,
                    "started_at": m.started_at,
                    "apps": counts.get(m.member, 0),
                    "me": m.member == self.member,
                }
                for m in members
            ],
            "owners": {app: self._roster.owners.get(app) for app in sorted(self._apps)},
        }


def _some(apps: Iterable[str], shown: int = 5) -> str:
    names = sorted(apps)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


DRY_RUN = "dry-run:"  # the mark of a dry run's members and lease rows (no Fly app name holds a colon)


class Scoped:
    """The lease table as the instances of one mode see it. Dry runs (FLYWATCH_DRY_RUN) and live instances
    share the tables but never each other's apps: a dry run's members and lease rows carry the DRY_RUN mark,
    and each side sees only its own. A dry run started beside a live cluster (to try a policy) therefore
    takes no app away from it: it shares the apps with the other dry runs alone, or watches them all by
    itself. Live instances see the tables as they are, less any dry run's rows."""

    def __init__(self, table: LeaseTable, *, dry_run: bool) -> None:
        self._table = table
        self._mark = DRY_RUN if dry_run else ""

    def key(self, app: str) -> str:
        """An app's lease row."""
        return self._mark + app

    def _ours(self, name: str) -> bool:
        return name.startswith(DRY_RUN) if self._mark else not name.startswith(DRY_RUN)

    def _seen(self, roster: Roster) -> Roster:
        members = tuple(m for m in roster.members if self._ours(m.member))
        owners = {key.removeprefix(self._mark): o for key, o in roster.owners.items() if self._ours(key)}
        return Roster(members, owners)

    async def join(self, member: str, region: str, started_at: float, ttl: float) -> Roster:
        return self._seen(await self._table.join(member, region, started_at, ttl))

    async def withdraw(self, member: str) -> Roster:
        return self._seen(await self._table.withdraw(member))

    async def exchange(
        self,
        member: str,
        ttl: float,
        *,
        renew: dict[str, int],
        release: dict[str, int],
        acquire: list[str],
    ) -> tuple[set[str], dict[str, int]]:
        renewed, acquired = await self._table.exchange(
            member,
            ttl,
            renew={self.key(app): epoch for app, epoch in renew.items()},
            release={self.key(app): epoch for app, epoch in release.items()},
            acquire=[self.key(app) for app in acquire],
        )
        return (
            {key.removeprefix(self._mark) for key in renewed},
            {key.removeprefix(self._mark): epoch for key, epoch in acquired.items()},
        )

    async def leave(self, member: str) -> None:
        await self._table.leave(member)

    async def changes(self, member: str) -> AsyncIterator[str]:
        async for teller in self._table.changes(member):
            if not teller or self._ours(teller):  # the other side's changes are none of ours
                yield teller

    async def close(self) -> None:
        await self._table.close()


def member_name(configured: str | None, machine: str | None, host: str, token: str) -> str:
    """This instance's name in the tables: FLYWATCH_INSTANCE, else the Fly machine's id, else the host; with
    a token of this process's own, so a restarted instance is a new member and never mistakes the leases of
    the process before it (which may still be acting, frozen, somewhere) for its own."""
    base = (configured or machine or host or "flywatch").strip() or "flywatch"
    return f"{base}/{token}"
