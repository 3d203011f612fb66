"""The simulated fleet: every started machine answers HTTP on its own loopback address.

A machine's private_ip is a distinct 127.x.y.z; all machines of an app listen on the app's internal port.
One aiohttp runner serves them all, with one listening site per started machine; a request is told apart
by the local address it arrived on. Each machine serves its health path and a Prometheus /metrics page
driven by the load model. Machines that are not started do not listen; machines in a region outage hang
(blackhole) or refuse connections.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.sim.load import LATENCY_BUCKETS, Traffic
from daemon.sim.model import Machine, Platform
from daemon.sim.tasks import Background

log = logging.getLogger(__name__)
_BLACKHOLE_POLL = 0.05
_BLACKHOLE_LIMIT = 600.0


class _MachineMetrics(Collector):
    def __init__(self, traffic: Traffic, inflight: float) -> None:
        self._traffic = traffic
        self._inflight = inflight

    def collect(self) -> Iterator[Metric]:
        traffic = self._traffic
        inflight = GaugeMetricFamily("app_inflight_requests", "Requests being served right now.")
        inflight.add_metric([], self._inflight)
        yield inflight
        requests = CounterMetricFamily(
            "app_http_requests", "HTTP requests answered, by status.", labels=["status"]
        )
        for status, count in sorted(traffic.requests.items()):
            requests.add_metric([status], count)
        yield requests
        buckets = [(str(bound), traffic.buckets[i]) for i, bound in enumerate(LATENCY_BUCKETS)]
        buckets.append(("+Inf", traffic.count))
        duration = HistogramMetricFamily("app_http_request_duration_seconds", "Time to answer a request.")
        duration.add_metric([], buckets, traffic.total_seconds)
        yield duration


class Fleet:
    def __init__(self, platform: Platform, *, ip_seed: int | None = None) -> None:
        self.platform = platform
        self._app = web.Application()
        self._app.router.add_route("*", "/{tail:.*}", self._handle)
        # a connection held by a blackholed machine must not hold up shutdown
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        self._sites: dict[str, web.TCPSite] = {}
        self._by_ip: dict[str, Machine] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._background = Background()
        # A random second octet keeps two simulators on one machine out of each other's addresses.
        self._octet = random.Random(ip_seed).randint(16, 239)
        self._next = 0
        self.bind_errors: list[str] = []
        platform.set_ip_allocator(self._allocate_ip)
        platform.listeners.append(self._on_state)

    def _allocate_ip(self) -> str:
        third, fourth = divmod(self._next, 254)
        self._next += 1
        return f"127.{self._octet}.{third % 256}.{fourth + 1}"

    async def start(self) -> None:
        await self._runner.setup()
        self.resync()
        await self.idle()

    async def stop(self) -> None:
        await self._background.stop()
        await self._runner.cleanup()
        self._sites.clear()

    async def idle(self) -> None:
        """Wait until every machine listens or not as its state says."""
        await self._background.idle()

    def listening(self, machine_id: str) -> bool:
        return machine_id in self._sites

    def resync(self) -> None:
        """Bring listeners in line with every machine's state and the outages in force."""
        for app in self.platform.apps.values():
            for machine in app.machines.values():
                self._schedule(machine)

    def _on_state(self, machine: Machine, _old: str) -> None:
        self._schedule(machine)

    def _schedule(self, machine: Machine) -> None:
        if not self.platform.settings.serve_fleet:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: start() resyncs
        self._background.spawn(self._sync(machine))

    def _should_listen(self, machine: Machine) -> bool:
        outage = self.platform.outage_for(machine)
        return machine.state == "started" and not (outage is not None and outage.mode == "refuse")

    async def _sync(self, machine: Machine) -> None:
        lock = self._locks.setdefault(machine.id, asyncio.Lock())
        async with lock:
            site = self._sites.get(machine.id)
            if self._should_listen(machine) and site is None:
                await self._listen(machine)
            elif not self._should_listen(machine) and site is not None:
                del self._sites[machine.id]
                await site.stop()

    async def _listen(self, machine: Machine) -> None:
        for _ in range(8):
            site = web.TCPSite(self._runner, machine.private_ip, machine.internal_port(), reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    self.bind_errors.append(f"{machine.id} {machine.private_ip}: {exc}")
                    log.warning("machine %s cannot listen on %s: %s", machine.id, machine.private_ip, exc)
                    return
                # someone else holds this address: move the machine to a fresh one
                self._by_ip.pop(machine.private_ip, None)
                machine.private_ip = self._allocate_ip()
                continue
            self._sites[machine.id] = site
            self._by_ip[machine.private_ip] = machine
            return
        self.bind_errors.append(f"{machine.id}: no free loopback address")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        machine = self._by_ip.get(sockname[0]) if sockname else None
        if machine is None or machine.state != "started":
            return self._drop(request)
        outage = self.platform.outage_for(machine)
        if outage is not None:
            if outage.mode == "blackhole":
                waited = 0.0
                while self.platform.outage_for(machine) is not None and waited < _BLACKHOLE_LIMIT:
                    await asyncio.sleep(_BLACKHOLE_POLL)
                    waited += _BLACKHOLE_POLL
            return self._drop(request)
        if request.path == machine.health_path():
            return await self._health(machine)
        if request.path == "/metrics":
            return self._metrics(machine)
        return web.json_response({"error": "not found"}, status=404)

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        """Answer nothing: the connection is cut, as it would be by a machine that is not there."""
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=503)

    async def _health(self, machine: Machine) -> web.Response:
        app = self.platform.app(machine.app)
        behaviour = self.platform.image_behaviour(machine.image)
        current = self.platform.app_conditions(app).get(machine.id)
        latency = current.latency if current is not None else app.base_latency + behaviour.extra_latency
        error_share = current.error_share if current is not None else behaviour.error_rate
        overload_share = current.overload_share if current is not None else 0.0
        if behaviour.health_status != 200:
            status, verdict = behaviour.health_status, "unhealthy"
        elif machine.health_errors.fire(error_share):
            status, verdict = 500, "error"
        elif machine.health_overload.fire(overload_share):
            status, verdict = 503, "overloaded"
        else:
            status, verdict = 200, "ok"
        await asyncio.sleep(latency)  # a real network answer takes real time
        body = {
            "status": verdict,
            "machine_id": machine.id,
            "region": machine.region,
            "image": machine.image,
            "release_version": machine.metadata.get("fly_release_version", ""),
        }
        return web.Response(status=status, text=json.dumps(body), content_type="application/json")

    def _metrics(self, machine: Machine) -> web.Response:
        app = self.platform.app(machine.app)
        self.platform.integrate_traffic(app)
        current = self.platform.app_conditions(app).get(machine.id)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_MachineMetrics(machine.traffic, current.inflight if current is not None else 0.0))
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")
