"""Plans and their results: what the decision core asks for, and what the actuator reports back.

A plan is a list of actions, each for one app (and region), each with its reason. Every action ends
done, skipped or failed, with why, and with what happened to each machine it touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ScaleDownMode(StrEnum):
    STOP = "stop"
    SUSPEND = "suspend"
    DESTROY = "destroy"


class Outcome(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class ScaleUp:
    """Bring `count` more machines of the current release up in `region`: start parked ones, then clone."""

    app: str
    region: str
    count: int
    reason: str
    process_group: str = "app"

    @property
    def kind(self) -> str:
        return "scale_up"


@dataclass(frozen=True)
class ScaleDown:
    """Take `count` machines down in `region`, never below `min_machines` started there."""

    app: str
    region: str
    count: int
    reason: str
    mode: ScaleDownMode = ScaleDownMode.STOP
    min_machines: int = 0
    process_group: str = "app"

    @property
    def kind(self) -> str:
        return "scale_down"


@dataclass(frozen=True)
class RolloutTarget:
    machine_id: str
    config: Mapping[str, Any]  # the whole machine config to run

    @property
    def image(self) -> str:
        return str(self.config.get("image", ""))


@dataclass(frozen=True)
class Rollout:
    """Update machines to given configs, `max_parallel` at a time, verifying each one (rollback uses it)."""

    app: str
    targets: tuple[RolloutTarget, ...]
    reason: str
    max_parallel: int = 1
    region: str = ""  # informational: rollouts may span regions

    @property
    def kind(self) -> str:
        return "rollout"


@dataclass(frozen=True)
class Destroy:
    """Destroy these machines (a bad release's canaries), each under its lease; one already gone is done."""

    app: str
    machine_ids: tuple[str, ...]
    reason: str
    region: str = ""  # informational

    @property
    def kind(self) -> str:
        return "destroy"


Action = ScaleUp | ScaleDown | Rollout | Destroy


@dataclass(frozen=True)
class MachineStep:
    """What happened to one machine: which operation, its outcome, and why."""

    machine_id: str
    operation: str  # start, create, stop, suspend, destroy, update
    outcome: Outcome
    reason: str = ""
    region: str = ""
    # failed for a reason that may pass (the API answering 5xx, no answer, a lease lost, the machine changed
    # under us), not because the machine itself cannot do it: worth trying again later
    retryable: bool = False


@dataclass(frozen=True)
class ActionResult:
    action: Action
    outcome: Outcome
    reason: str
    steps: tuple[MachineStep, ...] = field(default_factory=tuple)
    dry_run: bool = False

    @property
    def done_count(self) -> int:
        return sum(1 for step in self.steps if step.outcome is Outcome.DONE)


def summarise(action: Action, steps: list[MachineStep], wanted: int, note: str = "") -> ActionResult:
    """The action's outcome from its steps: done when `wanted` were done (a failure made up for along the way
    is still told in the reason), skipped when nothing was tried or every try was skipped, failed otherwise.
    The reason counts what happened and says why."""
    done = sum(1 for s in steps if s.outcome is Outcome.DONE)
    failed = [s for s in steps if s.outcome is Outcome.FAILED]
    skipped = [s for s in steps if s.outcome is Outcome.SKIPPED]
    parts = [f"{done} of {wanted} done"]
    if failed:
        parts.append(
            "failed: " + "; ".join(f"{s.machine_id or s.region} {s.operation}: {s.reason}" for s in failed)
        )
    if skipped:
        parts.append(
            "skipped: " + "; ".join(f"{s.machine_id or s.region} {s.operation}: {s.reason}" for s in skipped)
        )
    if note:
        parts.append(note)
    if done >= wanted:
        outcome = Outcome.DONE
    elif done == 0 and not failed:
        outcome = Outcome.SKIPPED
    else:
        outcome = Outcome.FAILED
    return ActionResult(action=action, outcome=outcome, reason="; ".join(parts), steps=tuple(steps))
