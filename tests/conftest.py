"""Fixtures shared by every test: a running simulator over real HTTP, clients, and a contract check.

Every test that uses `sim` has each of its exchanges validated against Fly's OpenAPI document; a test
that leaves a violation fails at teardown. A test that leaves an asyncio task behind fails too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from daemon.clock import ManualClock
from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer
from tests.support.contract import ContractChecker

TOKEN = "sim-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = 0.02  # seconds per transient state in tests over the wall clock


@pytest.fixture
def contract() -> ContractChecker:
    return ContractChecker()


@pytest.fixture
def settings() -> SimSettings:
    """Settings for the `sim` fixture; a test may override this fixture (or mutate it before use)."""
    return SimSettings(transition_delay=FAST, rate_limits=False)


@contextlib.asynccontextmanager
async def running_sim(
    settings: SimSettings, contract: ContractChecker, clock: ManualClock | None = None
) -> AsyncIterator[SimServer]:
    """A started simulator whose every exchange the contract checker sees; no violation may be left."""
    server = SimServer(settings, clock)
    server.observers.append(contract)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    assert not contract.violations, "contract violations:\n" + "\n".join(contract.violations)


@pytest.fixture
async def sim(settings: SimSettings, contract: ContractChecker) -> AsyncIterator[SimServer]:
    """A simulator on the wall clock, on a free loopback port."""
    async with running_sim(settings, contract) as server:
        yield server


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def manual_sim(clock: ManualClock, contract: ContractChecker) -> AsyncIterator[SimServer]:
    """A simulator whose time moves only when the test advances `clock`."""
    async with running_sim(SimSettings(transition_delay=1.0, rate_limits=True), contract, clock) as server:
        yield server


def _client_for(server: SimServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.api_url, headers=AUTH, timeout=10.0)


@pytest.fixture
async def api(sim: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated client of the simulated Machines API (base URL .../v1)."""
    async with _client_for(sim) as client:
        yield client


@pytest.fixture
async def manual_api(manual_sim: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    async with _client_for(manual_sim) as client:
        yield client


@pytest.fixture
async def control(sim: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the control API (base URL .../_sim)."""
    async with httpx.AsyncClient(base_url=sim.url + "/_sim", timeout=10.0) as client:
        yield client


@pytest.fixture
async def manual_control(manual_sim: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=manual_sim.url + "/_sim", timeout=10.0) as client:
        yield client


@pytest.fixture
async def fleet_client() -> AsyncIterator[httpx.AsyncClient]:
    """A plain client for the machines' own HTTP servers."""
    async with httpx.AsyncClient(timeout=2.0) as client:
        yield client


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 5.0, interval: float = 0.01
) -> Any:
    """Poll `probe` until it returns a truthy value, or fail after `timeout` seconds of wall time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s (last value: {last!r})")


@pytest.fixture(autouse=True)
async def _no_leftover_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves an asyncio task running."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leftovers = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert not leftovers, f"tasks left behind: {leftovers}"
