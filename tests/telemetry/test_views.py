"""The CLI's plain-text views of /status, /decisions and /releases: aligned tables, every field, no crash."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from daemon import views
from daemon.views import render_explain, render_releases, render_rollback_request, render_status

T0 = 1790000000.0  # 2026-09-21T14:13:20Z


def example_status() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "dry_run": False,
        "ready": True,
        "ready_reason": "",
        "started_at": T0,
        "policy": {"path": "config/flywatch.yaml", "loaded_at": T0, "apps": ["shop"], "last_error": ""},
        "apps": {
            "shop": {
                "last_tick": T0 + 100,
                "tick_error": "",
                "regions": {
                    "iad": {
                        "min": 1,
                        "max": 8,
                        "desired": 3,
                        "machines": {"stopped": 1, "started": 2},
                        "health": "healthy",
                        "health_reason": "2 healthy, 0 unhealthy, 0 unknown",
                        "metric": {"name": "inflight", "value": 42.5, "age": 3.1},
                        "last_decision": {
                            "at": T0 + 100,
                            "action": "scale_up",
                            "count": 1,
                            "rule": "target_tracking",
                            "reason": "inflight 42.0 / target 20 = 2.1 -> 3 machines",
                            "outcome": "done",
                        },
                    },
                    "cdg": {
                        "min": 1,
                        "max": 4,
                        "desired": 1,
                        "machines": {"started": 1},
                        "health": "degraded",
                    },
                },
            }
        },
    }


def decision(at: float, **fields: Any) -> dict[str, Any]:
    record = {
        "at": at,
        "app": "shop",
        "region": "iad",
        "action": "scale_up",
        "count": 1,
        "from": 2,
        "to": 3,
        "rule": "target_tracking",
        "reason": "inflight 42.0 / target 20 = 2.1 -> 3 machines",
        "outcome": "done",
        "inputs": {"inflight": 42.0, "target": 20, "window": "60s"},
        "not_acting": {"step_up": "inflight 42 below its first step (50)", "schedule": "no window now"},
    }
    return record | fields


def row_of(text: str, first_cell: str) -> str:
    (line,) = [line for line in text.splitlines() if line.split()[:1] == [first_cell]]
    return line


def test_status_shows_a_row_per_region_with_every_field() -> None:
    """A region's row: desired, range, machines by state, health, metric, age and the last decision."""
    text = render_status(example_status())
    iad = row_of(text, "iad")
    for shown in ("3", "1..8", "2 started, 1 stopped", "healthy", "inflight 42.5", "3.1s", "scale_up +1"):
        assert shown in iad
    assert "(done) target_tracking: inflight 42.0 / target 20 = 2.1 -> 3 machines" in iad
    assert row_of(text, "cdg").split()[1:3] == ["1", "1..4"]


def test_status_columns_are_aligned() -> None:
    """Every cell starts under its column's header."""
    text = render_status(example_status())
    header = row_of(text, "REGION")
    iad, cdg = row_of(text, "iad"), row_of(text, "cdg")
    assert iad.index("healthy") == header.index("HEALTH") == cdg.index("degraded")
    assert iad.index("2 started") == header.index("MACHINES") == cdg.index("1 started")
    assert iad.index("scale_up") == header.index("LAST DECISION")
    assert not any(line != line.rstrip() for line in text.splitlines())


def test_status_regions_are_sorted_and_apps_get_a_section_each() -> None:
    """Regions are listed alphabetically, each app under its own line with its last tick."""
    status = example_status()
    status["apps"]["blog"] = {"last_tick": T0, "regions": {"nrt": {"desired": 1}}}
    lines = render_status(status).splitlines()
    firsts = [line.split()[0] for line in lines if line.strip()]
    assert firsts.index("blog") < firsts.index("nrt") < firsts.index("shop") < firsts.index("cdg")
    assert firsts.index("cdg") < firsts.index("iad")
    assert "shop  last tick 2026-09-21T14:15:00Z" in lines


def test_status_header_says_version_readiness_mode_and_policy() -> None:
    """The header gives the version, ready or not (with why), dry run or live, and the policy file."""
    status = example_status()
    assert render_status(status).splitlines()[:2] == [
        "flywatch 0.1.0  ready  live  started 2026-09-21T14:13:20Z",
        "policy config/flywatch.yaml  loaded 2026-09-21T14:13:20Z  apps: shop",
    ]
    status |= {"ready": False, "ready_reason": "policy invalid", "dry_run": True}
    status["policy"]["last_error"] = "apps.shop.regions.iad.max: must be >= min"
    head = render_status(status).splitlines()[:3]
    assert head[0] == "flywatch 0.1.0  not ready: policy invalid  dry run  started 2026-09-21T14:13:20Z"
    assert head[2] == "policy error: apps.shop.regions.iad.max: must be >= min"


def test_status_with_now_says_how_long_ago() -> None:
    """Given now, times also say how long ago they were."""
    text = render_status(example_status(), now=T0 + 160)
    assert "started 2026-09-21T14:13:20Z (2m40s ago)" in text
    assert "last tick 2026-09-21T14:15:00Z (1m00s ago)" in text


def test_status_tick_error_is_shown() -> None:
    """An app whose last tick failed shows the error next to its name."""
    status = example_status()
    status["apps"]["shop"]["tick_error"] = "Machines_list: 503 after 4 tries"
    assert "tick error: Machines_list: 503 after 4 tries" in render_status(status)


def test_missing_fields_render_as_dashes() -> None:
    """A region without metric, health or decision, and an app never ticked, show "-" instead of failing."""
    status = example_status()
    status["apps"]["blog"] = {}
    status["apps"]["shop"]["regions"]["nrt"] = {}
    text = render_status(status)
    assert row_of(text, "nrt").split() == ["nrt", "-", "-", "-", "-", "-", "-", "-"]
    assert "blog  never ticked" in text
    assert "  no regions" in text


def test_an_empty_status_still_renders() -> None:
    """An empty document renders a header of dashes and says no apps are watched."""
    assert render_status({}).splitlines() == [
        "flywatch -  ready: -  live  started -",
        "policy -  loaded -  apps: -",
        "",
        "no apps watched",
    ]


MALFORMED: list[Any] = [
    {"apps": None},
    {"apps": []},
    {"apps": {"shop": None}},
    {"apps": {"shop": {"regions": ["iad"]}}},
    {"apps": {"shop": {"last_tick": "yesterday", "regions": {"iad": None}}}},
    {"apps": {"shop": {"regions": {"iad": {"machines": ["a"], "metric": "x", "desired": "3"}}}}},
    {"apps": {"shop": {"regions": {"iad": {"metric": {"value": "NaN", "age": None}, "min": True}}}}},
    {"apps": {"shop": {"regions": {"iad": {"last_decision": {"count": "one", "at": 1e300}}}}}},
    {"apps": {"shop": {"regions": {"iad": {"machines": {"started": None}}}}}},
    {"apps": {1: {"regions": {2: {}}}}},
    {"started_at": float("inf"), "policy": {"apps": "shop"}, "version": None, "ready": "yes"},
    {"started_at": -1e20, "policy": []},
]


@pytest.mark.parametrize("status", MALFORMED)
def test_malformed_documents_never_crash(status: dict[str, Any]) -> None:
    """Fields of unexpected types (a newer or broken daemon) render as "-" rather than raising."""
    assert isinstance(render_status(status), str)
    assert isinstance(render_explain("shop", status, [status, {"app": ["x"]}, {"at": "now"}]), str)


def test_non_numbers_are_not_shown_as_numbers() -> None:
    """A count given as text, or a boolean, is a dash: only numbers are shown as numbers."""
    status = {"apps": {"shop": {"regions": {"iad": {"desired": "3", "min": True, "max": 4}}}}}
    assert row_of(render_status(status), "iad").split()[:3] == ["iad", "-", "-..4"]


def test_control_characters_and_newlines_stay_out_of_the_table() -> None:
    """A terminal escape or a newline in a reason is neutralised, so the row stays one aligned line."""
    status = example_status()
    status["apps"]["shop"]["regions"]["iad"]["last_decision"]["reason"] = "line one\nline two \x1b[31mred"
    text = render_status(status)
    assert "\x1b" not in text
    assert "line one line two ?[31mred" in row_of(text, "iad")


def test_machine_states_are_ordered_serving_first() -> None:
    """Machines are counted by state, started first and failed late; an empty mapping reads "none"."""
    status = example_status()
    regions = status["apps"]["shop"]["regions"]
    regions["iad"]["machines"] = {"failed": 1, "stopped": 2, "zombie": 1, "started": 3, "starting": 1}
    regions["cdg"]["machines"] = {}
    text = render_status(status)
    assert "3 started, 1 starting, 2 stopped, 1 failed, 1 zombie" in row_of(text, "iad")
    assert "none" in row_of(text, "cdg")


def test_explain_lists_regions_with_health_reasons() -> None:
    """explain starts with the app's line and its regions' table, with the reason for each region's health."""
    text = render_explain("shop", example_status(), [])
    assert text.splitlines()[0] == "shop  last tick 2026-09-21T14:15:00Z"
    header, iad = row_of(text, "REGION"), row_of(text, "iad")
    assert iad.index("2 healthy, 0 unhealthy, 0 unknown") == header.index("HEALTH REASON")
    assert "no decisions recorded" in text


def test_explain_shows_decisions_newest_first_with_everything() -> None:
    """Decisions come newest first, each with ISO UTC time, region, action, numbers, rule, outcome,
    reason, inputs and why the other rules did not act."""
    records = [
        decision(T0 + 100),
        decision(T0 + 400, action="hold", count=0, reason="inside cooldown", outcome="none", rule="cooldown"),
        decision(T0 + 200, action="scale_down", count=2, **{"from": 5, "to": 3}, outcome="dry_run"),
    ]
    text = render_explain("shop", example_status(), records)
    heads = [line.strip() for line in text.splitlines() if line.startswith("  2026-")]
    assert heads == [
        "2026-09-21T14:20:00Z  iad  hold (2 -> 3)  rule cooldown  outcome none",
        "2026-09-21T14:16:40Z  iad  scale_down -2 (5 -> 3)  rule target_tracking  outcome dry_run",
        "2026-09-21T14:15:00Z  iad  scale_up +1 (2 -> 3)  rule target_tracking  outcome done",
    ]
    assert "    reason: inflight 42.0 / target 20 = 2.1 -> 3 machines" in text
    assert "    inputs: inflight=42, target=20, window=60s" in text
    assert "    not acting:" in text
    assert "      step_up   inflight 42 below its first step (50)" in text
    assert "      schedule  no window now" in text


def test_explain_keeps_only_the_apps_decisions() -> None:
    """Decisions of another app are left out; a decision with no app field is kept."""
    records = [decision(T0, app="blog", rule="blog_rule"), decision(T0 + 1, rule="mine"), decision(T0 + 2)]
    del records[2]["app"]
    text = render_explain("shop", example_status(), records)
    assert "blog_rule" not in text
    assert "rule mine" in text
    assert text.count("outcome done") == 2


def test_explain_decisions_without_numbers_or_time() -> None:
    """A decision missing its time, counts, inputs or other rules renders with dashes and sorts last."""
    records = [{"app": "shop", "action": "hold"}, decision(T0)]
    lines = render_explain("shop", example_status(), records).splitlines()
    heads = [line for line in lines if line.startswith("  ") and "rule" in line]
    assert heads[-1] == "  -  -  hold  rule -  outcome -"
    assert lines[-1] == "    reason: -"


def test_explain_nested_inputs_are_compact_json() -> None:
    """Inputs that are lists or mappings are shown as compact JSON on the inputs line."""
    records = [decision(T0, inputs={"samples": [1, 2.5], "window": {"s": 60}, "flag": None})]
    text = render_explain("shop", example_status(), records)
    assert 'inputs: samples=[1,2.5], window={"s":60}, flag=null' in text


def test_explain_long_reasons_wrap_under_their_label() -> None:
    """A reason longer than the width wraps, its continuation lines indented under the label."""
    reason = " ".join(f"word{i}" for i in range(40))
    text = render_explain("shop", example_status(), [decision(T0, reason=reason)])
    lines = [line for line in text.splitlines() if "word" in line]
    assert len(lines) > 1
    assert lines[0].startswith("    reason: word0")
    assert all(line.startswith("      word") for line in lines[1:])
    assert all(len(line) <= views.WIDTH for line in lines)


def test_explain_an_unknown_app_names_the_known_ones() -> None:
    """explain for an app the daemon does not watch says so and lists the apps it does watch."""
    text = render_explain("nope", example_status(), [])
    assert text.splitlines()[0] == "nope: not watched by this daemon (apps: shop)"


def test_explain_an_app_in_the_policy_that_never_ticked() -> None:
    """An app named by the policy but absent from the apps (no tick yet) is said never to have ticked."""
    status = example_status()
    status["policy"]["apps"].append("blog")
    assert render_explain("blog", status, []).splitlines()[0] == "blog  never ticked"


def cluster_status() -> dict[str, Any]:
    status = example_status()
    status["policy"]["apps"].extend(["blog", "wiki"])
    status["cluster"] = {
        "mode": "cluster",
        "member": "a/1f2e3d",
        "region": "iad",
        "joined": True,
        "takeover_seconds": 15.0,
        "last_heartbeat": T0 - 2,
        "last_error": "",
        "owned": 1,
        "members": [
            {"member": "a/1f2e3d", "region": "iad", "live": True, "apps": 1, "me": True},
            {"member": "b/4c5b6a", "region": "cdg", "live": True, "apps": 1, "me": False},
            {"member": "c/0a0b0c", "region": "nrt", "live": False, "apps": 0, "me": False},
        ],
        "owners": {"shop": "a/1f2e3d", "blog": "b/4c5b6a", "wiki": None},
    }
    return status


def test_status_of_a_cluster_member_says_who_it_is_and_who_holds_how_many_apps() -> None:
    text = render_status(cluster_status(), now=T0)
    assert (
        "cluster: this is a/1f2e3d (iad), a live member, holding 1 of 3 apps; takeover within 15.0s;"
        " last heartbeat 2026-09-21T14:13:18Z (2.0s ago)" in text
    )
    assert "cluster: 1 app(s) held by no live member" in text
    assert row_of(text, "a/1f2e3d").split() == ["a/1f2e3d", "(this", "one)", "iad", "live", "1"]
    assert row_of(text, "b/4c5b6a").split() == ["b/4c5b6a", "cdg", "live", "1"]
    assert row_of(text, "c/0a0b0c").split() == ["c/0a0b0c", "nrt", "gone", "0"]


def test_status_of_a_member_cut_off_says_so() -> None:
    status = cluster_status()
    status["cluster"] |= {"joined": False, "last_error": "PostgreSQL leases: connection refused"}
    text = render_status(status, now=T0)
    assert "a live member" not in text
    assert "CUT OFF (acts on nothing)" in text
    assert "cluster error: PostgreSQL leases: connection refused" in text


def test_status_of_an_instance_alone_has_no_cluster_lines() -> None:
    status = example_status() | {"cluster": {"mode": "single", "member": "a/1f2e3d", "owned": 1}}
    assert "cluster" not in render_status(status, now=T0)


def test_explain_an_app_another_instance_holds_names_that_instance() -> None:
    status = cluster_status()
    assert render_explain("blog", status, []).splitlines()[0] == (
        "blog: watched by b/4c5b6a, another instance: ask that one"
    )
    assert render_explain("wiki", status, []).splitlines()[0] == "wiki  never ticked"


def test_explain_says_dry_run_and_policy_error() -> None:
    """In dry run, and with a policy that failed to load, explain says so first."""
    status = example_status() | {"dry_run": True}
    status["policy"] = {**status["policy"], "last_error": "bad yaml"}
    assert render_explain("shop", status, []).splitlines()[:2] == [
        "dry run: decisions are recorded, not carried out",
        "policy error: bad yaml",
    ]


def test_rendering_does_not_change_its_input() -> None:
    """The views read the documents and never modify them."""
    status, records = example_status(), [decision(T0), decision(T0 + 1)]
    before = copy.deepcopy((status, records))
    render_status(status, now=T0)
    render_explain("shop", status, records, now=T0)
    assert (status, records) == before


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0.0s"),
        (3.14, "3.1s"),
        (59.94, "59.9s"),
        (125, "2m05s"),
        (3600, "1h00m"),
        (7322, "2h02m"),
        (90000, "1d01h"),
        (-2, "-2.0s"),
        (None, "-"),
        ("3", "-"),
        (float("nan"), "-"),
    ],
)
def test_ages_read_like_people_say_them(seconds: Any, text: str) -> None:
    """Durations: tenths of seconds under a minute, then m/s, h/m, d/h; anything else is "-"."""
    assert views._age(seconds) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3, "3"),
        (42.0, "42"),
        (42.5, "42.5"),
        (2.123456, "2.123"),
        (0.0004, "0.0004"),
        (12345.6, "12346"),
        (float("inf"), "inf"),
        (True, "-"),
        (None, "-"),
        ("3", "-"),
    ],
)
def test_numbers_are_short(value: Any, text: str) -> None:
    """Counts as integers, measurements with four significant digits; a non-number is "-"."""
    assert views._num(value) == text


def example_releases_status() -> dict[str, Any]:
    status = example_status()
    status["releases"] = {
        "shop": {
            "watched": {
                "version": 42,
                "id": "01JREL42",
                "image": "registry.fly.io/shop:v42",
                "verdict": "failing",
                "reason": "error rate 12% against 1% for v41",
                "numbers": {"error_rate": 0.12, "baseline_error_rate": 0.01, "requests": 5000},
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
                "state": "partial",
                "by": "auto",
                "reason": "error rate 12% against 1% for v41",
                "updated": ["m1", "m2"],
                "destroyed": ["c1"],
                "in_flight": [],
                "skipped": {"m4": "leased by others past the wait: deploy"},
                "failed": {"m5": "update: 500 internal error"},
                "note": "m4 is reverted once its lease is released",
                "started_at": T0 + 100,
                "finished_at": T0 + 130,
            },
            "halted": "",
            "bad": [42, 40],
        }
    }
    return status


def release_event(at: float, kind: str, version: int | None, summary: str, **fields: Any) -> dict[str, Any]:
    release = {"version": version, "id": f"r{version}", "image": f"shop:v{version}"} if version else None
    record = {"at": at, "app": "shop", "kind": kind, "summary": summary, "release": release}
    return record | {"numbers": {}, "details": {}} | fields


def history_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = lines.index("release history, newest first:") + 2  # the title, then the table's header
    return [line.split(None, 3) for line in lines[start:]]


def test_releases_show_the_watched_release_with_verdict_reason_and_numbers() -> None:
    """The watched release: version, image, id and verdict, then its reason, numbers and times."""
    lines = render_releases("shop", example_releases_status(), []).splitlines()
    assert lines[:5] == [
        "shop  release watch",
        "  watched     v42  registry.fly.io/shop:v42  id 01JREL42  verdict failing",
        "    reason: error rate 12% against 1% for v41",
        "    numbers: error_rate=0.12, baseline_error_rate=0.01, requests=5000",
        "    first seen 2026-09-21T14:13:20Z  rolled out 2026-09-21T14:14:20Z",
    ]
    assert "  known good  v41  registry.fly.io/shop:v41  id 01JREL41  verdict healthy" in lines
    assert "  marked bad  v42, v40" in lines


def test_releases_show_the_rollback_with_its_machines() -> None:
    """A rollback: from and to, state, who started it, why, when, and every machine by what became of it."""
    text = render_releases("shop", example_releases_status(), [])
    start = text.index("  rollback ")
    assert text[start:].splitlines()[:10] == [
        "  rollback    v42 -> v41 (registry.fly.io/shop:v41)  partial  by auto",
        "    reason: error rate 12% against 1% for v41",
        "    started 2026-09-21T14:15:00Z  finished 2026-09-21T14:15:30Z",
        "    updated: m1, m2",
        "    destroyed: c1",
        "    skipped (held by others):",
        "      m4  leased by others past the wait: deploy",
        "    failed:",
        "      m5  update: 500 internal error",
        "    note: m4 is reverted once its lease is released",
    ]


def test_a_rollback_under_way_shows_the_machines_in_flight() -> None:
    """A running rollback names the machines being changed now; one that changed none yet says so."""
    status = example_releases_status()
    rollback = status["releases"]["shop"]["rollback"]
    rollback |= {"state": "running", "updated": [], "destroyed": [], "skipped": {}, "failed": {}}
    rollback |= {"in_flight": ["m1", "m2"], "finished_at": None, "note": ""}
    text = render_releases("shop", status, [])
    assert "  rollback    v42 -> v41 (registry.fly.io/shop:v41)  running  by auto" in text
    assert "    in flight: m1, m2" in text
    assert "finished -" in text
    rollback["in_flight"] = []
    assert "    no machine changed yet" in render_releases("shop", status, [])


def test_releases_history_is_newest_first_one_line_each() -> None:
    """The history: one aligned line per event, newest first, with time, kind, version and summary."""
    events = [
        release_event(T0, "release_seen", 42, "release v42 (shop:v42) seen"),
        release_event(T0 + 130, "rollback_finished", 42, "rolled v42 back to v41"),
        release_event(T0 + 100, "rollback_started", 42, "rolling v42 back to v41 (shop:v41)"),
        release_event(T0 + 100, "verdict", None, "no release"),
    ]
    text = render_releases("shop", example_releases_status(), events)
    assert history_rows(text) == [
        ["2026-09-21T14:15:30Z", "rollback_finished", "v42", "rolled v42 back to v41"],
        ["2026-09-21T14:15:00Z", "rollback_started", "v42", "rolling v42 back to v41 (shop:v41)"],
        ["2026-09-21T14:15:00Z", "verdict", "-", "no release"],
        ["2026-09-21T14:13:20Z", "release_seen", "v42", "release v42 (shop:v42) seen"],
    ]
    table = text.splitlines()[text.splitlines().index("release history, newest first:") + 1 :]
    assert table[0].split() == ["AT", "KIND", "RELEASE", "SUMMARY"]
    assert {line.index(" v42 ") for line in table if " v42 " in line} == {table[0].index("RELEASE") - 1}
    assert not any(line != line.rstrip() for line in text.splitlines())


def test_releases_history_keeps_only_the_apps_events() -> None:
    """Events of another app are left out; one without an app field is kept; none at all is said."""
    events = [
        release_event(T0, "verdict", 7, "blog's", app="blog"),
        release_event(T0 + 1, "verdict", 42, "mine"),
        {"kind": "release_seen", "summary": "no app field"},
    ]
    rows = history_rows(render_releases("shop", example_releases_status(), events))
    assert [row[-1] for row in rows] == ["mine", "no app field"]
    assert rows[-1][:3] == ["-", "release_seen", "-"]
    text = render_releases("shop", example_releases_status(), events[:1])
    assert text.splitlines()[-1] == "no release events recorded"


def test_releases_with_now_say_how_long_ago() -> None:
    """Given now, the times of the release state and the history also say how long ago they were."""
    events = [release_event(T0 + 100, "rollback_started", 42, "rolling back")]
    text = render_releases("shop", example_releases_status(), events, now=T0 + 160)
    assert "first seen 2026-09-21T14:13:20Z (2m40s ago)" in text
    assert "started 2026-09-21T14:15:00Z (1m00s ago)" in text
    assert history_rows(text)[0][:2] == ["2026-09-21T14:15:00Z", "(1m00s"]


@pytest.mark.parametrize(
    ("entry", "shown"),
    [
        ({}, ["  watched     none seen yet", "  known good  none on record", "  rollback    none"]),
        ({"watched": None, "good": None, "rollback": None, "halted": "", "bad": []}, ["  rollback    none"]),
        ({"halted": "v43 failed after a rollback to it: a person must look"}, ["  halted: v43 failed after"]),
        ({"watched": {"version": 41, "after_rollback": True}}, ["(the release a rollback went back to)"]),
        ({"watched": {"version": 43}}, ["  watched     v43  -  verdict -", "    reason: -"]),
        ({"good": {"version": 41.0, "image": "shop:v41"}}, ["  known good  v41  shop:v41  verdict -"]),
        (
            {"rollback": {"state": "waiting"}},
            ["  rollback    - -> -  waiting  by -", "    started -  finished -"],
        ),
        ({"bad": [40, "41", None, True]}, ["  marked bad  v40"]),
    ],
)
def test_release_states_render_what_they_have(entry: dict[str, Any], shown: list[str]) -> None:
    """A release state with parts missing or null shows "none" or "-" for them, and everything it has."""
    text = render_releases("shop", {"releases": {"shop": entry}}, [])
    for line in shown:
        assert line in text, text
    assert "marked bad" not in text or "bad" in entry


@pytest.mark.parametrize(
    ("status", "first_line"),
    [
        ({"releases": {"shop": {}}, "policy": {"apps": ["shop"]}}, "shop  release watch"),
        ({"releases": {}, "policy": {"apps": ["shop"]}}, "shop  no release seen yet (never ticked)"),
        (
            {"releases": {"blog": {}}, "policy": {"apps": ["api"]}},
            "shop: not watched by this daemon (apps: api, blog)",
        ),
        ({"releases": {}}, "shop: not watched by this daemon (apps: none)"),
        ({"apps": {}}, "shop: this daemon reports no release watch"),
        ({"releases": ["shop"]}, "shop: this daemon reports no release watch"),
        ({"dry_run": True, "releases": {}}, "dry run: rollbacks are recorded, not carried out"),
    ],
)
def test_releases_say_what_the_daemon_knows_of_the_app(status: dict[str, Any], first_line: str) -> None:
    """Without release state for the app, it says why: never ticked, not watched (and which are), no watch."""
    assert render_releases("shop", status, []).splitlines()[0] == first_line


MALFORMED_RELEASES: list[Any] = [
    {"releases": None},
    {"releases": {"shop": None}},
    {"releases": {"shop": []}},
    {"releases": {"shop": {"watched": "v42", "good": 41, "rollback": ["x"], "bad": "40", "halted": 3}}},
    {"releases": {"shop": {"watched": {"version": "42", "numbers": [1], "first_seen": "now"}}}},
    {"releases": {"shop": {"watched": {"version": True, "numbers": {"x": {"y": [1]}}, "first_seen": 1e300}}}},
    {
        "releases": {
            "shop": {"rollback": {"from": 42, "to": {"version": None}, "updated": "m1", "failed": []}}
        }
    },
    {"releases": {"shop": {"rollback": {"skipped": {1: None}, "started_at": float("nan"), "note": None}}}},
    {
        "releases": {1: {}, "shop": {"good": {"version": float("inf"), "id": ["x"]}}},
        "policy": {"apps": "shop"},
    },
]
ODD_EVENTS: list[Any] = [
    {"at": "yesterday", "kind": None, "release": "v42"},
    {"app": ["shop"], "release": {"version": "42"}},
    {"at": float("inf"), "summary": {"a": 1}, "release": {"version": -1}},
    "not a record",
    None,
]


@pytest.mark.parametrize("status", MALFORMED_RELEASES)
def test_malformed_release_documents_never_crash(status: dict[str, Any]) -> None:
    """Release fields and events of unexpected types render as "-" rather than raising."""
    assert isinstance(render_releases("shop", status, ODD_EVENTS), str)
    assert isinstance(render_releases("shop", status, {"error": "not a list"}), str)  # type: ignore[arg-type]


def test_release_text_is_kept_on_one_line_without_control_characters() -> None:
    """A terminal escape or a newline in a summary or a reason is neutralised; each event stays one line."""
    status = example_releases_status()
    status["releases"]["shop"]["watched"]["reason"] = "bad\nnews \x1b[31mred"
    events = [release_event(T0, "verdict", 42, "line one\nline two \x1b[2J")]
    text = render_releases("shop", status, events)
    assert "\x1b" not in text
    assert "    reason: bad news ?[31mred" in text
    assert history_rows(text) == [["2026-09-21T14:13:20Z", "verdict", "v42", "line one line two ?[2J"]]


def test_rendering_releases_does_not_change_its_input() -> None:
    """render_releases reads the documents and never modifies them."""
    status, events = example_releases_status(), [release_event(T0, "verdict", 42, "x")]
    before = copy.deepcopy((status, events))
    render_releases("shop", status, events, now=T0)
    assert (status, events) == before


RECORDED_TO_NEWEST = "rollback of shop recorded: to the newest known-good release older than the one running"


@pytest.mark.parametrize(
    ("answer", "first_line"),
    [
        (
            {"ok": True, "app": "shop", "request": {"to": 41, "at": T0, "by": "alice@laptop via cli"}},
            "rollback of shop recorded: to v41 (asked by alice@laptop via cli at 2026-09-21T14:13:20Z)",
        ),
        (
            {"ok": True, "request": {"to": None, "at": T0, "by": "cli"}},
            f"{RECORDED_TO_NEWEST} (asked by cli at 2026-09-21T14:13:20Z)",
        ),
        (
            {},
            f"{RECORDED_TO_NEWEST} (asked by - at -)",
        ),
        (
            {"request": "odd"},
            f"{RECORDED_TO_NEWEST} (asked by - at -)",
        ),
    ],
)
def test_a_recorded_rollback_says_what_happens_next(answer: dict[str, Any], first_line: str) -> None:
    """The answer to a rollback request names the target and who asked, then that the next tick does it."""
    lines = render_rollback_request("shop", answer).splitlines()
    assert lines == [
        first_line,
        "the daemon's next tick of shop carries it out, or refuses it saying why;",
        "`flywatch releases shop` shows its progress",
    ]
