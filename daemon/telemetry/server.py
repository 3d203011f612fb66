"""The daemon's HTTP face: Prometheus metrics, liveness and readiness, its status and its decisions.

The server knows nothing of the reconciler or the policies: it is handed a registry and four callables
and serves what they answer. Every answer goes through `redact()`, so no route can show a secret even if
a callable returns one.

    GET /metrics                  the registry in Prometheus text (or OpenMetrics, when the scraper asks)
    GET /healthz                  200 {"ok": true} while alive, else 503 {"ok": false}
    GET /readyz                   200 {"ok": true, "reason": ...} when ready, else 503 with the reason
    GET /status                   what `status()` answers, as JSON
    GET /decisions?app=&limit=    the newest decisions (limit 1..1000, default 50), a JSON array
    GET /releases?app=&limit=     the newest release events (verdicts, rollbacks), the same way
    POST /releases/{app}/rollback a rollback by hand, body {"to": VERSION} or {}; only with the daemon's own
                                  Fly token as `Authorization: Bearer` (202, or 401, 409, 400 with why)

Anything else is a JSON 404 (or 405 for a known path and another method). The sync callables run in the
event loop, so they must answer from memory; `decisions` may await a store, within `call_timeout`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from daemon.telemetry.logging import redact

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000

Alive = Callable[[], bool]
Ready = Callable[[], tuple[bool, str]]
Status = Callable[[], dict[str, Any]]
Decisions = Callable[[str | None, int], Awaitable[list[dict[str, Any]]]]
# (app, to, by) -> the request as recorded; raises ValueError with why it cannot be taken
RollbackRequest = Callable[[str, int | None, str], Awaitable[dict[str, Any]]]
Authorize = Callable[[str], bool]  # the Authorization header -> whether it may ask for a rollback


def parse_listen(listen: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[ipv6]:port"; port 0 lets the system pick a free one."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen address must be HOST:PORT or [IPV6]:PORT, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"listen address {listen!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"listen address {listen!r}: write an IPv6 address in brackets, as [::]:9091")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {listen!r}: the port must be 0..65535")
    return host, int(port_text)


def _dual_stack(port: int) -> socket.socket:
    """A listening socket on every IPv6 and IPv4 address (IPv4 as mapped addresses), on `port`."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Every JSON answer leaves through here, so every one is redacted."""
    body = json.dumps(redact(data), default=str)
    return web.Response(
        text=body,
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _failure(what: str, exc: Exception) -> str:
    # Only the exception's type goes into the answer; its message is in the (redacted) log line.
    return f"{what} failed: {type(exc).__name__}"


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _json({"error": exc.reason.lower(), "path": request.path}, exc.status, allow)
    except Exception as exc:
        log.exception("telemetry request failed", extra={"path": request.path})
        return _json({"error": _failure(request.path, exc)}, 500)


class TelemetryServer:
    """The HTTP server; `start()` binds it, `url` says where it listens, `stop()` ends it gracefully."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        *,
        alive: Alive,
        ready: Ready,
        status: Status,
        decisions: Decisions,
        releases: Decisions | None = None,
        rollback: RollbackRequest | None = None,
        authorize: Authorize | None = None,
        shutdown_timeout: float = 1.0,
        call_timeout: float = 5.0,
    ) -> None:
        self.host, self._requested_port = parse_listen(listen)
        self._registry = registry
        self._alive = alive
        self._ready = ready
        self._status = status
        self._decisions = decisions
        self._releases = releases
        self._rollback = rollback
        self._authorize = authorize
        self._call_timeout = call_timeout
        app = web.Application(middlewares=[_errors_as_json])
        app.add_routes(
            [
                web.get("/metrics", self._metrics),
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/status", self._status_page),
                web.get("/decisions", self._decisions_page),
                web.get("/releases", self._releases_page),
                web.post("/releases/{app}/rollback", self._rollback_page),
            ]
        )
        # A handler still running at shutdown is cancelled after `shutdown_timeout` (a stuck store
        # query must not hold the daemon's exit).
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=shutdown_timeout,
        )
        self._port: int | None = None
        self._used = False  # an aiohttp runner is set up once: a stopped server is not started again

    @property
    def port(self) -> int:
        """The bound port (the one the system picked for port 0); only known once started."""
        if self._port is None:
            raise RuntimeError("the telemetry server is not started")
        return self._port

    @property
    def url(self) -> str:
        """A URL this host can reach the server at: a wildcard address ("::", "0.0.0.0") becomes the
        loopback address of its family."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._used:
            raise RuntimeError("a telemetry server starts once; make a new one")
        self._used = True
        await self._runner.setup()
        try:
            site: web.BaseSite
            if self.host == "::":
                # one socket for both families: asyncio makes "::" IPv6-only, and Fly's metrics scrape and
                # checks may come over IPv4 as well as over the 6PN
                site = web.SockSite(self._runner, _dual_stack(self._requested_port))
            else:
                site = web.TCPSite(self._runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        # A host name may resolve to several addresses (each its own socket): the first one is reported.
        self._port = int(self._runner.addresses[0][1])
        log.info("telemetry server listening on %s", self.url)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (within the shutdown timeout), then close."""
        if self._port is None:
            return
        await self._runner.cleanup()
        self._port = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        names = request.query.getall("name[]", [])
        registry: Collector = self._registry.restricted_registry(names) if names else self._registry
        # Label values are data too (a URL, an error message): registered secrets are cut out of them.
        text = redact(encoder(registry).decode("utf-8"))
        response = web.Response(body=text.encode("utf-8"), headers={"Content-Type": content_type})
        response.enable_compression()
        return response

    async def _healthz(self, _request: web.Request) -> web.Response:
        try:
            alive = bool(self._alive())
        except Exception as exc:
            log.exception("liveness check failed")
            return _json({"ok": False, "reason": _failure("liveness check", exc)}, 503)
        return _json({"ok": alive}, 200 if alive else 503)

    async def _readyz(self, _request: web.Request) -> web.Response:
        try:
            ready, reason = self._ready()
        except Exception as exc:
            log.exception("readiness check failed")
            return _json({"ok": False, "reason": _failure("readiness check", exc)}, 503)
        return _json({"ok": bool(ready), "reason": str(reason)}, 200 if ready else 503)

    async def _status_page(self, _request: web.Request) -> web.Response:
        return _json(self._status())

    async def _decisions_page(self, request: web.Request) -> web.Response:
        return await self._records_page(request, self._decisions, "decisions")

    async def _releases_page(self, request: web.Request) -> web.Response:
        if self._releases is None:
            return _json({"error": "no release watch"}, 404)
        return await self._records_page(request, self._releases, "release events")

    async def _records_page(self, request: web.Request, source: Decisions, what: str) -> web.Response:
        app = request.query.get("app") or None
        raw = request.query.get("limit", "")
        limit = DEFAULT_LIMIT
        if raw != "":
            limit = int(raw) if raw.isascii() and raw.isdigit() else 0
            if not 1 <= limit <= MAX_LIMIT:
                return _json(
                    {
                        "error": f"limit must be an integer from 1 to {MAX_LIMIT}",
                        "param": "limit",
                        "value": raw,
                    },
                    400,
                )
        try:
            async with asyncio.timeout(self._call_timeout):
                records = await source(app, limit)
        except TimeoutError:
            log.warning("%s not read within %.1fs", what, self._call_timeout)
            return _json({"error": f"{what} not read within {self._call_timeout:g}s"}, 504)
        return _json(list(records))

    async def _rollback_page(self, request: web.Request) -> web.Response:
        if self._rollback is None or self._authorize is None:
            return _json({"error": "rollbacks by hand are not served here"}, 404)
        if not self._authorize(request.headers.get("Authorization", "")):
            return _json({"error": "a rollback needs the daemon's Fly token as Authorization: Bearer"}, 401)
        app = request.match_info["app"]
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return _json({"error": 'the body must be JSON, e.g. {"to": 41} or {}'}, 400)
        if not isinstance(body, dict):
            return _json({"error": 'the body must be a JSON object, e.g. {"to": 41} or {}'}, 400)
        to = body.get("to")
        if to is not None and (isinstance(to, bool) or not isinstance(to, int) or to < 1):
            return _json({"error": f"to must be a release version (a positive integer), got {to!r}"}, 400)
        by = str(body.get("by") or "cli")
        try:
            async with asyncio.timeout(self._call_timeout):
                recorded = await self._rollback(app, to, by[:100])
        except TimeoutError:
            return _json({"error": f"rollback not recorded within {self._call_timeout:g}s"}, 504)
        except LookupError as exc:
            return _json({"error": str(exc)}, 404)
        except ValueError as exc:
            return _json({"error": str(exc)}, 409)
        return _json({"ok": True, "app": app, "request": recorded}, 202)
