"""Run every benchmark and write BENCHMARKS.md with the figures and the machine they ran on.

make bench            (or: .venv/bin/python -m bench.run)
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import probes, scale_up

ROOT = Path(__file__).resolve().parents[1]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH, as a developer runs it
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} cores{memory}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; commit {commit or 'unknown'}"
    )


def _ratio(peer: float, ours: float) -> str:
    if ours == 0:
        return "n/a (flywatch: 0)" if peer else "1.0"
    return f"{peer / ours:.2f}x"


def scale_up_section(result: dict[str, Any]) -> str:
    ours, peer = result["flywatch"], result["no_client_limiting"]
    rows = [
        ("API calls", ours["calls"], peer["calls"]),
        ("429 answers", ours["429s"], peer["429s"]),
        (
            "Machines_create calls",
            ours["calls_by_endpoint"].get("Machines_create", 0),
            peer["calls_by_endpoint"].get("Machines_create", 0),
        ),
        ("wall time (s)", round(ours["seconds"], 2), round(peer["seconds"], 2)),
    ]
    lines = [
        "## Scale one app from 1 to 20 machines in three regions at once",
        "",
        "`bench/scale_up.py`: the simulator with Fly's documented rate limits on; one started machine",
        "in iad; one plan: +7 iad, +6 cdg, +6 nrt. The peer is the same actuator with client-side rate",
        "limiting off, which is how fly-autoscaler talks to the Machines API (it has no client-side",
        "limiting). Ratio: peer / flywatch.",
        "",
        "| measure | flywatch | without client-side limiting | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {a} | {b} | {_ratio(float(b), float(a))} |" for name, a, b in rows]
    lines += [
        "",
        (
            f"Machines started at the end: flywatch {ours['started_machines']}, "
            f"peer {peer['started_machines']}; every action done: flywatch {ours['all_done']}, "
            f"peer {peer['all_done']}."
        ),
        (
            "Calls by endpoint (flywatch): "
            + ", ".join(f"{k} {v}" for k, v in sorted(ours["calls_by_endpoint"].items()))
        ),
        "",
        "Fly allows one create per second per app after a burst of 3, so 19 creates take at least 16 s",
        "whoever sends them; the difference is in what the API is made to refuse on the way.",
        "",
    ]
    return "\n".join(lines)


def probes_section(result: dict[str, Any]) -> str:
    ours, peer = result["flywatch"], result["blackbox_exporter"]
    lines = [
        f"## Health probes per second per CPU core ({result['machines']} machines on loopback)",
        "",
        "`bench/probes.py`: a `flywatch sim` process serves 1,000 machines, each on its own loopback",
        f"address; {result['rounds']} rounds probe every machine's health path,",
        f"{probes.CONCURRENCY} at a time. flywatch's prober runs in the benchmark process (its CPU time",
        "is that process's); the peer is",
        "prometheus-blackbox-exporter (Debian's), driven through /probe as Prometheus drives it, its CPU",
        "time read from /proc. Ratio: flywatch / peer (higher is better for flywatch).",
        "",
    ]
    if "error" in peer:
        return "\n".join([*lines, f"The peer could not run: {peer['error']}", ""])

    def per_core(side: dict[str, Any]) -> float:
        return float(side["probes"]) / max(float(side["cpu_seconds"]), 1e-9)

    def per_second(side: dict[str, Any]) -> float:
        return float(side["probes"]) / max(float(side["wall_seconds"]), 1e-9)

    rows = [
        ("probes per CPU-second", per_core(ours), per_core(peer)),
        ("probes per wall-clock second", per_second(ours), per_second(peer)),
        ("CPU seconds", float(ours["cpu_seconds"]), float(peer["cpu_seconds"])),
    ]
    lines += ["| measure | flywatch | blackbox exporter | flywatch / peer |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {a:,.1f} | {b:,.1f} | {a / b:.2f}x |" for name, a, b in rows if b]
    lines += [
        "",
        (
            f"Probes that passed: flywatch {ours['ok']} of {ours['probes']}, "
            f"peer {peer['ok']} of {peer['probes']}."
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = [scale_up_section(scale_up.run()), probes_section(probes.run())]
    text = "\n".join(
        [
            "# Benchmarks",
            "",
            f"Written by `make bench` on {started}.",
            f"Machine: {_machine()}.",
            "",
            *sections,
        ]
    )
    (ROOT / "BENCHMARKS.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
