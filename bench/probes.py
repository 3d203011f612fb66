"""Benchmark: health probes per second per CPU core, flywatch against prometheus-blackbox-exporter.

A simulated fleet of 1,000 machines (each on its own loopback address, in its own process: `flywatch sim`)
is probed round after round, once by flywatch's prober (in this process) and once by the blackbox exporter
(a separate process, driven through its /probe endpoint as Prometheus would drive it). The CPU time of the
prober alone is measured: this process's for flywatch, the exporter's own (from /proc) for the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from daemon.clock import SystemClock
from daemon.core.health import ProbeConditions
from daemon.sources.probes import Prober, ProbeTarget, probe_url

MACHINES = 1000
ROUNDS = 5
CONCURRENCY = 256


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code < 500:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


@contextlib.asynccontextmanager
async def fleet(workdir: Path) -> AsyncIterator[list[str]]:
    """A `flywatch sim` process with MACHINES started machines; yields their health URLs."""
    per_region = MACHINES // 4
    scenario = {
        "settings": {"rate_limits": False},
        "apps": [
            {
                "name": "fleet",
                "regions": {
                    "iad": per_region,
                    "cdg": per_region,
                    "nrt": per_region,
                    "syd": MACHINES - 3 * per_region,
                },
                "base_latency": 0.0,
            }
        ],
    }
    path = workdir / "fleet.yaml"
    path.write_text(yaml.safe_dump(scenario))
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "daemon", "sim", "--port", str(port), "--scenario", str(path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_http(f"http://127.0.0.1:{port}/_sim/health")
        async with httpx.AsyncClient(timeout=30.0) as client:
            summary = (await client.get(f"http://127.0.0.1:{port}/_sim/apps/fleet")).json()
        urls = [probe_url(m["private_ip"], m["port"], m["health_path"]) for m in summary["machines"]]
        yield urls
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=30)


async def flywatch_rounds(urls: list[str]) -> dict[str, Any]:
    prober = Prober(SystemClock(), timeout=5.0, concurrency=CONCURRENCY)
    targets = [ProbeTarget("fleet", str(i), "x", url) for i, url in enumerate(urls)]
    conditions = ProbeConditions()
    try:
        await prober.probe_all(targets[:50], conditions)  # warm up
        cpu, wall = time.process_time(), time.perf_counter()
        ok = 0
        for _ in range(ROUNDS):
            results = await prober.probe_all(targets, conditions)
            ok += sum(1 for r in results.values() if r.ok)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await prober.aclose()
    probes = len(targets) * ROUNDS
    return {"probes": probes, "ok": ok, "cpu_seconds": cpu, "wall_seconds": wall}


async def blackbox_rounds(urls: list[str], workdir: Path) -> dict[str, Any]:
    binary = shutil.which("prometheus-blackbox-exporter")
    if binary is None:
        return {"error": "prometheus-blackbox-exporter is not installed (make bench installs it)"}
    config = workdir / "blackbox.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "modules": {
                    "http_2xx": {"prober": "http", "timeout": "5s", "http": {"valid_status_codes": [200]}}
                }
            }
        )
    )
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        binary,
        *(f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=error"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_http(f"{base}/-/healthy")
        slots = asyncio.Semaphore(CONCURRENCY)
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def probe(url: str) -> bool:
                async with (
                    slots,
                    session.get(f"{base}/probe", params={"module": "http_2xx", "target": url}) as r,
                ):
                    return "probe_success 1" in await r.text()

            await asyncio.gather(*(probe(u) for u in urls[:50]))  # warm up
            cpu, wall = _cpu_seconds(process.pid), time.perf_counter()
            ok = 0
            for _ in range(ROUNDS):
                ok += sum(await asyncio.gather(*(probe(u) for u in urls)))
            cpu, wall = _cpu_seconds(process.pid) - cpu, time.perf_counter() - wall
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=30)
    return {"probes": len(urls) * ROUNDS, "ok": ok, "cpu_seconds": cpu, "wall_seconds": wall}


async def _run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        async with fleet(workdir) as urls:
            ours = await flywatch_rounds(urls)
            peer = await blackbox_rounds(urls, workdir)
    return {"machines": MACHINES, "rounds": ROUNDS, "flywatch": ours, "blackbox_exporter": peer}


def run(repeat: int = 3) -> dict[str, Any]:
    return {"runs": [asyncio.run(_run()) for _ in range(repeat)]}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
