"""The simulated Machines API over HTTP: /v1 routes, auth, rate limits, injected faults, counters.

Routes are named by the operationId of Fly's OpenAPI document, so counters, faults and contract
checks all speak of the same endpoints. Every answer is JSON shaped as Fly's (or Fly's raw 5xx when a
fault asks for one); no request, however malformed, gets a traceback or a bare 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from daemon.sim import errors
from daemon.sim.errors import ApiError
from daemon.sim.faults import FaultBook
from daemon.sim.model import Actor, Json, Platform
from daemon.sim.ratelimit import RateLimiter

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACTOR_KEY = web.RequestKey("actor", Actor)
LEASE_NONCE = "fly-machine-lease-nonce"
_KNOWN_STATUSES = frozenset(s.value for s in HTTPStatus)


@dataclass(frozen=True)
class Exchange:
    """One request and its answer, as seen on the wire (for contract checks in tests)."""

    operation: str
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    status: int
    response_headers: dict[str, str]
    response_body: bytes


class Counters:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.responses: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.rate_limited: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()

    def to_json(self) -> Json:
        return {
            "requests": dict(self.requests),
            "responses": {op: dict(codes) for op, codes in self.responses.items()},
            "rate_limited": dict(self.rate_limited),
            "rate_limited_total": sum(self.rate_limited.values()),
            "faults_injected": dict(self.faults),
        }

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def error_response(error: ApiError) -> web.Response:
    return json_response(error.body, error.status)


LEASE_OPERATIONS = frozenset({"Machines_create_lease", "Machines_show_lease", "Machines_release_lease"})
_LEASE_CODES = {400: "invalid_argument", 404: "not_found", 409: "aborted", 429: "resource_exhausted"}


def lease_shaped(error: ApiError, operation: str) -> ApiError:
    """Lease endpoints answer every error in the lease envelope (machines-api.md §2), `error` kept too."""
    if operation not in LEASE_OPERATIONS or "status" in error.body:
        return error
    code = _LEASE_CODES.get(error.status, "unknown")
    return errors.lease_envelope_error(error.status, error.message, code)


async def read_json(request: web.Request, *, required: bool = True) -> Json:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise errors.bad_request("a JSON request body is required")
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise errors.bad_request("request body must be a JSON object")
    return body


def query_lists(request: web.Request) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for key, value in request.query.items():
        result.setdefault(key, []).append(value)
    return result


class MachinesApi:
    def __init__(
        self,
        platform: Platform,
        faults: FaultBook,
        counters: Counters,
        observers: list[Callable[[Exchange], None]],
    ) -> None:
        self.platform = platform
        self.faults = faults
        self.counters = counters
        self.observers = observers
        self.limiter = RateLimiter(platform.clock)

    # ------------------------------------------------------------ middleware

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/") and request.path != "/v1":
            return await handler(request)
        route = request.match_info.route
        operation = route.name or "unknown"
        body = await request.read()
        try:
            response = await self._guarded(request, handler, operation)
        except web.HTTPException as exc:
            response = json_response({"error": exc.reason.lower()}, exc.status)
        except ApiError as exc:
            response = error_response(lease_shaped(exc, operation))
        except Exception:  # a bug of the simulator must still answer as an API would
            log.exception("simulator error on %s %s", request.method, request.path)
            response = json_response({"error": "internal: simulator error"}, 500)
        response.headers["fly-request-id"] = secrets.token_hex(13)
        self.counters.requests[operation] += 1
        self.counters.responses[operation][str(response.status)] += 1
        if self.observers and isinstance(response, web.Response):
            exchange = Exchange(
                operation=operation,
                method=request.method,
                path=request.path,
                query=list(request.query.items()),
                headers=dict(request.headers),
                body=body,
                status=response.status,
                response_headers=dict(response.headers),
                response_body=response.body if isinstance(response.body, bytes) else b"",
            )
            for observe in self.observers:
                try:
                    observe(exchange)
                except Exception:  # an observer's bug must not change the answer
                    log.exception("observer failed on %s %s", request.method, request.path)
        return response

    async def _guarded(self, request: web.Request, handler: Handler, operation: str) -> web.StreamResponse:
        request[ACTOR_KEY] = self._authenticate(request)
        app_name = request.match_info.get("app_name")
        fault = self.faults.hit(operation, app_name)
        if fault is None:
            return await self._limited(request, handler, operation, app_name)
        spec = fault.spec
        self.counters.faults[operation] += 1
        if spec.latency:
            await self.platform.clock.sleep(spec.latency)
        if spec.after:
            # the request is carried out, then its answer is lost: an ambiguous failure for the client
            with contextlib.suppress(ApiError, web.HTTPException):
                await self._limited(request, handler, operation, app_name)
        if spec.timeout:
            await asyncio.Event().wait()  # never answers; the client's timeout ends it
        if not spec.status:
            return await self._limited(request, handler, operation, app_name)
        if spec.body is not None:
            response = web.Response(status=spec.status, text=spec.body, content_type="text/html")
        else:
            phrase = HTTPStatus(spec.status).phrase.lower() if spec.status in _KNOWN_STATUSES else "error"
            injected = ApiError(spec.status, f"{phrase} (injected fault {fault.id})")
            response = error_response(lease_shaped(injected, operation))  # lease endpoints: their envelope
        if spec.retry_after is not None:
            response.headers["Retry-After"] = f"{spec.retry_after:g}"
        return response

    async def _limited(
        self, request: web.Request, handler: Handler, operation: str, app_name: str | None
    ) -> web.StreamResponse:
        """Fly's rate limits, then the handler."""
        if self.platform.settings.rate_limits and operation != "unknown":
            scope = request.match_info.get("machine_id") or app_name or "-"
            if not self.limiter.allow(operation, scope):
                self.counters.rate_limited[operation] += 1
                return error_response(lease_shaped(ApiError(429, "rate limit exceeded"), operation))
        return await handler(request)

    def _authenticate(self, request: web.Request) -> Actor:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme not in ("Bearer", "FlyV1") or not token:
            raise ApiError(401, "Authenticate: token validation error")
        agent = request.headers.get("User-Agent", "")
        tokens = self.platform.settings.tokens
        if not tokens:
            return Actor(owner="anonymous@tokens.fly.io", agent=agent)
        owner = tokens.get(token)
        if owner is None:
            raise ApiError(401, "Authenticate: token validation error")
        return Actor(owner=owner, agent=agent)

    # ------------------------------------------------------------ routes

    def endpoints(self) -> frozenset[str]:
        """The operationIds this API serves (what faults and counters name)."""
        return frozenset(str(r.kwargs["name"]) for r in self.routes() if r.kwargs.get("name") != "unknown")

    def routes(self) -> list[web.RouteDef]:
        m = "/v1/apps/{app_name}/machines/{machine_id}"
        return [
            web.get("/v1/apps", self.list_apps, name="Apps_list"),
            web.get("/v1/apps/{app_name}", self.show_app, name="Apps_show"),
            web.get("/v1/apps/{app_name}/machines", self.list_machines, name="Machines_list"),
            web.post("/v1/apps/{app_name}/machines", self.create_machine, name="Machines_create"),
            web.get(m, self.show_machine, name="Machines_show"),
            web.post(m, self.update_machine, name="Machines_update"),
            web.delete(m, self.destroy_machine, name="Machines_delete"),
            web.post(m + "/start", self.start_machine, name="Machines_start"),
            web.post(m + "/stop", self.stop_machine, name="Machines_stop"),
            web.post(m + "/suspend", self.suspend_machine, name="Machines_suspend"),
            web.post(m + "/restart", self.restart_machine, name="Machines_restart"),
            web.post(m + "/cordon", self.cordon, name="Machines_cordon"),
            web.post(m + "/uncordon", self.uncordon, name="Machines_uncordon"),
            web.get(m + "/wait", self.wait, name="Machines_wait"),
            web.get(m + "/lease", self.show_lease, name="Machines_show_lease"),
            web.post(m + "/lease", self.acquire_lease, name="Machines_create_lease"),
            web.delete(m + "/lease", self.release_lease, name="Machines_release_lease"),
            web.get(m + "/metadata", self.metadata_all, name="Machines_show_metadata"),
            web.put(m + "/metadata", self.metadata_put, name="Machines_update_metadata"),
            web.patch(m + "/metadata", self.metadata_patch, name="Machines_patch_metadata"),
            web.get(m + "/metadata/{key}", self.metadata_key, name="Machines_get_metadata_key"),
            web.post(m + "/metadata/{key}", self.metadata_set, name="Machines_upsert_metadata"),
            web.delete(m + "/metadata/{key}", self.metadata_delete, name="Machines_delete_metadata"),
            web.get(m + "/events", self.events, name="Machines_list_events"),
            web.get(m + "/versions", self.versions, name="Machines_list_versions"),
            web.route("*", "/v1/{tail:.*}", self.unknown, name="unknown"),
        ]

    async def unknown(self, request: web.Request) -> web.Response:
        raise ApiError(404, f"not found: {request.method} {request.path}")

    async def list_apps(self, request: web.Request) -> web.Response:
        org = request.query.get("org_slug")
        if not org:
            raise errors.bad_request("org_slug is required")
        apps = [self.platform.app_json(a) for a in self.platform.apps.values() if org in (a.org, "personal")]
        return json_response({"total_apps": len(apps), "apps": apps})

    async def show_app(self, request: web.Request) -> web.Response:
        return json_response(self.platform.app_json(self.platform.app(request.match_info["app_name"])))

    async def list_machines(self, request: web.Request) -> web.Response:
        return json_response(
            self.platform.list_machines(request.match_info["app_name"], query_lists(request))
        )

    async def create_machine(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        return json_response(
            self.platform.create_machine(request.match_info["app_name"], body, request[ACTOR_KEY])
        )

    async def show_machine(self, request: web.Request) -> web.Response:
        machine = self.platform.machine(request.match_info["app_name"], request.match_info["machine_id"])
        return json_response(self.platform.machine_json(machine))

    async def update_machine(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        result = self.platform.update_machine(
            app_name, machine_id, body, request.headers.get(LEASE_NONCE), request[ACTOR_KEY]
        )
        return json_response(result)

    async def destroy_machine(self, request: web.Request) -> web.Response:
        force = any(request.query.get(k, "").lower() in ("true", "1") for k in ("force", "kill"))
        result = self.platform.destroy_machine(
            request.match_info["app_name"],
            request.match_info["machine_id"],
            force,
            request.headers.get(LEASE_NONCE),
            request[ACTOR_KEY],
        )
        return json_response(result)

    async def start_machine(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        return json_response(
            self.platform.start_machine(
                app_name, machine_id, request.headers.get(LEASE_NONCE), request[ACTOR_KEY]
            )
        )

    async def stop_machine(self, request: web.Request) -> web.Response:
        body = await read_json(request, required=False)
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        return json_response(
            self.platform.stop_machine(
                app_name, machine_id, body, request.headers.get(LEASE_NONCE), request[ACTOR_KEY]
            )
        )

    async def suspend_machine(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        return json_response(
            self.platform.suspend_machine(
                app_name, machine_id, request.headers.get(LEASE_NONCE), request[ACTOR_KEY]
            )
        )

    async def restart_machine(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        return json_response(
            self.platform.restart_machine(
                app_name, machine_id, request.headers.get(LEASE_NONCE), request[ACTOR_KEY]
            )
        )

    async def cordon(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        nonce = request.headers.get(LEASE_NONCE)
        return json_response(self.platform.cordon(app_name, machine_id, True, nonce, request[ACTOR_KEY]))

    async def uncordon(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        nonce = request.headers.get(LEASE_NONCE)
        return json_response(self.platform.cordon(app_name, machine_id, False, nonce, request[ACTOR_KEY]))

    async def wait(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        return json_response(await self.platform.wait(app_name, machine_id, query_lists(request)))

    async def show_lease(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        return json_response(self.platform.show_lease(app_name, machine_id))

    async def acquire_lease(self, request: web.Request) -> web.Response:
        body = await read_json(request, required=False)
        raw_ttl = body.get("ttl", request.query.get("ttl"))
        ttl: int | None = None
        if raw_ttl is not None:
            try:
                ttl = int(raw_ttl)
            except (TypeError, ValueError):
                raise errors.bad_request(
                    f"ttl must be an integer number of seconds, got {raw_ttl!r}"
                ) from None
        description = body.get("description", "")
        if not isinstance(description, str):
            raise errors.bad_request("description must be a string")
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        envelope = self.platform.acquire_lease(
            app_name, machine_id, ttl, description, request.headers.get(LEASE_NONCE), request[ACTOR_KEY]
        )
        return json_response(envelope, 201)

    async def release_lease(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        result = self.platform.release_lease(
            app_name, machine_id, request.headers.get(LEASE_NONCE), request[ACTOR_KEY]
        )
        return json_response(result)

    async def metadata_all(self, request: web.Request) -> web.Response:
        return json_response(
            self.platform.metadata_get(request.match_info["app_name"], request.match_info["machine_id"])
        )

    async def metadata_key(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        return json_response(self.platform.metadata_get(app_name, machine_id, request.match_info["key"]))

    async def metadata_set(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        self.platform.metadata_set(
            app_name, machine_id, request.match_info["key"], body.get("value"), request[ACTOR_KEY]
        )
        return web.Response(status=204)

    async def metadata_delete(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        self.platform.metadata_delete(app_name, machine_id, request.match_info["key"], request[ACTOR_KEY])
        return web.Response(status=204)

    async def metadata_put(self, request: web.Request) -> web.Response:
        return await self._metadata_replace(request, merge=False)

    async def metadata_patch(self, request: web.Request) -> web.Response:
        return await self._metadata_replace(request, merge=True)

    async def _metadata_replace(self, request: web.Request, *, merge: bool) -> web.Response:
        body = await read_json(request)
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        self.platform.metadata_replace(app_name, machine_id, body, merge, request[ACTOR_KEY])
        return web.Response(status=204)

    async def events(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        return json_response(self.platform.list_events(app_name, machine_id, request.query.get("limit")))

    async def versions(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        return json_response(self.platform.list_versions(app_name, machine_id))
