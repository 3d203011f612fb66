"""Run every benchmark and write BENCHMARKS.md with the figures and the machine they ran on.

make bench            (or: .venv/bin/python -m bench.run)
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import probes, rollback, scale_up, ticks

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


def _spread(values: list[float], digits: int = 1) -> str:
    """The median, with the lowest and highest of the runs."""
    middle = statistics.median(values)
    if min(values) == max(values):
        return f"{middle:,.{digits}f}"
    return f"{middle:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def scale_up_section(result: dict[str, Any]) -> str:
    runs = result["runs"]

    def col(side: str, key: str) -> list[float]:
        return [float(run[side][key]) for run in runs]

    def creates(side: str) -> list[float]:
        return [float(run[side]["calls_by_endpoint"].get("Machines_create", 0)) for run in runs]

    rows = [
        ("API calls", col("flywatch", "calls"), col("peer", "calls"), 0),
        ("429 answers", col("flywatch", "429s"), col("peer", "429s"), 0),
        ("Machines_create calls", creates("flywatch"), creates("peer"), 0),
        ("wall time (s)", col("flywatch", "seconds"), col("peer", "seconds"), 2),
    ]
    lines = [
        "## Scale one app from 1 to 20 machines in three regions at once",
        "",
        "`bench/scale_up.py`: the simulator with Fly's documented rate limits on; one started machine",
        "in iad; one plan: +7 iad, +6 cdg, +6 nrt. flywatch waits on Fly's buckets before it calls and",
        "backs off on a 429. The peer is the same actuator calling the API the way fly-autoscaler does",
        "(no client-side limiting; a refused create sent again at once, as its createN loop does).",
        f"Figures: the median of {len(runs)} runs (lowest-highest). Ratio: peer / flywatch, of the",
        "medians (lower is better for both).",
        "",
        "| measure | flywatch | fly-autoscaler's way | peer / flywatch |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, ours, peer, digits in rows:
        a, b = statistics.median(ours), statistics.median(peer)
        ratio = "n/a (flywatch: 0)" if a == 0 and b else (f"{b / a:.2f}x" if a else "1.00x")
        lines.append(f"| {name} | {_spread(ours, digits)} | {_spread(peer, digits)} | {ratio} |")
    last = runs[-1]
    lines += [
        "",
        (
            f"Machines started at the end of the last run: flywatch {last['flywatch']['started_machines']},"
            f" peer {last['peer']['started_machines']}."
        ),
        "Calls by endpoint (flywatch, last run): "
        + ", ".join(f"{k} {v}" for k, v in sorted(last["flywatch"]["calls_by_endpoint"].items())),
        "",
        "Fly allows one create per second per app after a burst of 3, so 19 creates take at least 16 s",
        "whoever sends them: the difference is in what the API is made to refuse on the way.",
        "",
    ]
    return "\n".join(lines)


def probes_section(result: dict[str, Any]) -> str:
    runs = result["runs"]
    first = runs[0]
    lines = [
        f"## Health probes per CPU core ({first['machines']} machines on loopback)",
        "",
        "`bench/probes.py`: a `flywatch sim` process serves 1,000 machines, each on its own loopback",
        f"address; {first['rounds']} rounds probe every machine's health path,",
        f"{probes.CONCURRENCY} at a time, a new connection per probe on both sides. flywatch's prober",
        "runs in the benchmark process (its CPU time is that process's). The peer is",
        "prometheus-blackbox-exporter (Debian's), driven through /probe as Prometheus drives it; its CPU",
        "time, read from /proc, also pays for serving /probe and rendering each result, as it does in",
        f"production. Figures: the median of {len(runs)} runs (lowest-highest).",
        "",
    ]
    errors = [run["blackbox_exporter"]["error"] for run in runs if "error" in run["blackbox_exporter"]]
    if errors:
        return "\n".join([*lines, f"The peer could not run: {errors[0]}", ""])

    def per(side: str, key: str) -> list[float]:
        return [float(run[side]["probes"]) / max(float(run[side][key]), 1e-9) for run in runs]

    rows = [
        (
            "probes per CPU-second (higher is better)",
            per("flywatch", "cpu_seconds"),
            per("blackbox_exporter", "cpu_seconds"),
        ),
        (
            "probes per wall-clock second (higher is better)",
            per("flywatch", "wall_seconds"),
            per("blackbox_exporter", "wall_seconds"),
        ),
    ]
    lines += ["| measure | flywatch | blackbox exporter | flywatch / peer |", "| --- | ---: | ---: | ---: |"]
    for name, ours, peer in rows:
        ratio = statistics.median(ours) / statistics.median(peer)
        lines.append(f"| {name} | {_spread(ours, 0)} | {_spread(peer, 0)} | {ratio:.2f}x |")
    ok = sum(run["flywatch"]["ok"] for run in runs), sum(run["blackbox_exporter"]["ok"] for run in runs)
    total = sum(run["flywatch"]["probes"] for run in runs)
    lines += ["", f"Probes that passed, all runs: flywatch {ok[0]} of {total}, peer {ok[1]} of {total}.", ""]
    return "\n".join(lines)


def ticks_section(result: dict[str, Any]) -> str:
    latency = result["latency"]
    core, full = result["core"], result["full"]
    return "\n".join(
        [
            "## The daemon loop",
            "",
            "`bench/ticks.py`. Decision latency: a load step in one region of the simulator (Fly's rate",
            "limits on) to the first start or create call the daemon makes for it, with a scaling interval",
            f"of 1 s: median {statistics.median(latency):.2f} s over {len(latency)} runs",
            f"({min(latency):.2f}-{max(latency):.2f} s): the interval, and waits on Fly's limit of one list",
            "call per second per app (the probe job, the tick and the action each list the app).",
            "",
            f"One tick over {ticks.APPS} apps of 10 machines in 3 regions (no peer does this):",
            "",
            "| measure | value |",
            "| --- | ---: |",
            f"| decision core alone: CPU for all {ticks.APPS} apps | {core['cpu_seconds'] * 1000:.0f} ms |",
            f"| decision core alone: peak memory allocated | {core['peak_bytes'] / 1024:.0f} KiB |",
            f"| whole ticks (list, decide, record), CPU time | {full['cpu_seconds']:.2f} s |",
            f"| whole ticks, wall time | {full['wall_seconds']:.2f} s |",
            f"| whole ticks, growth of the process's peak RSS | {full['rss_growth_kib'] / 1024:.0f} MiB |",
            f"| ticks that failed | {full['errors']:.0f} |",
            "",
            "The whole tick is dominated by reading and validating each app's machine list and by the state",
            "store's durable writes (one per region per tick), not by the decision itself.",
            "",
        ]
    )


def _paragraph(text: str) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width=100, break_on_hyphens=False)


def rollback_section(result: dict[str, Any]) -> str:
    scenarios = result["scenarios"]
    head = scenarios[0]
    runs = head["runs"]

    def ours(scenario: dict[str, Any], key: str) -> list[float]:
        return [float(run["flywatch"][key]) for run in scenario["runs"]]

    def counted(scenario: dict[str, Any], window: str, key: str) -> list[float]:
        return [float(run["flywatch"][window][key]) for run in scenario["runs"]]

    def manual(scenario: dict[str, Any]) -> list[float]:
        return [float(run["manual"]["seconds"]) for run in scenario["runs"]]

    def ratio(a: list[float], b: list[float]) -> str:
        return f"{statistics.median(a) / statistics.median(b):.2f}x"

    machines = runs[0]["flywatch"]["machines"]
    rows = [
        (
            "deploy to failing verdict = rollback started (s)",
            _spread(ours(head, "detect_seconds"), 2),
            "a human",
            "",
        ),
        (
            "rollback started to done (s)",
            _spread(ours(head, "rollback_seconds"), 2),
            _spread(manual(head), 2),
            ratio(ours(head, "rollback_seconds"), manual(head)),
        ),
        ("deploy to rollback done (s)", _spread(ours(head, "total_seconds"), 2), "a human + the above", ""),
        ("API calls, deploy to done", _spread(counted(head, "whole", "calls"), 0), "n/a", ""),
        ("API calls, rollback started to done", _spread(counted(head, "rollback", "calls"), 0), "n/a", ""),
        ("429 answers, deploy to done", _spread(counted(head, "whole", "429s"), 0), "n/a", ""),
        ("client retries, deploy to done", _spread(ours(head, "retries"), 0), "n/a", ""),
    ]
    lines = [
        f"## Roll back a bad release on {machines} machines in three regions",
        "",
        *_paragraph(
            f"""`bench/rollback.py`: the simulator with Fly's documented rate limits on and
            {rollback.TRANSITION_DELAY:g} s per transient state; `shop` with {rollback.PER_REGION} started
            machines in each of iad, cdg and nrt, {rollback.LOAD_RPS:g} requests/s offered per region. The
            daemon's parts run in the benchmark process as tests/test_releases.py builds them (the client
            with its default retries and client-side rate limiting, the actuator with the daemon's defaults,
            the health watch, the release watch, the reconciler on a SQLite store), driven as the scheduler
            drives them: a probe job and a reconcile job, each every {rollback.TICK:g} s. Policy: health
            every {rollback.TICK:g} s, bake {rollback.BAKE:g} s, min_requests {rollback.MIN_REQUESTS},
            max_error_ratio 5%, max_parallel {head["max_parallel"]}. Once the good release is the known-good
            one, the bad image is marked `{head["mode"]}` (20% of requests answer 500) and deployed with
            strategy `immediate`: the whole fleet is bad at once. Times run from the deploy's 202 to the
            rollback's `started_at` and `finished_at` in the stored state; calls and 429s come from
            `/_sim/counters` (the rollback window's from the simulator's exchange log); the runs deploy at
            even points of the reconcile job's {rollback.CYCLE:g} s cycle. Every run ends with every machine
            started on its own known-good config again (image, release metadata, all of it), or fails."""
        ),
        "",
        *_paragraph(
            """The peer: flyctl has no automatic rollback. Its manual way, `fly deploy --image <old>`
            (rolling, the same max_parallel), is modelled by the simulator's own deployer redeploying the good
            image over the same bad fleet, timed from its 202 to the release complete. That deployer works on
            the platform directly (no HTTP, no rate limits, checks polled every 50 ms): a lower bound for
            flyctl. The human who has to notice the bad release and type the command is not counted."""
        ),
        "",
        *_paragraph(
            f"""Figures: the median of {len(runs)} runs (lowest-highest). Ratio: flywatch / the manual
            redeploy, of the medians (lower is better)."""
        ),
        "",
        "| measure | flywatch | manual redeploy | flywatch / manual |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
    lines += [
        "",
        "By bad image and max_parallel (median of each scenario's runs):",
        "",
        (
            "| bad image | max_parallel | deploy to verdict (s) | rollback (s) | total (s) | API calls"
            " | 429s | manual redeploy (s) | flywatch / manual |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in scenarios:
        lines.append(
            f"| {scenario['mode']} | {scenario['max_parallel']}"
            f" | {_spread(ours(scenario, 'detect_seconds'), 2)}"
            f" | {_spread(ours(scenario, 'rollback_seconds'), 2)}"
            f" | {_spread(ours(scenario, 'total_seconds'), 2)}"
            f" | {_spread(counted(scenario, 'whole', 'calls'), 0)}"
            f" | {_spread(counted(scenario, 'whole', '429s'), 0)}"
            f" | {_spread(manual(scenario), 2)}"
            f" | {ratio(ours(scenario, 'rollback_seconds'), manual(scenario))} |"
        )
    last = runs[-1]["flywatch"]
    calls = ", ".join(f"{k} {v}" for k, v in last["rollback"]["calls_by_endpoint"].items())
    requests = last["failing_numbers"].get("requests") or 0.0
    lines += [
        "",
        *_paragraph(
            f"""Calls by endpoint, rollback started to done (last run, max_parallel
            {head["max_parallel"]}): {calls}; {last["calls_per_machine"]:.1f} per machine reverted. Its
            failing verdict: {last["reason"]}, on {requests:.0f} requests of the new release. `unhealthy`
            (the health path answers 500) is judged on the health watch's verdicts instead of traffic."""
        ),
        "",
        *_paragraph(
            """The rollback is mostly the simulator's transitions (replacing, then starting: 0.2 s per chunk
            whoever sends the updates); flywatch adds its calls per machine (read, lease, update, wait, read
            for checks, read to verify, release, and a lease look-up of every machine, all at once, before
            the first chunk). Detection waits for `min_requests` of the new release's own traffic, and the
            reconcile job runs about every 2 s, not 1 s, because it and the probe job each list the app
            every second against Fly's limit of one list call per second per app."""
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        scale_up_section(scale_up.run()),
        probes_section(probes.run()),
        ticks_section(ticks.run()),
        rollback_section(rollback.run()),
    ]
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
