"""Several `flywatch run` processes sharing the apps of one policy on one PostgreSQL (daemon/cluster.py).

Three daemons (FLYWATCH_INSTANCE a, b and c, each in a region of its own) on one simulator and one fresh
PostgreSQL schema, with FLYWATCH_TAKEOVER at 5 s (heartbeat 1 s, lease 3.75 s), over nine apps `shop-0` to
`shop-8`, each with machines in iad and cdg and a scaling policy of its own.

Judged by each daemon's /status and /metrics, by the simulator's truth (machines by app, region and state,
and its mutation log, whose `agent` is the User-Agent "flywatch/VERSION (MEMBER)": it names the instance
that did each thing) and by a history of the lease table: before any daemon starts, the test creates the
tables itself and adds a trigger that copies every insert and update of a lease row (taken, renewed,
released) into a table of its own, stamped with the database's clock, which is this host's, as the
simulator's is. With it, who held an app at the time of any mutation is exact, not sampled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import psycopg
import pytest

from daemon import __version__
from daemon.core import ring
from daemon.store.postgres import PostgresStore
from tests.e2e.conftest import (
    API_TIME,
    CAPACITY,
    HEALTH_INTERVAL,
    LATENCY,
    SCALING_INTERVAL,
    STOP,
    Daemon,
    Flywatch,
    load,
    policy,
    until,
)
from tests.store.conftest import new_postgres_schema, postgres_schema_url

TAKEOVER = 5.0  # FLYWATCH_TAKEOVER
HEARTBEAT = TAKEOVER / 5  # cluster.Timing, from the one setting
LEASE = TAKEOVER - 1.25 * HEARTBEAT
# what watching adds on top of a time the daemons keep: /status polled every POLL s, each answer a few ms
# (tens on a loaded machine), and three daemons, PostgreSQL and the simulator sharing the cores
ALLOWANCE = 1.5
POLL = 0.05
SCHEDULING = 0.5  # a heartbeat's sleep that ends late on a loaded machine, for times the database measures
APPS = tuple(f"shop-{i}" for i in range(9))  # enough that each of three members is almost always given some
INSTANCES = {"a": "iad", "b": "cdg", "c": "nrt"}  # FLYWATCH_INSTANCE -> FLYWATCH_REGION
REGIONS = ("iad", "cdg")
# every app starts with one started machine per region, none parked: a scale-up creates its machines. (A
# parked one would be started under a Fly machine lease, and a daemon killed or frozen between taking that
# lease and the start leaves the machine leased for the lease's 30 s: the new owner rightly waits it out,
# "not creating machines while others hold leases", which these tests have no time for.)
STARTED = {"iad": 1, "cdg": 1}
HEALTH_TIMEOUT = 1.0  # the probes' timeout: their whole interval
UP_COOLDOWN = 2.0  # shorter than the harness's: a takeover of an action cut short waits it out
SCALE_UP = frozenset({"start", "create"})
SCALE_DOWN = frozenset({"stop", "suspend", "destroy"})
RELEASE_LEASE = "release_lease"  # the one change the client's guard lets through for an app not held
# seconds from a load step to every app holding at its new count: an interval, the up cooldown (a takeover
# counts an action cut short as done, so its cooldown runs from then), the API's rate-limited calls for a
# start and a create, with a margin for a loaded machine
CONVERGE = SCALING_INTERVAL + UP_COOLDOWN + 2 * API_TIME + 10
MAX = 10  # machines per region the policy allows
MAX_STEP = 6  # machines one scale-up may add
CREATE_EVERY = 1.0  # seconds between an app's creates, sustained (Fly's limit; the client keeps to it)
Targets = dict[str, dict[str, int]]  # started machines per region, of each app
READY = 45.0  # seconds for three processes starting at once on two cores to answer /readyz
AGENT = re.compile(r"^flywatch/" + re.escape(__version__) + r" \((?P<member>[^)]+)\)$")
SAMPLE = re.compile(r"^(?P<name>\w+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$", re.MULTILINE)
LABEL = re.compile(r'(\w+)="([^"]*)"')


# ---------------------------------------------------------------------------- the lease table's history

HISTORY = (
    """CREATE TABLE lease_history (
        id BIGSERIAL PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        app TEXT NOT NULL,
        owner TEXT,
        epoch BIGINT NOT NULL,
        acquired_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE FUNCTION record_lease() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO {schema}.lease_history (at, app, owner, epoch, acquired_at, expires_at)
        VALUES (extract(epoch FROM clock_timestamp()), NEW.app, NEW.owner, NEW.epoch,
                extract(epoch FROM NEW.acquired_at), extract(epoch FROM NEW.expires_at));
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER lease_history AFTER INSERT OR UPDATE ON flywatch_leases
        FOR EACH ROW EXECUTE FUNCTION record_lease()""",
)


@dataclass(frozen=True)
class LeaseRow:
    """A lease row as one statement left it: from `at` on, `owner` held the app at `epoch` until
    `expires_at` (all on the database's clock)."""

    at: float
    app: str
    owner: str | None
    epoch: int
    acquired_at: float
    expires_at: float


class Leases:
    """The lease table's history, per app in the order the statements ran."""

    def __init__(self, rows: Iterable[LeaseRow]) -> None:
        self.rows: dict[str, list[LeaseRow]] = {}
        for row in rows:
            self.rows.setdefault(row.app, []).append(row)

    def row_at(self, app: str, when: float) -> LeaseRow | None:
        """The app's row as it stood at `when`."""
        found = None
        for row in self.rows.get(app, []):
            if row.at > when:
                break
            found = row
        return found

    def owner_at(self, app: str, when: float) -> str | None:
        row = self.row_at(app, when)
        return row.owner if row is not None and row.owner is not None and row.expires_at > when else None

    def takes(self, app: str, since: float = 0.0) -> list[LeaseRow]:
        """The rows that gave the app to an owner at a new epoch (an insert or a takeover), since then."""
        taken, epoch = [], None
        for row in self.rows.get(app, []):
            if row.owner is not None and row.epoch != epoch and row.at >= since:
                taken.append(row)
            epoch = row.epoch
        return taken

    def releases(self, app: str, owner: str, since: float = 0.0) -> list[LeaseRow]:
        """The rows in which `owner` gave the app up (a release: the owner cleared at its epoch)."""
        given_up, held = [], None
        for row in self.rows.get(app, []):
            ours = held is not None and held.owner == owner and row.epoch == held.epoch
            if ours and row.owner is None and row.at >= since:
                given_up.append(row)
            held = row
        return given_up

    def unowned(self, app: str, start: float, end: float) -> list[tuple[float, float]]:
        """The spans within [start, end] in which no one held the app: released, or expired and not yet
        taken again."""
        rows = self.rows.get(app, [])
        spans = []
        gap_from: float | None = start
        for index, row in enumerate(rows):
            following = rows[index + 1].at if index + 1 < len(rows) else end
            if row.owner is not None and row.expires_at > row.at:
                if gap_from is not None and row.at > gap_from:
                    spans.append((gap_from, row.at))
                held_until = min(row.expires_at, following)
                gap_from = held_until if held_until < following else None
            elif gap_from is None:
                gap_from = row.at
        if gap_from is not None and gap_from < end:
            spans.append((gap_from, end))
        return [(max(a, start), min(b, end)) for a, b in spans if min(b, end) > max(a, start)]


@dataclass(frozen=True)
class State:
    url: str
    schema: str

    async def leases(self) -> Leases:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as connection:
            cursor = await connection.execute(
                "SELECT at, app, owner, epoch, acquired_at, expires_at FROM lease_history ORDER BY id"
            )
            rows = await cursor.fetchall()
        return Leases(LeaseRow(float(a), str(p), o, int(e), float(q), float(x)) for a, p, o, e, q, x in rows)


@pytest.fixture
async def state() -> AsyncIterator[State]:
    """A fresh schema with flywatch's tables and the lease history's trigger; dropped after the test (set up
    before `flywatch`, so torn down after it has killed the daemons)."""
    schema, drop = new_postgres_schema()
    url = postgres_schema_url(schema)
    try:
        store = PostgresStore.open(url)  # the tables, as the daemons would create them
        await store.close()
        with psycopg.connect(url, autocommit=True) as connection:
            for statement in HISTORY:
                connection.execute(statement.replace("{schema}", f'"{schema}"'))  # type: ignore[arg-type]
        yield State(url, schema)
    finally:
        drop()


# ---------------------------------------------------------------------------- the world and the cluster


def app_policy() -> dict[str, Any]:
    """The harness's policy for one app (short intervals), in iad and cdg, from 1 to MAX machines each."""
    one: dict[str, Any] = policy(regions=dict.fromkeys(REGIONS, (1, MAX)))["apps"]["shop"]
    # three daemons, the simulator and PostgreSQL on two cores: a probe may wait for a core; a region is
    # judged down (and its demand moved elsewhere as machines) only after three rounds without an answer
    one["health"].update(timeout=f"{HEALTH_TIMEOUT:g}s", unhealthy_after=3)
    one["scaling"]["scale_up"].update(cooldown=f"{UP_COOLDOWN:g}s", max_step=MAX_STEP)
    return one


class Phases:
    """Prints each phase of a test with the seconds since it began (shown with -s, or on failure)."""

    def __init__(self) -> None:
        self.began = time.monotonic()

    def __call__(self, what: str) -> None:
        print(f"{time.monotonic() - self.began:6.1f}s {what}")  # noqa: T201


async def create_apps(control: httpx.AsyncClient) -> None:
    for app in APPS:
        body = {
            "name": app,
            "regions": STARTED,
            "capacity_rps": CAPACITY,
            "base_latency": LATENCY,
            "load": {code: load(n) for code, n in STARTED.items()},
        }
        (await control.post("/apps", json=body)).raise_for_status()


async def set_loads(
    control: httpx.AsyncClient, machines: dict[str, int], apps: Iterable[str] = APPS
) -> float:
    """The load that needs `machines` machines per region, on every app of `apps`; when it changed."""
    before = time.time()
    for app in apps:
        response = await control.put(f"/apps/{app}/load", json={r: load(n) for r, n in machines.items()})
        response.raise_for_status()
    return before


async def fleets(control: httpx.AsyncClient) -> dict[str, list[dict[str, Any]]]:
    response = await control.get("/apps")
    response.raise_for_status()
    return {app["name"]: app["machines"] for app in response.json()}


async def started(control: httpx.AsyncClient) -> dict[str, Counter[str]]:
    """Started machines per region, of every app."""
    return {
        app: Counter(m["region"] for m in machines if m["state"] == "started")
        for app, machines in (await fleets(control)).items()
    }


async def mutations(control: httpx.AsyncClient, since: float = 0.0) -> list[dict[str, Any]]:
    """The simulator's mutation log (oldest first), of every app."""
    response = await control.get("/counters", params={"since": since})
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()["mutations"]
    return found


def member_of(mutation: dict[str, Any]) -> str:
    """The member (name/suffix) that sent a mutation, from its User-Agent."""
    matched = AGENT.match(mutation["agent"])
    assert matched, f"a mutation not sent by flywatch: {mutation}"
    return matched["member"]


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(LABEL.findall(m["labels"] or "")), float(m["value"]))
        for m in SAMPLE.finditer(text)
        if m["name"] == name
    ]


@dataclass
class Instance:
    """One daemon of the cluster: its FLYWATCH_INSTANCE, its process, and its name in the tables."""

    name: str
    daemon: Daemon
    member: str = ""
    stopped: bool = False  # SIGSTOPped: its telemetry server does not answer

    @property
    def up(self) -> bool:
        return self.daemon.running and not self.stopped

    def signal(self, sig: signal.Signals) -> float:
        """Send `sig`; the time just before."""
        print(f"{sig.name} to {self.member or self.name}")  # noqa: T201
        sent = time.time()
        self.daemon.send(sig)
        self.stopped = sig is signal.SIGSTOP or (self.stopped and sig is not signal.SIGCONT)
        return sent

    @staticmethod
    def owned(status: dict[str, Any]) -> set[str]:
        """The apps an instance's own /status says it holds."""
        me = status["cluster"]["member"]
        return {app for app, owner in status["cluster"]["owners"].items() if owner == me}


@dataclass
class Cluster:
    flywatch: Flywatch
    control: httpx.AsyncClient
    state: State
    instances: dict[str, Instance] = field(default_factory=dict)
    phase: Phases = field(default_factory=Phases)

    def environment(self, name: str) -> dict[str, str]:
        return {
            "FLYWATCH_INSTANCE": name,
            "FLYWATCH_REGION": INSTANCES[name],
            "FLYWATCH_TAKEOVER": f"{TAKEOVER:g}",
            "FLYWATCH_STATE_URL": self.state.url,
        }

    def spawn(self, name: str) -> Instance:
        """A new instance `name` (a process, not yet answering), in place of any before it of that name."""
        instance = Instance(name, self.flywatch.spawn(env=self.environment(name)))
        self.instances[name] = instance
        return instance

    async def ready(self, *instances: Instance) -> None:
        """Until each of them is ready; with its member name."""
        await asyncio.gather(*(i.daemon.wait_ready(READY) for i in instances))
        for instance in instances:
            instance.member = (await instance.daemon.status())["cluster"]["member"]
            assert instance.member.startswith(f"{instance.name}/"), instance.member

    async def start(self, *names: str) -> list[Instance]:
        """Start these instances at once; once each is ready."""
        started = [self.spawn(name) for name in names]
        await self.ready(*started)
        self.phase(f"ready: {', '.join(i.member for i in started)}")
        return started

    def up(self) -> list[Instance]:
        """The instances running, answering, and ready once (their member names known)."""
        return [i for i in self.instances.values() if i.up and i.member]

    async def statuses(self, instances: Iterable[Instance]) -> dict[str, dict[str, Any]]:
        listed = list(instances)
        answers = await asyncio.gather(*(i.daemon.status() for i in listed))
        return {i.name: answer for i, answer in zip(listed, answers, strict=True)}

    async def agreement(self) -> dict[str, str] | None:
        """Every app's owner, once the instances up agree on it, and it is the ring's split of the apps
        over them (each one a live member in everyone's eyes, each holding its share and watching exactly
        that: its "apps" are the ones it holds); else None."""
        instances = self.up()
        statuses = await self.statuses(instances)
        members = {i.member for i in instances}
        expected = ring.assign(APPS, members)
        for instance in instances:
            cluster = statuses[instance.name]["cluster"]
            live = {m["member"] for m in cluster["members"] if m["live"]}
            if not cluster["joined"] or live != members or cluster["owners"] != expected:
                return None
            mine = instance.owned(statuses[instance.name])
            if cluster["owned"] != len(mine) or set(statuses[instance.name]["apps"]) != mine:
                return None
        return expected

    async def settled(self, timeout: float = 4 * TAKEOVER) -> dict[str, str]:
        """Until the instances up agree on who owns what (the ring's split)."""

        async def agreed() -> dict[str, str] | None:
            return await self.agreement()

        owners: dict[str, str] = await until(
            agreed, timeout=timeout, what="the instances agree on the ring's split", interval=POLL
        )
        self.phase(f"settled: {dict(sorted(Counter(owners.values()).items()))}")
        return owners

    async def steady(self) -> None:
        """Until every region of every app is judged healthy by its owner, and holding."""

        async def holding() -> bool:
            statuses = await self.statuses(self.up())
            judged = set()
            for instance in self.up():
                apps = statuses[instance.name]["apps"]
                for app in instance.owned(statuses[instance.name]):
                    regions = apps.get(app, {}).get("regions", {})
                    if all(
                        regions.get(code, {}).get("health") == "healthy"
                        and (regions[code].get("last_decision") or {}).get("action") == "hold"
                        for code in REGIONS
                    ):
                        judged.add(app)
            return judged == set(APPS)

        await until(holding, timeout=20, what="every app healthy and holding", interval=POLL)
        self.phase("steady")

    async def holding_at(self, targets: Targets, timeout: float = CONVERGE) -> None:
        """Until every app has its target of started machines per region, and its owner, having seen that,
        holds there (so nothing more is on its way)."""

        async def there() -> bool:
            counts = await started(self.control)
            if any(counts[app] != Counter(target) for app, target in targets.items()):
                return False
            statuses = await self.statuses(self.up())
            for instance in self.up():
                apps = statuses[instance.name]["apps"]
                for app in instance.owned(statuses[instance.name]):
                    regions = apps.get(app, {}).get("regions", {})
                    for code, n in targets[app].items():
                        region = regions.get(code, {})
                        decision = region.get("last_decision") or {}
                        if region.get("desired") != n or decision.get("action") != "hold":
                            return False
                        if region.get("machines", {}).get("started") != n:
                            return False
            return True

        shown = {str(t): sorted(a for a in targets if targets[a] == t) for t in targets.values()}
        await until(there, timeout=timeout, what=f"every app holding at its target {shown}", interval=POLL)
        self.phase(f"holding at {shown}")

    async def owned_by(self, apps: set[str], among: list[Instance]) -> dict[str, str]:
        """Which of `among` holds each of `apps`, by their own /status; {} until each is held by one."""
        statuses = await self.statuses(among)
        holders: dict[str, list[str]] = {}
        for instance in among:
            for app in instance.owned(statuses[instance.name]) & apps:
                holders.setdefault(app, []).append(instance.name)
        if set(holders) != apps:
            return {}
        assert all(len(names) == 1 for names in holders.values()), f"held twice: {holders}"
        return {app: names[0] for app, names in holders.items()}

    async def taken_over(self, apps: set[str], among: list[Instance], since: float) -> dict[str, float]:
        """Poll `among` until they hold every one of `apps`; seconds from `since` until each was seen held."""
        seen: dict[str, float] = {}

        async def all_held() -> bool:
            statuses = await self.statuses(among)
            now = time.time()
            for instance in among:
                for app in instance.owned(statuses[instance.name]) & apps:
                    seen.setdefault(app, now - since)
            return set(seen) == apps

        await until(all_held, timeout=TAKEOVER + 10, what=f"{sorted(apps)} taken over", interval=POLL)
        self.phase(f"taken over: {sorted(apps)}")
        return seen

    def log_lines(self, needle: str) -> list[str]:
        """Lines of every daemon's log that contain `needle`."""
        found = []
        for daemon in self.flywatch.daemons:
            with contextlib.suppress(OSError):
                found.extend(
                    f"{daemon.log.name}: {line}"
                    for line in daemon.log.read_text(encoding="utf-8", errors="replace").splitlines()
                    if needle in line
                )
        return found


@pytest.fixture
async def cluster(state: State, flywatch: Flywatch, control: httpx.AsyncClient) -> AsyncIterator[Cluster]:
    """Nine apps in the simulator, a policy for each, and no daemon yet."""
    await create_apps(control)
    flywatch.write_policy({"apps": {app: app_policy() for app in APPS}})
    made = Cluster(flywatch, control, state)
    try:
        yield made
    finally:
        for instance in made.instances.values():
            if instance.stopped and instance.daemon.running:
                instance.daemon.send(signal.SIGCONT)  # so its kill is not held up
        # what the handovers cost the old owners, as their logs tell it (reported, not failed on):
        # writes the fence refused (FencedError), and requests the client's guard never sent (NotOwner)
        for what, needle in (
            ("fenced writes refused", "no longer holds"),
            ("requests not sent", "is not ours"),
        ):
            lines = made.log_lines(needle)
            if lines:
                print(f"{len(lines)} log line(s) of {what}, e.g.:")  # noqa: T201
                for line in lines[:3]:
                    print(f"  {line[:300]}")  # noqa: T201


# ---------------------------------------------------------------------------- what the log must show


def not_the_owners(log: list[dict[str, Any]], leases: Leases) -> list[str]:
    """Every mutation sent while its sender did not hold its app's lease (by the database, at the time the
    simulator carried it out). Releasing a machine lease is left out: the guard lets that through on
    purpose (it only lets others in sooner)."""
    wrong = []
    for mutation in log:
        if mutation["action"] == RELEASE_LEASE:
            continue
        sender = member_of(mutation)
        holder = leases.owner_at(mutation["app"], mutation["time"])
        if holder != sender:
            wrong.append(
                f"{mutation['time']:.3f} {mutation['app']}/{mutation['region']} {mutation['action']}"
                f" {mutation['machine']} by {sender}, while {holder or 'no one'} held it"
                f" ({leases.row_at(mutation['app'], mutation['time'])})"
            )
    return wrong


def each(target: dict[str, int], apps: Iterable[str] = APPS) -> Targets:
    """`target` for each of `apps`, the others at their first machines."""
    chosen = set(apps)
    return {app: dict(target) if app in chosen else dict(STARTED) for app in APPS}


def check_no_double_actions(log: list[dict[str, Any]], targets: Targets) -> None:
    """Each app went from its first machines to `target` with exactly the actions it needed: as many
    machines created in each region as the target wanted more, none started twice without a stop between
    (none parked, so none started at all), nothing stopped."""
    by_machine: dict[str, list[str]] = {}
    for mutation in log:
        if mutation["action"] in SCALE_UP | SCALE_DOWN:
            by_machine.setdefault(mutation["machine"], []).append(mutation["action"])
    for machine, actions in by_machine.items():
        ups = [a for a in actions if a in SCALE_UP | {"stop"}]
        assert all(not (x in SCALE_UP and y in SCALE_UP) for x, y in itertools.pairwise(ups)), (
            f"{machine} started twice in a row: {actions}"
        )
    for app in APPS:
        shown = "\n".join(
            f"  {m['time']:.3f} {m['region']} {m['action']} {m['machine']} by {member_of(m)}"
            for m in log
            if m["app"] == app and m["action"] != "lease" and m["action"] != RELEASE_LEASE
        )
        for code, wanted in targets[app].items():
            done = Counter(
                m["action"]
                for m in log
                if m["app"] == app and m["region"] == code and m["action"] in SCALE_UP
            )
            assert done["start"] == 0, f"{app}/{code}: {done['start']} start(s), none needed:\n{shown}"
            creates = wanted - STARTED[code]
            assert done["create"] == creates, (
                f"{app}/{code}: {done['create']} create(s), {creates} needed:\n{shown}"
            )
    assert [m for m in log if m["action"] in SCALE_DOWN] == []


async def check_final(cluster: Cluster, targets: Targets) -> tuple[list[dict[str, Any]], Leases]:
    """The apps at their targets, reached with no action done twice, each action by the app's owner then."""
    counts = await started(cluster.control)
    assert all(counts[app] == Counter(target) for app, target in targets.items()), counts
    log = await mutations(cluster.control)
    leases = await cluster.state.leases()
    check_no_double_actions(log, targets)
    wrong = not_the_owners(log, leases)
    assert not wrong, "mutations by an instance that did not hold the app:\n" + "\n".join(wrong)
    return log, leases


def logged_decisions(daemon: Daemon) -> list[tuple[float, dict[str, Any]]]:
    """(when it was logged, the record) of every decision a daemon recorded, from its JSON log."""
    found = []
    for line in daemon.log.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and isinstance(entry.get("decision"), dict):
                found.append((datetime.fromisoformat(entry["timestamp"]).timestamp(), entry["decision"]))
    return found


def victim_of(owners: dict[str, str], cluster: Cluster, among: Iterable[Instance]) -> Instance:
    """The instance of `among` that holds the most apps."""
    held = Counter(owners.values())
    return max(among, key=lambda i: (held[i.member], i.name))


def report(what: str, seconds: dict[str, float]) -> str:
    shown = ", ".join(f"{app} {s:.2f}s" for app, s in sorted(seconds.items()))
    return f"{what}: max {max(seconds.values()):.2f}s ({shown})"


# ---------------------------------------------------------------------------- the tests


async def test_three_instances_share_the_apps_by_the_ring_and_say_so(cluster: Cluster) -> None:
    """Three daemons up: every app is held by exactly one live instance, the one the ring gives it to; all
    three agree, watch exactly their share, and their /metrics say the same as their /status."""
    instances = await cluster.start("a", "b", "c")
    owners = await cluster.settled()

    members = {i.member for i in instances}
    assert set(owners) == set(APPS)
    assert set(owners.values()) <= members
    assert owners == ring.assign(APPS, members)
    held = Counter(owners.values())
    assert sum(held.values()) == len(APPS)
    # rendezvous hashing over nine apps: all nine on one member has a chance of 3 in 3**9
    assert sum(1 for i in instances if held[i.member] > 0) >= 2, held

    statuses = await cluster.statuses(instances)
    for instance in instances:
        status = statuses[instance.name]
        view = status["cluster"]
        assert (view["mode"], view["member"], view["region"]) == (
            "cluster",
            instance.member,
            INSTANCES[instance.name],
        )
        assert (view["takeover_seconds"], view["heartbeat_seconds"], view["lease_seconds"]) == (
            TAKEOVER,
            HEARTBEAT,
            LEASE,
        )
        assert view["owned"] == held[instance.member]
        assert set(status["apps"]) == instance.owned(status)
        assert {m["member"]: m["apps"] for m in view["members"] if m["live"]} == {
            i.member: held[i.member] for i in instances
        }
        assert {m["member"]: m["region"] for m in view["members"]} == {
            i.member: INSTANCES[i.name] for i in instances
        }
        assert [m["member"] for m in view["members"] if m["me"]] == [instance.member]

    async def metrics_agree() -> bool:
        for instance in instances:
            text = await instance.daemon.metrics()
            up = metric_samples(text, "flywatch_instance_up")
            owned = metric_samples(text, "flywatch_owned_apps")
            if up != [({"member": instance.member, "fly_region": INSTANCES[instance.name]}, 1.0)]:
                return False
            if owned != [({"member": instance.member}, float(held[instance.member]))]:
                return False
            if metric_samples(text, "flywatch_cluster_members") != [({}, 3.0)]:
                return False
            if metric_samples(text, "flywatch_unowned_apps") != [({}, 0.0)]:
                return False
        return True

    await until(metrics_agree, timeout=3 * HEARTBEAT + ALLOWANCE, what="/metrics agree with /status")

    # and the database agrees: each app's lease with its owner, unexpired
    leases = await cluster.state.leases()
    now = time.time()
    assert {app: leases.owner_at(app, now) for app in APPS} == owners
    await cluster.steady()  # each app is watched by its owner
    assert [m for m in await mutations(cluster.control) if m["action"] in SCALE_UP | SCALE_DOWN] == []


async def test_kill_9_of_an_owner_its_apps_are_taken_over_within_the_takeover_and_nothing_is_done_twice(
    cluster: Cluster,
) -> None:
    """kill -9 of the instance holding the most apps, while they need machines: the two others take its
    apps over within the takeover time and finish the job, and the mutation log shows no action done
    twice, each by the app's owner at the time, and nothing from the dead one after its death."""
    instances = await cluster.start("a", "b", "c")
    owners = await cluster.settled()
    await cluster.steady()
    victim = victim_of(owners, cluster, instances)
    survivors = [i for i in instances if i is not victim]
    its_apps = {app for app, owner in owners.items() if owner == victim.member}

    target = {"iad": 3, "cdg": 2}
    changed = await set_loads(cluster.control, target)

    async def victim_acting() -> list[dict[str, Any]]:
        log = await mutations(cluster.control, since=changed)
        return [m for m in log if m["action"] in SCALE_UP and member_of(m) == victim.member]

    # killed in the middle of its work: right after its first create
    await until(
        victim_acting, timeout=CONVERGE, what="the victim acting", daemon=victim.daemon, interval=0.01
    )
    killed = victim.signal(signal.SIGKILL)
    assert await victim.daemon.wait_exit(5) == -signal.SIGKILL

    seen = await cluster.taken_over(its_apps, survivors, killed)
    print(f"\n{victim.name} ({len(its_apps)} apps) killed; " + report("taken over (seen in /status)", seen))  # noqa: T201
    assert max(seen.values()) <= TAKEOVER + ALLOWANCE, report("taken over", seen)

    await cluster.holding_at(each(target))
    owners_after = await cluster.settled()
    assert set(owners_after.values()) <= {i.member for i in survivors}
    log, leases = await check_final(cluster, each(target))

    # by the database: each of its apps taken once, at a new epoch, by a survivor, within the takeover
    exact = {}
    for app in its_apps:
        takes = leases.takes(app, since=killed)
        assert len(takes) == 1, f"{app} changed hands more than once after the kill: {takes}"
        assert takes[0].owner in {i.member for i in survivors}
        exact[app] = takes[0].at - killed
    print(report("taken over (by the lease table)", exact))  # noqa: T201
    assert max(exact.values()) <= TAKEOVER + SCHEDULING, report("taken over (lease table)", exact)
    # the dead one: nothing after its death but what it had sent before (carried out as the simulator,
    # on this test's event loop, got to it)
    late = [m for m in log if member_of(m) == victim.member and m["time"] > killed + 0.5]
    assert late == [], late
    survivors_did = Counter(member_of(m) for m in log if m["app"] in its_apps and m["time"] > killed)
    assert survivors_did, "no survivor acted on the dead one's apps"


async def test_sigstop_of_an_owner_its_apps_move_and_once_resumed_it_acts_only_on_what_it_holds_again(
    cluster: Cluster,
) -> None:
    """SIGSTOP of the instance holding the most apps, in the middle of its work (a partition's stand-in):
    the others take its apps over within the takeover time and act on a new load; after SIGCONT it sends
    nothing for an app it does not hold, and nothing it decided before the freeze even on the apps it gets
    back by the ring (those it acts on only once they are its own again, at a new epoch, on what it sees
    then); the apps end as the policy wants."""
    instances = await cluster.start("a", "b", "c")
    owners = await cluster.settled()
    await cluster.steady()
    victim = victim_of(owners, cluster, instances)
    others = [i for i in instances if i is not victim]
    its_apps = {app for app, owner in owners.items() if owner == victim.member}

    # a big step on its apps: each of their ticks decides MAX_STEP machines more in iad, then as many in
    # cdg, created one after the other at Fly's limit of one a second (which the client keeps to): frozen
    # after its first create, it has most of them still to go when it runs again
    first = {"iad": 1 + MAX_STEP, "cdg": 1 + MAX_STEP}
    changed = await set_loads(cluster.control, first, its_apps)

    async def victim_acting() -> list[dict[str, Any]]:
        log = await mutations(cluster.control, since=changed)
        return [m for m in log if m["action"] in SCALE_UP and member_of(m) == victim.member]

    await until(
        victim_acting, timeout=CONVERGE, what="the victim acting", daemon=victim.daemon, interval=0.01
    )
    frozen = victim.signal(signal.SIGSTOP)
    # while it is frozen the world moves on: the load falls back to what needs a few machines more, which
    # the others must act on once they hold its apps (it made two at most: its client keeps a burst of 2)
    target = {"iad": 3, "cdg": 2}
    await set_loads(cluster.control, target, its_apps)
    leases = await cluster.state.leases()
    epochs = {app: leases.rows[app][-1].epoch for app in its_apps}  # what it held when frozen

    seen = await cluster.taken_over(its_apps, others, frozen)
    print(f"\n{victim.name} ({len(its_apps)} apps) stopped; " + report("taken over (seen in /status)", seen))  # noqa: T201
    assert max(seen.values()) <= TAKEOVER + ALLOWANCE, report("taken over", seen)
    await cluster.holding_at(each(target, its_apps))
    assert await cluster.owned_by(its_apps, others)

    resumed = victim.signal(signal.SIGCONT)
    samples: list[tuple[float, set[str]]] = []  # the victim's /status from then on: (asked at, held)
    sampling = asyncio.Event()

    async def sample() -> None:
        while not sampling.is_set():
            asked = time.time()
            with contextlib.suppress(httpx.HTTPError):
                samples.append((asked, Instance.owned(await victim.daemon.status())))
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())
    try:
        # it takes its share back from the others (the ring has not changed), at new epochs, and watches it
        assert await cluster.settled() == owners
        # the tick it was frozen in is over by then (what it had left: creates, one a second)
        try:
            left = 2 * MAX_STEP * CREATE_EVERY
            await cluster.holding_at(each(target, its_apps), timeout=CONVERGE + left)
        except pytest.fail.Exception as exc:
            unsettled: pytest.fail.Exception | None = exc  # said after what would explain it
        else:
            unsettled = None
            await asyncio.sleep(2 * HEARTBEAT)  # a few heartbeats more of it
    finally:
        sampling.set()
        await sampler

    # nothing it decided before it was frozen is carried out or recorded once it runs again, not even on
    # an app it holds again by then: that decision was made at an epoch it lost, on a world since changed
    stale = [
        f"logged {when - resumed:.2f}s after SIGCONT: {r['app']}/{r['region']} {r['action']} {r['count']}"
        f" ({r['from']} -> {r['to']}) decided {frozen - r['at']:.2f}s before SIGSTOP: {r['outcome']}"
        for when, r in logged_decisions(victim.daemon)
        if when >= resumed and r["at"] < frozen
    ]
    assert not stale, "decisions from before the freeze, recorded after it:\n" + "\n".join(stale)
    if unsettled is not None:
        raise unsettled

    log = await mutations(cluster.control)
    leases = await cluster.state.leases()
    after = [m for m in log if m["time"] >= resumed and member_of(m) == victim.member]
    released = [m for m in after if m["action"] == RELEASE_LEASE]
    for mutation in (m for m in after if m["action"] != RELEASE_LEASE):
        app = mutation["app"]
        row = leases.row_at(app, mutation["time"])
        # held by it at the time, taken again after the SIGCONT, at an epoch above the one it was frozen at
        assert row is not None, mutation
        assert row.owner == victim.member, (mutation, row)
        assert row.acquired_at >= resumed, (mutation, row)
        assert row.epoch > epochs.get(app, 0), (mutation, row, epochs)
        # and its own /status said so: the first look at it after the mutation shows the app held
        later = next((held for asked, held in samples if asked >= mutation["time"]), None)
        assert later is None or app in later, (mutation, "not held by its /status just after")
    regained = {}
    for app in its_apps:
        takes = leases.takes(app, since=frozen)
        assert takes[-1].owner == victim.member, takes
        assert takes[-1].epoch >= epochs[app] + 2, takes  # an other's epoch, then its own again
        regained[app] = takes[-1].at - resumed
    print(report("held again after SIGCONT (lease table)", regained))  # noqa: T201
    # what it knows of an app it holds again stays known: once a probe round or two has judged it afresh,
    # every decision it makes on it has the region's health (the tick it was frozen in, ending after the
    # app was its own again, once dropped all it knew of the app, so that later decisions saw "unknown")
    judged = 3 * HEALTH_INTERVAL + HEALTH_TIMEOUT + SCHEDULING
    blind = [
        f"{r['app']}/{r['region']} decided {r['at'] - resumed:.2f}s after SIGCONT:"
        f" health unknown ({r['inputs'].get('health_reason')})"
        for _, r in logged_decisions(victim.daemon)
        if r["app"] in its_apps
        and r["at"] >= leases.takes(r["app"], since=frozen)[-1].at + judged
        and r["inputs"].get("health") == "unknown"
    ]
    assert not blind, "decisions without health on apps it held again:\n" + "\n".join(blind)
    if released:
        print(f"{len(released)} machine lease(s) it released after SIGCONT (the guard lets that through)")  # noqa: T201
    assert Instance.owned(await victim.daemon.status()) == its_apps
    await check_final(cluster, each(target, its_apps))


def overlaps(samples: list[tuple[float, str, set[str]]]) -> list[str]:
    """Apps two instances held at once, by their /status samples taken one after another: Y's sample of an
    app between two of X's that both hold it (an instance's hold of an app is one stretch of time, and none
    changes hands twice within the few milliseconds between samples)."""
    found = []
    for index, (at, name, held) in enumerate(samples):
        for other in {n for _, n, _ in samples} - {name}:
            before = next((s for s in reversed(samples[:index]) if s[1] == other), None)
            after = next((s for s in samples[index + 1 :] if s[1] == other), None)
            if before is not None and after is not None:
                both = held & before[2] & after[2]
                if both:
                    found.append(f"{at:.3f}: {sorted(both)} held by {name} and by {other}")
    return found


async def test_a_newcomer_gets_its_share_within_heartbeats_and_a_graceful_stop_hands_apps_over_at_once(
    cluster: Cluster,
) -> None:
    """Two instances, then a third: some apps move to the newcomer within a few heartbeats, and no app is
    held by two instances at any sample. SIGTERM of one: it releases each of its apps on the way out (at
    once, or when the tick of it in flight ends) and tells, and the others take each at once, well within
    a heartbeat of its release; no app is ever left unowned for as long as a takeover."""
    await cluster.start("a", "b")
    owners = await cluster.settled()
    settled = time.time()

    samples: list[tuple[float, str, set[str]]] = []
    sampling = asyncio.Event()

    async def sample() -> None:
        while not sampling.is_set():
            for instance in list(cluster.instances.values()):
                if instance.up:
                    with contextlib.suppress(httpx.HTTPError):
                        status = await instance.daemon.status()
                        samples.append((time.time(), instance.name, Instance.owned(status)))
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    try:
        newcomer = cluster.spawn("c")

        async def member() -> str:
            name: str = (await newcomer.daemon.status())["cluster"]["member"]
            return name

        # the ring gives a newcomer nothing of nine apps once in 3**9 / 2**9 (its name's suffix is random):
        # then it is replaced by another, so that something does move
        for _ in range(5):
            name = await until(member, timeout=READY, what="the newcomer answering", daemon=newcomer.daemon)
            share = ring.share(APPS, [i.member for i in cluster.up() if i is not newcomer], name)
            if share:
                break
            newcomer.signal(signal.SIGTERM)
            assert await newcomer.daemon.wait_exit(STOP) == 0
            newcomer = cluster.spawn("c")
        assert share, "five newcomers in a row given nothing by the ring"
        await cluster.ready(newcomer)
        owners_three = await cluster.settled()
        assert {app for app, owner in owners_three.items() if owner == newcomer.member} == share
        # nothing moved between the two that were there
        assert {a: o for a, o in owners_three.items() if a not in share} == {
            a: o for a, o in owners.items() if a not in share
        }
        joined_at = next(
            m["started_at"] for m in (await newcomer.daemon.status())["cluster"]["members"] if m["me"]
        )

        leaving = victim_of(owners_three, cluster, cluster.up())
        its_apps = {app for app, owner in owners_three.items() if owner == leaving.member}
        stayers = [i for i in cluster.up() if i is not leaving]
        termed = leaving.signal(signal.SIGTERM)
        seen = await cluster.taken_over(its_apps, stayers, termed)
        assert await leaving.daemon.wait_exit(STOP) == 0, leaving.daemon.log_tail()
        owners_two = await cluster.settled()
        assert set(owners_two.values()) <= {i.member for i in stayers}
        assert {a: o for a, o in owners_two.items() if a not in its_apps} == {
            a: o for a, o in owners_three.items() if a not in its_apps
        }
    finally:
        sampling.set()
        await sampler
    ended = time.time()

    leases = await cluster.state.leases()
    moved_in = {app: leases.takes(app, since=joined_at)[0].at - joined_at for app in share}
    handed = {app: leases.takes(app, since=termed)[0].at - termed for app in its_apps}
    # released by the leaving owner (not left to expire), each once no tick of it ran; taken when told
    released = {app: leases.releases(app, leaving.member, since=termed) for app in its_apps}
    assert all(released.values()), f"not released on SIGTERM, left to expire: {released}"
    told = {app: leases.takes(app, since=termed)[0].at - released[app][0].at for app in its_apps}
    print(  # noqa: T201
        f"\nnewcomer {newcomer.member} given {len(share)} app(s); "
        + report("held by it (from its start, lease table)", moved_in)
        + f"\n{leaving.member} stopped with {len(its_apps)} app(s); "
        + report("taken over (lease table)", handed)
        + "; "
        + report("seen in /status", seen)
        + "; "
        + report("from its release", told)
    )
    # a newcomer: its first look, the old owners' next (they release), its next (it takes): a few heartbeats
    assert max(moved_in.values()) <= 4 * HEARTBEAT + ALLOWANCE, report("moved to the newcomer", moved_in)
    # a graceful stop: it releases each app at once, or once its tick in flight ends (however long that
    # takes on a loaded host), and tells: the others take it at once, not at their next look
    assert max(told.values()) <= HEARTBEAT / 2, report("taken over after its release", told)
    assert max(seen.values()) <= TAKEOVER, report("handed over on SIGTERM (/status)", seen)

    assert len({name for _, name, _ in samples}) == 3
    wrong = overlaps(samples)
    assert not wrong, "held by two instances at once:\n" + "\n".join(wrong[:20])
    spans = {app: leases.unowned(app, settled, ended) for app in APPS}
    longest = max((b - a for found in spans.values() for a, b in found), default=0.0)
    print(f"{len(samples)} /status samples, none overlapping; longest an app was unowned: {longest:.2f}s")  # noqa: T201
    assert longest < TAKEOVER, spans
    assert not_the_owners(await mutations(cluster.control), leases) == []
