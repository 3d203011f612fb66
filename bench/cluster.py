"""Benchmark: several `flywatch run` instances sharing the apps of one policy on one PostgreSQL.

1. Reconcile ticks per second over 5,000 apps with one, two and three instances. A simulator in another
   process (`flywatch sim`, Fly's rate limits off, no machine listening: bench/ticks.py's world for whole
   ticks) serves 5,000 apps of one started machine in each of two regions. The policy (bench/ticks.py's)
   holds all of them, scaling every SCALING_INTERVAL on the count of started machines (no per-machine HTTP
   for the metric; the release watch still asks each machine for its /metrics page, refused at once on
   loopback) with a target that makes every tick a hold, health probed once an hour (one round at start).
   The instances are `flywatch run` processes configured by their environment, as tests/e2e/conftest.py
   starts them, on one fresh PostgreSQL schema, added one at a time. With each new instance the benchmark
   waits until every app is owned by exactly one of them (each instance's /status `cluster` → `owners`,
   every instance seeing the same live members), lets the first ticks of the apps that changed hands pass,
   then counts the reconcile ticks each instance completed over a fixed window
   (flywatch_tick_duration_seconds_count{tick="reconcile"} from /metrics). The CPU time of every process
   involved (the instances, the simulator, this schema's PostgreSQL backends and the server's background
   processes) is read from /proc over the same window, and the whole machine's from /proc/stat. When the
   instances do not settle in time, the window is measured anyway and the result says so, with the leases
   they lost (flywatch_ownership_changes_total{change="lost"}).
2. Takeover. Three instances with the default FLYWATCH_TAKEOVER (15 s) over 30 of those apps: the owner
   of the most apps is killed with SIGKILL, and the two others' /status is polled every 100 ms until each of
   its apps shows as owned by one of them (timed from the kill). Then the same with SIGTERM (a graceful
   leave: the instance gives its leases up on the way out). After each run a new instance joins, so every
   run starts from three members that agree on who owns what.

Everything runs on this machine: the simulator, the instances and PostgreSQL share its cores.

    .venv/bin/python -m bench.cluster [--apps N] [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg
import yaml

from bench.ticks import _free_port, _policy

APPS = 5000
REGIONS = ("iad", "cdg")  # one started machine in each region of every app
INSTANCES = (1, 2, 3)
SCALING_INTERVAL = 5.0  # seconds between an app's reconcile ticks (the default): 1,000 ticks/s asked for
HEALTH_INTERVAL = 3600.0  # one probe round at start, none after it within the benchmark
WINDOW = 20.0  # seconds over which the ticks are counted
SETTLE = 5.0  # seconds from every app owned to the window (the first ticks of the apps that moved)
CONVERGE = 45.0  # seconds the instances get to agree that every app is owned
TAKEOVER_APPS = 30
KILLS = 3
LEAVES = 3
POLL = 0.1  # seconds between looks at the survivors' /status
DEFAULT_TAKEOVER = 15.0  # FLYWATCH_TAKEOVER's default (daemon/settings.py); left unset here
# client-go's leader election as Kubernetes' own components set it: a comparable figure, not a measurement
K8S_LEASE = {"lease_duration": 15.0, "renew_deadline": 10.0, "retry_period": 2.0}
POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/flywatch_test")
SIM_SETTINGS = {"rate_limits": False, "serve_fleet": False, "transition_delay": 0.1}  # as bench/ticks.py's
TIMEOUT = 10.0  # seconds for one answer of an instance (one whose event loop is that late: not answering)
CLK_TCK = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$", re.MULTILINE)
_LAPSED = re.compile(r"lost (\d+) app\(s\) whose leases lapsed")


class BenchmarkError(RuntimeError):
    """The benchmark did not reach what it measures; the message says where it stopped."""


def _names(count: int) -> list[str]:
    return [f"app-{i:04d}" for i in range(count)]


def _write_policy(path: Path, names: list[str], scaling_interval: float) -> None:
    """bench/ticks.py's policy, made a steady hold: the apps' two regions, one machine per started machine
    (desired = started), health probed once an hour."""
    policy = _policy(names, {"machines": {"state": "started"}}, f"{scaling_interval:g}s")
    for app in policy["apps"].values():
        app["regions"] = {region: {"min": 1, "max": 10} for region in REGIONS}
        app["scaling"]["target_per_machine"] = 1
        app["health"]["interval"] = f"{HEALTH_INTERVAL:g}s"
    path.write_text(yaml.safe_dump(policy))


# ---------------------------------------------------------------------------- CPU time, from /proc


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of stat


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK  # less idle and iowait


def _postgres_pids(application_name: str) -> list[int]:
    """This schema's backends (by application_name) and the server's own processes (walwriter,
    checkpointer, background writer, autovacuum: the postgres processes that serve no client)."""
    with psycopg.connect(POSTGRES, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchall()
    pids = [int(row[0]) for row in rows]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("postgres:") and "(" not in cmdline:  # a client backend names its peer
                pids.append(int(entry.name))
    return pids


class CpuMeter:
    """Cores busy, on average between `start` and `stop`: per group of processes, and the whole machine."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._before: dict[int, float] = {}
        self._busy = 0.0
        self._at = 0.0

    def _read(self) -> dict[int, float]:
        read = {pid: _cpu_seconds(pid) for pids in self.groups.values() for pid in pids}
        return {pid: value for pid, value in read.items() if value is not None}

    def start(self) -> None:
        self._before, self._busy, self._at = self._read(), _machine_busy(), time.monotonic()

    def stop(self) -> dict[str, float]:
        after, busy, wall = self._read(), _machine_busy(), time.monotonic() - self._at
        used = {
            group: sum(after[p] - self._before[p] for p in pids if p in after and p in self._before) / wall
            for group, pids in self.groups.items()
        }
        measured = sum(used.values())
        used["machine"] = (busy - self._busy) / wall
        used["other"] = max(used["machine"] - measured, 0.0)  # whatever else ran on the machine
        return used


# ---------------------------------------------------------------------------- the processes


@contextlib.contextmanager
def _schema() -> Iterator[tuple[str, str]]:
    """A fresh schema in the test database: the state URL on it, and the application_name its connections
    give (to find their backends). Dropped afterwards."""
    name = f"bench_cluster_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{name}&application_name={name}", name
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.asynccontextmanager
async def _simulator(workdir: Path, names: list[str]) -> AsyncIterator[tuple[str, int]]:
    """`flywatch sim` in another process serving `names`, as bench/ticks.py starts it: its URL and pid."""
    apps = [{"name": n, "regions": dict.fromkeys(REGIONS, 1)} for n in names]
    world = workdir / "world.yaml"
    world.write_text(yaml.safe_dump({"settings": SIM_SETTINGS, "apps": apps}))
    port = _free_port()
    with (workdir / "sim.log").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon",
            "sim",
            "--port",
            str(port),
            "--scenario",
            str(world),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 300
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{url}/_sim/health")).status_code == 200:
                        break
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise BenchmarkError(f"the simulator did not start:\n{_tail(workdir / 'sim.log')}")
                await asyncio.sleep(0.2)
        yield url, proc.pid
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


class Instance:
    """One `flywatch run` process, configured by its environment as tests/e2e/conftest.py starts one."""

    def __init__(self, workdir: Path, name: str, api_url: str, state_url: str) -> None:
        port = _free_port()
        self.name = name
        self.log = workdir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWATCH_", "FLY_"))}
        env.update(
            PYTHONUNBUFFERED="1",
            FLY_API_TOKEN="sim-token",  # the simulator's
            FLYWATCH_MACHINES_API_URL=api_url,
            FLYWATCH_LISTEN=f"127.0.0.1:{port}",
            FLYWATCH_STATE_URL=state_url,
            FLYWATCH_CONFIG=str(workdir / "policy.yaml"),
            FLYWATCH_LOG_FORMAT="json",
            FLYWATCH_INSTANCE=name,  # FLYWATCH_TAKEOVER unset: the default
        )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run"],
                cwd=workdir,  # no .env file of the checkout is read
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchmarkError(f"{self.name} exited with {self.proc.returncode}:\n{_tail(self.log)}")

    async def cluster(self) -> dict[str, Any] | None:
        """Its /status `cluster`; None while it does not answer (starting, or its loop too busy)."""
        self.check()
        try:
            response = await self.http.get("/status")
        except httpx.TransportError:
            return None
        if response.status_code != 200:
            return None
        cluster: dict[str, Any] = response.json()["cluster"]
        return cluster

    async def metrics(self) -> dict[str, float] | None:
        """The few series the benchmark reads, by name{labels} (a restricted /metrics, cheap whatever the
        number of apps), and "at": when the answer came; None while it does not answer."""
        self.check()
        names = [
            "flywatch_tick_duration_seconds_count",
            "flywatch_tick_duration_seconds_sum",
            "flywatch_ownership_changes_total",
            "flywatch_owned_apps",
            "flywatch_cluster_members",
            "flywatch_unowned_apps",
        ]
        try:
            response = await self.http.get("/metrics", params={"name[]": names})
        except httpx.TransportError:
            return None
        if response.status_code != 200:
            return None
        found = {"at": time.monotonic()}
        for name, labels, value in _SAMPLE.findall(response.text):
            # flywatch_owned_apps is labelled by the member's name, which changes with each process
            keep = labels if labels and name != "flywatch_owned_apps" else ""
            found[f"{name}{{{keep}}}" if keep else name] = float(value)
        return found

    def lapses(self) -> tuple[int, int]:
        """(times, apps): how often its leases lapsed here since it started, and how many apps that took
        from it, from its log (which it writes even while too busy to answer HTTP in time)."""
        found = [int(n) for n in _LAPSED.findall(self.log.read_text(errors="replace"))]
        return len(found), sum(found)

    async def close(self) -> None:
        _stop(self.proc)
        await self.http.aclose()


TICKS = 'flywatch_tick_duration_seconds_count{tick="reconcile"}'
TICK_SECONDS = 'flywatch_tick_duration_seconds_sum{tick="reconcile"}'
LOST = 'flywatch_ownership_changes_total{change="lost"}'


def _owned(views: list[dict[str, Any] | None], apps: int) -> dict[str, set[str]] | None:
    """Each member's apps, as it says itself, once every instance answers and sees the same live members,
    and each of the `apps` is owned by exactly one of them; else None."""
    if any(view is None for view in views):
        return None
    known = [view for view in views if view is not None]
    members = {view["member"] for view in known}
    own: dict[str, set[str]] = {}
    for view in known:
        if {m["member"] for m in view["members"] if m["live"]} != members or not view["joined"]:
            return None
        own[view["member"]] = {app for app, owner in view["owners"].items() if owner == view["member"]}
        if view["owned"] != len(own[view["member"]]):
            return None
    held = [app for mine in own.values() for app in mine]
    return own if len(held) == apps == len(set(held)) else None


async def _settled(
    instances: list[Instance], apps: int, timeout: float, every: float
) -> dict[str, set[str]] | None:
    """Wait until every app is owned (_owned); None after `timeout`. The cheap /metrics say when to look at
    the /status of each (whose `owners` lists every app of the policy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        figures = await asyncio.gather(*(i.metrics() for i in instances))
        if (
            all(
                f is not None
                and f.get("flywatch_cluster_members") == len(instances)
                and f.get("flywatch_unowned_apps") == 0
                for f in figures
            )
            and sum(f.get("flywatch_owned_apps", 0.0) for f in figures if f is not None) == apps
        ):
            own = _owned(list(await asyncio.gather(*(i.cluster() for i in instances))), apps)
            if own is not None:
                return own
        await asyncio.sleep(every)
    return None


# ---------------------------------------------------------------------------- 1. ticks per second


async def _window(instances: list[Instance], groups: dict[str, list[int]], window: float) -> dict[str, Any]:
    """Ticks completed by each instance and the cores busy over `window` seconds."""
    meter = CpuMeter(groups)
    before = await asyncio.gather(*(i.metrics() for i in instances))
    meter.start()
    await asyncio.sleep(window)
    after = await asyncio.gather(*(i.metrics() for i in instances))
    cpu = meter.stop()
    per: list[dict[str, Any]] = []
    for instance, start, end in zip(instances, before, after, strict=True):
        entry: dict[str, Any] = {"instance": instance.name, "answered": start is not None and end is not None}
        if start is not None and end is not None:
            ticks = end.get(TICKS, 0.0) - start.get(TICKS, 0.0)
            seconds = end.get(TICK_SECONDS, 0.0) - start.get(TICK_SECONDS, 0.0)
            entry.update(
                ticks=ticks,
                ticks_per_second=ticks / (end["at"] - start["at"]),
                mean_tick_seconds=seconds / ticks if ticks else None,
                lost=end.get(LOST, 0.0) - start.get(LOST, 0.0),
            )
        per.append(entry)
    answered = [p for p in per if p["answered"]]
    total = sum(p["ticks_per_second"] for p in answered) if len(answered) == len(per) else None
    return {"instances": per, "ticks_per_second": total, "cpu": cpu}


async def _throughput(
    workdir: Path,
    api_url: str,
    sim_pid: int,
    apps: int,
    counts: tuple[int, ...],
    window: float,
    settle: float,
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    instances: list[Instance] = []
    with _schema() as (state_url, application_name):
        try:
            for count in counts:
                started = time.monotonic()
                while len(instances) < count:
                    instances.append(Instance(workdir, f"ticks-{len(instances) + 1}", api_url, state_url))
                own = await _settled(instances, apps, CONVERGE, 1.0)
                converged = time.monotonic() - started if own is not None else None
                if own is not None:
                    await asyncio.sleep(settle)
                groups = {
                    "flywatch": [i.proc.pid for i in instances],
                    "simulator": [sim_pid],
                    "postgres": _postgres_pids(application_name),
                }
                figures = await _window(instances, groups, window)
                after = await _settled(instances, apps, 2 * TIMEOUT, 1.0) if own is not None else None
                moved = own is not None and (
                    after is None
                    or {m: len(a) for m, a in after.items()} != {m: len(a) for m, a in own.items()}
                )
                spread = own or after or {}
                members = {i.name: m for m in spread for i in instances if m.startswith(f"{i.name}/")}
                for entry in figures["instances"]:
                    entry["apps"] = (
                        len(spread[members[entry["instance"]]]) if entry["instance"] in members else None
                    )
                for entry, instance in zip(figures["instances"], instances, strict=True):
                    entry["lapses"], entry["apps_lapsed"] = instance.lapses()  # since it started
                results.append(
                    {
                        "count": count,
                        "converged_seconds": converged,
                        "moved_during_window": moved,
                        **figures,
                    }
                )
        finally:
            for instance in instances:
                await instance.close()
    return results


# ---------------------------------------------------------------------------- 2. takeover


async def _taken_over(survivors: list[Instance], apps: set[str], since: float) -> dict[str, float]:
    """Seconds from `since` until each of `apps` shows as owned by one of the survivors (by its own view)."""
    taken: dict[str, float] = {}
    deadline = since + 4 * DEFAULT_TAKEOVER
    while len(taken) < len(apps):
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"not taken over within {4 * DEFAULT_TAKEOVER:g}s: {sorted(apps - set(taken))}"
            )
        views = await asyncio.gather(*(s.cluster() for s in survivors))
        now = time.monotonic() - since
        for view in views:
            if view is None:
                continue
            for app, owner in view["owners"].items():
                if app in apps and owner == view["member"]:
                    taken.setdefault(app, now)
        await asyncio.sleep(POLL)
    return taken


async def _exited(proc: subprocess.Popen[bytes], since: float) -> float:
    """Seconds from `since` until `proc` has exited (polled every 10 ms, for 90 s at most)."""
    while proc.poll() is None and time.monotonic() < since + 90:
        await asyncio.sleep(0.01)
    return time.monotonic() - since


async def _takeover(workdir: Path, api_url: str, kills: int, leaves: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    instances: list[Instance] = []
    with _schema() as (state_url, _):
        try:
            for how in ["kill"] * kills + ["term"] * leaves:
                while len(instances) < 3:
                    name = f"takeover-{len(runs) + len(instances) + 1}"
                    instances.append(Instance(workdir, name, api_url, state_url))
                own = await _settled(instances, TAKEOVER_APPS, CONVERGE, POLL)
                if own is None:
                    raise BenchmarkError(f"the three instances did not agree within {CONVERGE:g}s")
                victim = max(
                    instances,
                    key=lambda i: len(next(a for m, a in own.items() if m.startswith(f"{i.name}/"))),
                )
                apps = next(a for m, a in own.items() if m.startswith(f"{victim.name}/"))
                survivors = [i for i in instances if i is not victim]
                since = time.monotonic()
                victim.proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
                exited = asyncio.ensure_future(_exited(victim.proc, since))  # watched meanwhile, not after
                taken = await _taken_over(survivors, apps, since)
                exited_seconds = await exited
                runs.append(
                    {
                        "how": how,
                        "apps": len(apps),
                        "all_seconds": max(taken.values()),
                        "first_seconds": min(taken.values()),
                        "exit_code": victim.proc.poll(),
                        # SIGTERM: the ticks in flight finish, then the leases are given up, then it exits
                        "exited_seconds": exited_seconds,
                    }
                )
                instances.remove(victim)
                await victim.close()
        finally:
            for instance in instances:
                await instance.close()
    return {"takeover": DEFAULT_TAKEOVER, "apps": TAKEOVER_APPS, "runs": runs, "kubernetes": K8S_LEASE}


# ---------------------------------------------------------------------------- the whole benchmark


async def _run(
    apps: int, counts: tuple[int, ...], window: float, settle: float, kills: int, leaves: int
) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        workdir = Path(tmp)
        names = _names(max(apps, TAKEOVER_APPS))
        async with _simulator(workdir, names) as (api_url, sim_pid):
            sim_ready = time.monotonic() - started
            _write_policy(workdir / "policy.yaml", names[:apps], SCALING_INTERVAL)
            throughput = (
                await _throughput(workdir, api_url, sim_pid, apps, counts, window, settle) if counts else []
            )
            throughput_done = time.monotonic()
            _write_policy(workdir / "policy.yaml", names[:TAKEOVER_APPS], SCALING_INTERVAL)
            takeover = await _takeover(workdir, api_url, kills, leaves) if kills or leaves else {}
            takeover_done = time.monotonic()
    return {
        "apps": apps,
        "regions": list(REGIONS),
        "scaling_interval": SCALING_INTERVAL,
        "health_interval": HEALTH_INTERVAL,
        "window": window,
        "settle": settle,
        "converge": CONVERGE,
        "cores": os.cpu_count(),
        "throughput": throughput,
        "takeover": takeover,
        "simulator_start_seconds": sim_ready,
        "throughput_seconds": throughput_done - started - sim_ready,
        "takeover_seconds": takeover_done - throughput_done,
        "seconds": time.monotonic() - started,
    }


def _terminated(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that the processes started are stopped and the schemas dropped


def run(
    apps: int = APPS,
    counts: tuple[int, ...] = INSTANCES,
    window: float = WINDOW,
    settle: float = SETTLE,
    kills: int = KILLS,
    leaves: int = LEAVES,
) -> dict[str, Any]:
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return asyncio.run(_run(apps, counts, window, settle, kills, leaves))
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=APPS, help=f"apps in the ticks part (default {APPS})")
    parser.add_argument("--quick", action="store_true", help="a 10 s window, one kill and one leave")
    args = parser.parse_args()
    quick = {"window": 10.0, "settle": 5.0, "kills": 1, "leaves": 1} if args.quick else {}
    print(json.dumps(run(args.apps, **quick), indent=2))  # type: ignore[arg-type]
