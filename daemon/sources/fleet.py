"""Which machines the watches look at: the app's process group, without a deploy's canaries and without
the machines that are gone. One rule for the health watch, the scrapes and the machine counts."""

from __future__ import annotations

from collections.abc import Iterable

from daemon.fly.models import Machine


def in_group(machines: Iterable[Machine], process_group: str) -> list[Machine]:
    return [
        m
        for m in machines
        if (m.process_group or "app") == process_group
        and not m.is_canary
        and m.state not in {"destroyed", "destroying"}
    ]
