"""flywatch packaged as a private Fly app: the Dockerfile, fly.toml, deploy/fly.ha.toml and deploy/deploy.sh.

No Docker engine runs here, so the Dockerfile is linted by hadolint and its stages are read. fly.toml (one
machine on a volume, SQLite) and deploy/fly.ha.toml (several machines on PostgreSQL) are validated against
Fly's JSON schema (../shared/reference/fly-toml.schema.json) with check-jsonschema, and what the schema leaves
open (top-level [checks]) is checked here, as are the settings they and the runbook name. deploy.sh runs
against a fake `flyctl` on PATH that logs every call and answers JSON the way flyctl does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices

from daemon.app import _STOP_GRACE, _UNWIND_GRACE
from daemon.cluster import DEFAULT_TAKEOVER, Timing
from daemon.settings import Settings
from daemon.telemetry.server import parse_listen
from tests.support.contract import reference_dir

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
FLY_TOML = ROOT / "fly.toml"
FLY_HA_TOML = ROOT / "deploy" / "fly.ha.toml"
RUNBOOK = ROOT / "deploy" / "README.md"
HA_SECTION = "## High availability: several instances on PostgreSQL"
FLY_CONFIGS = pytest.mark.parametrize("config_path", [FLY_TOML, FLY_HA_TOML], ids=["fly.toml", "fly.ha.toml"])
DEPLOY_SH = ROOT / "deploy" / "deploy.sh"
BASH = shutil.which("bash") or "/bin/bash"

REGISTRY = "registry.fly.io/flywatch"
PREVIOUS = f"{REGISTRY}:deployment-01PREVIOUS"
NEW = f"{REGISTRY}:deployment-02NEW"
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|apt-get|apt|apk|setuptools|wheel)\b"
)


def tool(name: str) -> str:
    """A dev dependency's executable: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: it is a dev dependency (pip install -e '.[dev]')")
    return found


# --- the Dockerfile ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_stages(text: str) -> list[list[Instruction]]:
    """The Dockerfile's instructions, one list per stage (a FROM starts one); continuations joined."""
    stages: list[list[Instruction]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return dockerfile_stages(DOCKERFILE.read_text())


def args_of(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in stage if i.keyword == keyword]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """ENV KEY=VALUE pairs of a stage (the form this Dockerfile uses)."""
    pairs = [word.split("=", 1) for args in args_of(stage, "ENV") for word in args.split()]
    return dict(pairs)


def test_hadolint_finds_nothing() -> None:
    """hadolint, down to its style rules, has nothing to say about the Dockerfile."""
    result = subprocess.run(  # noqa: S603 - a dev tool on our own file
        [tool("hadolint"), "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_builds_the_wheel_in_a_stage_of_its_own(stages: list[list[Instruction]]) -> None:
    """A builder stage turns the source into wheels; a second stage, on slim Python 3.11, starts afresh."""
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder[0].args.lower().endswith(" as build")
    assert any("pip wheel" in run or "-m build" in run for run in args_of(builder, "RUN"))
    base = final[0].args.split()[0]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    assert " as " not in final[0].args.lower()  # the last stage is the image


def test_final_stage_installs_only_the_wheels(stages: list[list[Instruction]]) -> None:
    """The image gets the built wheels and the example policy: no source tree, nothing fetched at install."""
    final = stages[-1]
    copies = args_of(final, "COPY")
    assert copies == ["config/flywatch.yaml /etc/flywatch/flywatch.yaml"]
    installs = [run for run in args_of(final, "RUN") if "pip install" in run]
    assert len(installs) == 1
    assert "from=build" in installs[0]
    assert "--no-index" in installs[0]
    assert re.search(r"/wheels/flywatch-\*\.whl", installs[0])
    assert "ADD" not in {i.keyword for i in final}


def test_final_stage_has_no_build_tools(stages: list[list[Instruction]]) -> None:
    """No compiler, build tool or package manager install runs in the final stage."""
    for run in args_of(stages[-1], "RUN"):
        assert not BUILD_TOOLS.search(run), run


def test_final_stage_runs_flywatch_run_as_a_non_root_user(stages: list[list[Instruction]]) -> None:
    """USER is a numeric non-root uid:gid; ENTRYPOINT is ["flywatch"] and CMD ["run"], in exec form."""
    final = stages[-1]
    users = args_of(final, "USER")
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit(), users
    assert int(uid) > 0, users
    assert gid in ("", uid) or int(gid) > 0, users
    assert [json.loads(e) for e in args_of(final, "ENTRYPOINT")] == [["flywatch"]]
    assert [json.loads(c) for c in args_of(final, "CMD")] == [["run"]]
    keywords = [i.keyword for i in final]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_example_policy_is_where_flywatch_config_points(stages: list[list[Instruction]]) -> None:
    """The image copies config/flywatch.yaml to FLYWATCH_CONFIG, and fly.toml points at the same file."""
    final = stages[-1]
    config = env_of(final)["FLYWATCH_CONFIG"]
    assert f"config/flywatch.yaml {config}" in args_of(final, "COPY")
    assert fly_toml()["env"]["FLYWATCH_CONFIG"] == config


def test_dockerignore_lets_in_only_what_the_build_copies(stages: list[list[Instruction]]) -> None:
    """.dockerignore excludes everything, then lets in exactly the sources the COPY lines name."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = {
        source.rstrip("/").removeprefix("./")
        for stage in stages
        for copy in args_of(stage, "COPY")
        if not copy.startswith("--from")
        for source in copy.split()[:-1]
    }
    assert sources == allowed


# --- fly.toml ---------------------------------------------------------------------------------------------


def fly_toml() -> dict[str, Any]:
    return tomllib.loads(FLY_TOML.read_text())


def fly_ha_toml() -> dict[str, Any]:
    return tomllib.loads(FLY_HA_TOML.read_text())


def setting_variables() -> set[str]:
    """The environment variables Settings reads: FLYWATCH_<FIELD>, or a field's own aliases instead (so
    FLY_MACHINE_ID counts and FLYWATCH_MACHINE_ID does not: Settings never reads that one)."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def string_values(node: Any) -> list[str]:
    """Every string value in a parsed TOML document, however deep."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in string_values(value)]
    if isinstance(node, list):
        return [s for value in node for s in string_values(value)]
    return []


def seconds(value: int | str) -> float:
    """A fly.toml duration: a number of seconds, or "75s", "2m", "500ms"."""
    if isinstance(value, int):
        return float(value)
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[unit]


@FLY_CONFIGS
def test_fly_toml_validates_against_the_fly_schema(config_path: Path) -> None:
    """check-jsonschema finds fly.toml and fly.ha.toml valid against Fly's schema (../shared/reference)."""
    schema = reference_dir() / "fly-toml.schema.json"
    assert schema.exists(), f"the schema is missing: {schema}"
    result = subprocess.run(  # noqa: S603 - a dev tool on our own file
        [tool("check-jsonschema"), "--schemafile", str(schema), str(config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@FLY_CONFIGS
def test_fly_toml_has_no_public_service(config_path: Path) -> None:
    """No [http_service] and no [[services]]: nothing reaches flywatch from outside the private network."""
    config = tomllib.loads(config_path.read_text())
    assert "http_service" not in config
    assert "services" not in config


def test_fly_toml_exposes_metrics_on_9091_where_flywatch_listens() -> None:
    """[metrics] is port 9091, path /metrics, the port of FLYWATCH_LISTEN."""
    config = fly_toml()
    assert config["metrics"] == {"port": 9091, "path": "/metrics"}
    assert config["env"]["FLYWATCH_LISTEN"] == "[::]:9091"
    assert parse_listen(config["env"]["FLYWATCH_LISTEN"]) == ("::", 9091)


def test_fly_toml_checks_healthz() -> None:
    """A top-level http check on port 9091, /healthz; every check has the port and type Fly requires."""
    checks = fly_toml()["checks"]
    for check in checks.values():
        assert {"port", "type"} <= check.keys(), check
        assert check["type"] in {"http", "tcp"}, check
    healthz = [c for c in checks.values() if c.get("path") == "/healthz"]
    assert len(healthz) == 1
    assert healthz[0]["type"] == "http"
    assert healthz[0]["port"] == 9091
    assert seconds(healthz[0]["timeout"]) < seconds(healthz[0]["interval"])


def test_fly_toml_keeps_the_state_on_the_volume() -> None:
    """A [[mounts]] volume at /data, and FLYWATCH_STATE_URL is the SQLite file on it."""
    config = fly_toml()
    mounts = config["mounts"] if isinstance(config["mounts"], list) else [config["mounts"]]
    assert [m["destination"] for m in mounts] == ["/data"]
    assert config["env"]["FLYWATCH_STATE_URL"] == "sqlite:////data/flywatch.db"


@FLY_CONFIGS
def test_fly_toml_kill_timeout_lets_a_tick_in_flight_finish(config_path: Path) -> None:
    """kill_timeout (top level, not inside a table) outlasts the daemon's SIGTERM grace, and it is >= 60 s: on
    several machines too, where the ticks finishing is what lets the instance give its leases up cleanly."""
    config = tomllib.loads(config_path.read_text())
    assert config["kill_signal"] == "SIGTERM"
    timeout = seconds(config["kill_timeout"])
    assert timeout >= 60
    assert timeout > _STOP_GRACE + _UNWIND_GRACE
    assert timeout <= 300  # Fly's maximum


@FLY_CONFIGS
def test_fly_toml_env_holds_known_settings_and_no_secret(
    monkeypatch: pytest.MonkeyPatch, config_path: Path
) -> None:
    """Every [env] key is a flywatch setting, none is a secret, and Settings reads them as intended."""
    env = tomllib.loads(config_path.read_text())["env"]
    assert not {"FLY_API_TOKEN", "FLYWATCH_FLY_API_TOKEN", "FLYWATCH_PROMETHEUS_TOKEN"} & env.keys()
    known = setting_variables()
    assert set(env) <= known, set(env) - known
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.machines_api_url == "http://_api.internal:4280"
    assert settings.log_format == "json"
    assert settings.dry_run is False


# --- deploy/fly.ha.toml and the runbook's high availability -----------------------------------------------


def test_fly_ha_toml_has_no_volume() -> None:
    """No [[mounts]]: the state is in PostgreSQL, so no machine is pinned to a volume (nor to its host)."""
    config = fly_ha_toml()
    assert "mounts" not in config
    assert "/data" not in string_values(config)


def test_fly_ha_toml_keeps_the_state_url_out_of_the_file() -> None:
    """FLYWATCH_STATE_URL is a secret (it holds the database's password): not in [env], and no PostgreSQL URL
    is set anywhere in the file (the ones in its comments are placeholders)."""
    config = fly_ha_toml()
    assert "FLYWATCH_STATE_URL" not in config["env"]
    assert not [s for s in string_values(config) if s.lower().startswith(("postgres", "sqlite"))]


def test_fly_ha_toml_exposes_metrics_and_checks_where_flywatch_listens() -> None:
    """[metrics] and every check are on the port of FLYWATCH_LISTEN, /metrics the path."""
    config = fly_ha_toml()
    _, port = parse_listen(config["env"]["FLYWATCH_LISTEN"])
    assert config["metrics"] == {"port": port, "path": "/metrics"}
    assert {check["port"] for check in config["checks"].values()} == {port}


def test_fly_ha_toml_checks_healthz_and_readyz() -> None:
    """Top-level http checks (they route and restart nothing) on /healthz and /readyz: fly deploy waits for a
    new machine to have rejoined the cluster before it takes the next one down."""
    checks = fly_ha_toml()["checks"]
    for check in checks.values():
        assert {"port", "type"} <= check.keys(), check
        assert check["type"] == "http", check
        assert seconds(check["timeout"]) < seconds(check["interval"]), check
    assert sorted(check["path"] for check in checks.values()) == ["/healthz", "/readyz"]


def test_fly_ha_toml_deploys_one_machine_at_a_time() -> None:
    """Rolling (not Fly's default canary, whose extra machine would be one more live member), one machine
    unavailable at a time, so the others hold its apps while it is replaced."""
    deploy = fly_ha_toml()["deploy"]
    assert deploy["strategy"] == "rolling"
    assert deploy["max_unavailable"] == 1


def test_fly_ha_toml_builds_the_repository_dockerfile() -> None:
    """flyctl reads [build] dockerfile relative to the config file: from deploy/, that is ../Dockerfile."""
    dockerfile = fly_ha_toml()["build"]["dockerfile"]
    assert (FLY_HA_TOML.parent / dockerfile).resolve() == DOCKERFILE.resolve()


def test_fly_ha_toml_is_fly_toml_but_for_the_state() -> None:
    """The same app, region, VM, signal and grace, metrics, liveness check and settings as fly.toml: only the
    state (no volume, no SQLite URL, FLYWATCH_CLUSTER so that a missing PostgreSQL URL stops the start), the
    deploy strategy and the readiness check differ."""
    single, ha = fly_toml(), fly_ha_toml()
    for key in ("app", "primary_region", "kill_signal", "kill_timeout", "metrics", "vm"):
        assert ha[key] == single[key], key
    assert ha["checks"]["healthz"] == single["checks"]["healthz"]
    assert ha["env"] == {k: v for k, v in single["env"].items() if k != "FLYWATCH_STATE_URL"} | {
        "FLYWATCH_CLUSTER": "true"
    }


def test_every_flywatch_variable_the_deploy_files_name_is_a_setting() -> None:
    """Each FLYWATCH_* named in fly.toml, deploy/fly.ha.toml (comments included) and the runbook is one
    Settings reads, but for FLYWATCH_POLICY: the secret the runbook writes to a file with [[files]]."""
    not_settings = {"FLYWATCH_POLICY"}
    known = setting_variables()
    for path in (FLY_TOML, FLY_HA_TOML, RUNBOOK):
        named = set(re.findall(r"\bFLYWATCH_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
        assert named, path
        assert named - not_settings <= known, (path.name, named - not_settings - known)
    ha_named = set(re.findall(r"\bFLYWATCH_[A-Z_]+", FLY_HA_TOML.read_text()))
    assert {"FLYWATCH_STATE_URL", "FLYWATCH_TAKEOVER", "FLYWATCH_INSTANCE", "FLYWATCH_REGION"} <= ha_named


def ha_runbook() -> str:
    """The runbook's high-availability section, up to the next section of the same level."""
    text = RUNBOOK.read_text()
    assert HA_SECTION in text
    section = text[text.index(HA_SECTION) + len(HA_SECTION) :]
    return section.split("\n## ", 1)[0]


def test_ha_runbook_sets_the_state_url_before_the_first_deploy() -> None:
    """The database's URL goes in as a secret, under the name flywatch reads, and is checked before the
    first `fly deploy -c deploy/fly.ha.toml`: without it the image's SQLite default makes each machine a lone
    daemon acting on every app."""
    section = ha_runbook()
    first_deploy = section.index("fly deploy -c deploy/fly.ha.toml")
    assert section.index("FLYWATCH_STATE_URL='postgresql://") < first_deploy
    assert section.index("fly secrets list -a flywatch") < first_deploy
    assert "--variable-name FLYWATCH_STATE_URL" in section
    assert "--variable-name FLYWATCH_STATE_URL" in FLY_HA_TOML.read_text()


def test_ha_runbook_stops_the_single_instance_before_the_cluster_starts() -> None:
    """Moving from SQLite: the single machine is removed before the cluster's first deploy (it knows nothing
    of the cluster and would act next to it), and the runbook says the state does not move."""
    section = ha_runbook()
    move = section[section.index("### From the single machine") :]
    assert move.index("fly scale count 0 -a flywatch") < move.index("fly deploy -c deploy/fly.ha.toml")
    assert "The state does not move" in move


def test_ha_runbook_times_are_the_clusters() -> None:
    """The heartbeat, lease and stop-acting times the runbook gives for the default takeover: cluster.py's."""
    timing = Timing(DEFAULT_TAKEOVER)
    section = ha_runbook()
    assert f"({DEFAULT_TAKEOVER:g} by default" in section
    assert f"takeover/5 = {timing.heartbeat:g} s" in section
    assert f"{timing.lease:g} s" in section
    assert f"within {timing.lease - timing.margin:g} s (lease" in section
    assert Settings(_env_file=None).takeover == DEFAULT_TAKEOVER  # type: ignore[call-arg]


# --- deploy/deploy.sh -------------------------------------------------------------------------------------

# The fake flyctl: state (machines, releases, the app's config as Fly has it, how each image behaves) in a
# JSON file; every call logged. Image modes: healthy; broken (never ready, checks critical: the canary fails);
# live-fails (ready in the canary, but failing on the real machine with its volume); deploy-fails (flyctl
# deploy updates the machine, then fails); rejected (flyctl deploy fails before it changes anything: auth,
# network, config rejected). A deployed fly.toml whose [[mounts]] is not at /data breaks the live machine (its
# state file is not where FLYWATCH_STATE_URL says). Flags in the state: canary_run_fails (machine run creates
# the canary, prints its id, then fails), destroy_fails (machine destroy fails).
FAKE_FLYCTL = r"""
import json, os, sys, tomllib

state_path, log_path = os.environ["FAKE_FLY_STATE"], os.environ["FAKE_FLY_LOG"]
with open(state_path) as f:
    state = json.load(f)
argv = sys.argv[1:]
with open(log_path, "a") as f:
    f.write(json.dumps(argv) + "\n")

VALUED = {"--app", "-a", "--config", "-c", "--strategy", "--wait-timeout", "--image-label", "--region",
          "--name", "--restart", "--vm-memory", "--metadata", "--env", "--timeout"}

def parse(args, valued):
    options, positional, i = {}, [], 0
    while i < len(args):
        arg = args[i]
        if arg in valued:
            options.setdefault(arg, []).append(args[i + 1])
            i += 2
        elif arg.startswith("-"):
            options.setdefault(arg, []).append(True)
            i += 1
        else:
            positional.append(arg)
            i += 1
    return options, positional

def save():
    with open(state_path, "w") as f:
        json.dump(state, f)

def mode(image):
    return state["images"].get(image, "healthy")

def is_canary(machine):
    return machine["config"].get("metadata", {}).get("flywatch_canary") == "true"

def mount_ok(machine):
    return is_canary(machine) or all(m["path"] == "/data" for m in machine["config"].get("mounts", []))

def ready(machine):
    m = mode(machine["config"]["image"])
    image_ok = m == "healthy" or (m in ("live-fails", "deploy-fails", "rejected") and is_canary(machine))
    return image_ok and mount_ok(machine)

def view(machine):
    checks = []
    if not is_canary(machine):
        checks = [{"name": "healthz", "status": "passing" if ready(machine) else "critical", "output": ""}]
    return dict(machine, checks=checks)

def live():
    return [m for m in state["machines"] if not is_canary(m)]

if argv[:1] == ["releases"]:
    print(json.dumps(state["releases"]))
elif argv[:2] == ["config", "save"]:  # writes the app's config as Fly has it
    options, _ = parse(argv[2:], VALUED)
    with open(options["--config"][0], "w") as f:
        f.write(state["fly_toml"])
    print("Wrote config file " + options["--config"][0])
elif argv[:1] == ["deploy"]:
    options, _ = parse(argv[1:], VALUED | {"--image"})
    if "--build-only" in options:
        print("==> Building image with Depot")
        sys.exit(state.get("build_exit", 0))
    image = options["--image"][0]
    if mode(image) == "rejected":
        print("Error: unauthorized", file=sys.stderr)
        sys.exit(1)
    with open(options["--config"][0]) as f:
        fly_toml = f.read()
    mounts = tomllib.loads(fly_toml).get("mounts", [])
    mounts = mounts if isinstance(mounts, list) else [mounts]
    state["fly_toml"] = fly_toml
    for machine in live():
        machine["config"]["image"] = image
        machine["instance_id"] = "01V%d" % (int(machine["instance_id"][3:]) + 1)
        for mount, declared in zip(machine["config"].get("mounts", []), mounts):
            mount["path"] = declared["destination"]
    version = max(r["Version"] for r in state["releases"]) + 1
    failed = mode(image) == "deploy-fails"
    state["releases"].insert(0, {"ID": "r%d" % version, "Version": version, "Stable": not failed,
                                 "Status": "failed" if failed else "complete", "ImageRef": image,
                                 "Reason": "change_image", "Description": "deploy image " + image})
    save()
    if failed:
        print("Error: timeout reached waiting for health checks to pass for machine 148e", file=sys.stderr)
        sys.exit(1)
elif argv[:2] == ["machine", "list"]:
    print(json.dumps([view(m) for m in state["machines"]]))
elif argv[:2] == ["machine", "run"]:
    options, positional = parse(argv[2:], VALUED)
    metadata = dict(kv.split("=", 1) for kv in options.get("--metadata", []))
    env = dict(kv.split("=", 1) for kv in options.get("--env", []))
    state["machines"].append({"id": "c4n4ry", "instance_id": "01V1", "name": options["--name"][0],
                              "state": "started", "region": options["--region"][0],
                              "private_ip": "fdaa:0:1::3",
                              "config": {"image": positional[0], "metadata": metadata, "env": env}})
    save()
    print("Success! A machine has been successfully launched in app flywatch")
    print(" Machine ID: c4n4ry")
    if state.get("canary_run_fails"):
        print("Error: could not start machine c4n4ry: failed to launch VM", file=sys.stderr)
        sys.exit(1)
elif argv[:2] == ["machine", "exec"]:
    _, positional = parse(argv[2:], VALUED)
    machine = next(m for m in state["machines"] if m["id"] == positional[0])
    ok = ready(machine)
    print(json.dumps({"exit_code": 0 if ok else 1, "stdout": "",
                      "stderr": "" if ok else "urllib.error.HTTPError: HTTP Error 503: Service Unavailable"}))
elif argv[:2] == ["machine", "destroy"]:
    _, positional = parse(argv[2:], VALUED)
    if state.get("destroy_fails"):
        print("Error: failed to destroy machine: request timed out", file=sys.stderr)
        sys.exit(1)
    state["machines"] = [m for m in state["machines"] if m["id"] not in positional]
    save()
else:
    print("fake flyctl: unknown command %r" % argv, file=sys.stderr)
    sys.exit(2)
"""


def world(images: dict[str, str] | None = None) -> dict[str, Any]:
    """One flywatch machine on PREVIOUS; the newest release failed, the one before it is PREVIOUS."""
    return {
        "machines": [
            {
                "id": "148e",
                "instance_id": "01V1",
                "name": "flywatch-live",
                "state": "started",
                "region": "iad",
                "private_ip": "fdaa:0:1::2",
                "config": {
                    "image": PREVIOUS,
                    "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"},
                    "mounts": [{"volume": "vol_1", "path": "/data"}],
                },
            }
        ],
        "releases": [
            {"ID": "r3", "Version": 3, "Status": "failed", "ImageRef": f"{REGISTRY}:deployment-00BAD"},
            {"ID": "r2", "Version": 2, "Status": "complete", "ImageRef": PREVIOUS},
            {"ID": "r1", "Version": 1, "Status": "complete", "ImageRef": f"{REGISTRY}:deployment-00OLD"},
        ],
        "images": images or {},
        "fly_toml": FLY_TOML.read_text(),  # what `flyctl config save` writes: the config the app runs now
    }


@dataclass
class Deploy:
    returncode: int
    stderr: str
    calls: list[list[str]]
    state: dict[str, Any]

    def index(self, *prefix: str, containing: str | None = None) -> int:
        """The position of the first flyctl call that starts with `prefix` (and has `containing`)."""
        for i, call in enumerate(self.calls):
            if call[: len(prefix)] == list(prefix) and (containing is None or containing in call):
                return i
        pytest.fail(f"no flyctl call {' '.join(prefix)} {containing or ''}; calls: {self.calls}")

    def deploys_of(self, image: str) -> list[list[str]]:
        return [c for c in self.deploys() if "--image" in c and c[c.index("--image") + 1] == image]

    def deploys(self) -> list[list[str]]:
        return [c for c in self.calls if c[:1] == ["deploy"]]

    def changes(self) -> list[list[str]]:
        """The calls that change something on Fly: deploys, and machines run or destroyed."""
        return [
            *self.deploys(),
            *(c for c in self.calls if c[:2] in (["machine", "run"], ["machine", "destroy"])),
        ]


def run_deploy(tmp_path: Path, state: dict[str, Any], *args: str, with_flyctl: bool = True) -> Deploy:
    """deploy.sh with the fake flyctl first on PATH (or no flyctl anywhere on PATH), short waits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    state_file, log_file = tmp_path / "fly-state.json", tmp_path / "flyctl.log"
    state_file.write_text(json.dumps(state))
    path = os.environ["PATH"].split(os.pathsep)
    if with_flyctl:
        fake = bin_dir / "flyctl"
        fake.write_text(f"#!{sys.executable}\n{FAKE_FLYCTL}")
        fake.chmod(0o755)
        path.insert(0, str(bin_dir))
    else:
        path = [d for d in path if not (Path(d) / "flyctl").exists()]
    env = {k: v for k, v in os.environ.items() if k != "FLYCTL"}
    env.update(PATH=os.pathsep.join(path), FAKE_FLY_STATE=str(state_file), FAKE_FLY_LOG=str(log_file))
    result = subprocess.run(  # noqa: S603 - our own script
        [BASH, str(DEPLOY_SH), "--timeout", "2", "--poll", "0.1", "--settle", "2", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    calls = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
    return Deploy(result.returncode, result.stderr, calls, json.loads(state_file.read_text()))


def test_deploy_sh_is_shellcheck_clean() -> None:
    """shellcheck finds nothing in deploy/deploy.sh."""
    result = subprocess.run(  # noqa: S603 - a dev tool on our own file
        [tool("shellcheck"), "--shell=bash", str(DEPLOY_SH)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_good_deploy_builds_once_then_canary_then_rolling(tmp_path: Path) -> None:
    """A healthy image: built and pushed once, a dry-run canary passes and goes, rolled out, no rollback."""
    deploy = run_deploy(tmp_path, world())
    assert deploy.returncode == 0, deploy.stderr
    build = deploy.calls[deploy.index("deploy", containing="--build-only")]
    assert "--push" in build
    image = "registry.fly.io/flywatch:" + build[build.index("--image-label") + 1]
    canary = deploy.calls[deploy.index("machine", "run")]
    assert canary[2] == image
    assert {"FLYWATCH_DRY_RUN=true", "flywatch_canary=true", "--skip-dns-registration"} <= set(canary)
    assert not any(arg in canary for arg in ("--volume", "-v"))  # the volume stays with the live machine
    env = [canary[i + 1] for i, arg in enumerate(canary) if arg == "--env"]
    assert [e for e in env if e.startswith("FLYWATCH_STATE_URL=")] == [
        "FLYWATCH_STATE_URL=sqlite:////tmp/flywatch-canary.db"  # off the volume, not production's state
    ]
    assert {f"{k}={v}" for k, v in fly_toml()["env"].items() if k != "FLYWATCH_STATE_URL"} <= set(env)
    probe = deploy.calls[deploy.index("machine", "exec", containing="c4n4ry")][-1]
    assert "http://[::1]:9091/readyz" in probe  # FLYWATCH_LISTEN is [::]:9091
    rolling = deploy.deploys_of(image)
    assert len(rolling) == 1
    assert rolling[0][rolling[0].index("--strategy") + 1] == "rolling"
    assert "--ha=false" in rolling[0]
    assert (
        deploy.index("releases")
        < deploy.index("deploy", containing="--build-only")
        < deploy.index("machine", "run")
        < deploy.index("machine", "exec", containing="c4n4ry")
        < deploy.index("machine", "destroy", containing="c4n4ry")
        < deploy.index("deploy", containing=image)
        < deploy.index("machine", "exec", containing="148e")
    )
    assert deploy.deploys_of(PREVIOUS) == []
    assert [m["config"]["image"] for m in deploy.state["machines"]] == [image]  # and no canary left


@pytest.mark.parametrize("failure", ["live-fails", "deploy-fails"])
def test_failing_health_check_rolls_back_to_the_previous_image(tmp_path: Path, failure: str) -> None:
    """Checks failing after the rollout, or flyctl deploy failing after changing the machine: rolled back."""
    deploy = run_deploy(tmp_path, world({NEW: failure}), "--image", NEW)
    assert deploy.returncode == 4, deploy.stderr
    assert deploy.index("deploy", containing=NEW) < deploy.index("deploy", containing=PREVIOUS)
    assert len(deploy.deploys_of(PREVIOUS)) == 1
    assert "--build-only" not in {arg for call in deploy.calls for arg in call}  # --image: no build
    assert [m["config"]["image"] for m in deploy.state["machines"]] == [PREVIOUS]
    assert f"rolled back to {PREVIOUS}" in deploy.stderr


def test_failing_canary_leaves_production_untouched(tmp_path: Path) -> None:
    """A canary that never gets ready is destroyed and nothing is deployed, so nothing is rolled back."""
    deploy = run_deploy(tmp_path, world({NEW: "broken"}), "--image", NEW)
    assert deploy.returncode == 3, deploy.stderr
    assert deploy.index("machine", "run") < deploy.index("machine", "destroy", containing="c4n4ry")
    assert deploy.deploys() == []
    assert deploy.state["machines"] == world()["machines"]
    assert "nothing was deployed" in deploy.stderr


def test_failed_rollback_asks_for_a_person(tmp_path: Path) -> None:
    """When the previous image fails too: exit 5, advising dry run (the watcher stays), not scaling to 0."""
    deploy = run_deploy(tmp_path, world({NEW: "live-fails", PREVIOUS: "live-fails"}), "--image", NEW)
    assert deploy.returncode == 5, deploy.stderr
    assert len(deploy.deploys_of(PREVIOUS)) == 1
    assert "fly secrets set -a flywatch FLYWATCH_DRY_RUN=true" in deploy.stderr
    assert "scale count 0" not in deploy.stderr


def test_rollback_uses_the_config_the_app_ran_with(tmp_path: Path) -> None:
    """A fly.toml change that breaks the release is not rolled back with: the saved running config is."""
    config = tmp_path / "fly.toml"
    config.write_text(FLY_TOML.read_text().replace('destination = "/data"', 'destination = "/mnt/data"'))
    deploy = run_deploy(tmp_path, world(), "-c", str(config), "--image", NEW)
    assert deploy.returncode == 4, deploy.stderr
    saved = deploy.calls[deploy.index("config", "save")]
    assert saved[saved.index("--app") + 1] == "flywatch"
    assert deploy.index("config", "save") < deploy.index("machine", "run")
    rolling, rollback = deploy.deploys_of(NEW)[0], deploy.deploys_of(PREVIOUS)[0]
    assert rolling[rolling.index("--config") + 1] == str(config)
    assert rollback[rollback.index("--config") + 1] == saved[saved.index("--config") + 1]
    [machine] = deploy.state["machines"]
    assert machine["config"]["image"] == PREVIOUS
    assert machine["config"]["mounts"][0]["path"] == "/data"
    assert not Path(saved[saved.index("--config") + 1]).exists()  # the saved config is cleaned up


def test_deploy_that_changed_nothing_is_not_rolled_back(tmp_path: Path) -> None:
    """flyctl deploy failing before it touched the machine (auth, network): exit 1, no rollback."""
    deploy = run_deploy(tmp_path, world({NEW: "rejected"}), "--image", NEW)
    assert deploy.returncode == 1, deploy.stderr
    assert len(deploy.deploys_of(NEW)) == 1
    assert deploy.deploys_of(PREVIOUS) == []
    assert "deploy failed, nothing changed" in deploy.stderr
    assert deploy.state["machines"] == world()["machines"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--poll", "0"), "--poll takes a positive number"),
        (("--poll", "0.0"), "--poll takes a positive number"),
        (("--poll", "-1"), "--poll takes a positive number"),
        (("--poll", "soon"), "--poll takes a positive number"),
        (("--poll", ""), "--poll needs a value"),
        (("--settle", "0"), "--settle takes a whole number, at least 1"),
        (("--settle", "1.5"), "--settle takes a whole number, at least 1"),
        (("--timeout", "5m"), "--timeout takes a whole number"),
    ],
)
def test_bad_waits_are_refused(tmp_path: Path, args: tuple[str, str], message: str) -> None:
    """--poll must be a positive number, --settle a whole number >= 1: else exit 2 before any flyctl call."""
    deploy = run_deploy(tmp_path, world(), "--image", NEW, *args)
    assert deploy.returncode == 2, deploy.stderr
    assert message in deploy.stderr
    assert deploy.calls == []


def test_canary_that_cannot_be_destroyed_stops_before_the_rollout(tmp_path: Path) -> None:
    """A ready canary that cannot be destroyed: exit 6, nothing deployed, its id in the message."""
    state = world()
    state["destroy_fails"] = True
    deploy = run_deploy(tmp_path, state, "--image", NEW)
    assert deploy.returncode == 6, deploy.stderr
    assert deploy.index("machine", "destroy", containing="c4n4ry") > deploy.index("machine", "run")
    assert deploy.deploys() == []
    assert "fly machine destroy -a flywatch --force c4n4ry" in deploy.stderr


def test_canary_that_fails_to_start_is_destroyed_by_the_id_flyctl_printed(tmp_path: Path) -> None:
    """machine run creates the canary, prints its id, then fails: that id is destroyed, exit 3."""
    state = world()
    state["canary_run_fails"] = True
    deploy = run_deploy(tmp_path, state, "--image", NEW)
    assert deploy.returncode == 3, deploy.stderr
    assert deploy.index("machine", "run") < deploy.index("machine", "destroy", containing="c4n4ry")
    assert not any(c[:2] == ["machine", "list"] for c in deploy.calls[deploy.index("machine", "run") :])
    assert deploy.deploys() == []
    assert deploy.state["machines"] == world()["machines"]


def test_preflight_refuses_a_stopped_machine(tmp_path: Path) -> None:
    """The flywatch machine stopped (a rolling update would time out on it): exit 2, nothing changed."""
    state = world()
    state["machines"][0]["state"] = "stopped"
    deploy = run_deploy(tmp_path, state, "--image", NEW)
    assert deploy.returncode == 2, deploy.stderr
    assert "148e is stopped, not started" in deploy.stderr
    assert deploy.changes() == []


def test_missing_flyctl_is_a_clear_error(tmp_path: Path) -> None:
    """Without flyctl on PATH the script says so and exits non-zero before doing anything."""
    deploy = run_deploy(tmp_path, world(), with_flyctl=False)
    assert deploy.returncode == 2
    assert "flyctl not found on PATH" in deploy.stderr
    assert deploy.calls == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("two machines", "flywatch runs as exactly one"),
        ("no machine", "has no machine"),
        ("canary running", "a canary of flywatch is already running"),
        ("no complete release", "no complete release of flywatch"),
    ],
)
def test_preflight_refuses_what_it_cannot_deploy_safely(tmp_path: Path, change: str, message: str) -> None:
    """Not exactly one machine, a canary left running or no release to come back to: refused, nothing done."""
    state = world()
    machine = state["machines"][0]
    if change == "two machines":
        state["machines"].append({**machine, "id": "29ab"})
    elif change == "no machine":
        state["machines"] = []
    elif change == "canary running":
        canary = {"image": NEW, "metadata": {"flywatch_canary": "true"}}
        state["machines"].append({**machine, "id": "c4n4ry", "config": canary})
    else:
        for release in state["releases"]:
            release["Status"] = "failed"
    deploy = run_deploy(tmp_path, state, "--image", NEW)
    assert deploy.returncode == 2, deploy.stderr
    assert message in deploy.stderr
    assert deploy.changes() == []


def test_canary_gets_the_files_of_fly_toml(tmp_path: Path) -> None:
    """A policy shipped as a [[files]] secret reaches the canary too: the canary runs production's policy."""
    config = tmp_path / "fly.toml"
    config.write_text(
        FLY_TOML.read_text()
        + '\n[[files]]\n  guest_path = "/etc/flywatch/policy.yaml"\n  secret_name = "FLYWATCH_POLICY"\n'
    )
    deploy = run_deploy(tmp_path, world(), "-c", str(config), "--image", NEW)
    assert deploy.returncode == 0, deploy.stderr
    canary = deploy.calls[deploy.index("machine", "run")]
    assert canary[canary.index("--file-secret") + 1] == "/etc/flywatch/policy.yaml=FLYWATCH_POLICY"
    rolling = deploy.deploys_of(NEW)[0]
    assert rolling[rolling.index("--config") + 1] == str(config)
