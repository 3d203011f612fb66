"""`flywatch run` end to end: a real daemon process scaling the simulated Fly app `shop` per region.

Each test starts from `shop` with one machine per region (unless it says otherwise), starts the daemon,
waits until it is ready and has judged every region, then changes the world and watches what the daemon
does to it, on the simulator's mutation log and clock.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from daemon.reconciler import DECISIONS, SCALING
from daemon.sim.server import SimServer
from daemon.store import open_store
from tests.e2e.conftest import (
    API_TIME,
    APP,
    DOWN_COOLDOWN,
    DOWN_STABILIZATION,
    SCALE_DOWN,
    SCALE_UP,
    SCALING_INTERVAL,
    STOP,
    TARGET,
    TICK_SLACK,
    UP_COOLDOWN,
    Daemon,
    Flywatch,
    create_shop,
    fleet,
    gaps,
    mutations,
    policy,
    set_load,
    started,
)

REGIONS = ("iad", "cdg", "nrt")
ONE_EACH = {"iad": 1, "cdg": 1, "nrt": 1}


async def steady(daemon: Daemon, regions: tuple[str, ...] = REGIONS) -> None:
    """Until every region is judged healthy and its last decision held."""

    async def held() -> bool:
        status = await daemon.status()
        by_region = status["apps"].get(APP, {}).get("regions", {})
        return all(
            by_region.get(code, {}).get("health") == "healthy"
            and (by_region[code].get("last_decision") or {}).get("action") == "hold"
            for code in regions
        )

    await daemon.until(held, timeout=15, what="every region healthy and holding")


async def counts(daemon: Daemon, control: httpx.AsyncClient, wanted: dict[str, int], timeout: float) -> None:
    """Until the simulator has exactly `wanted` started machines in those regions."""

    async def reached() -> bool:
        now = await started(control)
        return all(now[code] == n for code, n in wanted.items())

    await daemon.until(reached, timeout=timeout, what=f"started machines {wanted}")


async def recorded(daemon: Daemon, region: str, actions: int) -> list[dict[str, Any]]:
    """The region's decisions (oldest first), once `actions` of them acted and their ticks were recorded."""

    async def enough() -> list[dict[str, Any]] | None:
        decisions = await daemon.decisions(region)
        return decisions if sum(d["action"] != "hold" for d in decisions) >= actions else None

    result: list[dict[str, Any]] = await daemon.until(
        enough, timeout=10, what=f"{actions} action(s) in {region}"
    )
    return result


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`flywatch ARGS` as a process, run off the event loop (the simulator lives on it)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_a_load_step_scales_that_region_up_within_an_interval_plus_api_time(
    control: httpx.AsyncClient, flywatch: Flywatch
) -> None:
    """A load step in iad scales iad, and only iad, up within an interval plus API time; the CLI shows it."""
    await create_shop(control, ONE_EACH, ONE_EACH)
    daemon = await flywatch.start()
    await steady(daemon)
    assert await mutations(control, SCALE_UP | SCALE_DOWN) == []

    before, _ = await set_load(control, {"iad": 3})
    await counts(daemon, control, {"iad": 3}, timeout=SCALING_INTERVAL + API_TIME + 5)

    ups = await mutations(control, SCALE_UP)
    assert [m["region"] for m in ups] == ["iad", "iad"]
    latency = ups[0]["time"] - before
    assert latency < SCALING_INTERVAL + API_TIME, f"first machine {latency:.2f}s after the load step"
    assert (await started(control)) == {"iad": 3, "cdg": 1, "nrt": 1}
    assert await mutations(control, SCALE_DOWN) == []

    decisions = await recorded(daemon, "iad", 1)
    # the first tick that saw the new load acted on it (the latency above is the API's, not the decision's)
    saw = next(
        d for d in decisions if d["inputs"]["metric"] is not None and d["inputs"]["metric"] > 2 * TARGET
    )
    assert saw["action"] == "scale_up"
    acted = [d for d in decisions if d["action"] != "hold"]
    assert len(acted) == 1
    decision = acted[0]
    assert (decision["action"], decision["count"], decision["from"], decision["to"]) == ("scale_up", 2, 1, 3)
    assert (decision["rule"], decision["outcome"]) == ("target_tracking", "done")
    assert decision["inputs"]["started"] == 1
    assert (await control.get("/counters")).json()["rate_limited_total"] == 0  # it kept to Fly's limits

    async def desired_three() -> bool:
        return (await daemon.region("iad")).get("desired") == 3

    await daemon.until(desired_three, timeout=5, what="/status says iad wants 3")

    # what an operator sees of it: `flywatch status` and `flywatch explain shop`
    status = await cli("status", "--url", daemon.url)
    assert status.returncode == 0, status.stderr
    assert "ready" in status.stdout
    for code in REGIONS:
        assert re.search(rf"^\s*{code}\s", status.stdout, re.MULTILINE), status.stdout
    explain = await cli("explain", APP, "--url", daemon.url)
    assert explain.returncode == 0, explain.stderr
    for code in REGIONS:
        assert re.search(rf"^\s*{code}\s", explain.stdout, re.MULTILINE), explain.stdout
    assert "recent decisions, newest first:" in explain.stdout
    assert "scale_up" in explain.stdout
    assert "target_tracking" in explain.stdout


async def test_a_load_drop_scales_down_after_the_window_one_step_per_cooldown(
    control: httpx.AsyncClient, flywatch: Flywatch
) -> None:
    """A load drop scales down only once the stabilization window has passed, one machine per cooldown."""
    await create_shop(control, {"iad": 3, "cdg": 1, "nrt": 1}, {"iad": 3, "cdg": 1, "nrt": 1})
    daemon = await flywatch.start()
    await steady(daemon)

    _, dropped = await set_load(control, {"iad": 1})
    await counts(daemon, control, {"iad": 1}, timeout=DOWN_STABILIZATION + 2 * DOWN_COOLDOWN + 10)

    stops = await mutations(control, SCALE_DOWN)
    assert [(m["region"], m["action"]) for m in stops] == [("iad", "stop"), ("iad", "stop")]
    times = [m["time"] for m in stops]
    # the window counts from the last tick that still saw the load: at most a tick before the drop
    first = times[0] - dropped
    assert first >= DOWN_STABILIZATION - TICK_SLACK, f"first stop {first:.2f}s after the drop"
    assert all(gap >= DOWN_COOLDOWN for gap in gaps(times)), f"gaps between stops: {gaps(times)}"
    assert await mutations(control, SCALE_UP) == []

    decisions = await recorded(daemon, "iad", 2)
    downs = [d for d in decisions if d["action"] == "scale_down"]
    assert [(d["count"], d["from"], d["to"], d["outcome"]) for d in downs] == [
        (1, 3, 2, "done"),
        (1, 2, 1, "done"),
    ]
    last_high = max(d["at"] for d in decisions if d["desired"] == 3)
    assert downs[0]["at"] - last_high > DOWN_STABILIZATION  # the window, by the daemon's own record
    assert downs[1]["at"] - downs[0]["at"] >= DOWN_COOLDOWN
    held = [d for d in decisions if d["at"] > dropped and d["action"] == "hold" and d["desired"] == 1]
    assert {next(iter(d["not_acting"]), "") for d in held} <= {"stabilization", "cooldown", ""}
    assert any("stabilization" in d["not_acting"] for d in held)
    between = [d for d in held if downs[0]["at"] < d["at"] < downs[1]["at"]]
    assert any("cooldown" in d["not_acting"] for d in between)  # it was the cooldown that held the 2nd step
    assert (await started(control))["iad"] == 1  # its minimum, and no lower


async def test_a_region_outage_moves_its_capacity_and_brings_it_back(
    control: httpx.AsyncClient, flywatch: Flywatch
) -> None:
    """A region outage moves its demand to the other regions as machines; they scale back once it ends."""
    # iad and nrt are nearly idle: the half of cdg's traffic each gets in the outage (Fly's proxy sends a
    # region's requests elsewhere when none of its machines answers) stays within their one machine
    await create_shop(control, {"iad": 1, "cdg": 2, "nrt": 1}, {"iad": 0.35, "cdg": 2, "nrt": 0.35})
    daemon = await flywatch.start()
    await steady(daemon)

    outage = await control.post("/faults", json={"kind": "region_outage", "region": "cdg"})
    outage.raise_for_status()
    await counts(daemon, control, {"iad": 2, "nrt": 2}, timeout=15)
    peak = await started(control)

    await recorded(daemon, "nrt", 1)  # the tick that acted has recorded every region (nrt last)
    assert (await daemon.region("cdg")).get("health") == "down"
    moved = [d for d in await daemon.decisions() if d["action"] == "scale_up"]
    assert sorted(d["region"] for d in moved) == ["iad", "nrt"]
    for decision in moved:
        # cdg's demand while it was healthy (2 machines), shared between the two regions that can take it
        assert (decision["rule"], decision["count"], decision["outcome"]) == ("failover", 1, "done")
        assert decision["inputs"]["failover_extra"] == 1
        assert decision["inputs"]["demand"] == 1  # by their own metric, one machine each would do
    down = [d for d in await daemon.decisions("cdg") if d["inputs"]["health"] == "down"]
    assert down
    assert all(d["action"] == "hold" and "region_down" in d["not_acting"] for d in down)
    assert await mutations(control, SCALE_UP | SCALE_DOWN, region="cdg") == []  # the down region left alone
    assert peak == {"iad": 2, "cdg": 2, "nrt": 2}

    cleared = await control.delete("/faults/cdg")
    cleared.raise_for_status()
    recovered = time.time()
    await counts(daemon, control, {"iad": 1, "cdg": 2, "nrt": 1}, timeout=20)

    assert (await daemon.region("cdg")).get("health") == "healthy"
    stops = await mutations(control, SCALE_DOWN)
    assert sorted(m["region"] for m in stops) == ["iad", "nrt"]
    for stop in stops:
        assert stop["time"] - recovered >= DOWN_STABILIZATION - TICK_SLACK, f"{stop} too early"
    assert await mutations(control, SCALE_UP | SCALE_DOWN, region="cdg") == []
    backs = [d for d in await recorded(daemon, "nrt", 2) if d["action"] == "scale_down"]
    assert [(d["from"], d["to"], d["outcome"]) for d in backs] == [(2, 1, "done")]


async def test_kill_9_and_a_restart_keep_the_cooldown(
    sim: SimServer, control: httpx.AsyncClient, flywatch: Flywatch
) -> None:
    """kill -9 right after a scale-up, restart on the same state file: no scale-up before its cooldown."""
    cooldown = UP_COOLDOWN  # the restart (about two seconds) happens inside it
    flywatch.write_policy(policy(up_cooldown=cooldown))
    await create_shop(control, ONE_EACH, ONE_EACH)
    sim.platform.settings.state_delays["starting"] = 1.0  # the action is still in flight after its mutation
    daemon = await flywatch.start()
    await steady(daemon)

    await set_load(control, {"iad": 2})

    async def scaled() -> list[dict[str, Any]]:
        return await mutations(control, SCALE_UP, region="iad")

    first = (await daemon.until(scaled, timeout=SCALING_INTERVAL + API_TIME + 5, what="a scale-up"))[0]
    daemon.send(signal.SIGKILL)
    assert await daemon.wait_exit(5) == -signal.SIGKILL
    killed = time.time()
    await set_load(control, {"iad": 4})  # and more is wanted at once

    restarted = await flywatch.start()
    await counts(restarted, control, {"iad": 4}, timeout=cooldown + API_TIME + 10)
    later = [m for m in await mutations(control, SCALE_UP, region="iad") if m["time"] > first["time"]]
    assert later[0]["time"] - first["time"] >= cooldown, (
        f"scaled up again {later[0]['time'] - first['time']:.2f}s after the first action"
    )

    async def acted_again() -> list[dict[str, Any]] | None:
        after = [d for d in await restarted.decisions("iad") if d["at"] > killed]
        return after if any(d["action"] == "scale_up" for d in after) else None

    after = await restarted.until(acted_again, timeout=10, what="the restarted daemon's scale-up recorded")
    acted = [d for d in after if d["action"] == "scale_up"]
    assert [(d["from"], d["to"], d["outcome"]) for d in acted] == [(2, 4, "done")]
    # until then the restarted daemon held iad, and said why
    waited = [d for d in after if d["at"] < acted[0]["at"]]
    assert waited
    # by the cooldown, or, first, by the killed daemon's machine still starting ("settling", which the core
    # checks before the cooldown: a restart on a fast host comes back before that machine has started)
    reasons = [sorted(d["not_acting"]) for d in waited]
    assert all({"cooldown", "settling"} & set(r) for r in reasons), reasons
    assert any("cooldown" in r for r in reasons) or acted[0]["at"] - first["time"] >= cooldown, reasons


async def test_sighup_with_a_broken_policy_keeps_the_old_one(
    control: httpx.AsyncClient, flywatch: Flywatch
) -> None:
    """SIGHUP with a broken policy file keeps the old policy in force; a fixed file then applies."""
    await create_shop(control, ONE_EACH, ONE_EACH)
    daemon = await flywatch.start()
    await steady(daemon)
    loaded_at = (await daemon.status())["policy"]["loaded_at"]

    # the file's old mtime is put back, so the daemon's own watch of the file sees no change: only SIGHUP
    before = flywatch.policy_path.stat()
    flywatch.write_policy(policy(regions={"iad": (3, 2), "cdg": (1, 6), "nrt": (1, 6)}))
    os.utime(flywatch.policy_path, ns=(before.st_atime_ns, before.st_mtime_ns))
    daemon.send(signal.SIGHUP)

    async def rejected() -> str:
        return str((await daemon.status())["policy"]["last_error"])

    error = await daemon.until(rejected, timeout=10, what="the broken policy rejected")
    assert str(flywatch.policy_path) in error
    assert "apps.shop.regions.iad.min" in error
    assert "must not be above max (2)" in error
    assert re.search(
        r'^flywatch_config_reloads_total\{result="error"\} [1-9]', await daemon.metrics(), re.MULTILINE
    )
    status = await daemon.status()
    assert status["policy"]["loaded_at"] == loaded_at
    iad = status["apps"][APP]["regions"]["iad"]
    assert (iad["min"], iad["max"]) == (1, 6)

    # decisions go on under the old policy: iad may still grow past the broken file's max of 2
    rejected_at = time.time()
    await set_load(control, {"iad": 3})
    await counts(daemon, control, {"iad": 3}, timeout=SCALING_INTERVAL + API_TIME + 5)

    async def deciding() -> bool:
        return any(d["at"] > rejected_at for d in await daemon.decisions("cdg"))

    await daemon.until(deciding, timeout=10, what="decisions after the rejected reload")

    # fixed: cdg's minimum raised to 2 applies at once
    flywatch.write_policy(policy(regions={"iad": (1, 6), "cdg": (2, 6), "nrt": (1, 6)}))
    daemon.send(signal.SIGHUP)
    await counts(daemon, control, {"cdg": 2}, timeout=SCALING_INTERVAL + API_TIME + 5)

    async def applied() -> dict[str, Any] | None:
        status = await daemon.status()
        return status if status["apps"][APP]["regions"]["cdg"]["min"] == 2 else None

    status = await daemon.until(applied, timeout=10, what="/status shows the new cdg minimum")
    assert status["policy"]["last_error"] == ""
    assert status["policy"]["loaded_at"] > loaded_at
    assert re.search(
        r'^flywatch_config_reloads_total\{result="ok"\} [1-9]', await daemon.metrics(), re.MULTILINE
    )
    cdg = [d for d in await recorded(daemon, "cdg", 1) if d["action"] == "scale_up"]
    assert cdg[0]["rule"] == "min_bound"


async def test_dry_run_decides_and_changes_nothing(control: httpx.AsyncClient, flywatch: Flywatch) -> None:
    """FLYWATCH_DRY_RUN=true: a load step is decided and recorded as dry_run, and nothing changes on Fly."""
    await create_shop(control, ONE_EACH, ONE_EACH)
    daemon = await flywatch.start(dry_run=True)
    assert (await daemon.status())["dry_run"] is True
    await steady(daemon)

    await set_load(control, {"iad": 3})

    async def dry_runs() -> list[dict[str, Any]] | None:
        found = [d for d in await daemon.decisions("iad") if d["outcome"] == "dry_run"]
        return found if len(found) >= 2 else None

    decisions = await daemon.until(dry_runs, timeout=15, what="two dry-run decisions in iad")
    for decision in decisions:
        assert (decision["action"], decision["count"], decision["to"]) == ("scale_up", 2, 3)
        assert decision["result"].startswith("dry run: would")
    assert await mutations(control) == []  # not a start, not a create, not even a lease
    assert await started(control) == {"iad": 1, "cdg": 1, "nrt": 1}
    assert re.search(
        r"^flywatch_scaling_actions_total"
        r'\{action="scale_up",fly_app="shop",fly_region="iad",result="dry_run"\} [2-9]',
        await daemon.metrics(),
        re.MULTILINE,
    )


async def test_sigterm_lets_the_tick_finish_exits_0_promptly_and_holds_no_lease(
    sim: SimServer, control: httpx.AsyncClient, flywatch: Flywatch
) -> None:
    """SIGTERM mid-action: the action finishes and is recorded, the daemon exits 0 promptly, no lease held."""
    await create_shop(control, ONE_EACH, ONE_EACH)
    sim.platform.settings.state_delays["starting"] = 1.0  # the action is still in flight after its mutation
    daemon = await flywatch.start()
    await steady(daemon)

    await set_load(control, {"iad": 2})

    async def scaled() -> list[dict[str, Any]]:
        return await mutations(control, SCALE_UP, region="iad")

    await daemon.until(scaled, timeout=SCALING_INTERVAL + API_TIME + 5, what="a scale-up under way")
    signalled = time.monotonic()
    daemon.send(signal.SIGTERM)
    assert await daemon.wait_exit(STOP) == 0, daemon.log_tail()
    assert time.monotonic() - signalled < STOP

    assert '"event": "stopped"' in daemon.log_tail()
    store = open_store(flywatch.state_url)
    try:
        records = [e.record for e in await store.read(DECISIONS, key=APP)]
        memory = await store.get(SCALING, f"{APP}/iad")
    finally:
        await store.close()
    done = [r for r in records if (r["region"], r["action"], r["outcome"]) == ("iad", "scale_up", "done")]
    assert done, f"the tick in flight was cut short, its decision never recorded: {daemon.log_tail(8)}"
    assert memory is not None
    assert memory["last_scale_up"] is not None  # its cooldown survives the stop
    assert "in_flight" not in memory  # the action ended, and its end was recorded
    assert [m["id"] for m in await fleet(control) if m["lease_owner"] is not None] == []
    assert (await started(control))["iad"] == 2  # the tick waited for its machine before letting go
