"""End-to-end harness: `flywatch run` as a real process against the simulator, on the wall clock.

The simulator runs in the test's own event loop (the `sim` fixture, with Fly's rate limits on, as on Fly);
the daemon is a subprocess (`python -m daemon run`) configured only through its environment, with a policy
file in tmp_path whose intervals, windows and cooldowns are a few seconds so the suite stays fast. Tests
judge by the simulator's truth (machines by region and state, the mutation log with its times) and by the
daemon's own /status, /decisions and /metrics. Every daemon started is killed at the end of its test.

The app's load model is made linear: its machines' capacity is so high that nothing queues, so the
in-flight requests of a region are its offered rps times the base latency, whatever the machine count.
The policy scales on that (`app_inflight_requests`, summed per region), so `load(n)` is the load that
needs exactly n machines.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer
from tests.conftest import TOKEN

APP = "shop"
LATENCY = 0.05  # the app's base latency: in flight = rps x LATENCY
CAPACITY = 1e6  # rps one machine takes before it queues: never, here
TARGET = 5.0  # in-flight requests per machine the policy aims at
RPS = TARGET / LATENCY  # one machine's worth of load (100 rps)

SCALING_INTERVAL = 1.0
HEALTH_INTERVAL = 1.0
UP_COOLDOWN = 4.0
DOWN_STABILIZATION = 3.0
DOWN_COOLDOWN = 2.5
# What reacting may spend on the Machines API on top of the interval. Fly lets an app list its machines once
# a second (burst 3, of which the client keeps one back), and at these 1s intervals the daemon lists three
# times per reaction: the probe job every round, the tick, and the action before it chooses machines. Each
# list waits its turn for a token, so the first create lands 2 to 5 s after a load step (measured over 26
# runs: 1.97 s to 4.94 s, in whole seconds of list tokens); the create itself answers at once.
API_TIME = 5.0
# Jitter of the decision times against the change that caused them: the daemon samples once per tick, and
# a tick stamps its decision when it starts, before its rate-limited list call (a second at most).
TICK_SLACK = SCALING_INTERVAL + 1.0
READY = 30.0  # seconds a daemon may take to answer /readyz (import, first list, first tick)
STOP = 10.0  # seconds a daemon may take to exit after SIGTERM with a tick in flight

SCALE_UP = frozenset({"start", "create"})
SCALE_DOWN = frozenset({"stop", "suspend", "destroy"})


def load(machines: float) -> float:
    """Offered rps that `machines` machines are needed for (a quarter of one short of the boundary)."""
    return (machines - 0.25) * RPS


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def policy(
    *,
    regions: dict[str, tuple[int, int]] | None = None,
    up_cooldown: float = UP_COOLDOWN,
    down_stabilization: float = DOWN_STABILIZATION,
    down_cooldown: float = DOWN_COOLDOWN,
) -> dict[str, Any]:
    """A policy for `shop` with short intervals; bounds per region as (min, max)."""
    bounds = regions or {"iad": (1, 6), "cdg": (1, 6), "nrt": (1, 6)}
    return {
        "apps": {
            APP: {
                "regions": {code: {"min": low, "max": high} for code, (low, high) in bounds.items()},
                "health": {
                    "interval": f"{HEALTH_INTERVAL:g}s",
                    "timeout": "500ms",
                    "unhealthy_after": 1,
                    "healthy_after": 1,
                },
                "scaling": {
                    "interval": f"{SCALING_INTERVAL:g}s",
                    "metric": {
                        "scrape": {"name": "app_inflight_requests", "aggregate": "sum"},
                        "max_age": "5s",
                    },
                    "target_per_machine": TARGET,
                    "tolerance": 0.1,
                    "scale_up": {"stabilization": "0s", "cooldown": f"{up_cooldown:g}s", "max_step": 4},
                    "scale_down": {
                        "stabilization": f"{down_stabilization:g}s",
                        "cooldown": f"{down_cooldown:g}s",
                        "max_step": 1,
                    },
                },
                "release": {"bake": "0s"},
            }
        }
    }


async def until(
    probe: Callable[[], Awaitable[Any]],
    *,
    timeout: float,
    what: str,
    daemon: Daemon | None = None,
    interval: float = 0.05,
) -> Any:
    """Poll `probe` until it answers something truthy; fail after `timeout` seconds of wall time, or as
    soon as `daemon` has exited (with the tail of its log)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        if daemon is not None and not daemon.running:
            pytest.fail(
                f"flywatch exited with {daemon.proc.returncode} while waiting for {what}\n{daemon.log_tail()}"
            )
        try:
            last = await probe()
        except httpx.TransportError as exc:
            last = exc
        else:
            if last:
                return last
        if loop.time() >= deadline:
            tail = f"\n{daemon.log_tail()}" if daemon is not None else ""
            pytest.fail(f"{what}: not within {timeout:g}s (last: {last!r}){tail}")
        await asyncio.sleep(interval)


class Daemon:
    """One `flywatch run` process and an HTTP client of its telemetry server."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log
        self.http = httpx.AsyncClient(base_url=url, timeout=5.0)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.http.get(path, params=params)

    async def status(self) -> dict[str, Any]:
        response = await self.get("/status")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def region(self, code: str) -> dict[str, Any]:
        regions: dict[str, dict[str, Any]] = (await self.status())["apps"].get(APP, {}).get("regions", {})
        return regions.get(code, {})

    async def decisions(self, region: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """The app's decision records, oldest first."""
        response = await self.get("/decisions", app=APP, limit=limit)
        response.raise_for_status()
        records: list[dict[str, Any]] = response.json()
        return [r for r in reversed(records) if region is None or r["region"] == region]

    async def metrics(self) -> str:
        response = await self.get("/metrics")
        response.raise_for_status()
        return response.text

    async def wait_ready(self, timeout: float = READY) -> None:
        async def ready() -> bool:
            return (await self.get("/readyz")).status_code == 200

        await until(ready, timeout=timeout, what="flywatch ready (/readyz 200)", daemon=self)

    async def wait_exit(self, timeout: float) -> int:
        async def exited() -> bool:
            return not self.running

        await until(exited, timeout=timeout, what="flywatch exits")
        return int(self.proc.returncode)

    async def until(self, probe: Callable[[], Awaitable[Any]], *, timeout: float, what: str) -> Any:
        return await until(probe, timeout=timeout, what=what, daemon=self)


class Flywatch:
    """Starts `flywatch run` against the simulator: same policy file and state file for every start."""

    def __init__(self, sim: SimServer, directory: Path) -> None:
        self.sim = sim
        self.dir = directory
        self.policy_path = directory / "flywatch.yaml"
        self.state_url = f"sqlite:///{directory / 'state.db'}"
        self.daemons: list[Daemon] = []

    def write_policy(self, document: dict[str, Any] | str) -> None:
        text = document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
        self.policy_path.write_text(text, encoding="utf-8")

    def environment(self, listen: str, *, dry_run: bool) -> dict[str, str]:
        # nothing of the developer's own flywatch or Fly settings leaks in (FLY_ALLOC_ID would change the URL)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWATCH_", "FLY_"))}
        env.update(
            PYTHONUNBUFFERED="1",
            FLY_API_TOKEN=TOKEN,
            FLYWATCH_MACHINES_API_URL=self.sim.api_url,
            FLYWATCH_LISTEN=listen,
            FLYWATCH_STATE_URL=self.state_url,
            FLYWATCH_CONFIG=str(self.policy_path),
            FLYWATCH_LOG_FORMAT="json",
            FLYWATCH_DRY_RUN="true" if dry_run else "false",
        )
        return env

    def spawn(self, *, dry_run: bool = False, env: dict[str, str] | None = None) -> Daemon:
        """A new daemon process (not yet ready); its output goes to a log file in tmp_path. `env`: more
        environment variables (FLYWATCH_INSTANCE, say), over the harness's own."""
        if not self.policy_path.exists():
            self.write_policy(policy())
        port = free_port()
        log = self.dir / f"flywatch-{len(self.daemons)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run"],
                cwd=self.dir,  # no .env file of the checkout is read
                env={**self.environment(f"127.0.0.1:{port}", dry_run=dry_run), **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        daemon = Daemon(proc, f"http://127.0.0.1:{port}", log)
        self.daemons.append(daemon)
        return daemon

    async def start(self, *, dry_run: bool = False, env: dict[str, str] | None = None) -> Daemon:
        """A new daemon process, once /readyz says it is ready."""
        daemon = self.spawn(dry_run=dry_run, env=env)
        await daemon.wait_ready()
        return daemon

    async def aclose(self) -> None:
        for daemon in self.daemons:
            if daemon.running:
                daemon.proc.kill()
            daemon.proc.wait(timeout=10)
            await daemon.http.aclose()


@pytest.fixture
def settings() -> SimSettings:
    """Fly's rate limits on, as on Fly; transient states short."""
    return SimSettings(transition_delay=0.05, rate_limits=True)


@pytest.fixture
async def flywatch(sim: SimServer, tmp_path: Path) -> AsyncIterator[Flywatch]:
    launcher = Flywatch(sim, tmp_path)
    try:
        yield launcher
    finally:
        await launcher.aclose()


# ---------------------------------------------------------------------------- the simulator's truth


async def create_shop(
    control: httpx.AsyncClient, regions: dict[str, int], machines_load: dict[str, float]
) -> None:
    """The app `shop` with `regions` started machines each and the load `machines_load` machines need."""
    body = {
        "name": APP,
        "regions": regions,
        "capacity_rps": CAPACITY,
        "base_latency": LATENCY,
        "load": {code: load(n) for code, n in machines_load.items()},
    }
    (await control.post("/apps", json=body)).raise_for_status()


async def set_load(control: httpx.AsyncClient, machines_load: dict[str, float]) -> tuple[float, float]:
    """Change the offered load; the wall-clock times just before and just after the change."""
    before = time.time()
    response = await control.put(
        f"/apps/{APP}/load", json={code: load(n) for code, n in machines_load.items()}
    )
    response.raise_for_status()
    return before, time.time()


async def fleet(control: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await control.get(f"/apps/{APP}")
    response.raise_for_status()
    machines: list[dict[str, Any]] = response.json()["machines"]
    return machines


async def started(control: httpx.AsyncClient) -> Counter[str]:
    """Started machines per region."""
    return Counter(m["region"] for m in await fleet(control) if m["state"] == "started")


async def mutations(
    control: httpx.AsyncClient,
    actions: Iterable[str] | None = None,
    *,
    region: str | None = None,
    since: float = 0.0,
) -> list[dict[str, Any]]:
    """The simulator's mutation log (oldest first), filtered."""
    response = await control.get("/counters", params={"since": since})
    response.raise_for_status()
    wanted = set(actions) if actions is not None else None
    return [
        m
        for m in response.json()["mutations"]
        if m["app"] == APP
        and (wanted is None or m["action"] in wanted)
        and (region is None or m["region"] == region)
    ]


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]
