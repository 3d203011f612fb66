"""The Machines API client: the daemon's only door to Fly.

- One `_call()` carries every request: it waits on Fly's documented rate-limit buckets first (so the daemon
  causes no 429 in steady state), measures and counts the call, and retries by error class only: 429, 5xx,
  connection errors and timeouts, with exponential backoff and jitter, honouring Retry-After when present.
  Other 4xx raise typed errors (fly/errors.py).
- A create is never blindly retried after an ambiguous failure (408, 5xx, a lost answer): the machine may
  exist. Each create carries an idempotency key in its metadata, and the client looks it up first.
- The token is sent as `Bearer TOKEN`, or as is when it is a `FlyV1 ...` macaroon; it never appears in a
  message, an exception or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from daemon.clock import Clock
from daemon.core.ratelimit import CLIENT_HEADROOM, TokenBuckets
from daemon.fly import errors
from daemon.fly.auth import authorization
from daemon.fly.models import App, Lease, Machine, MachineConfig, MachineEvent, MachineVersion, WaitResult
from daemon.telemetry.metrics import ApiMetrics

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

DEFAULT_BASE_URL = "https://api.machines.dev"
INTERNAL_BASE_URL = "http://_api.internal:4280"
LEASE_NONCE_HEADER = "fly-machine-lease-nonce"
IDEMPOTENCY_KEY = "flywatch_idempotency_key"
MAX_WAIT_PER_CALL = 60  # Fly refuses wait timeouts above 60 s
_MAX_RETRY_AFTER = 60.0
_MIN_THROTTLE_WAIT = 0.001


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter. `attempts` counts the first try."""

    attempts: int = 5
    base: float = 0.25
    cap: float = 8.0
    jitter: float = 0.5  # share of each delay taken off at random

    def delay(self, retry: int, rng: random.Random) -> float:
        backoff = min(self.cap, self.base * (2.0**retry))
        return backoff * (1.0 - self.jitter * rng.random())


NO_BACKOFF = RetryPolicy(base=0.0, cap=0.0, jitter=0.0)  # for tests: same retries, no waiting


def _retry_after(response: httpx.Response | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), if the answer has one."""
    if response is None:
        return None
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    try:
        return min(max(float(raw), 0.0), _MAX_RETRY_AFTER)
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(raw)
        sent = response.headers.get("Date")
        date = email.utils.parsedate_to_datetime(sent) if sent else datetime.now(UTC)
        return min(max((when - date).total_seconds(), 0.0), _MAX_RETRY_AFTER)
    return None


_MIN_SECRET_PART = 8  # shorter pieces of a FlyV1 token list are not worth masking on their own


def _secrets_of(token: str) -> tuple[str, ...]:
    """What must never be repeated from an answer: the credential, and each part of a FlyV1 token list."""
    credential = token.strip().removeprefix("FlyV1 ").strip()
    parts = {p.strip() for p in credential.split(",") if len(p.strip()) >= _MIN_SECRET_PART}
    return tuple(sorted({credential, *parts} - {""}, key=len, reverse=True))


def _body(endpoint: str, response: httpx.Response) -> Any:
    """The JSON of a success; anything else is a BadResponse, never a stray decode error."""
    try:
        return response.json()
    except ValueError:
        raise errors.BadResponse(endpoint, f"answered {response.status_code} without JSON") from None


def _lease_data(endpoint: str, response: httpx.Response) -> dict[str, Any]:
    body = _body(endpoint, response)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("nonce"), str):
        raise errors.BadResponse(endpoint, "the lease answer has no data.nonce")
    return data


def _parsed(endpoint: str, response: httpx.Response, model: type[M]) -> M:
    """The answer as a model; a body of the wrong shape is a BadResponse."""
    try:
        return model.model_validate(_body(endpoint, response))
    except ValidationError as exc:
        raise errors.BadResponse(endpoint, f"unexpected answer: {exc.error_count()} problem(s)") from None


def _parsed_list(endpoint: str, response: httpx.Response, model: type[M], key: str | None = None) -> list[M]:
    body = _body(endpoint, response)
    items = body.get(key) if key is not None and isinstance(body, dict) else body
    if not isinstance(items, list):
        raise errors.BadResponse(endpoint, "expected a list")
    try:
        return [model.model_validate(item) for item in items]
    except ValidationError as exc:
        raise errors.BadResponse(endpoint, f"unexpected answer: {exc.error_count()} problem(s)") from None


def _error_from(endpoint: str, response: httpx.Response, masked: Iterable[str] = ()) -> errors.FlyApiError:
    """The typed error of an answer. A proxy's page may echo the request's headers: `masked` are hidden."""
    request_id = response.headers.get("fly-request-id", "")
    capacity = False
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("error") or response.reason_phrase)[:500]
        capacity = body.get("status") == "insufficient_capacity"
    else:
        message = response.text.strip() or response.reason_phrase
    for secret in masked:  # masked before it is cut: a cut could leave part of a secret unmatched
        message = message.replace(secret, "[redacted]")
    if len(message) > 200:
        message = message[:200] + "..."
    return errors.error_for(endpoint, response.status_code, message, request_id, capacity=capacity)


class MachinesClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        clock: Clock,
        metrics: ApiMetrics | None = None,
        retry: RetryPolicy | None = None,
        rate_limit: bool = True,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        guard: Callable[[str], str | None] | None = None,
        user_agent: str = "flywatch",
    ) -> None:
        """`guard(app)`: asked before every request that changes anything of `app` (None: go ahead; else why
        not, raised as NotOwner and never sent), so an instance that has lost an app cannot act on it."""
        base = base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self._clock = clock
        self._metrics = metrics
        self._retry = retry or RetryPolicy()
        self._buckets = TokenBuckets(CLIENT_HEADROOM) if rate_limit else None
        self._rng = rng or random.Random()
        self._timeout = timeout
        self._secrets = _secrets_of(token)
        self._guard = guard
        self._http = httpx.AsyncClient(
            base_url=base,
            headers={"Authorization": authorization(token), "User-Agent": user_agent},
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"MachinesClient({self._http.base_url!s})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ the one request path

    async def _throttle(self, endpoint: str, scope: str) -> None:
        if self._buckets is None:
            return
        while (wait := self._buckets.take(endpoint, scope, self._clock.now())) > 0.0:
            # a floor: a float-rounded wait of 1e-8 s does not move an epoch timestamp, and would spin
            await self._clock.sleep(max(wait, _MIN_THROTTLE_WAIT))

    def _count(self, endpoint: str, code: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(endpoint, code).inc()
            self._metrics.duration.labels(endpoint).observe(max(seconds, 0.0))

    async def _call(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        scope: str,
        params: dict[str, Any] | list[tuple[str, Any]] | None = None,
        body: dict[str, Any] | None = None,
        nonce: str | None = None,
        timeout: float | None = None,
        ambiguous_retry: bool = True,
        expect: Iterable[int] = (),
        deadline: float | None = None,
    ) -> httpx.Response:
        """Send one logical request, retried by error class. `expect`: error codes returned, not raised.

        `ambiguous_retry=False` (create): after a 5xx, a timeout or a lost answer the request may have
        been carried out, so the error goes back to the caller instead of being retried here.
        """
        headers = {LEASE_NONCE_HEADER: nonce} if nonce else None
        expected = set(expect)
        retry = 0
        while True:
            self._check_guard(endpoint, method, path)  # before the wait: not ours, it waits for nothing
            await self._throttle(endpoint, scope)
            self._check_guard(endpoint, method, path)  # and after it: the lease may have lapsed in it
            started = self._clock.now()
            response: httpx.Response | None = None
            try:
                response = await self._http.request(
                    method, path, params=params, json=body, headers=headers, timeout=timeout or self._timeout
                )
            except httpx.ConnectError as exc:
                self._count(endpoint, "error", self._clock.now() - started)
                error: errors.FlyApiError = errors.TransportError(endpoint, f"cannot connect: {exc!s}")
                reason, retryable = "connection", True  # never reached Fly: always safe to retry
            except httpx.TimeoutException as exc:
                self._count(endpoint, "timeout", self._clock.now() - started)
                error = errors.TransportError(endpoint, f"no answer in time ({type(exc).__name__})")
                reason, retryable = "timeout", ambiguous_retry
            except httpx.TransportError as exc:
                self._count(endpoint, "error", self._clock.now() - started)
                error = errors.TransportError(endpoint, f"connection lost: {type(exc).__name__}")
                reason, retryable = "connection", ambiguous_retry
            else:
                self._count(endpoint, str(response.status_code), self._clock.now() - started)
                if response.is_success or response.status_code in expected:
                    return response
                error = _error_from(endpoint, response, self._secrets)
                status = response.status_code
                reason = {429: "429", 408: "408"}.get(status, "5xx")
                # a 429 was refused before anything happened; a 408 (Fly's own deadline) or a 5xx may have
                # happened, so only a call that is safe to repeat is retried after one
                retryable = status == 429 or ((status >= 500 or status == 408) and ambiguous_retry)
            if not retryable or retry + 1 >= self._retry.attempts:
                raise error
            delay = _retry_after(response)
            if delay is None:
                delay = self._retry.delay(retry, self._rng)
            if deadline is not None and self._clock.now() + delay >= deadline:
                raise error  # the caller's own deadline comes first
            if self._metrics is not None:
                self._metrics.retries.labels(endpoint, reason).inc()
            log.info("retrying %s after a %s error in %.2fs (retry %d)", endpoint, reason, delay, retry + 1)
            await self._clock.sleep(delay)
            retry += 1

    def _check_guard(self, endpoint: str, method: str, path: str) -> None:
        """Raise NotOwner for a change to an app the guard says is not ours. Reads always go; so does
        releasing a machine lease of ours, which only lets others in sooner."""
        if self._guard is None or method == "GET" or endpoint == "Machines_release_lease":
            return
        parts = path.split("/")
        if len(parts) > 2 and parts[1] == "apps" and (reason := self._guard(parts[2])) is not None:
            raise errors.NotOwner(endpoint, reason)

    # ------------------------------------------------------------------ apps

    async def list_apps(self, org_slug: str) -> list[App]:
        response = await self._call(
            "Apps_list", "GET", "/apps", scope=org_slug, params={"org_slug": org_slug}
        )
        return _parsed_list("Apps_list", response, App, key="apps")

    async def get_app(self, app: str) -> App:
        response = await self._call("Apps_show", "GET", f"/apps/{app}", scope=app)
        return _parsed("Apps_show", response, App)

    # ------------------------------------------------------------------ machines

    async def list_machines(
        self,
        app: str,
        *,
        region: str | None = None,
        states: Iterable[str] = (),
        metadata: dict[str, str] | None = None,
        summary: bool = False,
        include_deleted: bool = False,
    ) -> list[Machine]:
        params: dict[str, Any] = {}
        if region:
            params["region"] = region
        if states := list(states):
            params["state"] = ",".join(states)
        if summary:
            params["summary"] = "true"
        if include_deleted:
            params["include_deleted"] = "true"
        for key, value in (metadata or {}).items():
            params[f"metadata.{key}"] = value
        response = await self._call("Machines_list", "GET", f"/apps/{app}/machines", scope=app, params=params)
        return _parsed_list("Machines_list", response, Machine)

    async def get_machine(self, app: str, machine_id: str) -> Machine:
        response = await self._call(
            "Machines_show", "GET", f"/apps/{app}/machines/{machine_id}", scope=machine_id
        )
        return _parsed("Machines_show", response, Machine)

    async def create_machine(
        self,
        app: str,
        config: MachineConfig,
        *,
        region: str,
        name: str | None = None,
        skip_launch: bool = False,
        lease_ttl: int | None = None,
        idempotency_key: str | None = None,
    ) -> Machine:
        """Create a machine; after an ambiguous failure, look it up by its idempotency key before a retry."""
        key = idempotency_key or secrets.token_hex(12)
        keyed = config.copy_with(metadata={**config.metadata, IDEMPOTENCY_KEY: key})
        body: dict[str, Any] = {"config": keyed.to_api(), "region": region}
        if name:
            body["name"] = name
        if skip_launch:
            body["skip_launch"] = True
        if lease_ttl:
            body["lease_ttl"] = lease_ttl
        retry = 0
        while True:
            try:
                response = await self._call(
                    "Machines_create",
                    "POST",
                    f"/apps/{app}/machines",
                    scope=app,
                    body=body,
                    ambiguous_retry=False,
                )
                return _parsed("Machines_create", response, Machine)
            except (errors.RequestTimeout, errors.ServerError, errors.TransportError) as exc:
                found = await self._find_created(app, key, retry)
                if found:
                    if lease_ttl and found[0].nonce is None:
                        # the create took a lease that only its lost answer named: read its nonce back
                        lease = await self.get_lease(app, found[0].id)
                        found[0].nonce = lease.nonce if lease is not None else None
                    log.info(
                        "create of %s in %s was ambiguous (%s); found it as %s",
                        app,
                        region,
                        exc.status,
                        found[0].id,
                    )
                    return found[0]
                if retry + 1 >= self._retry.attempts:
                    raise
                if self._metrics is not None:
                    self._metrics.retries.labels("Machines_create", "ambiguous").inc()
                await self._clock.sleep(self._retry.delay(retry, self._rng))
                retry += 1

    async def _find_created(self, app: str, key: str, retry: int) -> list[Machine]:
        """Machines carrying this idempotency key. The list lags just after a create, so a miss is looked
        at once more after a pause before the create may be sent again."""
        for attempt in range(2):
            listed = await self.list_machines(app, metadata={IDEMPOTENCY_KEY: key})
            # the metadata filter is documented but not in the OpenAPI document: check it ourselves
            found = [m for m in listed if m.metadata.get(IDEMPOTENCY_KEY) == key]
            if found or attempt:
                return found
            await self._clock.sleep(self._retry.delay(retry, self._rng))
        return []

    async def update_machine(
        self,
        app: str,
        machine_id: str,
        config: MachineConfig,
        *,
        current_version: str | None = None,
        nonce: str | None = None,
        skip_launch: bool | None = None,
    ) -> Machine:
        """Replace the machine's whole config (Fly takes no partial update)."""
        body: dict[str, Any] = {"config": config.to_api()}
        if current_version:
            body["current_version"] = current_version
        if skip_launch is not None:
            body["skip_launch"] = skip_launch
        try:
            response = await self._call(
                "Machines_update",
                "POST",
                f"/apps/{app}/machines/{machine_id}",
                scope=machine_id,
                body=body,
                nonce=nonce,
            )
        except errors.Conflict as exc:
            if isinstance(exc, errors.LeaseHeld):
                raise
            # after a lost answer and a retry, the first try may be what moved the version on (Fly does not
            # document the message of this 409, so any conflict but a held lease is looked into)
            machine = await self.get_machine(app, machine_id)
            if machine.config is not None and machine.config.to_api() == config.to_api():
                return machine
            raise
        return _parsed("Machines_update", response, Machine)

    async def _lifecycle(
        self, endpoint: str, app: str, machine_id: str, verb: str, nonce: str | None
    ) -> dict[str, Any]:
        path = f"/apps/{app}/machines/{machine_id}/{verb}"
        response = await self._call(endpoint, "POST", path, scope=machine_id, nonce=nonce)
        body = _body(endpoint, response) if response.content else {}
        result: dict[str, Any] = body if isinstance(body, dict) else {}
        return result

    async def start_machine(self, app: str, machine_id: str, *, nonce: str | None = None) -> dict[str, Any]:
        return await self._lifecycle("Machines_start", app, machine_id, "start", nonce)

    async def stop_machine(self, app: str, machine_id: str, *, nonce: str | None = None) -> dict[str, Any]:
        return await self._lifecycle("Machines_stop", app, machine_id, "stop", nonce)

    async def suspend_machine(self, app: str, machine_id: str, *, nonce: str | None = None) -> dict[str, Any]:
        return await self._lifecycle("Machines_suspend", app, machine_id, "suspend", nonce)

    async def restart_machine(self, app: str, machine_id: str, *, nonce: str | None = None) -> dict[str, Any]:
        return await self._lifecycle("Machines_restart", app, machine_id, "restart", nonce)

    async def destroy_machine(
        self, app: str, machine_id: str, *, force: bool = False, nonce: str | None = None
    ) -> None:
        params = {"force": "true"} if force else None
        await self._call(
            "Machines_delete",
            "DELETE",
            f"/apps/{app}/machines/{machine_id}",
            scope=machine_id,
            params=params,
            nonce=nonce,
        )

    async def wait(
        self,
        app: str,
        machine_id: str,
        states: str | Iterable[str] = "started",
        *,
        timeout: float = 60.0,
        version: str | None = None,
    ) -> WaitResult:
        """Block until the machine (or its `version`) reaches one of `states`; past 60 s by looping on 408."""
        wanted = [states] if isinstance(states, str) else list(states)
        deadline = self._clock.now() + timeout
        path = f"/apps/{app}/machines/{machine_id}/wait"
        while True:
            remaining = deadline - self._clock.now()
            per_call = max(1, min(MAX_WAIT_PER_CALL, math.ceil(remaining)))
            params: list[tuple[str, Any]] = [("state", s) for s in wanted] + [("timeout", per_call)]
            if version:
                params.append(("version", version))
            response = await self._call(
                "Machines_wait",
                "GET",
                path,
                scope=machine_id,
                params=params,
                timeout=per_call + 10.0,
                expect=(408,),
                deadline=deadline,
            )
            if response.status_code != 408:
                return _parsed("Machines_wait", response, WaitResult)
            if self._clock.now() >= deadline:
                raise _error_from("Machines_wait", response, self._secrets)

    # ------------------------------------------------------------------ leases

    async def acquire_lease(
        self, app: str, machine_id: str, *, ttl: int, description: str = "flywatch"
    ) -> Lease:
        path = f"/apps/{app}/machines/{machine_id}/lease"
        # a tag of our own in the description: if a retry after a lost answer finds the lease held, the
        # tag tells whether the holder is this very acquire (ours to keep) or someone else
        tag = f"{description} {secrets.token_hex(6)}"
        try:
            response = await self._call(
                "Machines_create_lease", "POST", path, scope=machine_id, body={"ttl": ttl, "description": tag}
            )
        except errors.LeaseHeld:
            existing = await self.get_lease(app, machine_id)
            if existing is not None and existing.description == tag:
                return existing
            raise
        return Lease.model_validate(_lease_data("Machines_create_lease", response))

    async def refresh_lease(self, app: str, machine_id: str, nonce: str, *, ttl: int) -> Lease:
        path = f"/apps/{app}/machines/{machine_id}/lease"
        body = {"ttl": ttl, "description": "flywatch"}
        response = await self._call(
            "Machines_create_lease", "POST", path, scope=machine_id, body=body, nonce=nonce
        )
        return Lease.model_validate(_lease_data("Machines_create_lease", response))

    async def get_lease(self, app: str, machine_id: str) -> Lease | None:
        path = f"/apps/{app}/machines/{machine_id}/lease"
        response = await self._call("Machines_show_lease", "GET", path, scope=machine_id, expect=(404,))
        if response.status_code == 404:
            return None
        return Lease.model_validate(_lease_data("Machines_show_lease", response))

    async def release_lease(self, app: str, machine_id: str, nonce: str) -> bool:
        """Release our lease; False when it had already expired (Fly answers 404 then)."""
        path = f"/apps/{app}/machines/{machine_id}/lease"
        response = await self._call(
            "Machines_release_lease", "DELETE", path, scope=machine_id, nonce=nonce, expect=(404,)
        )
        return response.status_code != 404

    @contextlib.asynccontextmanager
    async def lease(
        self, app: str, machine_id: str, *, ttl: int = 30, description: str = "flywatch"
    ) -> AsyncIterator[HeldLease]:
        """Hold the machine's lease for the block, refreshed in the background, released at the end.

        Raises LeaseHeld at once when someone else holds it: the caller skips the machine.
        """
        lease = await self.acquire_lease(app, machine_id, ttl=ttl, description=description)
        async with self.holding(app, machine_id, lease, ttl=ttl) as held:
            yield held

    @contextlib.asynccontextmanager
    async def holding(
        self, app: str, machine_id: str, lease: Lease, *, ttl: int = 30
    ) -> AsyncIterator[HeldLease]:
        """Keep a lease we already hold (one taken with a create's lease_ttl, say) for the block: refreshed in
        the background, released at the end (a lease that expired or a machine that is gone is fine)."""
        held = HeldLease(lease)
        refresher = asyncio.ensure_future(self._keep_lease(app, machine_id, held, ttl))
        try:
            yield held
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            try:
                await self.release_lease(app, machine_id, held.nonce)
            except Exception as exc:  # noqa: BLE001 - a lease we cannot release expires at its ttl
                log.warning("could not release the lease on %s/%s: %s", app, machine_id, exc)

    async def _keep_lease(self, app: str, machine_id: str, held: HeldLease, ttl: int) -> None:
        """Refresh every third of the ttl; a failed refresh is tried again until the lease could expire."""
        period = max(ttl / 3.0, 0.5)
        good_until = self._clock.now() + ttl
        while True:
            await self._clock.sleep(period)
            try:
                held.lease = await self.refresh_lease(app, machine_id, held.nonce, ttl=ttl)
                good_until = self._clock.now() + ttl
            except Exception as exc:  # noqa: BLE001 - any failure to refresh is judged the same way
                if isinstance(exc, errors.LeaseHeld) or self._clock.now() + period >= good_until:
                    held.lost = str(exc)
                    log.warning("lost the lease on %s/%s: %s", app, machine_id, exc)
                    return
                log.info("refreshing the lease on %s/%s failed, trying again: %s", app, machine_id, exc)

    # ------------------------------------------------------------------ metadata, versions, events

    async def get_metadata(self, app: str, machine_id: str) -> dict[str, str]:
        path = f"/apps/{app}/machines/{machine_id}/metadata"
        response = await self._call("Machines_show_metadata", "GET", path, scope=machine_id)
        body = _body("Machines_show_metadata", response)
        if not isinstance(body, dict):
            raise errors.BadResponse("Machines_show_metadata", "expected an object")
        return {str(k): str(v) for k, v in body.items()}

    async def set_metadata(self, app: str, machine_id: str, key: str, value: str) -> None:
        path = f"/apps/{app}/machines/{machine_id}/metadata/{key}"
        await self._call("Machines_upsert_metadata", "POST", path, scope=machine_id, body={"value": value})

    async def delete_metadata(self, app: str, machine_id: str, key: str) -> None:
        path = f"/apps/{app}/machines/{machine_id}/metadata/{key}"
        await self._call("Machines_delete_metadata", "DELETE", path, scope=machine_id)

    async def list_versions(self, app: str, machine_id: str) -> list[MachineVersion]:
        path = f"/apps/{app}/machines/{machine_id}/versions"
        response = await self._call("Machines_list_versions", "GET", path, scope=machine_id)
        return _parsed_list("Machines_list_versions", response, MachineVersion)

    async def list_events(self, app: str, machine_id: str, *, limit: int = 20) -> list[MachineEvent]:
        path = f"/apps/{app}/machines/{machine_id}/events"
        response = await self._call(
            "Machines_list_events", "GET", path, scope=machine_id, params={"limit": min(max(limit, 1), 50)}
        )
        return _parsed_list("Machines_list_events", response, MachineEvent)


@dataclass
class HeldLease:
    """A lease we hold. `lost` says why, when refreshing failed until it may have expired."""

    lease: Lease
    lost: str = ""

    @property
    def nonce(self) -> str:
        return self.lease.nonce

    def check(self) -> None:
        """Raise LeaseLost if the lease may be gone: no change may be made under it any more."""
        if self.lost:
            raise errors.LeaseLost("Machines_create_lease", f"lease lost: {self.lost}")
