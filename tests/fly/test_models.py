"""The Machines API models: lossless configs (unknown fields kept, nothing added) and what a Machine tells."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from daemon.fly.models import App, ImageRef, Lease, Machine, MachineConfig, MachineVersion, WaitResult

# A config as Fly answers it, with fields this client has no model for at every level.
FLY_CONFIG: dict[str, Any] = {
    "image": "registry.fly.io/shop:deployment-01J9",
    "env": {"PRIMARY_REGION": "iad"},
    "init": {"cmd": ["serve"], "swap_size_mb": 512},
    "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256, "x_guest_future": True},
    "restart": {"policy": "on-failure", "max_retries": 10},
    "auto_destroy": False,
    "services": [
        {
            "protocol": "tcp",
            "internal_port": 8080,
            "autostop": "suspend",
            "autostart": True,
            "min_machines_running": 1,
            "ports": [{"port": 443, "handlers": ["tls", "http"], "force_https": True}],
            "concurrency": {"type": "requests", "soft_limit": 20, "hard_limit": 25},
            "proxy_proto_options": {"version": "v2"},
        }
    ],
    "checks": {"health": {"type": "http", "port": 8080, "path": "/health", "interval": "15s"}},
    "mounts": [{"volume": "vol_123", "path": "/data", "name": "data", "size_gb": 1}],
    "metadata": {"fly_process_group": "app", "fly_release_version": "63"},
    "standbys": [],
    "x_future_field": {"nested": [1, 2.5, None, "s", {"deep": {}}]},
    "x_null": None,
}


def machine(**fields: Any) -> Machine:
    return Machine.model_validate({"id": "3d8d413b29d089", **fields})


def test_config_round_trip_is_exact() -> None:
    """A config read and written back is exactly what was read: unknown fields kept, nulls and empties too."""
    config = MachineConfig.model_validate(copy.deepcopy(FLY_CONFIG))
    assert config.to_api() == FLY_CONFIG


def test_to_api_adds_no_defaults() -> None:
    """Fields the answer did not have are not sent back as empty defaults."""
    assert MachineConfig.model_validate({"image": "x"}).to_api() == {"image": "x"}
    assert MachineConfig(image="x", metadata={"a": "b"}).to_api() == {"image": "x", "metadata": {"a": "b"}}


def test_copy_with_changes_a_copy_and_keeps_the_rest() -> None:
    """copy_with replaces fields in a deep copy; the original, unknown fields included, stays untouched."""
    original = MachineConfig.model_validate(copy.deepcopy(FLY_CONFIG))
    changed = original.copy_with(image="registry.fly.io/shop:v2", metadata={"fly_process_group": "worker"})
    assert changed.to_api() == {
        **FLY_CONFIG,
        "image": "registry.fly.io/shop:v2",
        "metadata": {"fly_process_group": "worker"},
    }
    changed.services[0]["internal_port"] = 9090
    assert changed.model_extra is not None
    changed.model_extra["x_future_field"]["nested"].append("more")
    assert original.to_api() == FLY_CONFIG


def test_copy_with_a_field_the_answer_lacked_sends_it() -> None:
    """A field set through copy_with is sent even where the answer did not have it, even when empty."""
    config = MachineConfig.model_validate({"image": "x"})
    assert config.copy_with(mounts=[], standbys=[]).to_api() == {"image": "x", "mounts": [], "standbys": []}


def test_machine_keeps_unknown_fields() -> None:
    """A Machine keeps the top-level fields it does not model (e.g. cordoned), and its config's too."""
    m = machine(cordoned=True, x_new={"a": 1}, config=copy.deepcopy(FLY_CONFIG))
    dumped = m.model_dump(mode="json")
    assert dumped["cordoned"] is True
    assert dumped["x_new"] == {"a": 1}
    assert m.config is not None
    assert m.config.to_api() == FLY_CONFIG


def test_known_config_falls_back_to_incomplete_config() -> None:
    """With the host unreachable Fly sends incomplete_config: metadata and image still come from it."""
    m = machine(
        host_status="unreachable", incomplete_config={"image": "x:1", "metadata": {"fly_canary": "true"}}
    )
    assert m.config is None
    assert m.known_config is not None
    assert m.image == "x:1"
    assert m.is_canary
    assert machine().known_config is None
    assert machine().metadata == {}


def test_image_falls_back_to_image_ref() -> None:
    """Without a config the image is written from image_ref; docker.io is left out as configs do."""
    ref = {"registry": "registry.fly.io", "repository": "shop", "tag": "deployment-2", "digest": "sha256:1"}
    assert machine(image_ref=ref).image == "registry.fly.io/shop:deployment-2"
    hub = {"registry": "docker.io", "repository": "library/nginx", "tag": "1.27"}
    assert machine(image_ref=hub).image == "library/nginx:1.27"
    assert ImageRef(registry="ghcr.io", repository="o/app").ref == "ghcr.io/o/app"
    assert machine().image == ""


@pytest.mark.parametrize(
    ("metadata", "version", "group"),
    [
        ({"fly_release_version": "63", "fly_process_group": "web"}, 63, "web"),
        ({"fly_release_version": "v63", "process_group": "app"}, None, "app"),
        ({}, None, ""),
    ],
)
def test_release_version_and_process_group(metadata: dict[str, str], version: int | None, group: str) -> None:
    """release_version is the integer of fly_release_version (None otherwise); the legacy group key counts."""
    m = machine(config={"image": "x", "metadata": metadata})
    assert m.release_version == version
    assert m.process_group == group


def test_has_volume() -> None:
    """A mounted volume shows; no mounts, no volume; no config at all: assume a volume."""
    assert machine(config=copy.deepcopy(FLY_CONFIG)).has_volume
    assert not machine(config={"image": "x"}).has_volume
    assert machine().has_volume  # nothing to tell by: assume a volume, so that nothing is ever destroyed


@pytest.mark.parametrize(
    ("statuses", "verdict"),
    [
        ([], None),
        (["passing", "passing"], True),
        (["passing", "critical"], False),
        (["passing", "warning"], None),
    ],
)
def test_checks_passing(statuses: list[str], verdict: bool | None) -> None:
    """Fly's checks: all passing is True, any critical is False, none or a warning gives no verdict."""
    checks = [{"name": f"c{i}", "status": s, "output": "", "updated_at": ""} for i, s in enumerate(statuses)]
    assert machine(checks=checks).checks_passing is verdict


def test_other_models_keep_unknown_fields() -> None:
    """Lease, App, WaitResult and MachineVersion read Fly's answers and keep what they do not model."""
    lease = Lease.model_validate(
        {"nonce": "5c35f65c9f95", "expires_at": 1790000030, "owner": "me", "version": "01J", "x": 1}
    )
    assert (lease.nonce, lease.expires_at, lease.model_dump()["x"]) == ("5c35f65c9f95", 1790000030, 1)
    app = App.model_validate({"name": "shop", "machine_count": 3, "network": "default"})
    assert (app.name, app.machine_count, app.model_dump()["network"]) == ("shop", 3, "default")
    waited = WaitResult.model_validate({"ok": True, "state": "started", "version": "01J", "event_id": "e"})
    assert waited.state == "started"
    version = MachineVersion.model_validate({"version": "01J", "user_config": copy.deepcopy(FLY_CONFIG)})
    assert version.user_config.to_api() == FLY_CONFIG


def test_in_place_edits_of_unread_fields_are_sent() -> None:
    """Metadata added in place to a config read without any is part of what goes back."""
    config = MachineConfig.model_validate({"image": "a:b", "x_future": 1})
    config.metadata["owner"] = "team"
    assert config.to_api() == {"image": "a:b", "x_future": 1, "metadata": {"owner": "team"}}
    assert MachineConfig.model_validate({"image": "a:b"}).to_api() == {"image": "a:b"}


def test_nulls_read_as_absent() -> None:
    """Fly's nulls for empty lists and maps keep the fields' defaults instead of failing validation."""
    machine = Machine.model_validate(
        {
            "id": "m",
            "config": {"image": "a", "metadata": None, "services": None, "checks": None},
            "checks": None,
        }
    )
    assert machine.config is not None
    assert machine.config.metadata == {}
    assert machine.checks == []
    assert machine.host_status == "unknown"  # not reported: not "ok"


def test_checks_that_do_not_speak_of_health_are_left_out() -> None:
    """Informational checks and Fly's own bg_deployments checks do not make a machine unhealthy."""
    machine = Machine.model_validate(
        {
            "id": "m",
            "config": {"image": "a", "checks": {"info": {"kind": "informational"}, "web": {"type": "http"}}},
            "checks": [
                {"name": "info", "status": "critical"},
                {"name": "bg_deployments_compat", "status": "critical"},
                {"name": "web", "status": "passing"},
            ],
        }
    )
    assert machine.checks_passing is True
    assert machine.declares_checks
