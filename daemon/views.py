"""Plain-text views for the CLI: `flywatch status`, `flywatch explain APP` and `flywatch releases APP`.

Pure functions over the JSON the daemon serves (GET /status, /decisions, /releases), so they are tested
without a daemon and work against any daemon version: a field that is missing, null or of an unexpected
type is shown as "-", never a crash. Times are shown in ISO 8601, UTC; pass `now` (seconds since the
epoch) to also see how long ago they were.

The /status document:

    {"version": "0.1.0", "dry_run": false, "ready": true, "ready_reason": "", "started_at": 1790000000.0,
     "policy": {"path": "config/flywatch.yaml", "loaded_at": 1790000000.0, "apps": ["shop"],
                "last_error": ""},
     "apps": {"shop": {"last_tick": 1790000100.0, "tick_error": "",
       "regions": {"iad": {"min": 1, "max": 8, "desired": 3, "machines": {"started": 2, "stopped": 1},
                           "health": "healthy", "health_reason": "2 healthy, 0 unhealthy, 0 unknown",
                           "metric": {"name": "inflight", "value": 42.0, "age": 3.1},
                           "last_decision": {"at": 1790000100.0, "action": "scale_up", "count": 1,
                                             "rule": "target_tracking",
                                             "reason": "inflight 42.0 / target 20 = 2.1 -> 3 machines",
                                             "outcome": "done"}}}}}}

`metric.age` is the age of the value in seconds when the status was taken; `machines` counts the
region's machines by state. A /decisions item:

    {"at": 1790000100.0, "app": "shop", "region": "iad", "action": "scale_up" | "scale_down" | "hold",
     "count": 1, "from": 2, "to": 3, "rule": "target_tracking", "reason": "...",
     "outcome": "done" | "skipped" | "failed" | "dry_run" | "none",
     "inputs": {"inflight": 42.0, "target": 20}, "not_acting": {"rule name": "why it did not act"}}

/status also has "releases", per app the release watch's state:

    {"shop": {"watched": {"version": 42, "id": "01J...", "image": "registry.fly.io/shop:v42",
                          "verdict": "failing", "reason": "...", "numbers": {"error_rate": 0.12},
                          "first_seen": 1790000000.0, "rollout_done_at": 1790000060.0,
                          "after_rollback": false} | null,
              "good": {"version": 41, "id": "...", "image": "...", "verdict": "healthy"} | null,
              "rollback": {"from": {release}, "to": {release}, "state": "waiting|running|done|partial|failed",
                           "by": "auto|manual", "reason": "...", "updated": ["m1"], "destroyed": ["c1"],
                           "in_flight": [], "skipped": {"m2": "why"}, "failed": {"m3": "why"}, "note": "",
                           "started_at": 1790000100.0, "finished_at": null} | null,
              "halted": "", "bad": [40]}}

A /releases item (newest first):

    {"at": 1790000100.0, "app": "shop", "kind": "rollback_started", "summary": "rolling v42 back to v41 ...",
     "release": {"version": 42, "id": "...", "image": "..."} | null, "numbers": {...}, "details": {...}}

The answer to POST /releases/{app}/rollback (202):

    {"ok": true, "app": "shop", "request": {"to": 41 | null, "at": 1790000100.0, "by": "alice@host via cli"}}
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeGuard

NONE = "-"
WIDTH = 100  # reasons and inputs wrap at this width in `explain`
# Machine states in the order an operator reads them: serving, on the way, parked, then broken.
STATE_ORDER = (
    "started", "starting", "replacing", "restarting", "created",
    "stopping", "stopped", "suspending", "suspended", "failed", "destroying", "destroyed",
)  # fmt: skip


def render_status(status: Mapping[str, Any], *, now: float | None = None) -> str:
    """The daemon, its policy, then one table per app: a row per region with its desired count,
    machines by state, health, metric and the last decision with its reason."""
    lines = [*_header(status, now), ""]
    apps = _mapping(status.get("apps"))
    if not apps:
        lines.append("no apps watched")
    for name in sorted(apps, key=str):
        app = _mapping(apps[name])
        lines.append(_app_line(str(name), app, now))
        regions = _mapping(app.get("regions"))
        if not regions:
            lines.extend(["  no regions", ""])
            continue
        rows = [
            [*_region_cells(str(region), _mapping(regions[region])), _last_decision(regions[region])]
            for region in sorted(regions, key=str)
        ]
        headers = ["REGION", "DESIRED", "RANGE", "MACHINES", "HEALTH", "METRIC", "AGE", "LAST DECISION"]
        lines.extend([*_table(headers, rows, indent="  "), ""])
    return "\n".join(lines).rstrip("\n") + "\n"


def render_explain(
    app: str,
    status: Mapping[str, Any],
    decisions: Sequence[Mapping[str, Any]],
    *,
    now: float | None = None,
) -> str:
    """Why an app is the way it is: its regions (with the reasons for their health), then its recent
    decisions newest first, each with its numbers, rule, reason, outcome, inputs, and why the other
    rules did not act."""
    apps = _mapping(status.get("apps"))
    lines: list[str] = []
    if _truthy(status.get("dry_run")):
        lines.append("dry run: decisions are recorded, not carried out")
    policy_error = _mapping(status.get("policy")).get("last_error")
    if policy_error:
        lines.append(f"policy error: {_cell(policy_error)}")
    if app in apps:
        entry = _mapping(apps[app])
        lines.append(_app_line(app, entry, now))
        regions = _mapping(entry.get("regions"))
        rows = [_region_cells(str(name), _mapping(regions[name])) for name in sorted(regions, key=str)]
        for row, name in zip(rows, sorted(regions, key=str), strict=True):
            row.append(_cell(_mapping(regions[name]).get("health_reason")))
        headers = ["REGION", "DESIRED", "RANGE", "MACHINES", "HEALTH", "METRIC", "AGE", "HEALTH REASON"]
        lines.extend(_table(headers, rows, indent="  ") if rows else ["  no regions"])
    elif (owner := _owner_elsewhere(app, _mapping(status.get("cluster")))) is not None:
        lines.append(f"{_cell(app)}: watched by {_cell(owner)}, another instance: ask that one")
    elif app in _list(_mapping(status.get("policy")).get("apps")):
        lines.append(f"{_cell(app)}  never ticked")
    else:
        known = ", ".join(sorted(str(name) for name in apps)) or "none"
        lines.append(f"{_cell(app)}: not watched by this daemon (apps: {known})")
    lines.append("")
    mine = [_mapping(d) for d in decisions if _mapping(d).get("app") in (None, app)]
    if not mine:
        lines.append("no decisions recorded")
        return "\n".join(lines) + "\n"
    lines.append("recent decisions, newest first:")
    for record in sorted(mine, key=_decision_time, reverse=True):
        lines.extend(_decision_lines(record, now))
    return "\n".join(lines) + "\n"


def render_releases(
    app: str,
    status: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    *,
    now: float | None = None,
) -> str:
    """An app's releases: the one watched (verdict, reason, numbers), the known-good one, the rollback
    under way or the last one with its machines, why the watch halted, the releases marked bad; then the
    release history newest first, one line per event."""
    lines: list[str] = []
    if _truthy(status.get("dry_run")):
        lines.append("dry run: rollbacks are recorded, not carried out")
    releases = status.get("releases")
    policy_apps = _list(_mapping(status.get("policy")).get("apps"))
    if not isinstance(releases, Mapping):
        lines.append(f"{_cell(app)}: this daemon reports no release watch")
    elif app in releases:
        lines.extend(_release_state(app, _mapping(releases[app]), now))
    elif app in policy_apps:
        lines.append(f"{_cell(app)}  no release seen yet (never ticked)")
    else:
        known = ", ".join(sorted({_cell(name) for name in [*releases, *policy_apps]})) or "none"
        lines.append(f"{_cell(app)}: not watched by this daemon (apps: {known})")
    lines.append("")
    mine = [_mapping(e) for e in _list(events) if _mapping(e).get("app") in (None, app)]
    if not mine:
        lines.append("no release events recorded")
        return "\n".join(lines) + "\n"
    lines.append("release history, newest first:")
    rows = [
        [
            _when(event.get("at"), now),
            _cell(event.get("kind")),
            _version(event.get("release")),
            _cell(event.get("summary")),
        ]
        for event in sorted(mine, key=_decision_time, reverse=True)
    ]
    lines.extend(_table(["AT", "KIND", "RELEASE", "SUMMARY"], rows, indent="  "))
    return "\n".join(lines) + "\n"


def render_rollback_request(app: str, answer: Mapping[str, Any], *, now: float | None = None) -> str:
    """What a 202 to POST /releases/{app}/rollback means: the request as recorded, and what happens next."""
    request = _mapping(answer.get("request"))
    to = request.get("to")
    target = f"v{_num(to)}" if _number(to) else "the newest known-good release older than the one running"
    return (
        f"rollback of {_cell(app)} recorded: to {target}"
        f" (asked by {_cell(request.get('by'))} at {_when(request.get('at'), now)})\n"
        f"the daemon's next tick of {_cell(app)} carries it out, or refuses it saying why;\n"
        f"`flywatch releases {_cell(app)}` shows its progress\n"
    )


def _release_state(app: str, entry: Mapping[str, Any], now: float | None) -> list[str]:
    lines = [f"{_cell(app)}  release watch"]
    watched = _mapping(entry.get("watched"))
    if watched:
        lines.append(f"  watched     {_release(watched)}  verdict {_cell(watched.get('verdict'))}")
        lines.extend(_wrapped("reason", _cell(watched.get("reason"))))
        numbers = _mapping(watched.get("numbers"))
        if numbers:
            lines.extend(
                _wrapped("numbers", ", ".join(f"{_cell(k)}={_value(v)}" for k, v in numbers.items()))
            )
        seen = f"    first seen {_when(watched.get('first_seen'), now)}"
        seen += f"  rolled out {_when(watched.get('rollout_done_at'), now)}"
        if _truthy(watched.get("after_rollback")):
            seen += "  (the release a rollback went back to)"
        lines.append(seen)
    else:
        lines.append("  watched     none seen yet")
    good = _mapping(entry.get("good"))
    if good:
        lines.append(f"  known good  {_release(good)}  verdict {_cell(good.get('verdict'))}")
    else:
        lines.append("  known good  none on record")
    lines.extend(_rollback_lines(_mapping(entry.get("rollback")), now))
    if entry.get("halted"):
        lines.extend(_wrapped("halted", _cell(entry.get("halted")), indent="  "))
    bad = [f"v{_num(v)}" for v in _list(entry.get("bad")) if _number(v)]
    if bad:
        lines.append(f"  marked bad  {', '.join(bad)}")
    return lines


def _rollback_lines(rollback: Mapping[str, Any], now: float | None) -> list[str]:
    if not rollback:
        return ["  rollback    none"]
    head = f"{_version(rollback.get('from'))} -> {_version(rollback.get('to'))}"
    to_image = _mapping(rollback.get("to")).get("image")
    if to_image:
        head += f" ({_cell(to_image)})"
    lines = [f"  rollback    {head}  {_cell(rollback.get('state'))}  by {_cell(rollback.get('by'))}"]
    lines.extend(_wrapped("reason", _cell(rollback.get("reason"))))
    lines.append(
        f"    started {_when(rollback.get('started_at'), now)}"
        f"  finished {_when(rollback.get('finished_at'), now)}"
    )
    touched = False
    for key, label in (("updated", "updated"), ("destroyed", "destroyed"), ("in_flight", "in flight")):
        ids = [_cell(machine) for machine in _list(rollback.get(key))]
        if ids:
            touched = True
            lines.extend(_wrapped(label, ", ".join(ids)))
    for key, label in (("skipped", "skipped (held by others)"), ("failed", "failed")):
        reasons = _mapping(rollback.get(key))
        if reasons:
            touched = True
            lines.append(f"    {label}:")
            width = max(len(_cell(machine)) for machine in reasons)
            lines.extend(f"      {_cell(m).ljust(width)}  {_cell(why)}" for m, why in reasons.items())
    if not touched:
        lines.append("    no machine changed yet")
    if rollback.get("note"):
        lines.extend(_wrapped("note", _cell(rollback.get("note"))))
    return lines


def _release(release: Mapping[str, Any]) -> str:
    text = f"{_version(release)}  {_cell(release.get('image'))}"
    if release.get("id"):
        text += f"  id {_cell(release.get('id'))}"
    return text


def _version(release: Any) -> str:
    version = _mapping(release).get("version")
    return f"v{_num(version)}" if _number(version) else NONE


def _header(status: Mapping[str, Any], now: float | None) -> list[str]:
    ready = status.get("ready")
    if ready is None:
        state = f"ready: {NONE}"
    elif _truthy(ready):
        state = "ready"
    else:
        state = f"not ready: {_cell(status.get('ready_reason')) or 'no reason given'}"
    mode = "dry run" if _truthy(status.get("dry_run")) else "live"
    started = _when(status.get("started_at"), now)
    lines = [f"flywatch {_cell(status.get('version'))}  {state}  {mode}  started {started}"]
    policy = _mapping(status.get("policy"))
    apps = ", ".join(_cell(name) for name in _list(policy.get("apps"))) or NONE
    lines.append(
        f"policy {_cell(policy.get('path'))}  loaded {_when(policy.get('loaded_at'), now)}  apps: {apps}"
    )
    if policy.get("last_error"):
        lines.append(f"policy error: {_cell(policy['last_error'])}")
    lines.extend(_cluster_lines(_mapping(status.get("cluster")), now))
    return lines


def _owner_elsewhere(app: str, cluster: Mapping[str, Any]) -> str | None:
    """The member holding `app` when that is another instance than the one asked."""
    owner = _mapping(cluster.get("owners")).get(app)
    return str(owner) if owner and owner != cluster.get("member") else None


def _cluster_lines(cluster: Mapping[str, Any], now: float | None) -> list[str]:
    """Several instances on one PostgreSQL: who this one is, and each member with the apps it holds."""
    if cluster.get("mode") != "cluster":
        return []
    owners = _mapping(cluster.get("owners"))
    unowned = sum(1 for owner in owners.values() if not owner)
    joined = "a live member" if _truthy(cluster.get("joined")) else "CUT OFF (acts on nothing)"
    heartbeat = _when(cluster.get("last_heartbeat"), now)
    first = (
        f"cluster: this is {_cell(cluster.get('member'))} ({_cell(cluster.get('region'))}), {joined},"
        f" holding {_cell(cluster.get('owned'))} of {len(owners)} apps; takeover within"
        f" {_cell(cluster.get('takeover_seconds'))}s; last heartbeat {heartbeat}"
    )
    lines = [first]
    if cluster.get("last_error"):
        lines.append(f"cluster error: {_cell(cluster['last_error'])}")
    if unowned:
        lines.append(f"cluster: {unowned} app(s) held by no live member")
    rows = [
        [
            _cell(m.get("member")) + (" (this one)" if _truthy(m.get("me")) else ""),
            _cell(m.get("region")),
            "live" if _truthy(m.get("live")) else "gone",
            _cell(m.get("apps")),
        ]
        for m in (_mapping(item) for item in _list(cluster.get("members")))
    ]
    lines.extend(_table(["MEMBER", "REGION", "STATE", "APPS"], rows, indent="  "))
    return lines


def _app_line(name: str, app: Mapping[str, Any], now: float | None) -> str:
    tick = app.get("last_tick")
    line = f"{_cell(name)}  last tick {_when(tick, now)}" if _number(tick) else f"{_cell(name)}  never ticked"
    if app.get("tick_error"):
        line += f"  tick error: {_cell(app['tick_error'])}"
    return line


def _region_cells(name: str, region: Mapping[str, Any]) -> list[str]:
    metric = _mapping(region.get("metric"))
    metric_text = NONE
    if metric:
        metric_text = f"{_cell(metric.get('name'))} {_num(metric.get('value'))}"
    low, high = _num(region.get("min")), _num(region.get("max"))
    return [
        _cell(name),
        _num(region.get("desired")),
        NONE if low == high == NONE else f"{low}..{high}",
        _machines(region.get("machines")),
        _cell(region.get("health")),
        metric_text,
        _age(metric.get("age")),
    ]


def _last_decision(region: Any) -> str:
    decision = _mapping(_mapping(region).get("last_decision"))
    if not decision:
        return NONE
    head = f"{_action(decision)} ({_cell(decision.get('outcome'))}) {_cell(decision.get('rule'))}"
    return f"{head}: {_cell(decision.get('reason'))}"


def _decision_lines(record: Mapping[str, Any], now: float | None) -> list[str]:
    action = _action(record)
    if _number(record.get("from")) or _number(record.get("to")):
        action += f" ({_num(record.get('from'))} -> {_num(record.get('to'))})"
    head = "  ".join(
        [
            _when(record.get("at"), now),
            _cell(record.get("region")),
            action,
            f"rule {_cell(record.get('rule'))}",
            f"outcome {_cell(record.get('outcome'))}",
        ]
    )
    lines = [f"  {head}"]
    lines.extend(_wrapped("reason", _cell(record.get("reason"))))
    inputs = _mapping(record.get("inputs"))
    if inputs:
        lines.extend(_wrapped("inputs", ", ".join(f"{_cell(k)}={_value(v)}" for k, v in inputs.items())))
    not_acting = _mapping(record.get("not_acting"))
    if not_acting:
        lines.append("    not acting:")
        width = max(len(_cell(rule)) for rule in not_acting)
        lines.extend(f"      {_cell(rule).ljust(width)}  {_cell(why)}" for rule, why in not_acting.items())
    return lines


def _wrapped(label: str, text: str, indent: str = "    ") -> list[str]:
    return textwrap.wrap(
        f"{label}: {text}",
        width=WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_long_words=False,
        break_on_hyphens=False,
    ) or [f"{indent}{label}: {NONE}"]


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], indent: str = "") -> list[str]:
    """Columns padded to their widest cell; the last column is not padded (no trailing spaces)."""
    body = [list(row) for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body, strict=True)]
    return [
        (indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))).rstrip()
        for row in [list(headers), *body]
    ]


def _action(decision: Mapping[str, Any]) -> str:
    action = _cell(decision.get("action"))
    count = decision.get("count")
    if _number(count) and count:
        sign = {"scale_up": "+", "scale_down": "-"}.get(action, "")
        return f"{action} {sign}{_num(abs(count))}"
    return action


def _machines(value: Any) -> str:
    counts = _mapping(value)
    if not isinstance(value, Mapping):
        return NONE
    if not counts:
        return "none"
    rank = {state: index for index, state in enumerate(STATE_ORDER)}
    ordered = sorted(counts, key=lambda state: (rank.get(state, len(rank)), str(state)))
    return ", ".join(f"{_num(counts[state])} {_cell(state)}" for state in ordered)


def _decision_time(record: Mapping[str, Any]) -> float:
    at = record.get("at")
    return float(at) if _number(at) and math.isfinite(at) else -math.inf


def _when(value: Any, now: float | None) -> str:
    """ISO 8601 in UTC, and how long ago when `now` is known."""
    if not _number(value):
        return NONE
    try:
        text = datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return NONE
    if now is None:
        return text
    return f"{text} ({_age(now - value)} ago)"


def _age(value: Any) -> str:
    """A duration the way people read it: 3.1s, 2m05s, 1h02m, 3d04h."""
    if not _number(value) or not math.isfinite(value):
        return NONE
    sign, seconds = ("-" if value < 0 else ""), abs(float(value))
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{sign}{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{sign}{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{sign}{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _num(value: Any) -> str:
    """A count as an integer, a measurement with up to four significant digits; "-" if not a number."""
    if not _number(value):
        return NONE
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def _value(value: Any) -> str:
    """An input's value: numbers as `_num`, text as is, anything else as compact JSON."""
    if _number(value):
        return _num(value)
    if isinstance(value, str):
        return _cell(value)
    return _cell(json.dumps(value, default=str, separators=(",", ":")))


def _cell(value: Any) -> str:
    """One line of printable text: whitespace runs become one space, control characters (a terminal
    escape in a reason, say) become "?"; None and empty become "-"."""
    if value is None or value == "":
        return NONE
    text = " ".join(str(value).split())
    return "".join(char if char.isprintable() else "?" for char in text) or NONE


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _truthy(value: Any) -> bool:
    return value is True


def _mapping(value: Any) -> Mapping[Any, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []
