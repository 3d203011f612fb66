"""Faults injected into the simulated Machines API: errors, bursts, latency and timeouts per endpoint.

Endpoints are named by the operationId of Fly's OpenAPI document (Machines_list, Machines_start, ...).
A share is applied exactly, not by chance: rate 0.25 fails every fourth matching request.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from daemon.sim.errors import bad_request
from daemon.sim.load import Diffuser


@dataclass
class ApiFault:
    id: int
    endpoint: str = "*"  # an operationId, or * for every endpoint
    app: str | None = None  # only requests about this app
    status: int = 503  # answered status; 0 answers normally (latency only)
    rate: float = 1.0  # share of matching requests hit
    count: int | None = None  # hit this many requests, then go away (a burst); None: until cleared
    latency: float = 0.0  # seconds to wait before answering
    timeout: bool = False  # never answer: the client's own timeout must fire
    body: str | None = None  # a raw, non-JSON body (as a proxy in front of Fly sends)
    hits: int = 0
    _diffuser: Diffuser = field(default_factory=Diffuser, repr=False)

    def matches(self, endpoint: str, app: str | None) -> bool:
        return self.endpoint in ("*", endpoint) and self.app in (None, app)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "api",
            "endpoint": self.endpoint,
            "app": self.app,
            "status": self.status,
            "rate": self.rate,
            "count": self.count,
            "latency": self.latency,
            "timeout": self.timeout,
            "body": self.body,
            "hits": self.hits,
        }


_FIELDS = {"endpoint", "app", "status", "rate", "count", "latency", "timeout", "body", "kind"}


class FaultBook:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.faults: list[ApiFault] = []

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, spec: dict[str, Any]) -> ApiFault:
        unknown = set(spec) - _FIELDS
        if unknown:
            raise bad_request(
                f"unknown fault field(s) {sorted(unknown)}; expected {sorted(_FIELDS - {'kind'})}"
            )
        try:
            fault = ApiFault(
                id=self.next_id(),
                endpoint=str(spec.get("endpoint", "*")),
                app=spec.get("app"),
                status=int(spec.get("status", 503)),
                rate=float(spec.get("rate", 1.0)),
                count=None if spec.get("count") is None else int(spec["count"]),
                latency=float(spec.get("latency", 0.0)),
                timeout=bool(spec.get("timeout", False)),
                body=None if spec.get("body") is None else str(spec["body"]),
            )
        except (TypeError, ValueError) as exc:
            raise bad_request(f"bad fault: {exc}") from None
        if not 0.0 <= fault.rate <= 1.0:
            raise bad_request(f"rate must be between 0 and 1, got {fault.rate}")
        if fault.status and not 400 <= fault.status <= 599:
            raise bad_request(f"status must be an HTTP error (400-599) or 0, got {fault.status}")
        if fault.count is not None and fault.count < 1:
            raise bad_request(f"count must be at least 1, got {fault.count}")
        self.faults.append(fault)
        return fault

    def hit(self, endpoint: str, app: str | None) -> ApiFault | None:
        """The fault this request runs into, if any (counted, and spent when a burst is over)."""
        for fault in list(self.faults):
            if not fault.matches(endpoint, app) or not fault._diffuser.fire(fault.rate):  # noqa: SLF001
                continue
            fault.hits += 1
            if fault.count is not None and fault.hits >= fault.count:
                self.faults.remove(fault)
            return fault
        return None

    def remove(self, fault_id: int) -> bool:
        before = len(self.faults)
        self.faults = [f for f in self.faults if f.id != fault_id]
        return len(self.faults) < before
