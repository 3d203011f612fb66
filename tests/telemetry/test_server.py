"""The telemetry HTTP server over real HTTP: metrics, health, readiness, status, decisions, releases."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from daemon.app import Daemon as FlywatchDaemon
from daemon.settings import Settings
from daemon.telemetry.logging import REDACTED
from daemon.telemetry.server import TelemetryServer, parse_listen
from tests.telemetry.conftest import SECRET, WEBHOOK


@dataclass
class Daemon:
    """What the server is handed, as plain state a test can change."""

    alive: bool = True
    ready: tuple[bool, str] = (True, "")
    status: dict[str, Any] = field(default_factory=lambda: {"version": "0.1.0", "apps": {}})
    records: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str | None, int]] = field(default_factory=list)
    delay: float = 0.0
    failure: Exception | None = None
    asked: asyncio.Event = field(default_factory=asyncio.Event)

    async def decisions(self, app: str | None, limit: int) -> list[dict[str, Any]]:
        self.calls.append((app, limit))
        self.asked.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.records[:limit]

    def status_page(self) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        return self.status

    def server(
        self, registry: CollectorRegistry, listen: str = "127.0.0.1:0", **kwargs: Any
    ) -> TelemetryServer:
        return TelemetryServer(
            registry,
            listen,
            alive=lambda: self.alive,
            ready=lambda: self.ready,
            status=self.status_page,
            decisions=self.decisions,
            **kwargs,
        )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def daemon() -> Daemon:
    return Daemon()


@pytest.fixture
async def server(daemon: Daemon, registry: CollectorRegistry) -> AsyncIterator[TelemetryServer]:
    async with daemon.server(registry) as running:
        yield running


@pytest.fixture
async def http(server: TelemetryServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
        yield client


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("[::]:9091", ("::", 9091)),
        ("[::1]:0", ("::1", 0)),
        ("0.0.0.0:9091", ("0.0.0.0", 9091)),  # noqa: S104 - parsed, not bound
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_listen_addresses_are_parsed(listen: str, expected: tuple[str, int]) -> None:
    """HOST:PORT and [IPV6]:PORT give the host to bind and the port (0: the system picks one)."""
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen",
    ["9091", ":9091", "::1:9091", "[::1]", "[nope]:9091", "127.0.0.1:", "127.0.0.1:65536", "h:1²", "h:-1"],
)
def test_bad_listen_addresses_are_refused(listen: str) -> None:
    """A listen address without a host or a valid port, or with a bare IPv6 address, is a ValueError."""
    with pytest.raises(ValueError, match="listen address"):
        parse_listen(listen)


async def test_port_zero_exposes_the_bound_port_and_url(server: TelemetryServer) -> None:
    """After start, port and url give the port the system picked, and the server answers there."""
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient() as client:
        assert (await client.get(server.url + "/healthz")).status_code == 200


async def test_url_is_unknown_before_start(daemon: Daemon, registry: CollectorRegistry) -> None:
    """Before start (and after stop) the server has no port: asking for its url is an error."""
    server = daemon.server(registry)
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url
    await server.stop()  # stopping a server never started is harmless


async def test_a_server_starts_once(server: TelemetryServer) -> None:
    """start() on a started (or stopped) server is an error rather than a second listener."""
    with pytest.raises(RuntimeError, match="starts once"):
        await server.start()
    await server.stop()
    with pytest.raises(RuntimeError, match="starts once"):
        await server.start()


async def test_a_wildcard_ipv6_listen_is_reachable_on_loopback(
    daemon: Daemon, registry: CollectorRegistry
) -> None:
    """Listening on [::]:0 binds all IPv6 addresses; url names [::1] so this host can reach it."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        server = daemon.server(registry, "[::]:0")
        await server.start()
    except OSError as exc:
        pytest.skip(f"cannot bind IPv6 here: {exc}")
    try:
        assert server.url == f"http://[::1]:{server.port}"
        async with httpx.AsyncClient() as client:
            assert (await client.get(server.url + "/healthz")).json() == {"ok": True}
    finally:
        await server.stop()


async def test_a_busy_port_fails_start_and_leaves_nothing_behind(
    server: TelemetryServer, daemon: Daemon, registry: CollectorRegistry
) -> None:
    """Starting on a port already taken raises OSError and leaves no half-started server."""
    second = daemon.server(registry, f"127.0.0.1:{server.port}")
    with pytest.raises(OSError, match=r"(?i)address already in use"):
        await second.start()
    with pytest.raises(RuntimeError, match="not started"):
        _ = second.port


async def test_metrics_are_the_registry_in_prometheus_text(
    registry: CollectorRegistry, http: httpx.AsyncClient
) -> None:
    """GET /metrics answers the registry's samples with Prometheus' text content type."""
    ticks = Counter("flywatch_ticks", "Ticks.", ["app"], registry=registry)
    ticks.labels(app="shop").inc(3)
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'flywatch_ticks_total{app="shop"} 3.0' in response.text


async def test_metrics_speak_openmetrics_when_asked(
    registry: CollectorRegistry, http: httpx.AsyncClient
) -> None:
    """A scraper that accepts OpenMetrics gets OpenMetrics, with its content type and # EOF."""
    Counter("flywatch_ticks", "Ticks.", registry=registry).inc()
    response = await http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")


async def test_metrics_can_be_restricted_by_name(
    registry: CollectorRegistry, http: httpx.AsyncClient
) -> None:
    """name[]=... limits /metrics to the named series, as prometheus_client's own handlers do."""
    Counter("flywatch_a", "A.", registry=registry).inc()
    Counter("flywatch_b", "B.", registry=registry).inc()
    text = (await http.get("/metrics", params={"name[]": "flywatch_a_total"})).text
    assert "flywatch_a_total" in text
    assert "flywatch_b_total" not in text


async def test_metrics_never_show_a_registered_secret(
    registry: CollectorRegistry, http: httpx.AsyncClient
) -> None:
    """A registered secret in a label value (a webhook URL, say) is cut out of /metrics."""
    Counter("flywatch_webhook_errors", "Errors.", ["target"], registry=registry).labels(target=WEBHOOK).inc()
    text = (await http.get("/metrics")).text
    assert WEBHOOK not in text
    assert f'target="{REDACTED}"' in text


@pytest.mark.parametrize(("alive", "code"), [(True, 200), (False, 503)])
async def test_healthz_follows_alive(daemon: Daemon, http: httpx.AsyncClient, alive: bool, code: int) -> None:
    """/healthz is 200 {"ok": true} while alive and 503 {"ok": false} when not."""
    daemon.alive = alive
    response = await http.get("/healthz")
    assert (response.status_code, response.json()) == (code, {"ok": alive})


async def test_healthz_is_503_when_the_check_itself_fails(
    daemon: Daemon, registry: CollectorRegistry
) -> None:
    """A liveness check that raises means not alive: 503, naming the failure but not its message."""

    def broken() -> bool:
        raise RuntimeError(SECRET)

    server = TelemetryServer(
        registry,
        "127.0.0.1:0",
        alive=broken,
        ready=lambda: (True, ""),
        status=dict,
        decisions=daemon.decisions,
    )
    async with server, httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"ok": False, "reason": "liveness check failed: RuntimeError"}


async def test_readyz_is_200_when_ready(daemon: Daemon, http: httpx.AsyncClient) -> None:
    """/readyz is 200 when ready."""
    response = await http.get("/readyz")
    assert (response.status_code, response.json()["ok"]) == (200, True)


async def test_readyz_is_503_with_the_reason_when_not_ready(daemon: Daemon, http: httpx.AsyncClient) -> None:
    """/readyz is 503 with the reason the daemon gives, redacted."""
    daemon.ready = (False, f"policy not loaded: 401 with {SECRET}")
    response = await http.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ok": False, "reason": f"policy not loaded: 401 with {REDACTED}"}


async def test_status_is_the_callables_dict_as_json(daemon: Daemon, http: httpx.AsyncClient) -> None:
    """/status answers status() as JSON, unchanged when it holds no secret."""
    daemon.status = {
        "version": "0.1.0",
        "ready": True,
        "apps": {"shop": {"regions": {"iad": {"desired": 3}}}},
    }
    response = await http.get("/status")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == daemon.status


async def test_status_never_shows_a_secret(daemon: Daemon, http: httpx.AsyncClient) -> None:
    """Secret-named keys and registered secrets in status() are redacted in the answer."""
    daemon.status = {"settings": {"fly_api_token": "anything", "webhook": WEBHOOK}, "note": f"t={SECRET}"}
    response = await http.get("/status")
    assert SECRET not in response.text
    assert WEBHOOK not in response.text
    assert response.json() == {
        "settings": {"fly_api_token": REDACTED, "webhook": REDACTED},
        "note": f"t={REDACTED}",
    }


async def test_a_failing_status_is_a_500_without_its_message(daemon: Daemon, http: httpx.AsyncClient) -> None:
    """status() raising answers 500 JSON naming the exception type; the message (maybe a secret) stays out."""
    daemon.failure = RuntimeError(f"store said {SECRET}")
    response = await http.get("/status")
    assert response.status_code == 500
    assert response.json() == {"error": "/status failed: RuntimeError"}


async def test_decisions_default_to_fifty_for_every_app(daemon: Daemon, http: httpx.AsyncClient) -> None:
    """/decisions without parameters asks for 50 decisions of every app and answers them as a JSON array."""
    daemon.records = [{"app": "shop", "action": "hold", "reason": f"x {SECRET}"}]
    response = await http.get("/decisions")
    assert response.status_code == 200
    assert response.json() == [{"app": "shop", "action": "hold", "reason": f"x {REDACTED}"}]
    assert daemon.calls == [(None, 50)]


@pytest.mark.parametrize(
    ("query", "call"),
    [("app=shop&limit=1", ("shop", 1)), ("limit=1000&app=", (None, 1000)), ("app=shop&limit=", ("shop", 50))],
)
async def test_decisions_pass_app_and_limit(
    daemon: Daemon, http: httpx.AsyncClient, query: str, call: tuple[str | None, int]
) -> None:
    """app and limit (1..1000) are handed to decisions(); an empty app means every app, an empty limit 50."""
    assert (await http.get(f"/decisions?{query}")).status_code == 200
    assert daemon.calls == [call]


@pytest.mark.parametrize("limit", ["0", "1001", "abc", "-1", "2.5", " 5", "²"])
async def test_a_bad_limit_is_a_400_naming_it(daemon: Daemon, http: httpx.AsyncClient, limit: str) -> None:
    """A limit that is not an integer from 1 to 1000 is a 400 JSON naming the parameter; nothing is read."""
    response = await http.get("/decisions", params={"limit": limit})
    assert response.status_code == 400
    body = response.json()
    assert body["param"] == "limit"
    assert body["value"] == limit
    assert "limit" in body["error"]
    assert daemon.calls == []


async def test_slow_decisions_are_a_504(daemon: Daemon, registry: CollectorRegistry) -> None:
    """A decision store that does not answer within call_timeout gives 504, not a hung request."""
    daemon.delay = 5.0
    async with (
        daemon.server(registry, call_timeout=0.05) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        response = await client.get("/decisions")
    assert response.status_code == 504
    assert "not read within" in response.json()["error"]


@pytest.mark.parametrize("path", ["/", "/nope", "/metrics/extra", "/status.json"])
async def test_unknown_paths_are_a_json_404(http: httpx.AsyncClient, path: str) -> None:
    """A path the server does not serve is a 404 with a JSON body."""
    response = await http.get(path)
    assert response.status_code == 404
    assert response.json() == {"error": "not found", "path": path}


async def test_another_method_is_a_json_405(http: httpx.AsyncClient) -> None:
    """POST on a known path is a 405 with a JSON body and the Allow header."""
    response = await http.post("/status")
    assert response.status_code == 405
    assert response.json()["error"] == "method not allowed"
    assert "GET" in response.headers["allow"]


async def test_stop_lets_a_request_in_flight_finish(daemon: Daemon, registry: CollectorRegistry) -> None:
    """stop() waits for a request already being served (within the shutdown timeout), then closes."""
    daemon.delay = 0.1
    daemon.records = [{"app": "shop"}]
    server = daemon.server(registry, shutdown_timeout=2.0)
    await server.start()
    async with httpx.AsyncClient(base_url=server.url) as client:
        request = asyncio.create_task(client.get("/decisions"))
        await daemon.asked.wait()
        await server.stop()
        response = await request
    assert response.json() == [{"app": "shop"}]


async def test_stop_cuts_a_stuck_request_after_the_shutdown_timeout(
    daemon: Daemon, registry: CollectorRegistry
) -> None:
    """A request that would never end does not hold stop() past the shutdown timeout."""
    daemon.delay = 60.0
    server = daemon.server(registry, shutdown_timeout=0.1, call_timeout=60.0)
    await server.start()
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=server.url) as client:
        request = asyncio.create_task(client.get("/decisions"))
        await daemon.asked.wait()
        started = loop.time()
        await server.stop()
        assert loop.time() - started < 2.0
        with pytest.raises(httpx.HTTPError):
            await request


MACAROON = SECRET.removeprefix("FlyV1 ")  # the part after the scheme: a bearer of it may roll back too


@dataclass
class Releases:
    """The release watch's callables the server is handed, as plain state a test can change."""

    events: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str | None, int]] = field(default_factory=list)
    asked: list[tuple[str, int | None, str]] = field(default_factory=list)
    failure: Exception | None = None
    answer: dict[str, Any] = field(default_factory=dict)

    async def history(self, app: str | None, limit: int) -> list[dict[str, Any]]:
        self.calls.append((app, limit))
        return self.events[:limit]

    async def rollback(self, app: str, to: int | None, by: str) -> dict[str, Any]:
        self.asked.append((app, to, by))
        if self.failure is not None:
            raise self.failure
        return {"to": to, "at": 1790000100.0, "by": by, **self.answer}


@pytest.fixture
def releases() -> Releases:
    return Releases()


@pytest.fixture
async def release_http(
    daemon: Daemon, releases: Releases, registry: CollectorRegistry
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a server with a release watch, authorizing as the daemon does with its Fly token."""
    authorize = FlywatchDaemon(Settings(FLY_API_TOKEN=SECRET))._authorize  # type: ignore[call-arg]
    server = daemon.server(
        registry, releases=releases.history, rollback=releases.rollback, authorize=authorize
    )
    async with server, httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
        yield client


async def test_release_events_default_to_fifty_for_every_app(
    releases: Releases, release_http: httpx.AsyncClient
) -> None:
    """/releases without parameters asks for 50 events of every app and answers them, redacted."""
    releases.events = [{"app": "shop", "kind": "rollback_failed", "summary": f"401 with {SECRET}"}]
    response = await release_http.get("/releases")
    assert response.status_code == 200
    assert response.json() == [{"app": "shop", "kind": "rollback_failed", "summary": f"401 with {REDACTED}"}]
    assert releases.calls == [(None, 50)]


@pytest.mark.parametrize(
    ("query", "answer"), [("app=shop&limit=2", (200, ("shop", 2))), ("limit=0", (400, None))]
)
async def test_release_events_take_app_and_limit_like_decisions(
    releases: Releases, release_http: httpx.AsyncClient, query: str, answer: tuple[int, Any]
) -> None:
    """/releases hands app and limit on as /decisions does, and refuses a limit outside 1..1000 with a 400."""
    code, call = answer
    assert (await release_http.get(f"/releases?{query}")).status_code == code
    assert releases.calls == ([call] if call else [])


async def test_without_a_release_watch_the_release_routes_are_404(http: httpx.AsyncClient) -> None:
    """A server handed no release watch answers its two routes with a JSON 404 saying so."""
    history = await http.get("/releases")
    assert (history.status_code, history.json()) == (404, {"error": "no release watch"})
    rollback = await http.post("/releases/shop/rollback", json={}, headers={"Authorization": SECRET})
    assert rollback.status_code == 404
    assert "not served here" in rollback.json()["error"]


@pytest.mark.parametrize(
    ("authorization", "body", "asked"),
    [
        (SECRET, {"to": 41}, ("shop", 41, "cli")),  # a macaroon as is, as Fly's clients send it
        (f"Bearer {MACAROON}", {}, ("shop", None, "cli")),
        (
            f"bearer {MACAROON}",
            {"to": None, "by": "alice@laptop via cli"},
            ("shop", None, "alice@laptop via cli"),
        ),
        (SECRET, None, ("shop", None, "cli")),  # no body at all: the newest known-good release
        (SECRET, {"to": 7, "by": "x" * 300}, ("shop", 7, "x" * 100)),  # who asked is cut to 100 characters
    ],
)
async def test_a_rollback_with_the_daemons_token_is_recorded(
    releases: Releases,
    release_http: httpx.AsyncClient,
    authorization: str,
    body: dict[str, Any] | None,
    asked: tuple[str, int | None, str],
) -> None:
    """With the daemon's token the request is handed on (app, to, who asked) and answered 202 with it."""
    headers = {"Authorization": authorization}
    if body is None:
        response = await release_http.post("/releases/shop/rollback", headers=headers)
    else:
        response = await release_http.post("/releases/shop/rollback", json=body, headers=headers)
    assert response.status_code == 202
    assert releases.asked == [asked]
    assert response.json() == {
        "ok": True,
        "app": "shop",
        "request": {"to": asked[1], "at": 1790000100.0, "by": asked[2]},
    }


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {MACAROON}x"},
        {"Authorization": f"Bearer {MACAROON[:-1]}"},
        {"Authorization": f"Basic {MACAROON}"},
        {"Authorization": MACAROON},
        {"X-Fly-Token": SECRET},
    ],
)
async def test_a_rollback_without_the_daemons_token_is_a_401(
    releases: Releases, release_http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """Without the daemon's own token, or with another, the answer is 401 and nothing is recorded."""
    response = await release_http.post("/releases/shop/rollback", json={"to": 41}, headers=headers)
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["error"]
    assert releases.asked == []
    assert MACAROON not in response.text


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"{", "must be JSON"),
        (b"to=41", "must be JSON"),
        (b'{"to": "41"}', "'41'"),
        (b'{"to": 0}', "0"),
        (b'{"to": -3}', "-3"),
        (b'{"to": true}', "True"),
        (b'{"to": 41.5}', "41.5"),
        (b'{"to": [41]}', "[41]"),
    ],
)
async def test_a_bad_rollback_body_is_a_400_and_nothing_is_recorded(
    releases: Releases, release_http: httpx.AsyncClient, content: bytes, named: str
) -> None:
    """A body that is not JSON, or a `to` that is not a positive integer, is a 400 saying what is wrong."""
    response = await release_http.post(
        "/releases/shop/rollback",
        content=content,
        headers={"Authorization": SECRET, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert named in response.json()["error"]
    assert releases.asked == []


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (LookupError("blog is not an app of the policy"), 404),
        (ValueError("a rollback of shop is already under way"), 409),
    ],
)
async def test_a_rollback_that_cannot_be_taken_says_why(
    releases: Releases, release_http: httpx.AsyncClient, failure: Exception, code: int
) -> None:
    """An app not in the policy is a 404 and a request that cannot be taken a 409, each with the reason."""
    releases.failure = failure
    response = await release_http.post("/releases/shop/rollback", json={}, headers={"Authorization": SECRET})
    assert (response.status_code, response.json()) == (code, {"error": str(failure)})


async def test_a_slow_rollback_request_is_a_504(daemon: Daemon, registry: CollectorRegistry) -> None:
    """A rollback request the store does not record within call_timeout is a 504, not a hung request."""

    async def stuck(app: str, to: int | None, by: str) -> dict[str, Any]:
        await asyncio.sleep(5.0)
        return {}

    server = daemon.server(
        registry, rollback=stuck, authorize=lambda header: header == "Bearer ok", call_timeout=0.05
    )
    async with server, httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post(
            "/releases/shop/rollback", json={}, headers={"Authorization": "Bearer ok"}
        )
    assert response.status_code == 504
    assert "not recorded within" in response.json()["error"]


@pytest.mark.parametrize("outcome", ["recorded", "refused", "not found"])
async def test_a_rollback_answer_never_shows_the_token(
    releases: Releases, release_http: httpx.AsyncClient, outcome: str
) -> None:
    """Whatever the rollback callable answers or raises with the token in it, the answer is redacted."""
    releases.answer = {"note": f"sent {SECRET}"}
    releases.failure = {"recorded": None, "refused": ValueError(SECRET), "not found": KeyError(SECRET)}[
        outcome
    ]
    response = await release_http.post(
        "/releases/shop/rollback", json={"by": SECRET}, headers={"Authorization": SECRET}
    )
    assert response.status_code in {202, 404, 409}
    assert SECRET not in response.text
    assert REDACTED in response.text


async def test_the_rollback_route_takes_only_post(release_http: httpx.AsyncClient) -> None:
    """GET on the rollback route is a JSON 405 naming POST."""
    response = await release_http.get("/releases/shop/rollback")
    assert response.status_code == 405
    assert "POST" in response.headers["allow"]


async def test_the_wildcard_address_answers_over_ipv4_and_ipv6() -> None:
    """[::] listens on both families (asyncio alone makes it IPv6-only): Fly's checks and its metrics
    scrape may come over either."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")

    async def no_decisions(app: str | None, limit: int) -> list[dict[str, Any]]:
        return []

    server = TelemetryServer(
        CollectorRegistry(),
        "[::]:0",
        alive=lambda: True,
        ready=lambda: (True, ""),
        status=dict,
        decisions=no_decisions,
    )
    async with server, httpx.AsyncClient(timeout=5.0) as client:
        for host in ("127.0.0.1", "[::1]"):
            response = await client.get(f"http://{host}:{server.port}/healthz")
            assert response.status_code == 200, host
