"""The injected clocks."""

from __future__ import annotations

import asyncio

from daemon.clock import ManualClock, SystemClock


async def test_manual_clock_fires_timers_in_order_at_their_instant() -> None:
    """Timers fire in time order, each with the clock at its own instant, during advance."""
    clock = ManualClock(start=100.0)
    seen: list[tuple[str, float]] = []
    clock.call_later(2.0, lambda: seen.append(("b", clock.now())))
    clock.call_later(1.0, lambda: seen.append(("a", clock.now())))
    cancelled = clock.call_later(1.5, lambda: seen.append(("x", clock.now())))
    cancelled.cancel()
    await clock.advance(1.0)
    assert seen == [("a", 101.0)]
    await clock.advance(5.0)
    assert seen == [("a", 101.0), ("b", 102.0)]
    assert clock.now() == 106.0


async def test_manual_sleep_waits_for_advance_but_zero_only_yields() -> None:
    """A sleep ends when time is advanced past it; a sleep of zero returns at once."""
    clock = ManualClock()
    sleeper = asyncio.ensure_future(clock.sleep(3.0))
    await clock.advance(2.9)
    assert not sleeper.done()
    await clock.advance(0.2)
    assert sleeper.done()
    await asyncio.wait_for(clock.sleep(0), timeout=1.0)


async def test_system_clock_sleeps_and_schedules() -> None:
    """The system clock's timers run on the event loop."""
    clock = SystemClock()
    fired = asyncio.Event()
    clock.call_later(0.0, fired.set)
    await asyncio.wait_for(fired.wait(), timeout=1.0)
    await clock.sleep(0)
    assert clock.now() > 1_700_000_000
