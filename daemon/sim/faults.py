"""Faults injected into the simulated Machines API: errors, bursts, latency, timeouts, lost answers.

Endpoints are named by the operationId of Fly's OpenAPI document (Machines_list, Machines_start, ...).
A share is applied exactly, not by chance: rate 0.25 fails every fourth matching request.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from daemon.sim.load import Diffuser
from daemon.sim.specs import ApiFaultSpec


@dataclass
class ApiFault:
    id: int
    spec: ApiFaultSpec
    hits: int = 0
    _diffuser: Diffuser = field(default_factory=Diffuser, repr=False)

    def matches(self, endpoint: str, app: str | None) -> bool:
        return self.spec.endpoint in ("*", endpoint) and self.spec.app in (None, app)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **self.spec.model_dump(), "hits": self.hits}


class FaultBook:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.faults: list[ApiFault] = []

    def add(self, spec: ApiFaultSpec) -> ApiFault:
        fault = ApiFault(id=next(self._ids), spec=spec)
        self.faults.append(fault)
        return fault

    def hit(self, endpoint: str, app: str | None) -> ApiFault | None:
        """The fault this request runs into, if any (counted, and spent when a burst is over)."""
        for fault in list(self.faults):
            if not fault.matches(endpoint, app) or not fault._diffuser.fire(fault.spec.rate):  # noqa: SLF001
                continue
            fault.hits += 1
            if fault.spec.count is not None and fault.hits >= fault.spec.count:
                self.faults.remove(fault)
            return fault
        return None

    def remove(self, fault_id: int) -> bool:
        before = len(self.faults)
        self.faults = [f for f in self.faults if f.id != fault_id]
        return len(self.faults) < before
