"""Typed models of what the Machines API answers and accepts.

A config read and written back loses nothing: every model keeps the fields it does not know
(`extra="allow"`), and `MachineConfig.to_api()` writes back exactly what was read plus what we changed.
An update sends the whole config, as Fly requires.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FlyModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """Fly writes null for an empty list or map: read it as absent, so the field keeps its default."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None or not cls._has_default(key)}

    @classmethod
    def _has_default(cls, key: str) -> bool:
        field = cls.model_fields.get(key)
        return field is not None and (field.default_factory is not None or field.default is not None)


class MachineConfig(FlyModel):
    image: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)
    services: list[dict[str, Any]] = Field(default_factory=list)
    checks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    mounts: list[dict[str, Any]] = Field(default_factory=list)
    standbys: list[str] = Field(default_factory=list)
    guest: dict[str, Any] | None = None

    def to_api(self) -> dict[str, Any]:
        """The JSON to send back: what was read (unknown fields included) with our changes, including
        changes made in place to a field that was not read (e.g. metadata added to a config without any)."""
        data = self.model_dump(mode="json", exclude_unset=True)
        full = self.model_dump(mode="json")
        for name, info in type(self).model_fields.items():
            if name not in data and full[name] != info.get_default(call_default_factory=True):
                data[name] = full[name]
        return data

    def copy_with(self, **changes: Any) -> MachineConfig:
        """A deep copy with some fields replaced (they count as set, so they are sent)."""
        data = self.to_api()
        data.update(changes)
        return MachineConfig.model_validate(data)


class ImageRef(FlyModel):
    registry: str = ""
    repository: str = ""
    tag: str = ""
    digest: str = ""

    @property
    def ref(self) -> str:
        """registry/repository:tag, as an image is written in a config."""
        prefix = f"{self.registry}/" if self.registry and self.registry != "docker.io" else ""
        return f"{prefix}{self.repository}:{self.tag}" if self.tag else f"{prefix}{self.repository}"


class CheckStatus(FlyModel):
    name: str = ""
    status: str = ""  # passing | warning | critical
    output: str = ""
    updated_at: str = ""


class MachineEvent(FlyModel):
    id: str = ""
    type: str = ""
    status: str = ""
    source: str = ""
    timestamp: int = 0  # milliseconds
    request: dict[str, Any] = Field(default_factory=dict)


class Machine(FlyModel):
    id: str
    name: str = ""
    state: str = ""
    region: str = ""
    instance_id: str = ""
    private_ip: str = ""
    config: MachineConfig | None = None
    incomplete_config: MachineConfig | None = None
    image_ref: ImageRef | None = None
    checks: list[CheckStatus] = Field(default_factory=list)
    events: list[MachineEvent] = Field(default_factory=list)
    host_status: str = "unknown"  # unknown is not ok: only Fly's own "ok" says the host is reachable
    created_at: str = ""
    updated_at: str = ""
    nonce: str | None = None

    @property
    def known_config(self) -> MachineConfig | None:
        """The config, or what Fly could tell of it while the host is unreachable."""
        return self.config or self.incomplete_config

    @property
    def metadata(self) -> dict[str, str]:
        config = self.known_config
        return config.metadata if config is not None else {}

    @property
    def image(self) -> str:
        config = self.known_config
        if config is not None and config.image:
            return config.image
        return self.image_ref.ref if self.image_ref is not None else ""

    @property
    def release_version(self) -> int | None:
        raw = self.metadata.get("fly_release_version", "")
        return int(raw) if raw.isdigit() else None

    @property
    def release_id(self) -> str:
        return self.metadata.get("fly_release_id", "")

    @property
    def process_group(self) -> str:
        return self.metadata.get("fly_process_group") or self.metadata.get("process_group") or ""

    @property
    def is_canary(self) -> bool:
        return self.metadata.get("fly_canary") == "true"

    @property
    def has_volume(self) -> bool:
        """Whether a volume is mounted; with no config to tell, assume one (so nothing is ever destroyed)."""
        config = self.known_config
        return config is None or any(mount.get("volume") for mount in config.mounts)

    @property
    def checks_passing(self) -> bool | None:
        """True when every Fly check passes, False when one is critical, None with no verdict yet.

        Checks that do not speak of the app's health are left out: the ones a config marks `informational`,
        and the ones Fly itself adds for its deployments (named bg_deployments*)."""
        informational = {
            name
            for name, check in (self.known_config.checks if self.known_config else {}).items()
            if check.get("kind") == "informational"
        }
        checks = [
            c for c in self.checks if c.name not in informational and not c.name.startswith("bg_deployments")
        ]
        if not checks:
            return None
        if any(check.status == "critical" for check in checks):
            return False
        return all(check.status == "passing" for check in checks) or None

    @property
    def declares_checks(self) -> bool:
        """Whether the config asks Fly to check this machine (top-level or service checks)."""
        config = self.known_config
        return config is not None and (bool(config.checks) or any(s.get("checks") for s in config.services))


class Lease(FlyModel):
    nonce: str
    expires_at: int = 0  # unix seconds
    owner: str = ""
    description: str = ""
    version: str = ""


class MachineVersion(FlyModel):
    version: str
    user_config: MachineConfig


class App(FlyModel):
    id: str = ""
    name: str
    machine_count: int = 0
    status: str = ""
    organization: dict[str, Any] = Field(default_factory=dict)


class WaitResult(FlyModel):
    ok: bool = True
    state: str = ""
    version: str = ""
    event_id: str = ""
