"""The Cluster itself, on the real database and the wall clock, with a small takeover (2 s: heartbeat 0.4 s,
lease 1.5 s, margin 0.4 s): several members in one event loop, each on its own lease connection. Every app
ends with exactly one owner, the one rendezvous hashing names; no app is ever held by two members at once;
joins, leaves and deaths move only the apps they must, in time, and a member cut off stops acting before
anyone else may start."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import prometheus_client
import psycopg
import pytest

from daemon.clock import Clock, ManualClock, SystemClock
from daemon.cluster import _SOONEST, Cluster, Scoped, SoleOwnership, member_name
from daemon.core import ring
from daemon.store import open_store
from daemon.store.base import Fence, FencedError, StoreError
from daemon.store.postgres import LISTENER, PostgresLeases, Roster
from daemon.telemetry.metrics import ClusterMetrics
from tests.store.conftest import new_postgres_schema, postgres_schema_url

TAKEOVER = 2.0
HEARTBEAT = TAKEOVER / 5  # 0.4
LEASE = TAKEOVER - 1.25 * HEARTBEAT  # 1.5
MARGIN = HEARTBEAT  # 0.4
APPS = {f"app-{i:02d}" for i in range(24)}


@pytest.fixture
def url() -> Iterator[str]:
    schema, drop = new_postgres_schema()
    yield postgres_schema_url(schema)
    drop()


@dataclass
class Node:
    """One member under test: its Cluster, its lease connection, and every change it reported, timed."""

    cluster: Cluster
    leases: PostgresLeases
    registry: prometheus_client.CollectorRegistry
    gained: dict[str, list[float]] = field(default_factory=dict)  # app -> monotonic times gained
    lost: dict[str, list[float]] = field(default_factory=dict)  # app -> monotonic times lost

    @property
    def name(self) -> str:
        return self.cluster.member

    def on_change(self, gained: set[str], lost: set[str]) -> None:
        now = time.monotonic()
        for app in gained:
            self.gained.setdefault(app, []).append(now)
        for app in lost:
            self.lost.setdefault(app, []).append(now)

    async def start(self) -> None:
        await self.cluster.start(self.on_change)

    def failures(self) -> float:
        return self.registry.get_sample_value("flywatch_cluster_heartbeat_failures_total") or 0.0


Make = Callable[..., Node]


@pytest.fixture
async def make(url: str) -> AsyncIterator[Make]:
    """Members on the test schema (not started); every one stopped and closed afterwards."""
    made: list[Node] = []
    numbers = itertools.count(1)

    def build(
        apps: set[str] = APPS,
        region: str = "iad",
        busy: Callable[[str], bool] = lambda _app: False,
        takeover: float = TAKEOVER,
    ) -> Node:
        n = next(numbers)
        leases = PostgresLeases.open(url)
        registry = prometheus_client.CollectorRegistry()
        cluster = Cluster(
            leases,
            SystemClock(),
            member=member_name(f"m{n}", None, "host", f"t{n}-{uuid.uuid4().hex[:6]}"),  # unique on the server
            region=region,
            takeover=takeover,
            busy=busy,
            metrics=ClusterMetrics(registry),
        )
        cluster.set_apps(apps)
        node = Node(cluster, leases, registry)
        made.append(node)
        return node

    yield build
    for node in made:
        await node.cluster.stop()
        await node.leases.close()


async def just_looked(node: Node) -> None:
    """Until `node` has made a look: its next one of its own (it is settled) is a heartbeat away."""
    beats = node.cluster.beats
    await until(
        lambda: node.cluster.beats > beats, timeout=2 * node.cluster.timing.heartbeat + 5, what="a look"
    )


async def until(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> float:
    """Poll `predicate` every 10 ms until it holds; the seconds that took. Fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def settled(nodes: list[Node], apps: set[str] = APPS) -> bool:
    """Every node owns exactly the share rendezvous hashing gives it among `nodes`."""
    expected = ring.assign(apps, [n.name for n in nodes])
    return all(n.cluster.owned() == {a for a, o in expected.items() if o == n.name} for n in nodes)


@contextlib.asynccontextmanager
async def disjointness(nodes: list[Node]) -> AsyncIterator[list[str]]:
    """Sample every node's owned() every 5 ms while the block runs; yields the list of overlaps seen (the
    caller asserts it stays empty)."""
    overlaps: list[str] = []

    async def sample() -> None:
        while True:
            owned = [(n.name, n.cluster.owned()) for n in nodes]
            for (a, mine), (b, theirs) in itertools.combinations(owned, 2):
                if both := mine & theirs:
                    overlaps.append(f"{sorted(both)} held by {a} and {b}")
            await asyncio.sleep(0.005)

    task = asyncio.ensure_future(sample())
    try:
        yield overlaps
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------------------------------- alone


async def test_a_member_alone_gets_every_app_at_start(url: str, make: Make) -> None:
    outsider = PostgresLeases.open(url)
    try:
        # an app held by someone else (not a member): shown as theirs
        assert await outsider.exchange("someone/else", 30.0, renew={}, release={}, acquire=["foreign"]) == (
            set(),
            {"foreign": 1},
        )
        node = make()
        await node.start()
        assert node.cluster.owned() == APPS
        assert set(node.gained) == APPS
        assert all(len(times) == 1 for times in node.gained.values())
        assert node.lost == {}
        assert node.cluster.joined
        for app in APPS:
            assert node.cluster.may_act(app) is None
            assert node.cluster.fence(app) == Fence(app, node.name, 1)
        refusal = node.cluster.may_act("foreign")
        assert refusal is not None
        assert "not ours" in refusal
        assert "someone/else" in refusal
        nobody = node.cluster.may_act("nobodys-app")
        assert nobody is not None
        assert "not ours" in nobody
        assert "no lease held" in nobody
        # the fence is good for a write to the store, a foreign one is not
        store = open_store(url)
        try:
            await store.put("cooldowns", "app-00/iad", {"v": 1}, fence=node.cluster.fence("app-00"))
            assert await store.get("cooldowns", "app-00/iad") == {"v": 1}
        finally:
            await store.close()
        # it stays that way over a few heartbeats: renewed, not re-acquired
        await asyncio.sleep(3 * HEARTBEAT)
        assert node.cluster.owned() == APPS
        assert node.cluster.beats >= 3
        assert all(len(times) == 1 for times in node.gained.values())
        assert node.cluster.fence("app-00").epoch == 1
    finally:
        await outsider.close()


# ---------------------------------------------------------------------------------------------- three


async def test_three_members_split_the_apps_as_the_ring_says_never_holding_one_twice(make: Make) -> None:
    nodes = [make(region=region) for region in ("iad", "ams", "syd")]
    async with disjointness(nodes) as overlaps:
        await asyncio.gather(*(n.start() for n in nodes))
        took = await until(lambda: settled(nodes), timeout=8.0, what="the split of the ring")
        await asyncio.sleep(2 * HEARTBEAT)  # and it stays so
        assert settled(nodes)
    assert overlaps == []
    owners = [n.cluster.owned() for n in nodes]
    assert set.union(*owners) == APPS
    assert sum(len(o) for o in owners) == len(APPS)
    assert all(owners), "24 apps over three members: each gets some"
    assert took < 3 * TAKEOVER


# ---------------------------------------------------------------------------------------------- join


async def test_a_member_that_joins_takes_only_its_share_after_the_others_let_go(make: Make) -> None:
    first, second = make(), make()
    await first.start()
    await second.start()
    await until(lambda: settled([first, second]), timeout=6.0, what="two members settling")
    before = {n.name: n.cluster.owned() for n in (first, second)}
    third = make()
    names = [first.name, second.name, third.name]
    moving = {app for app, owner in ring.assign(APPS, names).items() if owner == third.name}
    assert moving, "the third member's share is not empty"
    mark = time.monotonic()
    async with disjointness([first, second, third]) as overlaps:
        await third.start()
        took = await until(lambda: settled([first, second, third]), timeout=6.0, what="the join")
    assert overlaps == []
    assert took < TAKEOVER, "a handover between live members takes a heartbeat or two, not a takeover"
    assert third.cluster.owned() == moving
    for node in (first, second):
        # only the moving apps left; nothing else lost, nothing gained since the join
        assert node.cluster.owned() == before[node.name] - moving
        lost_since = {app for app, times in node.lost.items() if max(times) >= mark}
        assert lost_since == before[node.name] & moving
        assert not {app for app, times in node.gained.items() if max(times) >= mark}
    for app in moving:
        loser = first if app in before[first.name] else second
        assert loser.lost[app][-1] < third.gained[app][0], f"{app} gained before its loser let go of it"
    assert set(third.gained) == moving
    assert all(len(times) == 1 for times in third.gained.values())


# ---------------------------------------------------------------------------------------------- leave


async def test_a_member_that_stops_hands_its_apps_over_promptly(make: Make) -> None:
    nodes = [make(), make(), make()]
    for node in nodes:
        await node.start()
    await until(lambda: settled(nodes), timeout=8.0, what="three members settling")
    leaving, staying = nodes[0], nodes[1:]
    its_apps = leaving.cluster.owned()
    assert its_apps
    async with disjointness(nodes) as overlaps:
        mark = time.monotonic()
        await leaving.cluster.stop()
        assert leaving.cluster.owned() == set()
        assert all(leaving.lost[app][-1] >= mark for app in its_apps)
        assert leaving.cluster.may_act(min(its_apps)) is not None
        assert not leaving.cluster.joined
        took = await until(lambda: settled(staying), timeout=TAKEOVER + 1, what="the handover")
    assert overlaps == []
    # released, not left to expire: the others take over at their next look
    assert took < TAKEOVER / 2, f"took {took:.2f}s, a released lease is free at once"
    for app in its_apps:
        gainer = next(n for n in staying if app in n.cluster.owned())
        assert gainer.gained[app][-1] >= mark


async def test_a_member_draining_hands_its_idle_apps_over_at_once_and_a_busy_one_when_its_tick_ends(
    make: Make,
) -> None:
    """drain() (the daemon's first step on SIGTERM, while its ticks in flight finish): off the members
    at once, every app with no tick running released and taken by the other at its next look; the app
    still ticking stays held and renewed, well past a lease, and goes over as soon as its tick ends."""
    ticking: set[str] = set()
    leaving, staying = make(busy=lambda app: app in ticking), make()
    for node in (leaving, staying):
        await node.start()
    await until(lambda: settled([leaving, staying]), timeout=8.0, what="two members settling")
    its_apps = leaving.cluster.owned()
    kept = min(its_apps)
    ticking.add(kept)
    async with disjointness([leaving, staying]) as overlaps:
        await leaving.cluster.drain()
        assert not leaving.cluster.joined
        assert leaving.cluster.owned() == {kept}
        took = await until(
            lambda: staying.cluster.owned() == APPS - {kept}, timeout=TAKEOVER, what="the idle apps taken"
        )
        assert took < TAKEOVER / 2, f"took {took:.2f}s: released, they are free at once"
        # the busy one: held, renewed, acted on, for longer than a lease would last unrenewed
        held_since = time.monotonic()
        await until(lambda: time.monotonic() - held_since > LEASE + MARGIN, timeout=LEASE + MARGIN + 1)
        assert leaving.cluster.may_act(kept) is None
        assert kept not in staying.cluster.owned()
        ticking.clear()
        await until(lambda: staying.cluster.owned() == APPS, timeout=3 * HEARTBEAT + 1, what="the last app")
        assert leaving.cluster.owned() == set()
    assert overlaps == []


async def test_a_draining_member_whose_busy_app_lapsed_does_not_take_it_again(url: str) -> None:
    """Draining, a member keeps an app only while its tick runs and its lease holds here: once the lease
    lapsed (here on its own clock, then in the database), the next look lets it go for good instead of
    taking it again at a new epoch (held for a tick that can no longer act, it would keep its new owner
    out until that tick ended)."""
    clock = ManualClock()  # the member's own time: its lease lapses here when the test says
    leases, other = PostgresLeases.open(url), PostgresLeases.open(url)
    cluster = Cluster(
        leases, clock, member="m1/drain", region="iad", takeover=TAKEOVER, busy=lambda _app: True
    )
    try:
        cluster.set_apps({"app-00"})
        await cluster.beat()
        assert cluster.owned() == {"app-00"}
        await cluster.drain()  # not started: the look is made at once
        assert cluster.owned() == {"app-00"}  # busy: kept, renewed
        await clock.advance(LEASE)  # no renewal for a lease's length here: lapsed locally
        assert cluster.owned() == set()

        async def expired() -> bool:
            roster = await other.join("m2/watcher", "cdg", 0.0, LEASE)
            return "app-00" not in roster.owners

        deadline = time.monotonic() + LEASE + 2
        while not await expired():  # in the database too, by its own clock
            assert time.monotonic() < deadline, "the lease never expired in the database"
            await asyncio.sleep(0.05)
        await cluster.beat()
        assert cluster.owned() == set()
        assert await expired(), "taken again while draining"
    finally:
        await cluster.stop()
        await leases.close()
        await other.close()


async def test_a_dry_run_beside_a_live_cluster_takes_no_app_from_it_and_its_fences_hold(url: str) -> None:
    """Two live members and a dry run on one database: the live ones split every app between them as if
    the dry run were not there, the dry run holds every app on its own rows (its writes fenced by them),
    and none of them sees the other side's leases as owners; a second dry run shares with the first."""
    tables = [PostgresLeases.open(url) for _ in range(4)]
    clock = SystemClock()

    def member(n: int, *, dry_run: bool) -> Cluster:
        name = ("dry-run:" if dry_run else "") + f"m{n}/t{n}"
        scoped = Scoped(tables[n], dry_run=dry_run)
        return Cluster(scoped, clock, member=name, region="iad", takeover=TAKEOVER)

    live = [member(0, dry_run=False), member(1, dry_run=False)]
    dry = member(2, dry_run=True)
    store = open_store(url)
    try:
        for cluster in (*live, dry):
            cluster.set_apps(APPS)
            await cluster.start(lambda _gained, _lost: None)
        expected = ring.assign(APPS, [c.member for c in live])
        await until(
            lambda: (
                all(c.owned() == {a for a, o in expected.items() if o == c.member} for c in live)
                and dry.owned() == APPS
            ),
            timeout=8.0,
            what="live members splitting the apps and the dry run holding them all",
        )
        assert set(dry.status_json()["owners"].values()) == {dry.member}
        await until(  # each live member's view: the live owners only (the other's, once it looked again)
            lambda: set(live[0].status_json()["owners"].values()) == {c.member for c in live},
            timeout=3 * HEARTBEAT + 1,
            what="the live view of the owners",
        )
        app = min(APPS)
        await store.put("dry-run-scaling", app, {"n": 1}, fence=dry.fence(app))  # its own row fences it
        assert dry.fence(app).key == f"dry-run:{app}"
        owner = next(c for c in live if app in c.owned())
        await store.put("scaling", app, {"n": 2}, fence=owner.fence(app))
        with pytest.raises(FencedError):  # the dry run's fence is no proof of the live lease
            await store.put("scaling", app, {"n": 3}, fence=Fence(app, dry.member, dry.fence(app).epoch))
        second = member(3, dry_run=True)
        second.set_apps(APPS)
        await second.start(lambda _gained, _lost: None)
        shared = ring.assign(APPS, [dry.member, second.member])
        await until(
            lambda: (
                dry.owned() == {a for a, o in shared.items() if o == dry.member}
                and second.owned() == {a for a, o in shared.items() if o == second.member}
            ),
            timeout=8.0,
            what="two dry runs sharing the apps",
        )
        assert all(c.owned() == {a for a, o in expected.items() if o == c.member} for c in live)
        await second.stop()
    finally:
        for cluster in (*live, dry):
            await cluster.stop()
        for table in tables:
            await table.close()
        await store.close()


async def test_the_daemon_in_dry_run_on_postgresql_joins_as_a_dry_run(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLYWATCH_DRY_RUN on a PostgreSQL state: the daemon's member carries the dry-run mark and its lease
    table is the dry runs' (live, neither)."""
    from daemon.app import Daemon  # noqa: PLC0415 - the composition root, only for this test
    from daemon.settings import Settings  # noqa: PLC0415

    monkeypatch.setenv("FLYWATCH_STATE_URL", url)
    for dry_run, marked in (("true", True), ("false", False)):
        monkeypatch.setenv("FLYWATCH_DRY_RUN", dry_run)
        daemon = Daemon(Settings())
        store = open_store(url)
        try:
            ownership = daemon._ownership(store)
            assert isinstance(ownership, Cluster)
            assert ownership.member.startswith("dry-run:") is marked
            assert ownership.fence("shop").key == ("dry-run:shop" if marked else "shop")
        finally:
            for close in daemon._closers:
                await close()
            await store.close()


# ---------------------------------------------------------------------------------------------- death


async def test_a_member_that_dies_stops_acting_before_another_takes_over(make: Make) -> None:
    """A member whose heartbeat stops without a word (frozen, killed): its local leases lapse `margin`
    before the database's, so it refuses to act before any other member may take the apps, and the others
    take them within the takeover time."""
    nodes = [make(), make(), make()]
    for node in nodes:
        await node.start()
    await until(lambda: settled(nodes), timeout=8.0, what="three members settling")
    dead, alive = nodes[0], nodes[1:]
    its_apps = dead.cluster.owned()
    assert its_apps
    refused_at: dict[str, float] = {}

    async def watch_dead() -> None:
        while True:
            now = time.monotonic()
            for app in its_apps:
                if app not in refused_at and dead.cluster.may_act(app) is not None:
                    refused_at[app] = now
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch_dead())
    try:
        async with disjointness(nodes) as overlaps:
            loop = dead.cluster._loop
            assert loop is not None
            mark = time.monotonic()
            loop.cancel()  # the heartbeat stops: nothing released, nothing renewed
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            took = await until(lambda: settled(alive), timeout=TAKEOVER + 2, what="the takeover")
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert overlaps == []
    assert took <= TAKEOVER + 1.0, f"took {took:.2f}s"
    assert set(refused_at) == its_apps
    assert dead.cluster.owned() == set()
    first_gain = min(t for n in alive for app in its_apps for t in n.gained.get(app, []) if t >= mark)
    assert max(refused_at.values()) < first_gain
    for app in its_apps:
        gainer = next(n for n in alive if app in n.cluster.owned())
        assert gainer.gained[app][-1] >= mark
        assert refused_at[app] < gainer.gained[app][-1]
        # and it took the app at a higher epoch than the dead member's, so the dead one's writes are fenced
        assert gainer.cluster.fence(app).epoch > dead.cluster.fence(app).epoch


# ---------------------------------------------------------------------------------------------- cut off


async def test_a_member_whose_database_stops_answering_stops_acting_within_lease_minus_margin(
    make: Make,
) -> None:
    cut, other = make(), make()
    await cut.start()
    await other.start()
    await until(lambda: settled([cut, other]), timeout=6.0, what="two members settling")
    its_apps = cut.cluster.owned()
    assert its_apps
    assert cut.failures() == 0
    mark = time.monotonic()
    await cut.leases.close()  # every call now fails with a StoreError

    def stopped() -> bool:
        return not cut.cluster.joined and all(cut.cluster.may_act(app) is not None for app in its_apps)

    took = await until(stopped, timeout=LEASE + 1, what="the cut-off member stopping")
    assert took <= LEASE - MARGIN + 0.2, f"took {took:.2f}s"
    assert cut.cluster.owned() == set()
    refusal = cut.cluster.may_act(min(its_apps))
    assert refusal is not None
    assert "too long ago" in refusal
    assert cut.failures() >= 1
    assert "closed" in cut.cluster.last_error
    assert cut.cluster.status_json()["joined"] is False
    # the others take its apps once its leases expire in the database
    await until(lambda: other.cluster.owned() == APPS, timeout=TAKEOVER + 1, what="the takeover")
    assert time.monotonic() - mark <= TAKEOVER + 1
    assert cut.failures() >= 2  # it kept trying every heartbeat


# ---------------------------------------------------------------------------------------------- status


async def test_status_json_lists_members_owners_and_what_is_owned(make: Make) -> None:
    first, second = make(region="iad"), make(region="ams")
    await first.start()
    await second.start()
    expected = ring.assign(APPS, [first.name, second.name])

    def current() -> bool:
        return settled([first, second]) and first.cluster.status_json()["owners"] == expected

    await until(current, timeout=6.0, what="settled status")
    status = first.cluster.status_json()
    mine = first.cluster.owned()
    assert status["mode"] == "cluster"
    assert status["member"] == first.name
    assert status["region"] == "iad"
    assert status["joined"] is True
    assert status["takeover_seconds"] == TAKEOVER
    assert status["heartbeat_seconds"] == HEARTBEAT
    assert status["lease_seconds"] == LEASE
    assert status["last_error"] == ""
    assert isinstance(status["last_heartbeat"], float)
    assert status["owned"] == len(mine)
    assert status["owners"] == expected
    members = {m["member"]: m for m in status["members"]}
    assert set(members) == {first.name, second.name}
    assert members[first.name]["region"] == "iad"
    assert members[second.name]["region"] == "ams"
    assert members[first.name]["me"] is True
    assert members[second.name]["me"] is False
    assert all(m["live"] is True for m in members.values())
    assert members[first.name]["apps"] == len(mine)
    assert members[second.name]["apps"] == len(APPS) - len(mine)


# ---------------------------------------------------------------------------------------------- alone, no db


async def test_sole_ownership_owns_every_app_of_the_policy_without_fences() -> None:
    registry = prometheus_client.CollectorRegistry()
    sole = SoleOwnership("solo/1", "iad", ClusterMetrics(registry))
    sole.set_apps({"shop", "blog"})
    changes: list[tuple[set[str], set[str]]] = []
    await sole.start(lambda gained, lost: changes.append((gained, lost)))
    assert changes == [({"shop", "blog"}, set())]
    assert sole.owned() == {"shop", "blog"}
    assert sole.may_act("shop") is None
    refusal = sole.may_act("wiki")
    assert refusal is not None
    assert "wiki" in refusal
    assert sole.fence("shop") is None
    assert sole.fence("wiki") is None
    sole.set_apps({"wiki"})
    assert sole.owned() == {"wiki"}
    assert sole.may_act("shop") is not None
    status = sole.status_json()
    assert status["mode"] == "single"
    assert status["owned"] == 1
    assert status["members"] == [{"member": "solo/1", "region": "iad", "live": True, "apps": 1, "me": True}]
    await sole.stop()
    assert sole.owned() == {"wiki"}


# ---------------------------------------------------------------------------------------------- telling

SLOW = 60.0  # a takeover whose heartbeat (12 s) is far longer than any handover that was told


async def test_told_members_hand_over_on_join_drain_tick_end_and_stop_within_a_fraction_of_a_heartbeat(
    make: Make,
) -> None:
    """With a 12 s heartbeat, apps move in a second or two, never a heartbeat: a newcomer gets its share (it
    tells, the owner releases and tells, it takes), a draining member's idle apps and then, once its tick
    ends, its busy one go over, and a stopping member's apps are taken, each as soon as the others hear."""
    ticking: set[str] = set()
    first, second = make(takeover=SLOW, busy=lambda app: app in ticking), make(takeover=SLOW)
    told = SLOW / 5 / 4  # a quarter of a heartbeat
    await first.start()
    assert first.cluster.owned() == APPS
    # its second look (at once: set_apps woke it before it started) is over; the next is a heartbeat away
    await until(lambda: first.cluster.beats >= 2, timeout=5.0, what="the first member's second look")
    async with disjointness([first, second]) as overlaps:
        await second.start()
        took = await until(lambda: settled([first, second]), timeout=SLOW, what="the newcomer's share")
        assert took < told, f"the newcomer waited {took:.2f}s"

        its_apps = first.cluster.owned()
        kept = min(its_apps)
        ticking.add(kept)
        await just_looked(second)
        mark = time.monotonic()
        await first.cluster.drain()
        took = await until(lambda: second.cluster.owned() == APPS - {kept}, timeout=SLOW, what="idle apps")
        assert time.monotonic() - mark < told, f"the idle apps waited {took:.2f}s"
        assert first.cluster.owned() == {kept}
        ticking.clear()
        first.cluster.ended(kept)
        took = await until(lambda: second.cluster.owned() == APPS, timeout=SLOW, what="the busy app")
        assert took < told, f"the app whose tick ended waited {took:.2f}s"

        third = make(takeover=SLOW)
        await third.start()
        await until(lambda: settled([second, third]), timeout=SLOW, what="a third member's share")
        await just_looked(third)  # its next look of its own is a heartbeat away
        await second.cluster.stop()
        took = await until(lambda: third.cluster.owned() == APPS, timeout=SLOW, what="the stopped one's apps")
        assert took < told, f"a stopped member's apps waited {took:.2f}s"
    assert overlaps == []


async def test_a_draining_member_releases_a_busy_app_as_soon_as_its_tick_ends(url: str, make: Make) -> None:
    """ended(app) (the daemon's, as each tick ends) wakes the look that releases it: on its own clock, which
    moves only by tenths of a second (the least gap between looks), the draining member hands it over at
    once, never waiting for its next look (a second away)."""
    clock = ManualClock()
    gap = _SOONEST * 1.01  # a look's least gap, and a little more (times are floats)
    ticking = {"app-00"}
    leases = PostgresLeases.open(url)
    leaving = Cluster(  # its lease lasts 45 s in the database, whose clock goes on while its own stands
        leases, clock, member="m/leaving", region="iad", takeover=SLOW, busy=lambda app: app in ticking
    )
    try:
        leaving.set_apps({"app-00"})
        await leaving.start(lambda _gained, _lost: None)
        assert leaving.owned() == {"app-00"}
        draining = asyncio.ensure_future(leaving.drain())
        await clock.advance(gap)
        await asyncio.wait_for(draining, 10)
        assert leaving.owned() == {"app-00"}  # its tick runs: kept

        staying = make(apps={"app-00"})
        beats = leaving.beats
        await staying.start()
        assert staying.cluster.owned() == set()
        await clock.advance(gap)  # told of the newcomer, it looks: the tick still runs, the app kept
        await until(lambda: leaving.beats > beats, timeout=5.0, what="the look the newcomer's join woke")
        assert leaving.owned() == {"app-00"}
        ticking.clear()
        leaving.ended("app-00")
        await clock.advance(gap)
        await until(lambda: staying.cluster.owned() == {"app-00"}, timeout=5.0, what="the busy app released")
        assert leaving.owned() == set()
    finally:
        await leaving.stop()
        await leases.close()


async def test_a_member_whose_listener_was_cut_off_listens_again_and_is_told_again(
    url: str, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """The listening connection dropped (a server restart): logged once, the heartbeat goes on, and a new
    listener a heartbeat later hears the next handover."""
    takeover = 30.0
    heartbeat = takeover / 5
    staying, leaving = make(takeover=takeover), make(takeover=takeover)
    for node in (staying, leaving):
        await node.start()
    await until(lambda: settled([staying, leaving]), timeout=takeover, what="two members settling")

    def listeners() -> set[int]:
        with psycopg.connect(url, autocommit=True) as connection:
            rows = connection.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                (LISTENER + staying.name,),
            ).fetchall()
        return {int(pid) for (pid,) in rows}

    (cut,) = listeners()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SELECT pg_terminate_backend(%s)", (cut,))
    await until(lambda: listeners() not in (set(), {cut}), timeout=heartbeat + 5, what="listening again")
    assert "cannot listen to the other members" in caplog.text
    await just_looked(staying)  # its next look of its own is a heartbeat away
    await leaving.cluster.stop()
    took = await until(lambda: staying.cluster.owned() == APPS, timeout=takeover, what="the handover")
    assert took < heartbeat / 2, f"the handover waited {took:.2f}s: not told"


async def test_a_member_told_of_changes_over_and_over_looks_at_most_ten_times_a_second_renewing_on_time(
    url: str,
) -> None:
    """Another member joining and leaving as fast as it can (each tells): the member looks at once each
    time, but never more than once every tenth of a second, and renews its leases once a heartbeat, not
    at every look; it loses none of them."""
    inner, churner = PostgresLeases.open(url), PostgresLeases.open(url)
    table = _Slow(inner, delay=0.0)
    cluster = Cluster(table, SystemClock(), member="m/1", region="iad", takeover=TAKEOVER)
    lost: list[set[str]] = []
    try:
        cluster.set_apps(APPS)
        await cluster.start(lambda _gained, gone: lost.append(gone) if gone else None)
        assert cluster.owned() == APPS
        beats, renewals = cluster.beats, len(table.renewals)
        seconds = 2.0
        began = time.monotonic()
        while time.monotonic() - began < seconds:  # a member that is never live long enough to be given apps
            await churner.join("churner/1", "cdg", 0.0, 0.0)  # expired as it is written: never live
            await churner.leave("churner/1")
        looks = cluster.beats - beats
        renewing = [n for n in table.renewals[renewals:] if n]
        assert looks > seconds / HEARTBEAT + 3, f"{looks} looks in {seconds}s: not woken by the others"
        assert looks <= seconds / _SOONEST + 2, f"{looks} looks in {seconds}s"
        # once a heartbeat, or once half a heartbeat when woken looks fall just so; not at each look
        most = seconds / (HEARTBEAT / 2) + 2
        assert seconds / HEARTBEAT - 2 <= len(renewing) <= most, table.renewals[renewals:]
        assert all(n == len(APPS) for n in renewing)
        assert lost == []
        assert cluster.owned() == APPS
    finally:
        await cluster.stop()
        await inner.close()
        await churner.close()


# ---------------------------------------------------------------------------------------------- known bug


class _Slow:
    """A lease table `delay` seconds away (a database in another region): every call takes that long more."""

    def __init__(self, inner: PostgresLeases, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self.renewals: list[int] = []  # the number of leases each exchange renewed

    def key(self, app: str) -> str:
        return self._inner.key(app)

    async def join(self, member: str, region: str, started_at: float, ttl: float) -> Roster:
        await asyncio.sleep(self._delay)
        return await self._inner.join(member, region, started_at, ttl)

    async def exchange(
        self,
        member: str,
        ttl: float,
        *,
        renew: dict[str, int],
        release: dict[str, int],
        acquire: list[str],
    ) -> tuple[set[str], dict[str, int]]:
        done = await self._inner.exchange(member, ttl, renew=renew, release=release, acquire=acquire)
        await asyncio.sleep(self._delay)
        self.renewals.append(len(renew))
        return done

    async def leave(self, member: str) -> None:
        await self._inner.leave(member)

    def changes(self, member: str) -> AsyncIterator[str]:
        return self._inner.changes(member)

    async def close(self) -> None:
        await self._inner.close()


@contextlib.asynccontextmanager
async def _pending(
    url: str, wrap: Callable[[PostgresLeases], _Slow], clock: Clock, takeover: float = TAKEOVER
) -> AsyncIterator[tuple[Cluster, _Slow, list[set[str]]]]:
    """A member (on `wrap` of its lease connection) whose share is {kept, pending}, "pending" held meanwhile
    by an instance that is no member (the process before a restart, still frozen); started, holding "kept".
    Yields it, its lease table and the list of what it lost; stopped and closed afterwards."""
    holder, inner = PostgresLeases.open(url), PostgresLeases.open(url)
    table = wrap(inner)
    cluster = Cluster(table, clock, member="m/1", region="iad", takeover=takeover)
    lost: list[set[str]] = []
    try:
        await holder.exchange("m/0", 60.0, renew={}, release={}, acquire=["pending"])
        cluster.set_apps({"kept", "pending"})
        await cluster.start(lambda _gained, gone: lost.append(gone) if gone else None)
        assert cluster.owned() == {"kept"}
        yield cluster, table, lost
    finally:
        await cluster.stop()
        await inner.close()
        await holder.close()


async def _pending_member(url: str, delay: float, seconds: float) -> tuple[Cluster, int, list[set[str]]]:
    """_pending's member `delay` seconds from its database, run for `seconds`: the beats it made, what it
    lost."""
    async with _pending(url, lambda inner: _Slow(inner, delay), SystemClock()) as (cluster, _, lost):
        beats = cluster.beats
        await asyncio.sleep(seconds)
        return cluster, cluster.beats - beats, list(lost)  # before stop() reports its own loss


class _Flaky(_Slow):
    """A lease table whose every other join fails (a database timing out under load)."""

    def __init__(self, inner: PostgresLeases) -> None:
        super().__init__(inner, delay=0.0)
        self.joins = 0

    async def join(self, member: str, region: str, started_at: float, ttl: float) -> Roster:
        self.joins += 1
        if self.joins % 2 == 0:
            raise StoreError("PostgreSQL leases: join timed out (test)")
        return await super().join(member, region, started_at, ttl)


async def test_a_member_whose_database_fails_every_other_look_still_renews_and_loses_nothing(
    url: str,
) -> None:
    """A failed look is followed a second later (an app of its share is pending) by one that renews, even
    if renewal was not due yet at the failure: on its own clock, over 30 s (the lease lapses here 8.25 s
    after a renewal), the member renews every couple of seconds and keeps its app at its first epoch."""
    clock = ManualClock()
    # 15 s: the leases last 11.25 s in the database, far longer than this test takes on the wall clock
    async with _pending(url, _Flaky, clock, takeover=15.0) as (cluster, table, lost):
        assert isinstance(table, _Flaky)
        renewals = len(table.renewals)
        for _ in range(120):
            await clock.advance(0.25)
            await until(lambda: cluster._ended == cluster._begun, timeout=5.0, what="the look in flight")
        renewing = [n for n in table.renewals[renewals:] if n]
        assert table.joins >= 20, f"{table.joins} looks in 30 s"
        assert len(renewing) >= 30 / 3, f"{len(renewing)} renewals in 30 s of a failing database"
        assert lost == []
        assert cluster.owned() == {"kept"}
        assert cluster.fence("kept").epoch == 1


async def test_a_member_with_a_pending_app_looks_at_least_every_heartbeat(url: str) -> None:
    """The module's docstring: a member with apps of its share not taken yet looks again sooner."""
    _, beats, _ = await _pending_member(url, delay=0.0, seconds=2.0)
    assert beats >= int(2.0 / HEARTBEAT) - 1  # 4 or 5 looks at 0.4 s; it makes 2 at 1.0 s


async def test_a_member_with_a_pending_app_keeps_the_apps_it_holds_with_a_distant_database(url: str) -> None:
    """60 ms more per call (a database in another region; each call is several round trips in truth)."""
    cluster, _, lost = await _pending_member(url, delay=0.06, seconds=2.5)
    assert lost == []  # it loses "kept" every look: its lease lapsed here between two looks
    assert cluster.fence("kept").epoch == 1
