"""The `flywatch` command line: `flywatch sim` as a real process, its scenario files and its arguments."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon import __version__
from daemon.cli import main

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
