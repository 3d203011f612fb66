"""The policy file (config.py): a full policy parses; every error names its file, line and key path."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from daemon.config import (
    LoadedPolicy,
    Policy,
    PolicyError,
    load_policy,
    parse_duration,
    parse_policy,
    promql_by_region,
    summary,
)

SOURCE = "config/flywatch.yaml"
HOOK = "https://hooks.example.com/services/T000/B000/very-secret-token"

FULL = textwrap.dedent(
    f"""\
    apps:
      shop:
        process_group: app
        regions:
          iad: {{min: 1, max: 8}}
          cdg: {{min: 1, max: 4}}
          nrt: {{min: 1, max: 4}}
        health:
          port: 8080
          path: /health
          interval: 5s
          timeout: 2s
          headers: {{User-Agent: flywatch}}
          expect_status: [200, 204]
          max_latency: 1s
          body_contains: ok
          json_field: {{path: status, equals: ok}}
          unhealthy_after: 2
          healthy_after: 3
        scaling:
          interval: 5s
          metric:
            scrape:
              port: 9091
              path: /metrics
              name: app_inflight_requests
              aggregate: avg
              labels: {{route: checkout}}
              min_coverage: 0.5
            max_age: 30s
          target_per_machine: 20
          tolerance: 0.1
          scale_up:   {{stabilization: 0s,  cooldown: 10s, max_step: 4}}
          scale_down: {{stabilization: 1m30s, cooldown: 30s, max_step: 1}}
          scale_down_action: suspend
          on_missing_metric: max
          schedules:
            - cron: "0 8 * * mon-fri"
              duration: 10h
              timezone: Europe/Paris
              regions: {{cdg: {{min: 2}}, iad: {{min: 3, max: 10}}}}
        release:
          bake: 5m
          max_error_ratio: 0.05
          max_p95_latency: 800ms
          max_unhealthy_ratio: 0.25
          min_requests: 50
          on_failure: rollback
          max_parallel: 2
          lease_wait: 2m
          traffic:
            source: promql
            requests: fly_app_http_responses_count
            latency: fly_app_http_response_time_seconds
      api:
        regions:
          ord: {{max: 3}}
        scaling:
          metric: {{promql: 'sum(rate(http_requests_total{{app="api", region="{{region}}"}}[1m]))'}}
          target_per_machine: 2.5
        release: {{on_failure: alert}}
      batch:
        regions: {{fra: {{min: 0, max: 2}}}}
        scaling:
          metric: {{machines: {{state: stopped}}}}
          target_per_machine: 1
          scale_down_action: destroy
      web:
        regions: {{ams: {{min: 1, max: 2}}}}
        release: {{on_failure: none}}
    alerts:
      webhooks:
        - url: {HOOK}
          format: slack
        - url: http://alerts.internal:9000/flywatch
    """
)

MINIMAL = "apps:\n  shop:\n    regions:\n      iad: {max: 3}\n"


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, SOURCE)
    assert caught.value.source == SOURCE
    assert str(caught.value) == f"{SOURCE}: " + "; ".join(caught.value.problems)
    return caught.value.problems


def doc(text: str) -> str:
    return textwrap.dedent(text)


# ---------------------------------------------------------------------------- a full policy


def test_full_policy_parses() -> None:
    """Every option of the example policy is read, durations in seconds and defaults where left out."""
    policy = parse_policy(FULL, SOURCE)
    shop = policy.apps["shop"]
    assert list(shop.regions) == ["iad", "cdg", "nrt"]
    assert (shop.regions["iad"].min, shop.regions["iad"].max) == (1, 8)
    health = shop.health
    assert (health.port, health.path, health.interval, health.timeout, health.max_latency) == (
        8080,
        "/health",
        5.0,
        2.0,
        1.0,
    )
    assert health.headers == {"User-Agent": "flywatch"}
    assert health.expect_status == [200, 204]
    assert health.body_contains == "ok"
    assert health.json_field is not None
    assert (health.json_field.path, health.json_field.equals) == ("status", "ok")
    assert (health.unhealthy_after, health.healthy_after) == (2, 3)
    scaling = shop.scaling
    assert scaling is not None
    assert scaling.metric.scrape is not None
    assert scaling.metric.scrape.model_dump() == {
        "name": "app_inflight_requests",
        "port": 9091,
        "path": "/metrics",
        "aggregate": "avg",
        "labels": {"route": "checkout"},
        "min_coverage": 0.5,
    }
    assert (scaling.metric.max_age, scaling.metric_max_age) == (30.0, 30.0)
    assert (scaling.interval, scaling.target_per_machine, scaling.tolerance) == (5.0, 20.0, 0.1)
    assert (scaling.scale_up.stabilization, scaling.scale_up.cooldown, scaling.scale_up.max_step) == (
        0,
        10,
        4,
    )
    assert (scaling.scale_down.stabilization, scaling.scale_down.cooldown, scaling.scale_down.max_step) == (
        90,
        30,
        1,
    )
    assert (scaling.scale_down_action, scaling.on_missing_metric) == ("suspend", "max")
    [schedule] = scaling.schedules
    assert (schedule.cron, schedule.duration, schedule.timezone) == (
        "0 8 * * mon-fri",
        36000.0,
        "Europe/Paris",
    )
    assert {code: (b.min, b.max) for code, b in schedule.regions.items()} == {
        "cdg": (2, None),
        "iad": (3, 10),
    }
    assert shop.release.model_dump() == {
        "bake": 300.0,
        "max_error_ratio": 0.05,
        "max_p95_latency": 0.8,
        "max_unhealthy_ratio": 0.25,
        "min_requests": 50,
        "on_failure": "rollback",
        "max_parallel": 2,
        "lease_wait": 120.0,
        "traffic": {
            "source": "promql",
            "port": 8080,
            "path": "/metrics",
            "requests": "fly_app_http_responses_count",
            "status_label": "status",
            "latency": "fly_app_http_response_time_seconds",
        },
    }
    api = policy.apps["api"]
    assert api.scaling is not None
    assert api.scaling.metric.promql == 'sum(rate(http_requests_total{app="api", region="{region}"}[1m]))'
    assert (api.process_group, api.health.interval, api.scaling.metric_max_age) == ("app", 5.0, 30.0)
    assert (api.scaling.scale_down.stabilization, api.scaling.scale_down.max_step) == (60.0, 1)
    assert api.scaling.on_missing_metric == "hold"
    batch = policy.apps["batch"].scaling
    assert batch is not None
    assert batch.metric.machines is not None
    assert batch.metric.machines.state == "stopped"
    assert policy.apps["web"].scaling is None
    hooks = policy.alerts.webhooks
    assert [(h.url.get_secret_value(), h.format) for h in hooks] == [
        (HOOK, "slack"),
        ("http://alerts.internal:9000/flywatch", "json"),
    ]


def test_summary_describes_each_app() -> None:
    """summary() gives one line per app: regions and bounds, what drives scaling, what a bad release gets."""
    assert summary(parse_policy(FULL, SOURCE)) == [
        (
            "shop: iad 1-8, cdg 1-4, nrt 1-4; scrape app_inflight_requests, target 20 per machine; "
            "release rollback: rollback"
        ),
        (
            "api: ord 1-3; promql "
            """'sum(rate(http_requests_total{app="api", region="{region}"}[1m]))', target 2.5 per machine; """
            "release rollback: alert"
        ),
        "batch: fra 0-2; machines stopped, target 1 per machine; release rollback: rollback",
        "web: ams 1-2; watch only (no scaling); release rollback: none",
    ]


def test_metric_max_age_defaults_to_three_intervals() -> None:
    """Without max_age a sample is fresh for three scaling intervals, at least 30s."""
    text = (
        MINIMAL
        + "    scaling:\n      interval: 20s\n      metric: {machines: {}}\n      target_per_machine: 1\n"
    )
    scaling = parse_policy(text, SOURCE).apps["shop"].scaling
    assert scaling is not None
    assert scaling.metric_max_age == 60.0
    assert scaling.metric.machines is not None
    assert scaling.metric.machines.state == "started"


# ---------------------------------------------------------------------------- one problem each


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            """\
            apps:
              shop:
                regions:
                  iad:
                    min: 9
                    max: 8
            """,
            f"{SOURCE}:5: apps.shop.regions.iad.min: must not be above max (8)",
        ),
        (
            """\
            apps:
              shop:
                regions: {iad: {max: 3}}
                scaling:
                  metric: {machines: {}}
                  target_per_machine: 1
                  scale_up: {cooldwn: 10s}
            """,
            f"{SOURCE}:7: apps.shop.scaling.scale_up.cooldwn: unknown key",
        ),
        (
            MINIMAL + "extras: 1\n",
            f"{SOURCE}:5: extras: unknown key",
        ),
        (
            """\
            apps:
              shop:
                regions:
                  iad: {max: 3}
                  xyz: {max: 3}
            """,
            f"{SOURCE}:5: apps.shop.regions.xyz: unknown Fly region 'xyz'",
        ),
        (
            MINIMAL + "    health:\n      interval: 5x\n",
            f"{SOURCE}:6: apps.shop.health.interval: expected a duration like 5s, 1m30s or 800ms, got '5x'",
        ),
        (
            MINIMAL + "    health:\n      interval: 0s\n",
            f"{SOURCE}:6: apps.shop.health.interval: must be more than 0s",
        ),
        (
            MINIMAL + "    health:\n      interval: 2s\n      timeout: 3s\n",
            (
                f"{SOURCE}:7: apps.shop.health.timeout: "
                "must be more than 0s and at most the interval (2s), got 3s"
            ),
        ),
        (
            MINIMAL + "    release: {max_p95_latency: -1}\n",
            (
                f"{SOURCE}:5: apps.shop.release.max_p95_latency: "
                "a duration must be a finite number of seconds >= 0, got -1"
            ),
        ),
        (
            """\
            apps:
              shop:
                regions: {iad: {max: 3}}
                scaling:
                  metric:
                    promql: sum(rate(http_requests_total[1m]))
                  target_per_machine: 10
            """,
            (
                f"{SOURCE}:6: apps.shop.scaling.metric.promql: the query must be grouped by region "
                "(e.g. sum by (region) (...)) or contain a {region} placeholder"
            ),
        ),
        (
            """\
            apps:
              shop:
                regions: {iad: {max: 3}}
                scaling:
                  metric:
                    machines: {}
                    scrape: {name: x}
                  target_per_machine: 10
            """,
            (
                f"{SOURCE}:5: apps.shop.scaling.metric: give exactly one of scrape, promql or machines "
                "(got scrape, machines)"
            ),
        ),
        (
            """\
            apps:
              shop:
                regions: {iad: {max: 3}}
                scaling:
                  metric: {machines: {}}
            """,
            f"{SOURCE}:4: apps.shop.scaling.target_per_machine: required key is missing",
        ),
        (
            """\
            apps:
              shop:
                regions: {iad: {max: 3}}
                scaling:
                  metric: {machines: {}}
                  target_per_machine: 1
                  schedules:
                    - cron: "0 8 * * *"
                      duration: 1h
                      regions: {iad: {min: 1}}
                    - cron: "0 25 * * *"
                      duration: 1h
                      regions: {iad: {min: 1}}
            """,
            f"{SOURCE}:11: apps.shop.scaling.schedules[1].cron: not a valid cron expression: '0 25 * * *'",
        ),
        (
            """\
            apps:
              shop:
                regions: {iad: {max: 3}}
                scaling:
                  metric: {machines: {}}
                  target_per_machine: 1
                  schedules:
                    - cron: "0 8 * * *"
                      duration: 1h
                      timezone: Europe/Pariss
                      regions: {iad: {min: 1}}
            """,
            (
                f"{SOURCE}:10: apps.shop.scaling.schedules[0].timezone: "
                "unknown time zone 'Europe/Pariss' (use an IANA name like Europe/Paris)"
            ),
        ),
        (
            """\
            apps:
              shop:
                regions: {iad: {max: 3}}
                scaling:
                  metric: {machines: {}}
                  target_per_machine: 1
                  schedules:
                    - cron: "0 8 * * *"
                      duration: 1h
                      regions:
                        iad: {min: 1}
                        cdg: {min: 1}
            """,
            f"{SOURCE}:12: apps.shop.scaling.schedules[0].regions.cdg: names regions not managed here: cdg",
        ),
        (
            """\
            apps:
              shop:
                regions: {iad: {max: 3}}
                scaling:
                  metric: {machines: {}}
                  target_per_machine: 1
                  schedules:
                    - cron: "0 8 * * *"
                      duration: 1h
                      regions:
                        iad:
                          min: 5
                          max: 2
            """,
            f"{SOURCE}:12: apps.shop.scaling.schedules[0].regions.iad.min: must not be above max (2)",
        ),
        (
            MINIMAL + "alerts:\n  webhooks:\n    - url: ftp://token@hooks.example.com/x\n",
            f"{SOURCE}:7: alerts.webhooks[0].url: must be an http:// or https:// URL",
        ),
        (
            "",
            f"{SOURCE}: the top level must be a mapping with `apps:` (and `alerts:`)",
        ),
        (
            "- shop\n",
            f"{SOURCE}: the top level must be a mapping with `apps:` (and `alerts:`)",
        ),
    ],
    ids=[
        "min above max",
        "unknown key",
        "unknown top-level key",
        "unknown region",
        "bad duration",
        "zero interval",
        "timeout over interval",
        "negative duration",
        "ungrouped promql",
        "two metric kinds",
        "missing key",
        "bad cron",
        "bad time zone",
        "schedule region not managed",
        "schedule min above max",
        "webhook not http",
        "empty file",
        "not a mapping",
    ],
)
def test_problem_is_named_exactly(text: str, problem: str) -> None:
    """Each kind of error is one problem: file:line, the key path, and what is wrong."""
    assert problems(doc(text)) == [problem]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("apps: {}\n", f"{SOURCE}:1: apps: "),
        ("apps:\n  Shop_1:\n    regions: {iad: {max: 1}}\n", f"{SOURCE}:2: apps.Shop_1: "),
        ("apps:\n  shop: {}\n", f"{SOURCE}:2: apps.shop.regions: "),
        ("apps:\n  shop:\n    regions: {}\n", f"{SOURCE}:3: apps.shop.regions: "),
        (
            "apps:\n  shop:\n    regions:\n      iad: {min: lots, max: 3}\n",
            f"{SOURCE}:4: apps.shop.regions.iad.min: ",
        ),
        ("apps:\n  shop:\n    regions:\n      iad: {max: 2.5}\n", f"{SOURCE}:4: apps.shop.regions.iad.max: "),
        (
            "apps:\n  shop:\n    regions:\n      iad: {min: -1, max: 3}\n",
            f"{SOURCE}:4: apps.shop.regions.iad.min: ",
        ),
        (MINIMAL + "    health: {port: 70000}\n", f"{SOURCE}:5: apps.shop.health.port: "),
        (MINIMAL + "    health: {path: health}\n", f"{SOURCE}:5: apps.shop.health.path: "),
        (MINIMAL + "    health:\n      expect_status: []\n", f"{SOURCE}:6: apps.shop.health.expect_status: "),
        (
            MINIMAL + "    health:\n      expect_status: [200, 99]\n",
            f"{SOURCE}:6: apps.shop.health.expect_status[1]: ",
        ),
        (
            MINIMAL + "    health:\n      unhealthy_after: 0\n",
            f"{SOURCE}:6: apps.shop.health.unhealthy_after: ",
        ),
        (
            MINIMAL + "    health:\n      json_field: {path: a}\n",
            f"{SOURCE}:6: apps.shop.health.json_field.equals: ",
        ),
        (MINIMAL + "    release:\n      on_failure: panic\n", f"{SOURCE}:6: apps.shop.release.on_failure: "),
        (
            MINIMAL + "    release:\n      max_error_ratio: 2\n",
            f"{SOURCE}:6: apps.shop.release.max_error_ratio: ",
        ),
        (MINIMAL + "    release:\n      max_parallel: 0\n", f"{SOURCE}:6: apps.shop.release.max_parallel: "),
        (
            MINIMAL + "    release:\n      traffic: {source: graphite}\n",
            f"{SOURCE}:6: apps.shop.release.traffic.source: ",
        ),
        (MINIMAL + "    release:\n      lease_wait: soon\n", f"{SOURCE}:6: apps.shop.release.lease_wait: "),
        (MINIMAL + "alerts:\n  webhooks:\n    - {url: 42}\n", f"{SOURCE}:7: alerts.webhooks[0].url: "),
        (
            MINIMAL + "alerts:\n  webhooks:\n    - url: https://h.example\n      format: xml\n",
            f"{SOURCE}:8: alerts.webhooks[0].format: ",
        ),
        (MINIMAL + "alerts:\n  pager: x\n", f"{SOURCE}:6: alerts.pager: "),
    ],
)
def test_problem_names_line_and_key(text: str, where: str) -> None:
    """Type and range errors from pydantic name the key's own line and path."""
    [problem] = problems(text)
    assert problem.startswith(where)
    assert len(problem) > len(where)


def scaling_doc(line: str) -> str:
    """The minimal policy with a scaling section whose last line is `line`."""
    given = line.split(":", maxsplit=1)[0]
    lines = [f"{key}: {value}" for key, value in SCALING.items() if key != given]
    return MINIMAL + "    scaling:\n" + "".join(f"      {text}\n" for text in [*lines, line])


SCALING = {"metric": "{machines: {}}", "target_per_machine": "10"}


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("interval: 0", "interval"),
        ("target_per_machine: 0", "target_per_machine"),
        ("target_per_machine: .inf", "target_per_machine"),
        ("tolerance: 1", "tolerance"),
        ("scale_down_action: kill", "scale_down_action"),
        ("on_missing_metric: zero", "on_missing_metric"),
        ("scale_up: {max_step: 0}", "scale_up.max_step"),
        ("scale_down: {stabilization: soon}", "scale_down.stabilization"),
        ("metric: {machines: {state: gone}}", "metric.machines.state"),
        ("metric: {scrape: {name: x, min_coverage: 0}}", "metric.scrape.min_coverage"),
        ("metric: {scrape: {name: x, aggregate: p99}}", "metric.scrape.aggregate"),
        ("metric: {scrape: {port: 80}}", "metric.scrape.name"),
        ("metric: {promql: 'sum by (region) (x)', max_age: 1 minute}", "metric.max_age"),
        ("schedules: [{cron: '0 8 * * *', duration: 0s, regions: {iad: {min: 1}}}]", "schedules[0].duration"),
        ("schedules: [{cron: '0 8 * * *', regions: {iad: {min: 1}}}]", "schedules[0].duration"),
        (
            "schedules: [{cron: '0 8 * * *', duration: 1h, regions: {zzz: {min: 1}}}]",
            "schedules[0].regions.zzz",
        ),
    ],
)
def test_scaling_problem_names_line_and_key(line: str, key: str) -> None:
    """A wrong scaling option names apps.shop.scaling.<key> and the line it is on."""
    text = scaling_doc(line)
    [problem] = problems(text)
    assert problem.startswith(f"{SOURCE}:{len(text.splitlines())}: apps.shop.scaling.{key}: ")


def test_several_problems_are_all_reported() -> None:
    """A policy with several mistakes reports every one of them, not only the first."""
    text = doc(
        """\
        apps:
          shop:
            regions:
              iad: {min: 9, max: 8}
              xyz: {max: 3}
            bogus: 1
            health:
              interval: 5x
            scaling:
              interval: 0s
              metric:
                promql: sum(rate(x[1m]))
              target_per_machine: 10
              scale_up: {cooldown: -1}
              schedules:
                - cron: "61 * * * *"
                  duration: 0s
                  timezone: Mars/Olympus
                  regions:
                    cdg: {min: 5, max: 1}
          web:
            regions: {}
        alerts:
          webhooks:
            - url: not-a-url
        """
    )
    assert sorted(problems(text), key=lambda p: int(p.split(":")[1])) == [
        f"{SOURCE}:4: apps.shop.regions.iad.min: must not be above max (8)",
        f"{SOURCE}:5: apps.shop.regions.xyz: unknown Fly region 'xyz'",
        f"{SOURCE}:6: apps.shop.bogus: unknown key",
        f"{SOURCE}:8: apps.shop.health.interval: expected a duration like 5s, 1m30s or 800ms, got '5x'",
        f"{SOURCE}:10: apps.shop.scaling.interval: must be more than 0s",
        (
            f"{SOURCE}:12: apps.shop.scaling.metric.promql: the query must be grouped by region "
            "(e.g. sum by (region) (...)) or contain a {region} placeholder"
        ),
        (
            f"{SOURCE}:14: apps.shop.scaling.scale_up.cooldown: "
            "a duration must be a finite number of seconds >= 0, got -1"
        ),
        f"{SOURCE}:16: apps.shop.scaling.schedules[0].cron: not a valid cron expression: '61 * * * *'",
        f"{SOURCE}:17: apps.shop.scaling.schedules[0].duration: must be more than 0s",
        (
            f"{SOURCE}:18: apps.shop.scaling.schedules[0].timezone: "
            "unknown time zone 'Mars/Olympus' (use an IANA name like Europe/Paris)"
        ),
        f"{SOURCE}:20: apps.shop.scaling.schedules[0].regions.cdg.min: must not be above max (1)",
        f"{SOURCE}:22: apps.web.regions: Dictionary should have at least 1 item after validation, not 0",
        f"{SOURCE}:25: alerts.webhooks[0].url: must be an http:// or https:// URL",
    ]


# ---------------------------------------------------------------------------- YAML itself


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "apps:\n  shop:\n    regions:\n      iad: {max: 3}\n      iad: {max: 4}\n",
            f"{SOURCE}:5:7: not valid YAML: key 'iad' given twice (first on line 4)",
        ),
        (
            "apps:\n  shop:\n    regions:\n      iad:\n        max: 3\n        max: 4\n",
            f"{SOURCE}:6:9: not valid YAML: key 'max' given twice (first on line 5)",
        ),
        (
            MINIMAL + "  shop:\n    regions: {cdg: {max: 1}}\n",
            f"{SOURCE}:5:3: not valid YAML: key 'shop' given twice (first on line 2)",
        ),
        (
            MINIMAL + "apps: {}\n",
            f"{SOURCE}:5:1: not valid YAML: key 'apps' given twice (first on line 1)",
        ),
    ],
    ids=["region", "nested key", "app", "top level"],
)
def test_duplicate_keys_name_both_lines(text: str, problem: str) -> None:
    """A key given twice in one mapping is an error naming both lines, never a silent overwrite."""
    assert problems(text) == [problem]


def test_a_document_libyaml_refuses_but_yaml_allows_is_read_and_its_problems_have_lines() -> None:
    """A directive libyaml does not know (PyYAML's own parser only warns of it): the policy is read by the
    pure-Python loader, and its problems are located by the same loader, not raised as YAML errors."""
    text = "%FOO bar\n---\napps:\n  shop:\n    regions: {iad: {max: 2}}\n    nope: 1\n"
    assert problems(text) == [f"{SOURCE}:6: apps.shop.nope: unknown key"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "apps:\n  shop:\n    regions: {iad: {max: 3}\n    health: {}\n",
            f"{SOURCE}:4:5: not valid YAML: expected ',' or '}}', but got '<scalar>'",
        ),
        (
            "apps:\n  shop:\n    regions:\n      iad: {max: 3}\n   health: {}\n",
            f"{SOURCE}:5:4: not valid YAML: expected <block end>, but found '<block mapping start>'",
        ),
        (
            "apps:\n\tshop: 1\n",
            f"{SOURCE}:2:1: not valid YAML: found character '\\t' that cannot start any token",
        ),
        (
            "apps:\n  ? [a, b]\n  : 1\n",
            f"{SOURCE}:2:5: not valid YAML: found unhashable key",
        ),
    ],
    ids=["unclosed flow mapping", "bad indentation", "tab", "unhashable key"],
)
def test_invalid_yaml_names_line_and_column(text: str, problem: str) -> None:
    """YAML that does not parse is one problem naming the line and column where the parser stopped."""
    assert problems(text) == [problem]


def test_merge_keys_are_not_duplicates() -> None:
    """`<<: *anchor` merges a mapping; keys given next to it override it and are not duplicates."""
    text = (
        "apps:\n  shop:\n    regions:\n      iad: &small {min: 1, max: 3}\n      cdg: {<<: *small, max: 5}\n"
    )
    regions = parse_policy(text, SOURCE).apps["shop"].regions
    assert {code: (b.min, b.max) for code, b in regions.items()} == {"iad": (1, 3), "cdg": (1, 5)}
    twice = text.replace("max: 5}", "max: 5, max: 6}")
    assert problems(twice) == [f"{SOURCE}:5:33: not valid YAML: key 'max' given twice (first on line 5)"]


# ---------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("800ms", 0.8),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5m", 90.0),
        ("1h 30m", 5400.0),
        (" 10s ", 10.0),
        ("0s", 0.0),
        (5, 5.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    """Durations are read as 800ms, 5s, 1m30s, 2h, 1d or a plain number of seconds."""
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5", "expected a duration like 5s, 1m30s or 800ms, got '5'"),
        ("5x", "expected a duration like 5s, 1m30s or 800ms, got '5x'"),
        ("5S", "expected a duration like 5s, 1m30s or 800ms, got '5S'"),
        ("1m30", "expected a duration like 5s, 1m30s or 800ms, got '1m30'"),
        ("s", "expected a duration like 5s, 1m30s or 800ms, got 's'"),
        (".5s", "expected a duration like 5s, 1m30s or 800ms, got '.5s'"),
        ("1e3s", "expected a duration like 5s, 1m30s or 800ms, got '1e3s'"),
        ("-5s", "expected a duration like 5s, 1m30s or 800ms, got '-5s'"),
        ("5 seconds", "expected a duration like 5s, 1m30s or 800ms, got '5 seconds'"),
        ("", "expected a duration like 5s, 1m30s or 800ms, got ''"),
        ("  ", "expected a duration like 5s, 1m30s or 800ms, got '  '"),
        (True, "expected a duration like 5s, 1m30s or 800ms, got True"),
        (None, "expected a duration like 5s, 1m30s or 800ms, got None"),
        ([5], "expected a duration like 5s, 1m30s or 800ms, got [5]"),
        (-1, "a duration must be a finite number of seconds >= 0, got -1"),
        (math.inf, "a duration must be a finite number of seconds >= 0, got inf"),
        (math.nan, "a duration must be a finite number of seconds >= 0, got nan"),
    ],
)
def test_bad_durations(value: object, message: str) -> None:
    """Anything else is refused with a message that shows the value and the accepted forms."""
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value) == message


@pytest.mark.parametrize(("given", "seconds"), [("1m30s", 90.0), ("800ms", 0.8), ("2h", 7200.0), ("7", 7.0)])
def test_durations_in_the_policy(given: str, seconds: float) -> None:
    """A duration in the policy file is held as seconds."""
    text = MINIMAL + f"    release: {{bake: {given}}}\n"
    assert parse_policy(text, SOURCE).apps["shop"].release.bake == pytest.approx(seconds)


@pytest.mark.parametrize("given", [".nan", ".inf", "-2s", "'5'", "true", "2 weeks"])
def test_bad_durations_in_the_policy(given: str) -> None:
    """A bad duration in the policy file names its key and line."""
    [problem] = problems(MINIMAL + f"    release:\n      bake: {given}\n")
    assert problem.startswith(f"{SOURCE}:6: apps.shop.release.bake: ")


# ---------------------------------------------------------------------------- PromQL grouping


@pytest.mark.parametrize(
    ("query", "grouped"),
    [
        ("sum by (region) (rate(http_requests_total[1m]))", True),
        ("sum by (app, region) (fly_app_concurrency)", True),
        ("sum by ( region , app ) (x)", True),
        ("max by(region)(x)", True),
        ("sum(rate(http_requests_total[1m])) by (region)", True),
        ('sum(rate(http_requests_total{region="{region}"}[1m]))', True),
        ("avg(x{region='{region}', app='shop'})", True),
        ("sum(rate(http_requests_total[1m]))", False),
        ("sum by (app) (x)", False),
        ("sum by (regions) (x)", False),
        ("sum by (fly_region) (x)", False),
        ("sum without (region) (x)", False),
        ('sum(x{region="iad"})', False),
        ("sum(requests_by (region))", False),
    ],
)
def test_promql_grouped_by_region(query: str, grouped: bool) -> None:
    """A PromQL query must give one value per region: `by (... region ...)` or a {region} placeholder."""
    assert promql_by_region(query) is grouped
    text = scaling_doc(f"metric: {{promql: {json.dumps(query)}}}")  # a JSON string is a YAML string
    if grouped:
        scaling = parse_policy(text, SOURCE).apps["shop"].scaling
        assert scaling is not None
        assert scaling.metric.promql == query
    else:
        [problem] = problems(text)
        where = f"{SOURCE}:{len(text.splitlines())}: apps.shop.scaling.metric.promql: "
        assert problem.startswith(f"{where}the query must be grouped by region")


# ---------------------------------------------------------------------------- secrets and files


def test_webhook_urls_are_secrets() -> None:
    """A webhook URL never shows in the policy's repr, str or JSON dump, nor in the loaded file's repr."""
    policy = parse_policy(FULL, SOURCE)
    loaded = LoadedPolicy(policy=policy, source=SOURCE, text=FULL)
    for shown in (repr(policy), str(policy), policy.model_dump_json(), repr(policy.alerts), repr(loaded)):
        assert "very-secret-token" not in shown
        assert "alerts.internal" not in shown
    assert "**********" in repr(policy.alerts)
    assert policy.alerts.webhooks[0].url.get_secret_value() == HOOK


def test_bad_webhook_url_is_not_echoed() -> None:
    """An error about a webhook URL does not repeat the URL (it may hold a token)."""
    text = MINIMAL + "alerts:\n  webhooks:\n    - url: hooks.example.com/very-secret-token\n"
    [problem] = problems(text)
    assert "very-secret-token" not in problem


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    """load_policy reads a file and names it in every problem; a missing file is a problem too."""
    path = tmp_path / "flywatch.yaml"
    path.write_text(FULL, encoding="utf-8")
    loaded = load_policy(path)
    assert isinstance(loaded.policy, Policy)
    assert (loaded.source, loaded.text) == (str(path), FULL)
    path.write_text("apps:\n  shop:\n    regions:\n      iad: {min: 4, max: 3}\n", encoding="utf-8")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.problems == [f"{path}:4: apps.shop.regions.iad.min: must not be above max (3)"]
    with pytest.raises(PolicyError) as missing:
        load_policy(tmp_path / "nowhere.yaml")
    assert missing.value.problems == [f"{tmp_path / 'nowhere.yaml'}: cannot read: No such file or directory"]


def test_policy_is_frozen() -> None:
    """A parsed policy cannot be changed in place (a reload builds a new one)."""
    policy = parse_policy(MINIMAL, SOURCE)
    with pytest.raises(ValueError, match="frozen"):
        policy.apps["shop"].regions["iad"].max = 9  # type: ignore[misc]
