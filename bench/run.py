"""Run every benchmark and write BENCHMARKS.md with the figures and the machine they ran on.

make bench            (or: .venv/bin/python -m bench.run)
.venv/bin/python -m bench.run cluster ticks     only the named benchmarks: their sections of BENCHMARKS.md
                                                are rewritten (each saying when and on what it ran alone),
                                                the others kept as they are
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cluster, probes, rollback, scale_up, ticks

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


def _cores(cpu: dict[str, float]) -> str:
    return ", ".join(f"{cpu[k]:.2f}" for k in ("flywatch", "simulator", "postgres", "other"))


def cluster_section(result: dict[str, Any]) -> str:
    apps, interval, rows = result["apps"], result["scaling_interval"], result["throughput"]
    one = next((r["ticks_per_second"] for r in rows if r["count"] == 1 and r["converged_seconds"]), None)
    lines = [
        f"## Several instances on one PostgreSQL: {apps:,} apps on one to three, and takeover",
        "",
        *_paragraph(
            f"""`bench/cluster.py`: a `flywatch sim` process (Fly's rate limits off, no machine listening,
            as for the whole ticks above) serves {apps:,} apps of one started machine in each of
            {" and ".join(result["regions"])}. One policy holds them all: scaling every {interval:g} s on the
            count of started machines with a target that makes every tick a hold ({apps / interval:,.0f}
            reconcile ticks/s asked for), health probed once an hour (one round at start). `flywatch run`
            processes, configured by their environment with the default FLYWATCH_TAKEOVER, share one fresh
            PostgreSQL schema and are added one at a time. With each, the benchmark waits (up to
            {result["converge"]:g} s) until every app is owned by exactly one instance (their /status
            `cluster` → `owners`, all seeing the same live members), waits {result["settle"]:g} s more, then
            counts the reconcile ticks each completed over {result["window"]:g} s
            (flywatch_tick_duration_seconds_count); cores busy are read from /proc over the same window. This
            machine has {result["cores"]} cores, and the simulator, the instances and PostgreSQL (and whatever
            else runs on it: "other") compete for them, so instances cannot add up here as they would on
            machines of their own."""
        ),
        "",
        (
            "| instances | apps per instance | reconcile ticks/s | vs one instance | mean tick (s)"
            " | cores busy: flywatch, simulator, PostgreSQL, other | every app owned after (s) |"
        ),
        "| ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    notes = []
    for row in rows:
        count, per, total = row["count"], row["instances"], row["ticks_per_second"]
        settled = row["converged_seconds"] is not None and not row["moved_during_window"]
        spread = " / ".join(str(p["apps"]) for p in per) if settled else "never settled"
        rate = "no answer" if total is None else f"{total:,.1f}"
        ratio = f"{total / one:.2f}x" if settled and one and total is not None else "n/a"
        ticks = sum(p.get("ticks", 0.0) for p in per)
        spent = sum((p.get("mean_tick_seconds") or 0.0) * p.get("ticks", 0.0) for p in per)
        mean = f"{spent / ticks:.2f}" if ticks else "n/a"
        owned = (
            f"{row['converged_seconds']:.1f}"
            if row["converged_seconds"] is not None
            else "not within the wait"
        )
        lines.append(f"| {count} | {spread} | {rate} | {ratio} | {mean} | {_cores(row['cpu'])} | {owned} |")
        if not settled:
            lapses = sum(p["lapses"] for p in per)
            silent = [p["instance"] for p in per if not p["answered"]]
            notes.append(
                f"With {count} instance{'s' if count > 1 else ''}: leases lapsed {lapses} times since they"
                f" started ({sum(p['apps_lapsed'] for p in per):,} apps dropped, from their logs)"
                + (f"; {', '.join(silent)} did not answer /metrics within 10 s" if silent else "")
                + "."
            )
    if notes:
        lines += [
            "",
            *_paragraph(
                f"""Not settled: the instances never agreed, within the wait, that every app was owned. An
                instance acts on an app only while its lease was renewed lately enough (until the lease less
                a heartbeat after the renewal was sent: {cluster.DEFAULT_TAKEOVER * 0.55:g} s at the default
                takeover); when its event loop
                is held up longer than that, it drops every app and takes them again at its next look. The
                ticks it counted are what it did meanwhile. """
                + " ".join(notes)
            ),
        ]
    takeover = result["takeover"]
    if takeover:
        runs = takeover["runs"]

        def times(how: str, key: str) -> list[float]:
            return [float(r[key]) for r in runs if r["how"] == how]

        bound = takeover["takeover"]
        beat = bound / 5
        lease = bound - 1.25 * beat
        lines += [
            "",
            *_paragraph(
                f"""Takeover: three instances over {takeover["apps"]} of those apps, FLYWATCH_TAKEOVER at
                its default {bound:g} s (a heartbeat every {beat:g} s, leases of {lease:g} s). The owner of
                the most apps is stopped; the two others' /status is polled every 100 ms until each of its
                apps shows as owned by one of them. Times from the signal: the median of the runs
                (lowest-highest)."""
            ),
            "",
            "| the owner | runs | its apps | all of them owned again (s) | the first of them (s) | bound |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for how, what, limit in (
            ("kill", "killed (SIGKILL)", f"{bound:g} s (FLYWATCH_TAKEOVER)"),
            ("term", "stopped (SIGTERM): gives its leases up", "its ticks in flight, then a few round trips"),
        ):
            if times(how, "all_seconds"):
                lines.append(
                    f"| {what} | {len(times(how, 'all_seconds'))} | {_spread(times(how, 'apps'), 0)}"
                    f" | {_spread(times(how, 'all_seconds'), 2)} | {_spread(times(how, 'first_seconds'), 2)}"
                    f" | {limit} |"
                )
        k8s = takeover["kubernetes"]
        exits = times("term", "exited_seconds")
        stopped = (
            " A stopped instance leaves the members and releases every app with no tick running at once,"
            " each of the others when its tick ends, and tells the others (PostgreSQL's NOTIFY), who take"
            f" them at once, without waiting for their next look (it exited {_spread(exits, 2)} s after the"
            " signal)."
            if exits
            else ""
        )
        lines += [
            "",
            *_paragraph(
                f"""After a kill, the leases run out {lease - beat:g}-{lease:g} s later (they were renewed up
                to a heartbeat before it) and a survivor takes them at its next look (up to a heartbeat later,
                then every second while it waits for them): within {bound:g} s.{stopped} No peer to
                compare with: fly-autoscaler and the other autoscalers for Fly run as
                one process and have no takeover. For context only, not measured: Kubernetes' leader election
                as its own components set it (lease {k8s["lease_duration"]:g} s, renew deadline
                {k8s["renew_deadline"]:g} s, a retry every {k8s["retry_period"]:g} s) lets a standby take
                over about {k8s["lease_duration"]:g} s after the leader's last renewal, plus up to one
                retry."""
            ),
        ]
    lines += ["", f"The whole benchmark took {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


# Every benchmark, in the order of BENCHMARKS.md: how it runs, and how its section reads. Each section names
# its module (`bench/NAME.py`) in its first lines: that is how a run of some of them finds theirs to rewrite.
BENCHMARKS: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "scale_up": (scale_up.run, scale_up_section),
    "probes": (probes.run, probes_section),
    "ticks": (ticks.run, ticks_section),
    "rollback": (rollback.run, rollback_section),
    "cluster": (cluster.run, cluster_section),
}
_NAMED = re.compile(r"`bench/(\w+)\.py`")


def _rewrite(names: list[str], started: str) -> str:
    """BENCHMARKS.md with the sections of `names` run again (each saying so), the others as they are; a
    section not there yet is added at the end. The file is read once the benchmarks are over."""
    fresh = {}
    for name in names:
        run, render = BENCHMARKS[name]
        heading, _, body = render(run()).rstrip("\n").partition("\n")
        note = f"_Run alone by `python -m bench.run {name}` on {started}; machine: {_machine()}._"
        fresh[name] = f"{heading}\n\n{note}\n{body}"
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `make bench` (not yet run).\n"
    head, *sections = re.split(r"(?m)^(?=## )", old)
    parts = [head.rstrip("\n")] + [s.rstrip("\n") for s in sections]
    for name, section in fresh.items():
        found = [i for i, s in enumerate(parts) if i and (m := _NAMED.search(s)) and m.group(1) == name]
        if found:
            parts[found[0]] = section
        else:
            parts.append(section)
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        sys.stderr.write(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}\n")
        return 2
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if names:
        text = _rewrite(list(dict.fromkeys(names)), started)
    else:
        sections = [render(run()) for run, render in BENCHMARKS.values()]
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
