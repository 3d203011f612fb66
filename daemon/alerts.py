"""Alerts: telling people, through their own webhooks, what flywatch saw and what it did about it.

A rollback nobody hears of is half a safety feature. The release watch and the health watch call
`Alerter.notify()` when a release fails or stays inconclusive, a rollback starts, ends or fails, or a region
goes down or comes back; the alert goes to every webhook of the policy (Slack's incoming webhooks, or any
receiver of plain JSON).

Why it is built this way:

- A tick never waits for a webhook. `notify()` only puts the alert on a queue and returns; background
  workers send it. A slow or dead receiver can delay its own alerts, never a scaling action or a rollback.
- Each webhook has its own bounded queue and its own worker: one hung receiver does not hold back the
  others, and the alerts to one receiver arrive in the order they happened (rollback_started before
  rollback_finished). A full queue drops the new alert rather than grow without bound.
- Delivery is retried on what may pass (connection errors, timeouts, 408, 429, 5xx) with exponential backoff
  and jitter, honouring Retry-After; any other 4xx is the receiver saying no, so it fails at once. The waits
  between attempts go through the injected clock (tests drive them with a ManualClock); the timeout of one
  request is the network's, on the wall clock.
- Every delivery ends counted in flywatch_alerts_total: sent, failed or dropped.
- A webhook URL is a credential (whoever holds a Slack webhook URL can post to the channel), so it is in no
  log line, no exception message and no repr: logs name a webhook by its place in the policy and its format,
  "webhook 2 (slack)", and name an error by its type and HTTP status, never by httpx's message (which
  may quote the URL). Requests go through httpx's transport rather than its client, because the client logs
  every request's full URL (logger "httpx", at INFO).
- Nothing here raises into the caller: an unexpected error in a worker is logged and the worker goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import httpx

from daemon.clock import Clock
from daemon.telemetry.logging import REDACTED
from daemon.telemetry.metrics import ALERT_EVENTS, AlertMetrics

log = logging.getLogger("flywatch.alerts")

EVENTS: Final = ALERT_EVENTS  # the events flywatch alerts on (defined with their counters)
SOURCE: Final = "flywatch"
JITTER: Final = 0.5  # share of each backoff taken off at random, so receivers are not hit in lockstep
SLACK_MAX_FIELDS: Final = 10  # Slack refuses a section block with more fields
_HEADERS: Final = {"Content-Type": "application/json", "User-Agent": "flywatch"}
_MAX_EXPONENT: Final = 60  # 2.0 ** 60 is already far above any cap; higher powers would only overflow

Result = Literal["sent", "failed", "dropped"]


@dataclass(frozen=True)
class Alert:
    """One thing worth telling people, with its numbers."""

    event: str  # one of EVENTS
    app: str
    summary: str  # one human line: "shop v7 (registry.fly.io/shop:bad) is failing: error ratio 21% > 5%"
    at: float  # unix seconds
    region: str = ""
    version: int | None = None
    numbers: Mapping[str, float | None] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)  # JSON-able extras


@dataclass(frozen=True)
class WebhookTarget:
    """Where alerts go. The URL is a secret: it is never logged, never in a message, masked in the repr."""

    url: str
    format: Literal["slack", "json"] = "json"

    def __repr__(self) -> str:
        return f"WebhookTarget(url='{REDACTED}', format={self.format!r})"


# ---------------------------------------------------------------------------------------------- bodies


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON: mappings, lists, strings, finite numbers, booleans, null; anything else as
    its str(). NaN and infinities become null (json.dumps would write them, but they are not JSON)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    return str(value)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_body(alert: Alert) -> dict[str, Any]:
    """The body of the "json" format: every field of the alert, and its time both ways."""
    return {
        "source": SOURCE,
        "event": alert.event,
        "app": alert.app,
        "region": alert.region or None,
        "version": alert.version,
        "summary": alert.summary,
        "numbers": _jsonable(alert.numbers),
        "details": _jsonable(alert.details),
        "at": _iso(alert.at),
        "at_unix": alert.at,
    }


def _slack_escape(text: str) -> str:
    """Slack reads <...> as links and mentions, so &, < and > are escaped as its documentation asks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:g}"


def slack_text(alert: Alert) -> str:
    """One line with the app, the event, the version and the region, then the summary; no emoji."""
    head = [f"[{SOURCE}] {alert.app} {alert.event}"]
    if alert.version is not None:
        head.append(f"v{alert.version}")
    if alert.region:
        head.append(f"in {alert.region}")
    return _slack_escape(_one_line(f"{' '.join(head)}: {alert.summary}"))


def slack_body(alert: Alert) -> dict[str, Any]:
    """A Slack-compatible body: `text` for every receiver (and for notifications), blocks with the numbers."""
    text = slack_text(alert)
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    numbers = list(alert.numbers.items())[:SLACK_MAX_FIELDS]
    if numbers:
        fields = [
            {"type": "mrkdwn", "text": _slack_escape(f"*{_one_line(name)}*: {_number(value)}")}
            for name, value in numbers
        ]
        blocks.append({"type": "section", "fields": fields})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _iso(alert.at)}]})
    return {"text": text, "blocks": blocks}


def body_of(alert: Alert, fmt: Literal["slack", "json"]) -> bytes:
    body = slack_body(alert) if fmt == "slack" else json_body(alert)
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class _Outcome:
    """How one attempt ended. `reason` names the error by type or status, never by its message."""

    sent: bool
    retryable: bool = False
    reason: str = ""
    retry_after: float | None = None


_SENT: Final = _Outcome(sent=True)


def _retry_after(response: httpx.Response, cap: float) -> float | None:
    """Seconds from a Retry-After header in seconds, capped; None when absent or not a number."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), cap)


class _Lane:
    """One webhook's queue and its worker: deliveries to one receiver go out one at a time, in order."""

    def __init__(self, target: WebhookTarget, index: int, queue_size: int) -> None:
        self.target = target
        self.index = index  # 1-based place in the policy: how logs name the webhook
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=queue_size)
        self.worker: asyncio.Task[None] | None = None
        self.current: Alert | None = None  # the delivery in progress
        self.retired = False  # removed by configure(): the worker ends once the queue is empty

    @property
    def name(self) -> str:
        return f"webhook {self.index} ({self.target.format})"  # never the URL, not even its host

    @property
    def idle(self) -> bool:
        return self.current is None and self.queue.empty()


class Alerter:
    """Sends each alert to every configured webhook, in the background, with retries."""

    def __init__(
        self,
        webhooks: Sequence[WebhookTarget],
        clock: Clock,
        metrics: AlertMetrics | None = None,
        *,
        attempts: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        timeout: float = 5.0,
        queue_size: int = 1000,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        if min(base_delay, max_delay) < 0 or timeout <= 0:
            raise ValueError("delays must not be negative, and the timeout must be positive")
        self._clock = clock
        self._metrics = metrics
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._timeout = timeout
        self._queue_size = queue_size
        self._rng = random.Random()
        self._transport = httpx.AsyncHTTPTransport()
        self._lanes: dict[WebhookTarget, _Lane] = {}
        self._retired: list[_Lane] = []
        self._closed = False
        self._close_done = asyncio.Event()
        self.configure(webhooks)

    # ------------------------------------------------------------------------------------- the interface

    def configure(self, webhooks: Sequence[WebhookTarget]) -> None:
        """Send later alerts to `webhooks`. Alerts already queued for a removed webhook still go to it."""
        lanes: dict[WebhookTarget, _Lane] = {}
        for index, target in enumerate(dict.fromkeys(webhooks), start=1):
            lane = self._lanes.pop(target, None) or _Lane(target, index, self._queue_size)
            lane.index = index
            lanes[target] = lane
        for lane in self._lanes.values():
            lane.retired = True
            if lane.idle and lane.worker is not None:
                lane.worker.cancel()  # waiting for work that will never come
            self._retired.append(lane)
        self._lanes = lanes
        self._retired = [lane for lane in self._retired if not (lane.idle and self._stopped(lane))]

    def notify(self, alert: Alert) -> None:
        """Queue one delivery of `alert` per webhook and return at once. Never blocks, never raises."""
        try:
            for lane in self._lanes.values():
                if self._closed:
                    self._drop(lane, alert, "the alerter is closed")
                    continue
                try:
                    lane.queue.put_nowait(alert)
                except asyncio.QueueFull:
                    self._drop(lane, alert, f"its queue is full ({self._queue_size} waiting)")
            self._start_workers()
        except Exception as exc:  # noqa: BLE001 - an alert must never break the tick that raised it
            log.error("alert not queued: unexpected %s", type(exc).__name__)  # noqa: TRY400 - see _work

    async def idle(self) -> None:
        """Return once every delivery queued so far has ended, sent or given up."""
        self._start_workers()
        for lane in self._all_lanes():
            await lane.queue.join()

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop: queued and running deliveries get `grace` seconds (on the clock), the rest are dropped."""
        if self._closed:
            await self._close_done.wait()
            return
        self._start_workers()  # an alert queued outside the loop gets its grace too
        self._closed = True
        lanes = self._all_lanes()
        try:
            drained = asyncio.ensure_future(self._drained(lanes))
            waited = asyncio.ensure_future(self._clock.sleep(grace))
            try:
                await asyncio.wait({drained, waited}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (drained, waited):
                    task.cancel()
                await asyncio.gather(drained, waited, return_exceptions=True)
        finally:
            workers = [lane.worker for lane in lanes if lane.worker is not None]
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for lane in lanes:
                self._drop_all(lane)
            self._retired = []
            await self._transport.aclose()
            self._close_done.set()

    # ------------------------------------------------------------------------------------- the workers

    def _all_lanes(self) -> list[_Lane]:
        return [*self._lanes.values(), *self._retired]

    @staticmethod
    def _stopped(lane: _Lane) -> bool:
        return lane.worker is None or lane.worker.done()

    def _start_workers(self) -> None:
        """Start a worker for each lane with work and none running, on the running loop (if there is one:
        an alert queued outside the loop waits for the next call made inside it)."""
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for lane in self._all_lanes():
            if self._stopped(lane) and not (lane.retired and lane.idle):
                lane.worker = loop.create_task(self._work(lane), name=f"flywatch-alerts-{lane.index}")

    async def _drained(self, lanes: Iterable[_Lane]) -> None:
        for lane in lanes:
            await lane.queue.join()

    async def _work(self, lane: _Lane) -> None:
        while True:
            alert = await lane.queue.get()
            lane.current = alert
            try:
                result = await self._deliver(lane, alert)
            except Exception as exc:  # noqa: BLE001 - one bad alert must not stop the lane
                # no traceback: an exception's message (httpx's do) may quote the URL
                log.error(  # noqa: TRY400
                    "%s: %s alert for %s failed unexpectedly (%s); going on",
                    lane.name,
                    alert.event,
                    alert.app,
                    type(exc).__name__,
                )
                result = "failed"
            self._count(alert, result)
            lane.current = None
            lane.queue.task_done()
            if lane.retired and lane.queue.empty():
                return

    async def _deliver(self, lane: _Lane, alert: Alert) -> Result:
        body = body_of(alert, lane.target.format)
        attempt = 1
        while True:
            outcome = await self._attempt(lane.target.url, body)
            if outcome.sent:
                log.debug("%s: %s alert for %s sent (attempt %d)", lane.name, alert.event, alert.app, attempt)
                return "sent"
            if not outcome.retryable or attempt >= self._attempts:
                log.warning(
                    "%s: %s alert for %s not delivered: %s (attempt %d of %d, giving up)",
                    lane.name,
                    alert.event,
                    alert.app,
                    outcome.reason,
                    attempt,
                    self._attempts,
                )
                return "failed"
            delay = outcome.retry_after if outcome.retry_after is not None else self._backoff(attempt)
            log.info(
                "%s: %s alert for %s not delivered: %s (attempt %d of %d), retrying in %.2fs",
                lane.name,
                alert.event,
                alert.app,
                outcome.reason,
                attempt,
                self._attempts,
                delay,
            )
            await self._clock.sleep(delay)
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        """base_delay doubling from the first retry, capped at max_delay, less up to JITTER of it."""
        ceiling = min(self._max_delay, self._base_delay * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
        return ceiling * (1.0 - JITTER * self._rng.random())

    async def _attempt(self, url: str, body: bytes) -> _Outcome:
        """POST `body` once. Errors are named by type and status only: httpx's messages may hold the URL."""
        try:
            request = httpx.Request(
                "POST",
                url,
                content=body,
                headers=_HEADERS,
                extensions={"timeout": httpx.Timeout(self._timeout).as_dict()},
            )
        except httpx.InvalidURL:
            return _Outcome(sent=False, reason="an invalid URL")
        try:
            async with asyncio.timeout(self._timeout):  # the whole exchange, not each read
                response = await self._transport.handle_async_request(request)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except httpx.UnsupportedProtocol:
            return _Outcome(sent=False, reason="a URL that is not http:// or https://")
        except (httpx.TimeoutException, TimeoutError) as exc:
            return _Outcome(sent=False, retryable=True, reason=f"no answer in time ({type(exc).__name__})")
        except httpx.TransportError as exc:
            return _Outcome(sent=False, retryable=True, reason=f"connection error ({type(exc).__name__})")
        status = response.status_code
        if 200 <= status < 300:
            return _SENT
        reason = f"HTTP {status}"
        if status in {408, 429} or status >= 500:
            return _Outcome(
                sent=False, retryable=True, reason=reason, retry_after=_retry_after(response, self._max_delay)
            )
        # the receiver refuses this very request: asking again would not help
        return _Outcome(sent=False, reason=reason)

    # ------------------------------------------------------------------------------------- accounting

    def _count(self, alert: Alert, result: Result) -> None:
        if self._metrics is not None:
            self._metrics.deliveries.labels(alert.event, result).inc()

    def _drop(self, lane: _Lane, alert: Alert, why: str) -> None:
        log.warning("%s: %s alert for %s dropped: %s", lane.name, alert.event, alert.app, why)
        self._count(alert, "dropped")

    def _drop_all(self, lane: _Lane) -> None:
        """After the workers stopped: what was running and what was still queued is dropped."""
        if lane.current is not None:
            self._drop(lane, lane.current, "still being delivered when the alerter closed")
            lane.current = None
            lane.queue.task_done()
        while True:
            try:
                alert = lane.queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            self._drop(lane, alert, "still queued when the alerter closed")
            lane.queue.task_done()
