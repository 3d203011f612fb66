"""The `flywatch` command line: `flywatch sim` as a real process, its scenario files and its arguments, and
the commands that talk to a running daemon (`releases`, `rollback`) against real HTTP servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from daemon import __version__
from daemon.app import Daemon
from daemon.cli import _private, main
from daemon.settings import Settings
from daemon.telemetry.server import TelemetryServer

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Bearer sim-token"}
STARTUP = 20.0  # seconds a simulator process may take to answer its health check
STOP = 10.0  # seconds it may take to exit after SIGTERM


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def flywatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_flywatch(*args: str, timeout: float = STARTUP) -> subprocess.CompletedProcess[str]:
    """Run flywatch to completion (it is expected to exit by itself)."""
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        flywatch(*args),
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def poll(probe: Any, *, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> Any:
    """Call `probe` until it returns a truthy value; fail after `timeout` seconds or if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"flywatch exited with {proc.returncode} while waiting for {what}:\n{out}\n{err}")
        try:
            result = probe()
        except httpx.TransportError:
            result = None
        if result:
            return result
        time.sleep(0.05)  # a polling interval under a deadline, not a wait for an outcome
    pytest.fail(f"{what} not reached within {timeout}s")


@contextmanager
def running_sim(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`flywatch sim` on a free port, healthy and with its scenario loaded; killed whatever happens."""
    port = free_port()
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        flywatch("sim", "--port", str(port), *args),
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=2.0) as client:

            def healthy() -> bool:
                response = client.get(f"{base}/_sim/health")
                return response.status_code == 200 and response.json()["ok"] is True

            poll(healthy, timeout=STARTUP, what="the simulator's health check", proc=proc)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=STOP)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """SIGTERM the process; its exit code and output, which must come within STOP seconds."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=STOP)
    return proc.returncode, out, err


def test_sim_serves_the_default_scenario_and_stops_on_sigterm() -> None:
    """`flywatch sim` serves the embedded `shop` app over the API and its machines, and exits 0 on SIGTERM."""
    with running_sim() as (proc, base), httpx.Client(base_url=base, timeout=5.0) as client:

        def shop_machines() -> list[dict[str, Any]] | None:
            response = client.get("/v1/apps/shop/machines", headers=AUTH)
            return response.json() if response.status_code == 200 else None

        machines = poll(shop_machines, timeout=STARTUP, what="shop's machines", proc=proc)
        assert len(machines) == 5
        assert sorted(m["region"] for m in machines) == ["cdg", "iad", "iad", "nrt", "nrt"]
        assert client.get("/v1/apps/shop/machines").status_code == 401
        started = next(m for m in machines if m["state"] == "started")
        check = started["config"]["checks"]["health"]
        health_url = f"http://{started['private_ip']}:{check['port']}{check['path']}"
        with httpx.Client(timeout=2.0) as machine_client:
            answer = poll(
                lambda: (r := machine_client.get(health_url)).status_code == 200 and r,
                timeout=STARTUP,
                what=f"{health_url} answering 200",
                proc=proc,
            )
        assert answer.status_code == 200
        began = time.monotonic()
        code, out, err = stop(proc)
    assert code == 0, err
    assert time.monotonic() - began < STOP
    assert "serving embedded default scenario" in out
    assert "app shop:" in out
    assert started["id"] in out
    assert f"{base}/v1" in out
    assert "Bearer sim-token" in out
    assert "stopping" in out
    assert "Traceback" not in err


def test_sigterm_is_not_held_up_by_a_request_that_never_answers() -> None:
    """SIGTERM ends `flywatch sim` promptly with exit 0 even while a timeout fault holds a request open."""
    with running_sim() as (proc, base), httpx.Client(base_url=base, timeout=5.0) as client:
        fault = client.post("/_sim/faults", json={"endpoint": "Machines_list", "timeout": True})
        assert fault.status_code == 201
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as hanging:
            hanging.sendall(
                b"GET /v1/apps/shop/machines HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer sim-token\r\n\r\n"
            )

            def held() -> bool:
                counters = client.get("/_sim/counters").json()
                return bool(counters["faults_injected"].get("Machines_list") == 1)

            poll(held, timeout=STARTUP, what="the request to be held by the fault", proc=proc)
            began = time.monotonic()
            code, _, err = stop(proc)
            assert code == 0, err
            assert time.monotonic() - began < 5.0
            try:
                tail = hanging.recv(1024)
            except ConnectionResetError:
                tail = b""
            assert tail == b""  # the held request was dropped, never answered


SCENARIO = """\
settings:
  transition_delay: 0.05
  rate_limits: false
  tokens:
    blog-token: writer@tokens.fly.io
apps:
  - name: blog
    regions:
      ams: 2
      syd: {started: 1, stopped: 1}
    load: {ams: 10}
images:
  - image: registry.fly.io/blog:broken
    mode: crash
"""


def test_sim_builds_a_custom_scenario_file(tmp_path: Path) -> None:
    """`--scenario FILE` builds that world: its apps, machines, load, images and tokens."""
    path = tmp_path / "world.yaml"
    path.write_text(SCENARIO)
    with (
        running_sim("--scenario", str(path)) as (proc, base),
        httpx.Client(base_url=base, timeout=5.0) as client,
    ):

        def blog() -> dict[str, Any] | None:
            response = client.get("/_sim/apps/blog")
            return response.json() if response.status_code == 200 else None

        app = poll(blog, timeout=STARTUP, what="the blog app", proc=proc)
        assert [a["name"] for a in client.get("/_sim/apps").json()] == ["blog"]
        assert sorted((m["region"], m["state"]) for m in app["machines"]) == [
            ("ams", "started"),
            ("ams", "started"),
            ("syd", "started"),
            ("syd", "stopped"),
        ]
        assert app["load"] == {"ams": 10.0}
        assert client.get("/_sim/images").json()["registry.fly.io/blog:broken"]["crash"] is True
        machines = client.get("/v1/apps/blog/machines", headers={"Authorization": "Bearer blog-token"})
        assert machines.status_code == 200
        assert len(machines.json()) == 4
        assert client.get("/v1/apps/blog/machines", headers=AUTH).status_code == 401  # tokens were replaced
        assert client.get("/v1/apps/shop", headers={"Authorization": "Bearer blog-token"}).status_code == 404
        code, out, _ = stop(proc)
    assert code == 0
    assert f"serving {path}" in out


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("apps: []\nplanets: [mars]\n", "planets"),
        ("settings:\n  warp_speed: 9\n", "warp_speed"),
        ("apps: [\n  - name: blog\n", "not valid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("settings: fast\n", "settings must be a mapping"),
    ],
)
def test_sim_rejects_a_bad_scenario_file(tmp_path: Path, text: str, named: str) -> None:
    """A scenario with an unknown key, invalid YAML or the wrong shape exits 2 naming the file and problem."""
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    result = run_flywatch("sim", "--port", str(free_port()), "--scenario", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_sim_rejects_a_missing_scenario_file(tmp_path: Path) -> None:
    """A scenario file that does not exist exits 2 with a message naming it."""
    path = tmp_path / "nowhere.yaml"
    result = run_flywatch("sim", "--port", str(free_port()), "--scenario", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_sim_rejects_a_scenario_whose_app_cannot_be_built(tmp_path: Path) -> None:
    """An app the simulator cannot build (an unknown region) exits 2 naming the file and the app's index."""
    path = tmp_path / "moon.yaml"
    path.write_text("apps:\n  - name: blog\n    regions: {moon: 1}\n")
    result = run_flywatch("sim", "--port", str(free_port()), "--scenario", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "apps[0]" in result.stderr
    assert "moon" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["sim", "--delay", "-1"], "--delay"),
        (["sim", "--delay", "soon"], "--delay"),
        (["sim", "--port", "abc"], "--port"),
        (["sim", "--port", "70000"], "--port"),
        (["sim", "--seed", "x"], "--seed"),
        (["sim", "--colour"], "--colour"),
        (["launch"], "launch"),
        ([], "required"),
        (["rollback"], "app"),
        (["rollback", "shop", "--to", "0"], "--to"),
        (["rollback", "shop", "--to", "latest"], "--to"),
        (["releases"], "app"),
        (["releases", "shop", "--limit", "0"], "--limit"),
        (["releases", "shop", "--limit", "1001"], "--limit"),
    ],
)
def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], named: str) -> None:
    """argparse rejects bad or missing arguments with exit code 2 and a message naming the problem."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert named in err
    assert "usage: flywatch" in err


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("FLYWATCH_TAKEOVER", "1", "greater than or equal to 2"),
        ("FLYWATCH_TAKEOVER", "soon", "valid number"),
        ("FLYWATCH_DRY_RUN", "perhaps", "valid boolean"),
    ],
)
def test_a_bad_setting_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str, says: str
) -> None:
    """A setting from the environment that is not valid: exit 2, one line naming the variable and what is
    wrong, no traceback and not the value (a setting may be a URL with a password)."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        main(["run"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"flywatch: {variable}: " in err
    assert says in err
    assert "Traceback" not in err


def _run_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`flywatch run` with the demo's policy (a copy in tmp_path) and a telemetry port of its own."""
    policy = tmp_path / "flywatch.yaml"
    policy.write_text(Path("config/demo.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setenv("FLYWATCH_CONFIG", str(policy))
    monkeypatch.setenv("FLYWATCH_LISTEN", "127.0.0.1:0")


def test_a_state_store_that_cannot_be_opened_exits_1_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _run_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("FLYWATCH_STATE_URL", "postgresql://flywatch:hunter2-pw@127.0.0.1:1/state")
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert "flywatch run: PostgreSQL store postgresql://flywatch:***@127.0.0.1:1/state: cannot open" in err
    assert "hunter2" not in err


def test_an_instance_meant_for_a_cluster_refuses_to_start_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """FLYWATCH_CLUSTER=true on a SQLite state (a forgotten secret): exit 1 before acting on anything."""
    _run_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("FLYWATCH_STATE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    monkeypatch.setenv("FLYWATCH_CLUSTER", "true")
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert "flywatch run: FLYWATCH_CLUSTER is set" in err
    assert "set FLYWATCH_STATE_URL to the PostgreSQL they share" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`flywatch --version` prints the package version and exits 0."""
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"flywatch {__version__}"


def test_module_entry_point() -> None:
    """`python -m daemon` is flywatch: --version works and no command exits 2 with usage."""
    version = run_flywatch("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"flywatch {__version__}"
    bare = run_flywatch()
    assert bare.returncode == 2
    assert "usage: flywatch" in bare.stderr


def test_the_example_scenario_in_config_builds() -> None:
    """config/sim-scenario.example.yaml, which documents every key, is a valid scenario."""
    import asyncio  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from daemon.sim.server import SimServer, read_scenario, settings_from  # noqa: PLC0415

    path = Path(__file__).resolve().parents[1] / "config" / "sim-scenario.example.yaml"
    scenario, source = read_scenario(path)
    settings = settings_from(scenario, source)
    assert settings.tokens["deployer-token"] == "deploy@tokens.fly.io"

    async def build() -> dict[str, int]:
        async with SimServer(settings) as sim:
            await sim.load_scenario(scenario, source)
            return {name: len(app.machines) for name, app in sim.platform.apps.items()}

    assert asyncio.run(build()) == {"shop": 7, "api": 4}


# ---------------------------------------------------------------- talking to a running daemon

T0 = 1790000000.0  # 2026-09-21T14:13:20Z
DAEMON_TOKEN = "fo1_cli-test-token-5e2b"


def daemon_status() -> dict[str, Any]:
    """What `flywatch run` answers on /status, cut down to what the release commands read."""
    return {
        "version": __version__,
        "dry_run": False,
        "ready": True,
        "policy": {"path": "config/flywatch.yaml", "loaded_at": T0, "apps": ["shop"], "last_error": ""},
        "apps": {"shop": {"last_tick": T0, "regions": {}}},
        "releases": {
            "shop": {
                "watched": {
                    "version": 42,
                    "id": "01JREL42",
                    "image": "registry.fly.io/shop:v42",
                    "verdict": "failing",
                    "reason": "error rate 12% against 1% for v41",
                    "numbers": {"error_rate": 0.12},
                    "first_seen": T0,
                    "rollout_done_at": T0 + 60,
                    "after_rollback": False,
                },
                "good": {
                    "version": 41,
                    "id": "01JREL41",
                    "image": "registry.fly.io/shop:v41",
                    "verdict": "healthy",
                },
                "rollback": {
                    "from": {"version": 42, "id": "01JREL42", "image": "registry.fly.io/shop:v42"},
                    "to": {"version": 41, "id": "01JREL41", "image": "registry.fly.io/shop:v41"},
                    "state": "running",
                    "by": "manual",
                    "reason": "asked for by hand (alice@laptop via cli)",
                    "updated": ["m1"],
                    "destroyed": [],
                    "in_flight": ["m2"],
                    "skipped": {},
                    "failed": {},
                    "note": "",
                    "started_at": T0 + 100,
                    "finished_at": None,
                },
                "halted": "",
                "bad": [42],
            }
        },
    }


@dataclass
class FakeDaemon:
    """The HTTP routes of `flywatch run` that the release commands use, answering from plain state."""

    status: dict[str, Any] = field(default_factory=daemon_status)
    events: list[dict[str, Any]] = field(default_factory=list)
    token: str = DAEMON_TOKEN
    forced: tuple[int, Any] | None = None  # the rollback's answer, whatever is asked
    queries: list[dict[str, str]] = field(default_factory=list)
    asked: list[tuple[str, str, Any]] = field(default_factory=list)  # (app, Authorization, body)
    url: str = ""

    async def status_page(self, _request: web.Request) -> web.Response:
        return web.json_response(self.status)

    async def releases_page(self, request: web.Request) -> web.Response:
        self.queries.append(dict(request.query))
        return web.json_response(self.events[: int(request.query.get("limit", "50"))])

    async def rollback_page(self, request: web.Request) -> web.Response:
        app = request.match_info["app"]
        body = await request.json() if request.can_read_body else None
        authorization = request.headers.get("Authorization", "")
        self.asked.append((app, authorization, body))
        if self.forced is not None:
            return web.json_response(self.forced[1], status=self.forced[0])
        expected = self.token if self.token.startswith("FlyV1 ") else f"Bearer {self.token}"
        if authorization != expected:
            return web.json_response({"error": "a rollback needs the daemon's Fly token"}, status=401)
        if app not in self.status["releases"]:
            return web.json_response({"error": f"{app} is not an app of the policy"}, status=404)
        request_record = {"to": body.get("to"), "at": T0 + 200, "by": body.get("by", "cli")}
        return web.json_response({"ok": True, "app": app, "request": request_record}, status=202)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """`app` on a free loopback port; its base URL."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
def daemon_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """The daemon's token in the environment, and no stray setting (nor a .env file) from elsewhere."""
    monkeypatch.chdir(tmp_path)
    for name in ("FLY_API_TOKEN", "FLYWATCH_FLY_API_TOKEN", "FLYWATCH_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLY_API_TOKEN", DAEMON_TOKEN)
    return monkeypatch


@pytest.fixture
async def fake(daemon_env: pytest.MonkeyPatch) -> AsyncIterator[FakeDaemon]:
    """A stand-in daemon on a free loopback port."""
    daemon = FakeDaemon()
    app = web.Application()
    app.add_routes(
        [
            web.get("/status", daemon.status_page),
            web.get("/releases", daemon.releases_page),
            web.post("/releases/{app}/rollback", daemon.rollback_page),
        ]
    )
    async with serving(app) as url:
        daemon.url = url
        yield daemon


async def cli_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`flywatch ARGS` in this process, off the event loop (the daemon it talks to lives on it)."""
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def release_event(at: float, kind: str, summary: str, app: str = "shop") -> dict[str, Any]:
    release = {"version": 42, "id": "01JREL42", "image": "registry.fly.io/shop:v42"}
    return {
        "at": at,
        "app": app,
        "kind": kind,
        "summary": summary,
        "release": release,
        "numbers": {},
        "details": {},
    }


async def test_releases_shows_the_release_state_then_the_history(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """`flywatch releases APP` shows the watched and known-good releases and the rollback, then history."""
    fake.events = [
        release_event(T0 + 100, "rollback_started", "rolling v42 back to v41 (registry.fly.io/shop:v41)"),
        release_event(T0 + 90, "rollback_requested", "rollback of v42 asked for by hand"),
        release_event(T0, "release_seen", "release v42 (registry.fly.io/shop:v42) seen"),
    ]
    code, out, err = await cli_main(capsys, "releases", "shop", "--limit", "5", "--url", fake.url + "/")
    assert (code, err) == (0, "")
    assert fake.queries == [{"app": "shop", "limit": "5"}]
    lines = out.splitlines()
    assert lines[:2] == [
        "shop  release watch",
        "  watched     v42  registry.fly.io/shop:v42  id 01JREL42  verdict failing",
    ]
    assert "    reason: error rate 12% against 1% for v41" in lines
    assert "  known good  v41  registry.fly.io/shop:v41  id 01JREL41  verdict healthy" in lines
    assert "  rollback    v42 -> v41 (registry.fly.io/shop:v41)  running  by manual" in lines
    assert "    updated: m1" in lines
    assert "    in flight: m2" in lines
    history = lines[lines.index("release history, newest first:") + 2 :]
    assert [line.split()[:3] for line in history] == [
        ["2026-09-21T14:15:00Z", "rollback_started", "v42"],
        ["2026-09-21T14:14:50Z", "rollback_requested", "v42"],
        ["2026-09-21T14:13:20Z", "release_seen", "v42"],
    ]


async def test_releases_finds_the_daemon_from_flywatch_listen(
    fake: FakeDaemon, daemon_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --url the daemon is found where FLYWATCH_LISTEN says it listens; --limit defaults to 20."""
    daemon_env.setenv("FLYWATCH_LISTEN", "0.0.0.0:" + fake.url.rsplit(":", 1)[1])
    code, out, _ = await cli_main(capsys, "releases", "shop")
    assert code == 0
    assert out.splitlines()[-1] == "no release events recorded"
    assert fake.queries == [{"app": "shop", "limit": "20"}]


async def test_releases_of_an_unreachable_daemon_names_its_url(
    daemon_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When nothing answers at the URL, `flywatch releases` exits 1 naming it, without a traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await cli_main(capsys, "releases", "shop", "--url", url)
    assert (code, out) == (1, "")
    assert f"flywatch releases: cannot read {url}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "body", "target"),
    [
        (["--to", "41"], {"to": 41}, "to v41"),
        (["--to", "v41"], {"to": 41}, "to v41"),
        ([], {}, "to the newest known-good release older than the one running"),
    ],
)
async def test_rollback_posts_the_request_with_the_daemons_token(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], args: list[str], body: dict[str, Any], target: str
) -> None:
    """`rollback APP` POSTs target and asker, the token as bearer; it says what comes next, not the token."""
    code, out, err = await cli_main(capsys, "rollback", "shop", *args, "--url", fake.url)
    assert (code, err) == (0, "")
    ((app, authorization, sent),) = fake.asked
    assert (app, authorization) == ("shop", f"Bearer {DAEMON_TOKEN}")
    assert {k: v for k, v in sent.items() if k != "by"} == body
    assert sent["by"]  # who asked, for the reason and the history
    assert out.splitlines() == [
        f"rollback of shop recorded: {target} (asked by {sent['by']} at 2026-09-21T14:16:40Z)",
        "the daemon's next tick of shop carries it out, or refuses it saying why;",
        "`flywatch releases shop` shows its progress",
    ]
    assert DAEMON_TOKEN not in out + err


async def test_rollback_sends_a_macaroon_as_it_is(
    fake: FakeDaemon, daemon_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `FlyV1 ...` token goes as the Authorization header as it is, as the daemon itself sends it to Fly."""
    fake.token = "FlyV1 fm2_cli-test,fm2_second"
    daemon_env.setenv("FLY_API_TOKEN", f"  {fake.token}\n")
    code, out, _ = await cli_main(capsys, "rollback", "shop", "--url", fake.url)
    assert code == 0
    assert fake.asked[0][1] == fake.token
    assert "fm2_" not in out


@pytest.mark.parametrize(
    ("forced", "shown"),
    [
        ((400, {"error": "to must be a release version (a positive integer), got '41'"}), "400: to must be"),
        ((404, {"error": "blog is not an app of the policy"}), "404: blog is not an app of the policy"),
        (
            (409, {"error": "a rollback of shop is already under way"}),
            "409: a rollback of shop is already under",
        ),
        (
            (401, {"error": "a rollback needs the daemon's Fly token"}),
            "(FLY_API_TOKEN here must be the daemon's own)",
        ),
        ((500, "not an object"), "500: Internal Server Error"),
        ((409, {"error": f"echoed {DAEMON_TOKEN}"}), "409: echoed [redacted]"),
    ],
)
async def test_rollback_refused_prints_the_daemons_error_and_exits_1(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], forced: tuple[int, Any], shown: str
) -> None:
    """A refused request exits 1 with the daemon's status and error on stderr, never the token."""
    fake.forced = forced
    code, out, err = await cli_main(capsys, "rollback", "shop", "--to", "41", "--url", fake.url)
    assert (code, out) == (1, "")
    assert err.startswith(f"flywatch rollback: {fake.url} answered {forced[0]}")
    assert shown in err
    assert DAEMON_TOKEN not in err


async def test_rollback_with_another_token_or_app_is_refused(
    fake: FakeDaemon, daemon_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token that is not the daemon's gets its 401, an app it does not watch its 404: both exit 1."""
    code, _, err = await cli_main(capsys, "rollback", "blog", "--url", fake.url)
    assert (code, "404: blog is not an app of the policy" in err) == (1, True)
    daemon_env.setenv("FLY_API_TOKEN", "someone-elses")
    code, _, err = await cli_main(capsys, "rollback", "shop", "--url", fake.url)
    assert (code, "401: a rollback needs the daemon's Fly token" in err) == (1, True)
    assert "someone-elses" not in err


@pytest.mark.parametrize("token", [None, "", "   "])
async def test_rollback_without_a_token_exits_2_and_sends_nothing(
    fake: FakeDaemon, daemon_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], token: str | None
) -> None:
    """Without FLY_API_TOKEN (or with a blank one) the command says so and exits 2 before any request."""
    if token is None:
        daemon_env.delenv("FLY_API_TOKEN")
    else:
        daemon_env.setenv("FLY_API_TOKEN", token)
    code, out, err = await cli_main(capsys, "rollback", "shop", "--url", fake.url)
    assert (code, out) == (2, "")
    assert "FLY_API_TOKEN is not set" in err
    assert fake.asked == []


async def test_rollback_with_a_token_no_header_can_carry_exits_2_without_showing_it(
    fake: FakeDaemon, daemon_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token with a control character inside is refused before any request, and not echoed."""
    daemon_env.setenv("FLY_API_TOKEN", "first-half\nsecond-half")
    code, _, err = await cli_main(capsys, "rollback", "shop", "--url", fake.url)
    assert code == 2
    assert "control character" in err
    assert "half" not in err
    assert fake.asked == []


async def test_rollback_to_an_unreachable_daemon_names_its_url(
    daemon_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When nothing answers at the URL, `flywatch rollback` exits 1 naming it, without a traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await cli_main(capsys, "rollback", "shop", "--url", url)
    assert (code, out) == (1, "")
    assert f"flywatch rollback: cannot reach {url}" in err
    assert "Traceback" not in err
    assert DAEMON_TOKEN not in err


@pytest.mark.parametrize("token", ["fo1_plain-token", "FlyV1 fm2_macaroon,fm2_another"])
async def test_rollback_is_accepted_by_the_real_daemon_server(
    daemon_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], token: str
) -> None:
    """The daemon's own server and authorization accept the CLI's header, for both kinds of token."""
    daemon_env.setenv("FLY_API_TOKEN", token)
    asked: list[tuple[str, int | None, str]] = []

    async def rollback(app: str, to: int | None, by: str) -> dict[str, Any]:
        asked.append((app, to, by))
        return {"to": to, "at": T0, "by": by}

    async def no_records(app: str | None, limit: int) -> list[dict[str, Any]]:
        return []

    daemon = Daemon(Settings(FLY_API_TOKEN=token))  # type: ignore[call-arg]
    server = TelemetryServer(
        CollectorRegistry(),
        "127.0.0.1:0",
        alive=lambda: True,
        ready=lambda: (True, ""),
        status=daemon_status,
        decisions=no_records,
        releases=no_records,
        rollback=rollback,
        authorize=daemon._authorize,
    )
    async with server:
        code, out, err = await cli_main(capsys, "rollback", "shop", "--to", "41", "--url", server.url)
        assert (code, err) == (0, ""), err
        assert asked == [("shop", 41, asked[0][2])]
        assert "rollback of shop recorded: to v41" in out
        daemon_env.setenv("FLY_API_TOKEN", token + "x")
        code, _, err = await cli_main(capsys, "rollback", "shop", "--url", server.url)
        assert code == 1
        assert "answered 401" in err
    assert len(asked) == 1


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:9091", True),
        ("http://[::1]:9091", True),
        ("http://localhost:9091", True),
        ("http://[fdaa:0:1:a7b:1::2]:9091", True),
        ("http://flywatch.internal:9091", True),
        ("https://flywatch.example.com", True),
        ("http://flywatch.example.com:9091", False),
        ("http://10.0.0.5:9091", False),
    ],
)
def test_rollback_sends_the_token_only_where_it_is_safe(url: str, allowed: bool) -> None:
    """The Fly token goes in clear only to loopback or Fly's private network; elsewhere only over TLS."""
    assert _private(url) is allowed


def test_rollback_refuses_plain_http_to_a_public_host(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`flywatch rollback --url http://public` exits 2 before sending anything, naming why."""
    monkeypatch.setenv("FLY_API_TOKEN", "sim-token")
    assert main(["rollback", "shop", "--url", "http://flywatch.example.com:9091"]) == 2
    err = capsys.readouterr().err
    assert "refusing to send the Fly token over plain HTTP" in err
    assert "sim-token" not in err
