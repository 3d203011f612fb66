"""The alert sender over real HTTP: a loopback aiohttp receiver records every request and can be told to fail.

Waits between attempts go through a manual clock that records each sleep asked of it, so the tests check the
backoff the alerter chose and move time past it themselves; only HTTP itself runs on the wall clock, and
waiting for it is polled with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from daemon.alerts import Alert, Alerter, WebhookTarget
from daemon.clock import ManualClock, SystemClock
from daemon.telemetry.metrics import AlertMetrics
from tests.conftest import eventually

SECRET = "SECRET123"
AT = 1_790_000_000.5

ALERT = Alert(
    event="release_failing",
    app="shop",
    summary="shop v7 (registry.fly.io/shop:bad) is failing: error ratio 21% > 5%",
    at=AT,
    region="iad",
    version=7,
    numbers={"error_ratio": 0.21, "threshold": 0.05, "p99_ms": None},
    details={"image": "registry.fly.io/shop:bad", "machines": ["m1", "m2"]},
)


def alert(event: str = "region_down", n: int = 0) -> Alert:
    return Alert(event=event, app="shop", summary=f"alert {n}", at=AT + n, region="cdg", details={"n": n})


# --------------------------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Reply:
    status: int = 200
    retry_after: str | None = None
    hang: bool = False  # never answer (until the receiver stops)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    """A webhook receiver: answers each request with the next scripted reply, then 200."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    script: list[Reply] = field(default_factory=list)
    hang_paths: set[str] = field(default_factory=set)  # requests to these paths always hang
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def hook(self, path: str = f"/hooks/{SECRET}") -> str:
        return self.url + path

    def bodies(self, path: str | None = None) -> list[Any]:
        return [r.body for r in self.requests if path is None or r.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(request.path, dict(request.headers), json.loads(await request.read())))
        reply = Reply(hang=True) if request.path in self.hang_paths else Reply()
        if self.script and request.path not in self.hang_paths:
            reply = self.script.pop(0)
        if reply.hang:
            await self.release.wait()
        headers = {"Retry-After": reply.retry_after} if reply.retry_after is not None else {}
        return web.Response(status=reply.status, headers=headers, text="ok")


class StepClock(ManualClock):
    """A manual clock that records every sleep asked of it, and how many are waiting now."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []
        self.sleeping = 0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.sleeping += 1
        try:
            await super().sleep(seconds)
        finally:
            self.sleeping -= 1


async def drive(clock: StepClock, done: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until `done()` (or a wall-clock deadline): whenever the alerter waits to retry, move time past it."""

    async def probe() -> bool:
        if done():
            return True
        if clock.sleeping:
            await clock.advance(clock.sleeps[-1])
        return False

    await eventually(probe, timeout=timeout)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)  # the access log would print the secret path
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    rec.url = f"http://{host}:{port}"
    yield rec
    rec.release.set()
    await runner.cleanup()


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def make_alerter(
    receiver: Receiver, clock: StepClock, registry: CollectorRegistry
) -> AsyncIterator[Callable[..., Alerter]]:
    """Alerters on the test's clock and registry, closed (grace 0) before the receiver stops."""
    made: list[Alerter] = []

    def make(webhooks: list[WebhookTarget], **options: Any) -> Alerter:
        chosen_clock = options.pop("clock", clock)
        alerter = Alerter(webhooks, chosen_clock, AlertMetrics(registry), **options)
        made.append(alerter)
        return alerter

    yield make
    for alerter in made:
        await alerter.aclose(grace=0)


def count(registry: CollectorRegistry, result: str, event: str = "region_down") -> float:
    value = registry.get_sample_value("flywatch_alerts_total", {"event": event, "result": result})
    return value or 0.0


async def idle(alerter: Alerter) -> None:
    await asyncio.wait_for(alerter.idle(), 5.0)


# ---------------------------------------------------------------------------------------------- bodies


async def test_json_body(
    receiver: Receiver, make_alerter: Callable[..., Alerter], registry: CollectorRegistry
):
    """The json format posts every field of the alert, its time in ISO 8601 UTC and in unix seconds."""
    alerter = make_alerter([WebhookTarget(receiver.hook(), "json")])
    alerter.notify(ALERT)
    await idle(alerter)
    [request] = receiver.requests
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == {
        "source": "flywatch",
        "event": "release_failing",
        "app": "shop",
        "region": "iad",
        "version": 7,
        "summary": "shop v7 (registry.fly.io/shop:bad) is failing: error ratio 21% > 5%",
        "numbers": {"error_ratio": 0.21, "threshold": 0.05, "p99_ms": None},
        "details": {"image": "registry.fly.io/shop:bad", "machines": ["m1", "m2"]},
        "at": "2026-09-21T14:13:20.500Z",
        "at_unix": AT,
    }
    assert count(registry, "sent", "release_failing") == 1


async def test_json_body_without_region_version_or_finite_numbers(
    receiver: Receiver, make_alerter: Callable[..., Alerter]
):
    """A missing region and version are null, and so are NaN and infinite numbers (they are not JSON)."""
    alerter = make_alerter([WebhookTarget(receiver.hook(), "json")])
    alerter.notify(
        Alert("region_recovered", "shop", "iad is back", AT, numbers={"a": math.nan, "b": math.inf, "c": 1.0})
    )
    await idle(alerter)
    [body] = receiver.bodies()
    assert body["region"] is None
    assert body["version"] is None
    assert body["numbers"] == {"a": None, "b": None, "c": 1.0}


async def test_slack_body(receiver: Receiver, make_alerter: Callable[..., Alerter]):
    """The slack format posts one emoji-free line with app, event, version and region, and the numbers."""
    alerter = make_alerter([WebhookTarget(receiver.hook(), "slack")])
    alerter.notify(ALERT)
    await idle(alerter)
    [body] = receiver.bodies()
    text = body["text"]
    assert text == (
        "[flywatch] shop release_failing v7 in iad: "
        "shop v7 (registry.fly.io/shop:bad) is failing: error ratio 21% &gt; 5%"
    )
    assert text.isascii()
    assert "\n" not in text
    fields = [f["text"] for block in body["blocks"] for f in block.get("fields", [])]
    assert fields == ["*error_ratio*: 0.21", "*threshold*: 0.05", "*p99_ms*: n/a"]


# --------------------------------------------------------------------------------------------- retries


async def test_retries_with_exponential_backoff_until_sent(
    receiver: Receiver, make_alerter: Callable[..., Alerter], clock: StepClock, registry: CollectorRegistry
):
    """5xx answers are retried after base_delay doubling (less jitter), capped at max_delay, until sent."""
    receiver.script = [Reply(500), Reply(502), Reply(503), Reply(500)]
    alerter = make_alerter([WebhookTarget(receiver.hook())], attempts=5, base_delay=1.0, max_delay=3.0)
    alerter.notify(alert())
    await drive(clock, lambda: count(registry, "sent") == 1)
    assert len(receiver.requests) == 5
    ceilings = [1.0, 2.0, 3.0, 3.0]
    assert len(clock.sleeps) == 4
    for slept, ceiling in zip(clock.sleeps, ceilings, strict=True):
        assert ceiling / 2 <= slept <= ceiling
    assert count(registry, "failed") == 0


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_retryable_statuses(
    receiver: Receiver, make_alerter: Callable[..., Alerter], registry: CollectorRegistry, status: int
):
    """408, 429 and 5xx are retried (here on the system clock with a tiny backoff)."""
    receiver.script = [Reply(status)]
    alerter = make_alerter([WebhookTarget(receiver.hook())], clock=SystemClock(), base_delay=0.001)
    alerter.notify(alert())
    await idle(alerter)
    assert len(receiver.requests) == 2
    assert count(registry, "sent") == 1


async def test_retry_after_is_honoured_and_capped(
    receiver: Receiver, make_alerter: Callable[..., Alerter], clock: StepClock, registry: CollectorRegistry
):
    """A Retry-After in seconds sets the wait before the next attempt, capped at max_delay."""
    receiver.script = [
        Reply(429, retry_after="7"),
        Reply(503, retry_after="999"),
        Reply(429, retry_after="soon"),
    ]
    alerter = make_alerter([WebhookTarget(receiver.hook())], base_delay=1.0, max_delay=30.0)
    alerter.notify(alert())
    await drive(clock, lambda: count(registry, "sent") == 1)
    assert clock.sleeps[:2] == [7.0, 30.0]
    assert 2.0 <= clock.sleeps[2] <= 4.0  # not a number of seconds: the usual backoff
    assert len(receiver.requests) == 4


async def test_timeouts_are_retried(
    receiver: Receiver, make_alerter: Callable[..., Alerter], clock: StepClock, registry: CollectorRegistry
):
    """A receiver that does not answer within the timeout is tried again."""
    receiver.script = [Reply(hang=True)]
    alerter = make_alerter([WebhookTarget(receiver.hook())], timeout=0.2)
    alerter.notify(alert())
    await drive(clock, lambda: count(registry, "sent") == 1)
    assert len(receiver.requests) == 2
    assert len(clock.sleeps) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
async def test_client_errors_are_not_retried(
    receiver: Receiver,
    make_alerter: Callable[..., Alerter],
    clock: StepClock,
    registry: CollectorRegistry,
    status: int,
):
    """Any other 4xx fails the delivery at once: one request, no wait, counted failed."""
    receiver.script = [Reply(status)] * 5
    alerter = make_alerter([WebhookTarget(receiver.hook())], attempts=5)
    alerter.notify(alert())
    await idle(alerter)
    assert len(receiver.requests) == 1
    assert clock.sleeps == []
    assert count(registry, "failed") == 1
    assert count(registry, "sent") == 0


async def test_attempts_exhausted_counts_failed(
    receiver: Receiver, make_alerter: Callable[..., Alerter], clock: StepClock, registry: CollectorRegistry
):
    """After `attempts` failed tries the delivery ends counted failed, and the next alert still goes."""
    receiver.script = [Reply(500)] * 3
    alerter = make_alerter([WebhookTarget(receiver.hook())], attempts=3)
    alerter.notify(alert(n=1))
    alerter.notify(alert(n=2))
    await drive(clock, lambda: count(registry, "sent") == 1)
    assert count(registry, "failed") == 1
    assert len(clock.sleeps) == 2  # between the 3 attempts of the first alert
    assert [b["details"]["n"] for b in receiver.bodies()] == [1, 1, 1, 2]


# ------------------------------------------------------------------------------------ never in the way


async def test_notify_never_blocks(
    receiver: Receiver, make_alerter: Callable[..., Alerter], registry: CollectorRegistry
):
    """notify() from sync code in the loop returns at once and the caller goes on while the receiver hangs."""
    receiver.script = [Reply(hang=True)]
    alerter = make_alerter([WebhookTarget(receiver.hook())], timeout=30.0)
    steps: list[str] = []

    def tick() -> None:
        for n in range(100):
            alerter.notify(alert(n=n))
        steps.append("tick done")

    started = time.perf_counter()
    tick()
    elapsed = time.perf_counter() - started
    assert steps == ["tick done"]
    assert elapsed < 0.05
    await eventually(lambda: _async(len(receiver.requests) == 1))  # the first delivery is under way
    steps.append("next tick")
    assert count(registry, "sent") == 0  # ... and still hanging: the caller did not wait for it
    assert count(registry, "dropped") == 0


async def _async(value: bool) -> bool:
    return value


async def test_one_hung_webhook_does_not_hold_back_another(
    receiver: Receiver, make_alerter: Callable[..., Alerter], registry: CollectorRegistry
):
    """Each webhook has its own queue: alerts to a healthy receiver go out while another one hangs."""
    receiver.hang_paths = {"/slow"}
    alerter = make_alerter(
        [WebhookTarget(receiver.hook("/slow")), WebhookTarget(receiver.hook("/fast"), "slack")], timeout=30.0
    )
    for n in range(3):
        alerter.notify(alert(n=n))
    await eventually(lambda: _async(count(registry, "sent") == 3))
    assert len(receiver.bodies("/fast")) == 3
    assert len(receiver.bodies("/slow")) == 1


async def test_full_queue_drops_the_new_delivery(
    receiver: Receiver,
    make_alerter: Callable[..., Alerter],
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
):
    """With the queue full, a new delivery is dropped, counted and logged once with its event name."""
    caplog.set_level(logging.WARNING, logger="flywatch.alerts")
    alerter = make_alerter([WebhookTarget(receiver.hook())], queue_size=2)
    for n in range(5):
        alerter.notify(alert("region_down" if n < 2 else "rollback_started", n))  # no await: nothing sent yet
    assert count(registry, "dropped", "rollback_started") == 3
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 3
    assert all("rollback_started" in line and "webhook 1 (json)" in line for line in drops)
    await idle(alerter)
    assert count(registry, "sent") == 2
    assert [b["details"]["n"] for b in receiver.bodies()] == [0, 1]


async def test_worker_survives_an_unexpected_error(
    receiver: Receiver,
    make_alerter: Callable[..., Alerter],
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
):
    """An alert that breaks its delivery is counted failed and logged; the worker goes on with the next."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError(f"cannot print {receiver.hook()}")

    alerter = make_alerter([WebhookTarget(receiver.hook())])
    alerter.notify(Alert("region_down", "shop", "bad", AT, details={"x": Unprintable()}))
    alerter.notify(alert(n=1))
    await idle(alerter)
    assert count(registry, "failed") == 1
    assert count(registry, "sent") == 1
    assert any("RuntimeError" in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text


async def test_no_webhooks_is_fine(make_alerter: Callable[..., Alerter], registry: CollectorRegistry):
    """Without webhooks notify() does nothing, idle() returns and nothing is counted."""
    alerter = make_alerter([])
    alerter.notify(alert())
    await idle(alerter)
    assert count(registry, "sent") == count(registry, "dropped") == 0


# ------------------------------------------------------------------------------------- reload and stop


async def test_configure_switches_targets(
    receiver: Receiver, make_alerter: Callable[..., Alerter], registry: CollectorRegistry
):
    """After configure(), later alerts go to the new webhooks only; an empty set sends nothing."""
    alerter = make_alerter([WebhookTarget(receiver.hook("/a"))])
    alerter.notify(alert(n=1))
    alerter.configure([WebhookTarget(receiver.hook("/b"), "slack")])
    alerter.notify(alert(n=2))
    await idle(alerter)
    assert [b["details"]["n"] for b in receiver.bodies("/a")] == [1]  # queued before: still delivered
    assert [b["text"] for b in receiver.bodies("/b")] == ["[flywatch] shop region_down in cdg: alert 2"]
    alerter.configure([])
    alerter.notify(alert(n=3))
    await idle(alerter)
    assert len(receiver.requests) == 2
    assert count(registry, "sent") == 2


async def test_aclose_drains_within_grace(
    receiver: Receiver, make_alerter: Callable[..., Alerter], registry: CollectorRegistry
):
    """aclose() lets queued deliveries finish within the grace, in order, and closing twice is fine."""
    alerter = make_alerter([WebhookTarget(receiver.hook())])
    for n in range(3):
        alerter.notify(alert(n=n))
    await asyncio.wait_for(alerter.aclose(grace=5.0), 5.0)
    assert [b["details"]["n"] for b in receiver.bodies()] == [0, 1, 2]
    assert count(registry, "sent") == 3
    assert count(registry, "dropped") == 0
    await alerter.aclose()


async def test_aclose_drops_what_is_left_after_grace(
    receiver: Receiver, make_alerter: Callable[..., Alerter], clock: StepClock, registry: CollectorRegistry
):
    """Deliveries still running or queued when the grace (on the clock) ends are dropped and counted."""
    receiver.script = [Reply(hang=True)]
    alerter = make_alerter([WebhookTarget(receiver.hook())], timeout=30.0)
    alerter.notify(alert(n=1))
    alerter.notify(alert(n=2))
    await eventually(lambda: _async(len(receiver.requests) == 1))
    closing = asyncio.create_task(alerter.aclose(grace=5.0))
    await clock.advance(4.0)
    assert not closing.done()
    await clock.advance(1.0)
    await asyncio.wait_for(closing, 5.0)
    assert count(registry, "dropped") == 2
    assert count(registry, "sent") == 0
    alerter.notify(alert(n=3))  # after closing: dropped, never raised
    assert count(registry, "dropped") == 3
    await alerter.aclose()


# --------------------------------------------------------------------------------- the URL is a secret


async def test_url_never_in_a_log_record(
    receiver: Receiver,
    make_alerter: Callable[..., Alerter],
    clock: StepClock,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
):
    """No log record of any logger, at any level, holds the URL: refused connections, 5xx, 4xx, sent."""
    caplog.set_level(logging.DEBUG)
    refused = WebhookTarget(f"http://127.0.0.1:{free_port()}/hooks/{SECRET}", "slack")
    answering = WebhookTarget(receiver.hook())
    receiver.script = [Reply(500), Reply(400)]
    alerter = make_alerter([refused, answering], attempts=2)
    alerter.notify(alert(n=1))
    alerter.notify(alert(n=2))
    await drive(clock, lambda: count(registry, "failed") == 3 and count(registry, "sent") == 1)
    lines = [r.getMessage() for r in caplog.records]
    assert any("webhook 1 (slack)" in line and "ConnectError" in line for line in lines)
    assert any("webhook 2 (json)" in line and "HTTP 500" in line for line in lines)
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(record.args)
    assert SECRET not in caplog.text
    assert "127.0.0.1" not in "\n".join(r.getMessage() for r in caplog.records if r.name == "flywatch.alerts")


def test_webhook_repr_masks_the_url():
    """A webhook's repr and str show its format, never its URL."""
    target = WebhookTarget(f"https://hooks.slack.com/services/{SECRET}", "slack")
    assert SECRET not in repr(target)
    assert SECRET not in str(target)
    assert SECRET not in repr([target])
    assert "slack" in repr(target)
