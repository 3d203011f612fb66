"""`flywatch run` end to end on releases: a real daemon process watching the simulated app `shop` while the
simulator's deployer (as `fly deploy` does it) rolls out good and bad images.

Judged by the simulator's truth (every machine's config, the mutation log with who did what and when), the
daemon's /status and /releases, and the alerts a real webhook receiver gets.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.conftest import TOKEN
from tests.e2e.conftest import APP, Daemon, Flywatch, free_port, until

GOOD = "registry.fly.io/shop:good"
BAD = "registry.fly.io/shop:bad"
BAKE = 3.0
LEASE_WAIT = 30.0
ROLLOUT = 30.0  # seconds a rollback of a few machines may take on top of the bake, Fly's limits on
OWNER = "sim@tokens.fly.io"  # the token flywatch runs with; the deployer is deploy@tokens.fly.io
REGIONS = ("iad", "cdg", "nrt")


def release_policy(webhook: str, **release: Any) -> dict[str, Any]:
    return {
        "apps": {
            APP: {
                "regions": {code: {"min": 1, "max": 6} for code in REGIONS},
                "health": {
                    "interval": "1s",
                    "timeout": "800ms",
                    # two in a row: the simulator's "errors" image fails every fifth health probe too, and
                    # one such blip must not pass for an unhealthy release (the no-traffic case would
                    # then be judged on health, not found inconclusive)
                    "unhealthy_after": 2,
                    "healthy_after": 1,
                },
                "release": {
                    "bake": f"{BAKE:g}s",
                    "min_requests": 30,
                    "max_error_ratio": 0.05,
                    "max_p95_latency": "500ms",
                    "max_parallel": 2,
                    "lease_wait": f"{LEASE_WAIT:g}s",
                    **release,
                },
            }
        },
        "alerts": {"webhooks": [{"url": webhook, "format": "json"}]},
    }


class Receiver:
    """A webhook receiver: every alert flywatch sends, in order."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/secret-e2e"

    async def handle(self, request: web.Request) -> web.Response:
        self.alerts.append(await request.json())
        return web.Response(text="ok")

    def events(self) -> list[str]:
        return [a["event"] for a in self.alerts]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hooks = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/secret-e2e", hooks.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", hooks.port)
    await site.start()
    yield hooks
    await runner.cleanup()


async def make_shop(control: httpx.AsyncClient, per_region: int = 1, rps: float = 40.0) -> None:
    body = {
        "name": APP,
        "regions": dict.fromkeys(REGIONS, per_region),
        "image": GOOD,
        "capacity_rps": 1e6,
        "base_latency": 0.02,
        "metadata": {"team": "shop"},
        "load": dict.fromkeys(REGIONS, rps),
    }
    (await control.post("/apps", json=body)).raise_for_status()


async def machines(control: httpx.AsyncClient, api: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """Every live machine with its whole config, by id, from the simulator's control API (the Machines API
    is rate-limited per app, and the daemon's own calls need its tokens)."""
    del api
    response = await control.get(f"/apps/{APP}")
    response.raise_for_status()
    return {m["id"]: m for m in response.json()["machines"] if m["state"] != "destroyed"}


async def mutations(
    control: httpx.AsyncClient, action: str, owner: str | None = None
) -> list[dict[str, Any]]:
    response = await control.get("/counters")
    response.raise_for_status()
    return [
        m
        for m in response.json()["mutations"]
        if m["app"] == APP and m["action"] == action and (owner is None or m["owner"] == owner)
    ]


async def releases(daemon: Daemon) -> dict[str, Any]:
    state: dict[str, Any] = (await daemon.status()).get("releases", {}).get(APP) or {}
    return state


async def adopted(daemon: Daemon, version: int = 1) -> None:
    """Until the daemon has recorded release `version` as known-good."""

    async def recorded() -> bool:
        good = (await releases(daemon)).get("good") or {}
        return good.get("version") == version

    await daemon.until(recorded, timeout=30, what=f"release v{version} recorded as known-good")


async def rollback_ended(daemon: Daemon, timeout: float) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        rollback = (await releases(daemon)).get("rollback")
        return rollback if rollback and rollback["state"] in {"done", "partial", "failed"} else None

    result: dict[str, Any] = await daemon.until(ended, timeout=timeout, what="the rollback ends")
    return result


async def deploy(control: httpx.AsyncClient, image: str, **options: Any) -> float:
    response = await control.post(f"/apps/{APP}/deploy", json={"image": image, **options})
    response.raise_for_status()
    return time.time()


async def mark(control: httpx.AsyncClient, image: str, mode: str) -> None:
    (await control.post("/images", json={"image": image, "mode": mode})).raise_for_status()


@pytest.fixture
async def api(sim: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sim.api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10.0
    ) as client:
        yield client


@pytest.mark.parametrize("mode", ["unhealthy", "errors", "crash", "slow"])
async def test_a_bad_release_is_rolled_back_by_itself(
    mode: str, flywatch: Flywatch, control: httpx.AsyncClient, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    """Health 500s, 20% errors, a crash at boot, or slow answers: rolled back within bake plus rollout
    time; the good image runs on every machine again and every other part of each config is unchanged."""
    await make_shop(control)
    before = {mid: m["config"] for mid, m in (await machines(control, api)).items()}
    flywatch.write_policy(release_policy(receiver.url))
    daemon = await flywatch.start()
    await adopted(daemon)
    await mark(control, BAD, mode)
    deployed = await deploy(control, BAD, strategy="immediate")
    rollback = await rollback_ended(daemon, timeout=BAKE + ROLLOUT + 30)
    took = time.time() - deployed
    assert rollback["state"] == "done", rollback
    assert took < BAKE + ROLLOUT, f"rolled back {took:.1f}s after the deploy"
    after = {mid: m["config"] for mid, m in (await machines(control, api)).items()}
    assert after == before  # the good image, its release metadata, and everything else as it was
    assert {m["state"] for m in (await machines(control, api)).values()} == {"started"}
    await until(
        lambda: asyncio.sleep(
            0, {"release_failing", "rollback_started", "rollback_finished"} <= set(receiver.events())
        ),
        timeout=10,
        what="the alerts",
    )
    failing = next(a for a in receiver.alerts if a["event"] == "release_failing")
    assert failing["version"] == 2
    assert receiver.url not in daemon.log.read_text()
    metrics = await daemon.metrics()
    assert 'flywatch_rollbacks_total{fly_app="shop",result="done"} 1.0' in metrics
    assert (
        'flywatch_release_info{fly_app="shop",image="registry.fly.io/shop:good",version="1"} 1.0' in metrics
    )
    assert 'flywatch_release_info{fly_app="shop",image="registry.fly.io/shop:bad",version="2"} 0.0' in metrics


async def test_a_good_release_is_left_alone(
    flywatch: Flywatch, control: httpx.AsyncClient, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    """A healthy release bakes, is judged healthy, becomes the known-good one; flywatch changes nothing."""
    await make_shop(control)
    flywatch.write_policy(release_policy(receiver.url))
    daemon = await flywatch.start()
    await adopted(daemon)
    await deploy(control, "registry.fly.io/shop:v2", strategy="immediate")
    await adopted(daemon, version=2)
    state = await releases(daemon)
    assert state["watched"]["verdict"] == "healthy"
    assert state["rollback"] is None
    assert await mutations(control, "update", OWNER) == []
    images = {m["config"]["image"] for m in (await machines(control, api)).values()}
    assert images == {"registry.fly.io/shop:v2"}
    assert "release_failing" not in receiver.events()


async def test_a_release_with_no_traffic_is_inconclusive_and_kept(
    flywatch: Flywatch, control: httpx.AsyncClient, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    """No requests at all: the release is never rolled back on missing data; it is kept and alerted."""
    await make_shop(control, rps=0.0)
    flywatch.write_policy(release_policy(receiver.url))
    daemon = await flywatch.start()
    await adopted(daemon)
    await mark(control, BAD, "errors")  # it would fail, were there traffic to show it
    await deploy(control, BAD, strategy="immediate")

    async def inconclusive() -> bool:
        watched = (await releases(daemon)).get("watched") or {}
        return watched.get("version") == 2 and watched.get("verdict") == "inconclusive"

    await daemon.until(inconclusive, timeout=BAKE + 20, what="v2 judged inconclusive")
    await until(
        lambda: asyncio.sleep(0, "release_inconclusive" in receiver.events()), timeout=10, what="the alert"
    )
    assert (await releases(daemon))["rollback"] is None
    assert await mutations(control, "update", OWNER) == []
    assert {m["config"]["image"] for m in (await machines(control, api)).values()} == {BAD}


async def test_kill_9_in_the_middle_of_a_rollback_resumes_and_touches_no_machine_twice(
    flywatch: Flywatch, control: httpx.AsyncClient, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    """The daemon is killed after the rollback's first update; the next one finishes it from the store;
    the mutation log shows exactly one revert per machine."""
    await make_shop(control, per_region=2)
    before = {mid: m["config"] for mid, m in (await machines(control, api)).items()}
    flywatch.write_policy(release_policy(receiver.url, max_parallel=1))
    daemon = await flywatch.start()
    await adopted(daemon)
    await mark(control, BAD, "errors")
    await deploy(control, BAD, strategy="immediate")

    async def first_revert() -> bool:
        return bool(await mutations(control, "update", OWNER))

    await daemon.until(first_revert, timeout=BAKE + ROLLOUT, what="the rollback's first update")
    daemon.send(signal.SIGKILL)
    await daemon.wait_exit(timeout=10)
    reverted = len(await mutations(control, "update", OWNER))
    assert reverted < len(before), "killed too late: the rollback had already finished"
    second = await flywatch.start()
    rollback = await rollback_ended(second, timeout=ROLLOUT + 30)
    assert rollback["state"] == "done", rollback
    after = {mid: m["config"] for mid, m in (await machines(control, api)).items()}
    assert after == before
    updates = [m["machine"] for m in await mutations(control, "update", OWNER)]
    assert sorted(updates) == sorted(before)  # each machine reverted once, none twice


async def test_a_rollback_whose_old_release_fails_too_stops_and_alerts(
    flywatch: Flywatch, control: httpx.AsyncClient, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    """When the release rolled back to fails as well, flywatch stops, alerts, and does nothing more."""
    await make_shop(control)
    flywatch.write_policy(release_policy(receiver.url))
    daemon = await flywatch.start()
    await adopted(daemon)
    await mark(control, BAD, "errors")
    await deploy(control, BAD, strategy="immediate")
    await until(
        lambda: asyncio.sleep(0, "rollback_started" in receiver.events()), timeout=BAKE + 20, what="rollback"
    )
    await mark(control, GOOD, "errors")  # the old release breaks too (a dependency both need, say)
    await until(
        lambda: asyncio.sleep(0, "rollback_failed" in receiver.events()),
        timeout=BAKE + ROLLOUT + 20,
        what="the rollback_failed alert",
    )
    state = await releases(daemon)
    assert state["halted"]
    updates = len(await mutations(control, "update", OWNER))
    ticks = (await daemon.status())["apps"][APP]["last_tick"]

    async def later_ticks() -> bool:
        return (await daemon.status())["apps"][APP]["last_tick"] >= ticks + 3

    await daemon.until(later_ticks, timeout=15, what="three more ticks")
    assert len(await mutations(control, "update", OWNER)) == updates  # stopped: nothing more is changed
    assert receiver.events().count("rollback_started") == 1


async def test_leases_held_by_a_deploy_are_waited_for(
    flywatch: Flywatch, control: httpx.AsyncClient, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    """A rolling deploy holds its machine's lease while it waits for the bad instance's checks: flywatch
    waits, and reverts that machine only after the deploy let go of it."""
    await make_shop(control)
    flywatch.write_policy(release_policy(receiver.url))
    daemon = await flywatch.start()
    await adopted(daemon)
    await mark(control, BAD, "unhealthy")
    await deploy(control, BAD, strategy="rolling", wait_timeout=8)
    rollback = await rollback_ended(daemon, timeout=BAKE + ROLLOUT + 20)
    assert rollback["state"] == "done", rollback
    reverts = await mutations(control, "update", OWNER)
    assert reverts
    deploy_leases = await mutations(control, "release_lease", "deploy@tokens.fly.io")
    for revert in reverts:
        released = [m["time"] for m in deploy_leases if m["machine"] == revert["machine"]]
        assert released, f"the deploy never held {revert['machine']}"
        assert max(released) <= revert["time"], "flywatch changed a machine the deploy still held"
    history = (await daemon.get("/releases", app=APP, limit=200)).json()
    assert any(e["kind"] == "rollback_started" for e in history)
    assert {m["config"]["image"] for m in (await machines(control, api)).values()} == {GOOD}
