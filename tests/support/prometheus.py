"""A real Prometheus server (Debian's `prometheus`) on a free loopback port, scraping the simulator's fleet.

Targets come from a file_sd JSON file that `retarget()` rewrites as machines come and go; Prometheus picks
the change up at once. Each target carries the labels Fly's own Prometheus puts on app metrics:
app, region and instance (the machine id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from daemon.sim.server import SimServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.targets = workdir / "targets.json"
        self.url = f"http://127.0.0.1:{port}"

    def retarget(self, sim: SimServer) -> int:
        """Point Prometheus at every started machine of every app; returns how many."""
        groups = [
            {
                "targets": [f"{m.private_ip}:{m.internal_port()}"],
                "labels": {"app": app.name, "region": m.region, "instance": m.id},
            }
            for app in sim.platform.apps.values()
            for m in app.machines.values()
            if m.state == "started"
        ]
        tmp = self.targets.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.targets)  # atomic: Prometheus never reads half a file
        return len(groups)

    async def wait_for_targets(self, count: int, timeout: float = 20.0) -> None:
        """Until Prometheus has scraped `count` targets successfully at least once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient(base_url=self.url) as client:
            while loop.time() < deadline:
                body = (await client.get("/api/v1/targets")).json()
                up = [t for t in body["data"]["activeTargets"] if t["health"] == "up"]
                if len(up) >= count:
                    return
                await asyncio.sleep(0.2)
        raise AssertionError(f"Prometheus did not scrape {count} targets within {timeout}s")


@contextlib.asynccontextmanager
async def running_prometheus(workdir: Path, scrape_interval: str = "1s") -> AsyncIterator[PrometheusServer]:
    binary = shutil.which("prometheus")
    if binary is None:
        msg = "prometheus is not installed: `make test` installs it (scripts/system-deps.sh)"
        raise RuntimeError(msg)
    server = PrometheusServer(workdir, free_port())
    server.targets.write_text("[]")
    config = workdir / "prometheus.yml"
    config.write_text(
        f"""global:
  scrape_interval: {scrape_interval}
  scrape_timeout: {scrape_interval}
scrape_configs:
  - job_name: fleet
    file_sd_configs:
      - files: ["{server.targets}"]
        refresh_interval: 1s
"""
    )
    log_file = (workdir / "prometheus.log").open("w")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{server.port}",
        "--log.level=warn",
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        async with httpx.AsyncClient(base_url=server.url) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/-/ready")).status_code == 200:
                        break
                if process.returncode is not None or loop.time() > deadline:
                    log = (workdir / "prometheus.log").read_text()
                    raise RuntimeError(f"Prometheus did not start: {log[-2000:]}")
                await asyncio.sleep(0.1)
        yield server
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log_file.close()


def scrape_fixed_target(server: PrometheusServer, address: str, *, job: str) -> None:
    """Point `server` at one fixed target (a flywatch daemon's /metrics, say) in place of the fleet.

    It goes through the same file_sd file as `retarget()` (which replaces it again), with the target's
    `job` label set to `job`, as a scrape job of that name would have it.
    """
    groups = [{"targets": [address], "labels": {"job": job}}]
    tmp = server.targets.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    tmp.replace(server.targets)  # atomic: Prometheus never reads half a file


async def wait_for_series(
    server: PrometheusServer, selector: str, timeout: float = 20.0
) -> list[dict[str, object]]:
    """Until an instant query of `selector` answers at least one series; those series."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(base_url=server.url) as client:
        while True:
            body = (await client.get("/api/v1/query", params={"query": selector})).json()
            result: list[dict[str, object]] = body.get("data", {}).get("result", [])
            if body.get("status") == "success" and result:
                return result
            if loop.time() >= deadline:
                raise AssertionError(f"Prometheus had no series for {selector} within {timeout}s: {body}")
            await asyncio.sleep(0.2)
