"""Releases as machines show them, the known-good record, and the rollback plan. Pure: plain views of machines
in, plain decisions out, deterministic for the same input.

- A release is what `fly deploy` writes into every machine's config: `fly_release_version`, `fly_release_id`
  and the image. The newest version among an app's machines is the release being rolled out or running.
- The known-good record is the last release that ran on every machine and was not judged failing, with each
  machine's whole config: a rollback puts exactly that config back, so everything but the release (env,
  guest, services, mounts) is what it was.
- The rollback plan: every machine that does not run the known-good release is updated back to its own
  known-good config; a machine created during the bad release (no config of its own on record) gets the
  known-good config of a sibling of its process group (its own mounts kept: a volume cannot move), and a
  deploy's canary is destroyed (it only ever existed for the release).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RELEASE_VERSION = "fly_release_version"
RELEASE_ID = "fly_release_id"
CANARY = "fly_canary"
IDEMPOTENCY = "flywatch_idempotency_key"  # the key flywatch's creates carry (fly/client.py)
IN_TRANSITION = frozenset({"starting", "stopping", "suspending", "replacing", "updating", "restarting"})


@dataclass(frozen=True, order=True)
class ReleaseKey:
    """One release: its version, its id, and the image most of its machines run."""

    version: int
    id: str = ""
    image: str = ""

    @property
    def label(self) -> str:
        return f"v{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "id": self.id, "image": self.image}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReleaseKey:
        return cls(int(data["version"]), str(data.get("id", "")), str(data.get("image", "")))


@dataclass(frozen=True)
class MachineRelease:
    """One machine as the release watch sees it."""

    id: str
    region: str
    state: str
    config: Mapping[str, Any]  # the whole config, as the API gave it
    process_group: str = "app"
    healthy: bool | None = None  # the health watch's verdict; None: none yet
    crashed: bool = False  # ended `failed`, or exited non-zero since its release was first seen
    complete: bool = True  # False: Fly gave only part of the config (host unreachable): never recorded

    @property
    def metadata(self) -> Mapping[str, str]:
        metadata = self.config.get("metadata")
        return metadata if isinstance(metadata, Mapping) else {}

    @property
    def image(self) -> str:
        return str(self.config.get("image", ""))

    @property
    def version(self) -> int | None:
        raw = str(self.metadata.get(RELEASE_VERSION, ""))
        return int(raw) if raw.isdigit() else None

    @property
    def release_id(self) -> str:
        return str(self.metadata.get(RELEASE_ID, ""))

    @property
    def canary(self) -> bool:
        return self.metadata.get(CANARY) == "true"


def newest_release(machines: Iterable[MachineRelease]) -> ReleaseKey | None:
    """The newest release among the machines (canaries included: a canary is the first sight of a release),
    with the id and image most of its machines carry (ties: by name)."""
    pool = [m for m in machines if m.version is not None]
    if not pool:
        return None
    version = max(m.version for m in pool if m.version is not None)
    return release_of(version, [m for m in pool if m.version == version])


def release_of(version: int, machines: Sequence[MachineRelease]) -> ReleaseKey:
    counts: dict[tuple[str, str], int] = {}
    for machine in machines:
        key = (machine.release_id, machine.image)
        counts[key] = counts.get(key, 0) + 1
    release_id, image = min(counts, key=lambda k: (-counts[k], k)) if counts else ("", "")
    return ReleaseKey(version, release_id, image)


def runs(machine: MachineRelease, release: ReleaseKey) -> bool:
    return machine.version == release.version and (not release.image or machine.image == release.image)


def rolled_out(machines: Sequence[MachineRelease], release: ReleaseKey) -> bool:
    """Every machine (canaries aside) runs the release, and none is changing. Machines without release
    metadata, and machines on unreachable hosts (whose config is not known), are left out, as flyctl's deploy
    leaves them out."""
    regular = [m for m in machines if not m.canary and m.version is not None and m.complete]
    return bool(regular) and all(runs(m, release) and m.state not in IN_TRANSITION for m in regular)


@dataclass(frozen=True)
class KnownGood:
    """The release to roll back to, and each machine's whole config under it."""

    release: ReleaseKey
    configs: Mapping[str, Mapping[str, Any]]  # machine id -> config
    recorded_at: float
    verdict: str = ""  # what the release watch said of it when it was recorded

    def to_json(self) -> dict[str, Any]:
        return {
            **self.release.to_json(),
            "configs": {mid: dict(config) for mid, config in self.configs.items()},
            "recorded_at": self.recorded_at,
            "verdict": self.verdict,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KnownGood:
        return cls(
            release=ReleaseKey.from_json(data),
            configs=dict(data.get("configs") or {}),
            recorded_at=float(data.get("recorded_at", 0.0)),
            verdict=str(data.get("verdict", "")),
        )


def known_good(
    machines: Sequence[MachineRelease],
    release: ReleaseKey,
    now: float,
    verdict: str,
    previous: KnownGood | None = None,
) -> KnownGood:
    """The record of `release` from the machines that run it. Configs already on record for it are kept for
    machines not seen now (a machine being updated by the next release still needs its way back)."""
    configs: dict[str, Mapping[str, Any]] = {}
    if previous is not None and previous.release == release:
        configs.update(previous.configs)
    for machine in machines:
        if runs(machine, release) and not machine.canary and machine.complete:
            configs[machine.id] = copy.deepcopy(dict(machine.config))
    return KnownGood(release, configs, now, verdict)


def missing_configs(machines: Sequence[MachineRelease], good: KnownGood) -> list[str]:
    """Machines not on the known-good release whose known-good config is not on record: their history
    (GET /versions) is where it can still be found."""
    return sorted(
        m.id for m in machines if not m.canary and not runs(m, good.release) and m.id not in good.configs
    )


@dataclass(frozen=True)
class RevertTarget:
    machine_id: str
    region: str
    config: Mapping[str, Any]
    origin: (
        str  # "own": its own known-good config; "sibling:<id>": a sibling's, for a machine new in the release
    )


@dataclass(frozen=True)
class RollbackPlan:
    to: ReleaseKey
    updates: tuple[RevertTarget, ...] = ()
    destroys: tuple[str, ...] = ()  # canaries of the bad release
    stuck: dict[str, str] = field(default_factory=dict)  # machines that cannot be reverted, and why
    unreachable: tuple[str, ...] = ()  # on hosts Fly cannot reach: their config is unknown, left for later

    @property
    def empty(self) -> bool:
        return not self.updates and not self.destroys


def _sibling(machine: MachineRelease, good: KnownGood, by_id: Mapping[str, MachineRelease]) -> str | None:
    """A machine of the same process group with a known-good config: the same region first, then by id."""
    candidates = sorted(
        good.configs,
        key=lambda mid: (
            by_id[mid].region != machine.region if mid in by_id else True,
            mid,
        ),
    )
    for mid in candidates:
        metadata = good.configs[mid].get("metadata") or {}
        group = metadata.get("fly_process_group") or "app"
        if group == machine.process_group:
            return mid
    return None


def plan_rollback(
    machines: Sequence[MachineRelease], good: KnownGood, bad: ReleaseKey | None = None
) -> RollbackPlan:
    """What it takes to put the machines of the bad release (or of any release since the known-good one, up
    to `bad`) back on the known-good release. A machine of a newer release is someone's deploy going
    forward: never touched. Machines without release metadata are not ours to judge: left alone. The
    machines that crashed or are unhealthy go first (they hurt most), then by region and id."""
    by_id = {m.id: m for m in machines}
    updates: list[RevertTarget] = []
    destroys: list[str] = []
    stuck: dict[str, str] = {}
    unreachable: list[str] = []
    order = sorted(machines, key=lambda m: (not (m.crashed or m.healthy is False), m.region, m.id))
    for machine in order:
        if machine.state in {"destroyed", "destroying"} or runs(machine, good.release):
            continue
        if machine.version is None or (bad is not None and machine.version > bad.version):
            continue
        if machine.canary:
            destroys.append(machine.id)
            continue
        if not machine.complete:
            unreachable.append(machine.id)  # an update sends the whole config: never a partial one
            continue
        own = good.configs.get(machine.id)
        if own is not None:
            updates.append(RevertTarget(machine.id, machine.region, copy.deepcopy(dict(own)), "own"))
            continue
        sibling = _sibling(machine, good, by_id)
        if sibling is None:
            stuck[machine.id] = (
                f"no known-good config of {good.release.label} for it or any machine of its process group"
            )
            continue
        config = copy.deepcopy(dict(good.configs[sibling]))
        metadata = dict(config.get("metadata") or {})
        metadata.pop(IDEMPOTENCY, None)  # the sibling's create key is its own
        config["metadata"] = metadata
        config["mounts"] = copy.deepcopy(list(machine.config.get("mounts") or []))  # a volume cannot move
        config.pop("standbys", None)
        updates.append(RevertTarget(machine.id, machine.region, config, f"sibling:{sibling}"))
    return RollbackPlan(good.release, tuple(updates), tuple(destroys), stuck, tuple(unreachable))


def config_from_versions(
    versions: Sequence[Mapping[str, Any]], release: ReleaseKey
) -> Mapping[str, Any] | None:
    """The newest config in a machine's history (GET /versions, newest first) that ran `release`."""
    for version in versions:
        config = version.get("user_config") or version.get("config")
        if not isinstance(config, Mapping):
            continue
        metadata = config.get("metadata") or {}
        if str(metadata.get(RELEASE_VERSION, "")) == str(release.version) and (
            not release.image or config.get("image") == release.image
        ):
            return config
    return None
