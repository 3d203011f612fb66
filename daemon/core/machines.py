"""Which machines to act on: pure choices over plain views of machines, deterministic for the same input.

Safety rules live here, each at the line that enforces it:
- scale up starts parked machines of the current release before creating any;
- a clone is taken only from a healthy, started machine of the current release, never from an older image;
- scale down takes the least useful machines first (unhealthy, then unknown, then the newest), never below the
  region's minimum, and never the last started machine of the current release in the app;
- unreachable hosts and canary machines are never chosen.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ACTIVE_STATES = frozenset(
    {"created", "starting", "started", "stopping", "stopped", "suspending", "suspended", "replacing"}
)
PARKED_STATES = ("suspended", "stopped")  # suspended first: it resumes faster


@dataclass(frozen=True)
class MachineView:
    id: str
    region: str
    state: str
    image: str
    release_version: int | None
    created_at: str = ""
    healthy: bool | None = None  # None: no verdict yet
    has_volume: bool = False
    process_group: str = "app"
    host_ok: bool = True
    canary: bool = False


@dataclass(frozen=True)
class Release:
    """The release machines should run: its version and image."""

    version: int | None
    image: str

    def runs(self, machine: MachineView) -> bool:
        return machine.release_version == self.version and machine.image == self.image


def eligible(machines: Iterable[MachineView], process_group: str) -> list[MachineView]:
    """Machines the autoscaler may consider: this process group, reachable, active, not a deploy's canary."""
    return sorted(
        (
            m
            for m in machines
            if m.process_group == process_group and m.host_ok and not m.canary and m.state in ACTIVE_STATES
        ),
        key=lambda m: m.id,
    )


def current_release(machines: Sequence[MachineView]) -> Release | None:
    """The newest release among the machines, and the image most of its machines run (ties: by name)."""
    versions = [m.release_version for m in machines if m.release_version is not None]
    if versions:
        newest = max(versions)
        pool = [m for m in machines if m.release_version == newest]
    else:
        newest = None
        pool = list(machines)
    if not pool:
        return None
    counts: dict[str, int] = {}
    for machine in pool:
        counts[machine.image] = counts.get(machine.image, 0) + 1
    image = min(counts, key=lambda i: (-counts[i], i))
    return Release(version=newest, image=image)


def to_start(machines: Sequence[MachineView], region: str, release: Release, count: int) -> list[MachineView]:
    """Parked machines of the current release in the region, suspended first, then by id."""
    parked = [m for m in machines if m.region == region and m.state in PARKED_STATES and release.runs(m)]
    parked.sort(key=lambda m: (PARKED_STATES.index(m.state), m.id))
    return parked[: max(count, 0)]


def clone_source(machines: Sequence[MachineView], region: str, release: Release) -> MachineView | None:
    """A healthy started machine of the current release to copy, from the region if it has one."""
    healthy = [m for m in machines if m.state == "started" and m.healthy is True and release.runs(m)]
    in_region = [m for m in healthy if m.region == region]
    pool = in_region or healthy
    return min(pool, key=lambda m: m.id) if pool else None


def least_useful_first(machines: Iterable[MachineView]) -> list[MachineView]:
    """Unhealthy, then unknown, then healthy; within each, the newest first; then by id."""
    ordered = sorted(machines, key=lambda m: m.id)
    ordered.sort(key=lambda m: m.created_at, reverse=True)  # RFC 3339 UTC: string order is time order
    ordered.sort(key=lambda m: {False: 0, None: 1, True: 2}[m.healthy])
    return ordered


def to_take_down(
    machines: Sequence[MachineView], region: str, count: int, min_machines: int, release: Release | None
) -> tuple[list[MachineView], str]:
    """Started machines of the region to stop, least useful first, within the limits; and why fewer, if so."""
    started = [m for m in machines if m.region == region and m.state == "started"]
    allowed = max(0, len(started) - max(min_machines, 0))  # never below the region's minimum
    chosen: list[MachineView] = []
    note = ""
    if allowed < count:
        note = f"the region keeps its minimum of {min_machines}"
    current_started = [
        m for m in machines if m.state == "started" and release is not None and release.runs(m)
    ]
    for machine in least_useful_first(started):
        if len(chosen) >= min(count, allowed):
            break
        remaining_current = [m for m in current_started if m not in chosen and m.id != machine.id]
        if release is not None and release.runs(machine) and not remaining_current:
            # never the last started machine of the current release: it is what every clone is made from
            note = "the last started machine of the current release stays"
            continue
        chosen.append(machine)
    return chosen, note
