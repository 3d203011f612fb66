"""Fixtures of the source tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from daemon.clock import SystemClock
from daemon.fly.client import NO_BACKOFF, MachinesClient
from daemon.sim.server import SimServer


@pytest.fixture
async def fly(sim: SimServer) -> AsyncIterator[MachinesClient]:
    """A Machines API client of the wall-clock simulator, without backoff."""
    client = MachinesClient(sim.api_url, "sim-token", clock=SystemClock(), retry=NO_BACKOFF)
    yield client
    await client.aclose()
