"""Health probes over Fly's private network: http://[private_ip]:PORT/PATH for every started machine.

Probes run concurrently (bounded), each with its own timeout and a fresh connection (a kept-alive
connection would hide a machine that stopped accepting new ones). What a probe saw is a `ProbeOutcome`;
whether that passes is for core/health.py to judge.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp

from daemon.clock import Clock
from daemon.core.health import ProbeConditions, ProbeOutcome, ProbeResult, judge
from daemon.sources.http import LazySession, describe, read_body

_MAX_BODY = 64 * 1024


def probe_url(private_ip: str, port: int, path: str) -> str:
    """IPv6 addresses in brackets (as Fly's 6PN addresses are), IPv4 as is."""
    try:
        host = f"[{private_ip}]" if ipaddress.ip_address(private_ip).version == 6 else private_ip
    except ValueError:
        host = private_ip  # a name: leave it to the resolver
    return f"http://{host}:{port}{path if path.startswith('/') else '/' + path}"


@dataclass(frozen=True)
class ProbeTarget:
    app: str
    machine_id: str
    region: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


class Prober:
    def __init__(self, clock: Clock, *, timeout: float = 2.0, concurrency: int = 256) -> None:
        self._clock = clock
        self._timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._sessions = LazySession()

    def _client(self) -> aiohttp.ClientSession:
        return self._sessions.get()

    async def aclose(self) -> None:
        await self._sessions.aclose()

    async def observe(self, target: ProbeTarget, timeout: float | None = None) -> ProbeOutcome:
        """One probe: what answered, how fast; or what went wrong. Never raises."""
        limit = timeout or self._timeout
        async with self._slots:  # the clock starts once the probe really goes out, not while it queues
            at = self._clock.now()
            started = time.perf_counter()
            try:
                async with self._client().get(
                    target.url,
                    headers=dict(target.headers),
                    timeout=aiohttp.ClientTimeout(total=limit, sock_connect=limit),
                    allow_redirects=False,
                ) as response:
                    body = await read_body(response, _MAX_BODY, truncate=True)
                    return ProbeOutcome(
                        at=at,
                        latency=time.perf_counter() - started,
                        status=response.status,
                        body=body.decode("utf-8", errors="replace"),
                    )
            except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one, but a silent host
                return ProbeOutcome(at=at, latency=time.perf_counter() - started, error=describe(exc, limit))
            except (TimeoutError, aiohttp.ClientError) as exc:
                slow = isinstance(exc, TimeoutError)  # connected, then no answer in time
                return ProbeOutcome(
                    at=at, latency=time.perf_counter() - started, error=describe(exc, limit), slow=slow
                )

    async def probe(
        self, target: ProbeTarget, conditions: ProbeConditions, timeout: float | None = None
    ) -> ProbeResult:
        return judge(await self.observe(target, timeout), conditions)

    async def probe_all(
        self, targets: Iterable[ProbeTarget], conditions: ProbeConditions, timeout: float | None = None
    ) -> dict[str, ProbeResult]:
        """Probe every target at once; results by machine id."""
        items = list(targets)
        results = await asyncio.gather(*(self.probe(t, conditions, timeout) for t in items))
        return {target.machine_id: result for target, result in zip(items, results, strict=True)}
