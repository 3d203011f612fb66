"""`flywatch demo`: the whole product in two minutes, on one machine, with nothing to set up.

It starts the simulated Fly platform with the app `shop` in iad, cdg and nrt, runs the daemon on it
(in this process, with the policy `daemon/demo.yaml`, also at config/demo.yaml, and a SQLite state file
in a temporary directory), and plays a story through the simulator's control API, as the world would:

1. steady state;
2. a load spike in cdg: scaled up there, and only there;
3. nrt fails: its demand moves to the healthy regions, and comes back when nrt does;
4. a bad release (20% of answers are errors): judged failing and rolled back by itself;
5. the load drops: scaled down, after the stabilization window, one step per cooldown.

A live view shows every region's machines, health, load and last decision with its reason (redrawn on a
terminal; elsewhere every new decision is printed once). The end is a summary of what happened, checked:
exit 0 when every step happened, 1 with what did not. `--fast` shortens the transitions and the pauses
(for tests and CI); the daemon's own intervals are the policy's either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import IO, Any

import httpx

from daemon.app import Daemon
from daemon.settings import Settings
from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer
from daemon.telemetry.logging import configure_logging

APP = "shop"
REGIONS = ("iad", "cdg", "nrt")
TOKEN = "demo-token"  # noqa: S105 - the simulator's token for this run only, not a secret
OWNER = "demo@flywatch"  # whose name the simulator writes on the daemon's changes
DOWN_WINDOW = 8.0  # demo.yaml's scale_down.stabilization
LATENCY = 0.05  # seconds per answer: in-flight requests = rps x LATENCY, whatever the machine count
TARGET = 5.0  # in-flight requests per machine the demo policy aims at (daemon/demo.yaml)
RPS = TARGET / LATENCY  # one machine's worth of load
GOOD = "registry.fly.io/shop:v1"
BAD = "registry.fly.io/shop:v2-errors"
STEP_TIMEOUT = 60.0  # seconds a step may take before the demo says it did not happen


def load(machines: float) -> float:
    """Offered rps that `machines` machines are needed for (a little short of the next one)."""
    return (machines - 0.3) * RPS


def policy_path() -> Path:
    return Path(str(files("daemon").joinpath("demo.yaml")))


@dataclass
class Step:
    title: str
    ok: bool = False
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Story:
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)


# ---------------------------------------------------------------------------- the view (pure)


def render(world: Mapping[str, Any], status: Mapping[str, Any], step: str, elapsed: float) -> str:
    """The live view: one row per region (machines by state, health, offered load, desired, last
    decision with its reason), then the release watch's line."""
    machines = [m for m in world.get("machines", []) if m.get("state") != "destroyed"]
    regions = status.get("apps", {}).get(APP, {}).get("regions", {})
    loads = world.get("load", {})
    lines = [f"flywatch demo  {elapsed:5.1f}s  {step}", ""]
    lines.append(
        f"{'REGION':<7}{'STARTED':>8}{'OTHER':>7}  {'HEALTH':<9}{'LOAD':>7}{'DESIRED':>9}  LAST DECISION"
    )
    for code in REGIONS:
        mine = [m for m in machines if m.get("region") == code]
        started = sum(1 for m in mine if m.get("state") == "started")
        region = regions.get(code, {})
        decision = region.get("last_decision") or {}
        action = decision.get("action", "-")
        why = f"{action}: {decision.get('rule', '')}: {decision.get('reason', '')}" if decision else "-"
        desired = region.get("desired")
        lines.append(
            f"{code:<7}{started:>8}{len(mine) - started:>7}  {region.get('health', '-'):<9}"
            f"{loads.get(code, 0):>7.0f}{'-' if desired is None else desired:>9}  {why[:90]}"
        )
    release = status.get("releases", {}).get(APP) or {}
    watched = release.get("watched") or {}
    rollback = release.get("rollback") or {}
    line = f"release: v{watched.get('version', '-')} {watched.get('verdict', '-')}"
    if watched.get("reason"):
        line += f" ({watched['reason']})"
    if rollback:
        versions = (rollback.get("from", {}).get("version"), rollback.get("to", {}).get("version"))
        line += f"; rollback v{versions[0]} -> v{versions[1]} {rollback.get('state')}"
    lines.extend(["", line[:150]])
    return "\n".join(lines)


def summary(story: Story) -> str:
    lines = ["", "summary:"]
    for step in story.steps:
        mark = "ok  " if step.ok else "FAIL"
        lines.append(f"  {mark} {step.title} ({step.seconds:.1f}s): {step.detail}")
    lines.append("all of it happened, by itself" if story.ok else "some of it did not happen")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the run


class Demo:
    def __init__(self, *, fast: bool, out: IO[str], live: bool) -> None:
        self.fast = fast
        self.out = out
        self.live = live  # redraw in place (a terminal) or print each new decision once
        self.story = Story()
        self.started = time.monotonic()
        self.current = "starting"
        self._seen: set[tuple[str, float]] = set()
        self.sim: SimServer | None = None
        self.daemon: Daemon | None = None
        self.control: httpx.AsyncClient | None = None
        self.banner = ""
        self._before_outage: dict[str, int] = {}
        self._dropped_at = 0.0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def run(self, workdir: Path) -> int:
        delay = 0.02 if self.fast else 0.1
        self.sim = SimServer(SimSettings(transition_delay=delay, rate_limits=True, tokens={TOKEN: OWNER}))
        await self.sim.start("127.0.0.1", 0)
        self.control = httpx.AsyncClient(base_url=f"{self.sim.url}/_sim", timeout=10.0)
        viewer: asyncio.Task[None] | None = None
        try:
            await self._world()
            # everything set here: nothing of the environment (FLYWATCH_*, a .env file) leaks into the demo
            settings = Settings(
                FLY_API_TOKEN=TOKEN,  # by its alias, as the environment gives it
                machines_api_url=self.sim.url,
                config=policy_path(),
                listen="127.0.0.1:0",
                state_url=f"sqlite:///{workdir / 'state.db'}",
                log_format="json",
                dry_run=False,
                org=None,
                prometheus_url=None,
                prometheus_token=None,
                _env_file=None,  # type: ignore[call-arg]
            )
            self.daemon = Daemon(settings)
            await self.daemon.start()
            assert self.daemon.server is not None  # noqa: S101 - start() serves it
            url = self.daemon.server.url
            self.banner = (
                f"the simulated Fly API at {self.sim.api_url}\n"
                f"flywatch serves {url}/metrics, {url}/status, {url}/releases?app=shop\n"
                f"its log: {workdir / 'flywatch.log'}"
            )
            self.say(self.banner)
            viewer = asyncio.ensure_future(self._view())
            await self._play()
        finally:
            if viewer is not None:
                viewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await viewer
            if self.daemon is not None:
                await self.daemon.stop()
            await self.control.aclose()
            await self.sim.stop()
        self.say(summary(self.story))
        return 0 if self.story.ok else 1

    async def _world(self) -> None:
        assert self.control is not None  # noqa: S101
        body = {
            "name": APP,
            "regions": dict.fromkeys(REGIONS, 1),
            "image": GOOD,
            "capacity_rps": 1e6,  # nothing queues: load is what the metric says, not a side effect
            "base_latency": LATENCY,
            "load": {code: load(1) for code in REGIONS},
        }
        (await self.control.post("/apps", json=body)).raise_for_status()
        (await self.control.post("/images", json={"image": BAD, "mode": "errors"})).raise_for_status()

    async def _status(self) -> dict[str, Any]:
        assert self.daemon is not None  # noqa: S101
        return self.daemon.status()

    async def _app(self) -> dict[str, Any]:
        assert self.control is not None  # noqa: S101
        response = await self.control.get(f"/apps/{APP}")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def _started(self) -> dict[str, int]:
        machines = (await self._app())["machines"]
        return {
            code: sum(1 for m in machines if m["region"] == code and m["state"] == "started")
            for code in REGIONS
        }

    async def _set_load(self, machines: Mapping[str, float]) -> None:
        assert self.control is not None  # noqa: S101
        body = {code: load(n) for code, n in machines.items()}
        (await self.control.put(f"/apps/{APP}/load", json=body)).raise_for_status()

    async def _view(self) -> None:
        """The live view, once a second, until cancelled."""
        while True:
            try:
                world, status = await self._app(), await self._status()
            except httpx.HTTPError:
                await asyncio.sleep(1.0)
                continue
            if self.live:
                view = render(world, status, self.current, self._elapsed())
                self.out.write(f"\x1b[H\x1b[2J{view}\n\n{self.banner}\n")
                self.out.flush()
            else:
                self._print_new_decisions(status)
            await asyncio.sleep(1.0)

    def _print_new_decisions(self, status: Mapping[str, Any]) -> None:
        for code, region in sorted(status.get("apps", {}).get(APP, {}).get("regions", {}).items()):
            decision = region.get("last_decision") or {}
            if not decision or decision.get("action") == "hold":
                continue
            key = (code, float(decision.get("at", 0.0)))
            if key in self._seen:
                continue
            self._seen.add(key)
            self.say(
                f"  {self._elapsed():5.1f}s {code}: {decision.get('action')} {decision.get('count')} "
                f"({decision.get('rule')}: {decision.get('reason')}) -> {decision.get('outcome')}"
            )

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    async def _pause(self, seconds: float) -> None:
        """Time to look at the view between steps (a story step itself waits for what it waits for)."""
        await asyncio.sleep(seconds / 8 if self.fast else seconds)

    async def _step(
        self, title: str, act: Callable[[], Awaitable[None]], done: Callable[[], Awaitable[str]]
    ) -> None:
        """Do `act`, then wait (polling, with a deadline) until `done` says what happened ("" not yet)."""
        self.current = title
        if not self.live:
            self.say(f"{self._elapsed():5.1f}s {title}")
        step = Step(title)
        self.story.steps.append(step)
        began = time.monotonic()
        await act()
        deadline = began + STEP_TIMEOUT
        while time.monotonic() < deadline:
            detail = await done()
            if detail:
                step.ok, step.detail = True, detail
                break
            await asyncio.sleep(0.25)
        else:
            step.detail = f"not within {STEP_TIMEOUT:g}s"
        step.seconds = time.monotonic() - began
        if not self.live:
            self.say(f"{self._elapsed():5.1f}s   {'done' if step.ok else 'did not happen'}: {step.detail}")

    async def _play(self) -> None:
        """The story: each step changes the world, then waits for flywatch to have answered it."""
        for title, act, done, pause in (
            ("steady state", self._nothing, self._steady, 8.0),
            ("a load spike in cdg (3 machines' worth)", self._spike, self._scaled_up, 6.0),
            ("nrt fails (its machines unreachable)", self._outage, self._moved, 4.0),
            ("nrt recovers", self._recover, self._back, 6.0),
            ("a bad release: 20% of its answers are errors", self._deploy_bad, self._rolled_back, 6.0),
            ("the load drops", self._drop, self._scaled_down, 2.0),
        ):
            await self._step(title, act, done)
            await self._pause(pause)

    # ---------------------------------------------------------------- the steps: what is done

    async def _nothing(self) -> None:
        return None

    async def _spike(self) -> None:
        await self._set_load({"cdg": 3})

    async def _outage(self) -> None:
        self._before_outage = await self._started()
        await self._post("/faults", {"kind": "region_outage", "region": "nrt"})

    async def _recover(self) -> None:
        assert self.control is not None  # noqa: S101
        (await self.control.delete("/faults/nrt")).raise_for_status()

    async def _deploy_bad(self) -> None:
        await self._post(f"/apps/{APP}/deploy", {"image": BAD, "strategy": "immediate"})

    async def _drop(self) -> None:
        self._dropped_at = time.time()
        await self._set_load(dict.fromkeys(REGIONS, 1))

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        assert self.control is not None  # noqa: S101
        (await self.control.post(path, json=body)).raise_for_status()

    # ---------------------------------------------------------------- the steps: what shows it happened

    async def _regions(self) -> dict[str, Any]:
        regions: dict[str, Any] = (await self._status()).get("apps", {}).get(APP, {}).get("regions", {})
        return regions

    async def _steady(self) -> str:
        status = await self._status()
        regions = status.get("apps", {}).get(APP, {}).get("regions", {})
        healthy = all(regions.get(code, {}).get("health") == "healthy" for code in REGIONS)
        good = (status.get("releases", {}).get(APP) or {}).get("good")
        if not healthy or not good:
            return ""
        return f"every region healthy on one machine; release v{good['version']} on record"

    async def _scaled_up(self) -> str:
        started = await self._started()
        if started["cdg"] < 3:
            return ""
        if started["iad"] != 1 or started["nrt"] != 1:
            return ""  # only there: the other regions' load did not change
        return f"cdg 1 -> {started['cdg']} machines, and only there (iad 1, nrt 1)"

    async def _moved(self) -> str:
        regions = await self._regions()
        if regions.get("nrt", {}).get("health") != "down":
            return ""
        takers = [
            code
            for code in ("iad", "cdg")
            if "failover" in str((regions.get(code, {}).get("last_decision") or {}).get("reason", ""))
        ]
        started = await self._started()
        if not takers or started["iad"] + started["cdg"] < 1 + 3 + 1:
            return ""
        return (
            f"nrt down; its demand moved to {', '.join(takers)} "
            f"(started: iad {started['iad']}, cdg {started['cdg']})"
        )

    async def _back(self) -> str:
        regions = await self._regions()
        if regions.get("nrt", {}).get("health") != "healthy":
            return ""
        started, before = await self._started(), self._before_outage
        if started["nrt"] < 1 or any(started[code] != before[code] for code in ("iad", "cdg")):
            return ""  # the capacity it took from the others comes back to them
        return (
            f"nrt healthy and serving again; the capacity moved for it is given back "
            f"(iad {started['iad']}, cdg {started['cdg']}, as before the outage)"
        )

    async def _rolled_back(self) -> str:
        release = (await self._status()).get("releases", {}).get(APP) or {}
        rollback = release.get("rollback") or {}
        if rollback.get("state") != "done":
            return ""
        machines = [m for m in (await self._app())["machines"] if m["state"] != "destroyed"]
        if {m["image"] for m in machines} != {GOOD}:
            return ""
        return (
            f"v{rollback['from']['version']} failing ({rollback.get('reason')}): rolled back to "
            f"v{rollback['to']['version']}, {len(rollback.get('updated', []))} machines reverted"
        )

    async def _scaled_down(self) -> str:
        started = await self._started()
        if any(started[code] != 1 for code in REGIONS):
            return ""
        assert self.control is not None  # noqa: S101
        response = await self.control.get("/counters", params={"since": self._dropped_at})
        stops = sorted(
            m["time"]
            for m in response.json()["mutations"]
            if m["action"] in {"stop", "suspend", "destroy"} and m["owner"] == OWNER
        )
        if not stops:
            return ""
        steps = 1 + sum(1 for a, b in itertools.pairwise(stops) if b - a >= 1.0)
        return (
            f"back to one machine per region: {len(stops)} machine(s) taken down in {steps} step(s), "
            f"the first {stops[0] - self._dropped_at:.1f}s after the drop "
            f"(stabilization window {DOWN_WINDOW:g}s)"
        )


def run_demo(*, fast: bool, out: IO[str], live: bool) -> int:
    """The demo, start to end; the exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="flywatch-demo-"))
    code = 130
    with (workdir / "flywatch.log").open("w", encoding="utf-8") as log:
        configure_logging("json", stream=log)
        demo = Demo(fast=fast, out=out, live=live)
        try:
            code = asyncio.run(demo.run(workdir))
        except KeyboardInterrupt:
            print("flywatch demo: interrupted", file=out)
    if code == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"flywatch demo: its log and state are kept in {workdir}", file=out)
    return code
