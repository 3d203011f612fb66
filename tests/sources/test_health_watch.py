"""The health watch against the simulator's fleet over real HTTP: probes, hysteresis, regions, doubt."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemon.clock import SystemClock
from daemon.core.health import (
    Hysteresis,
    MachineVerdict,
    ProbeConditions,
    RegionState,
    Verdict,
    region_health,
)
from daemon.fly.client import MachinesClient
from daemon.sources.health import AppHealth, HealthSpec, HealthWatch
from daemon.sources.probes import Prober, probe_url
from daemon.telemetry.metrics import HealthMetrics
from tests.sim.helpers import make_app

FAST = HealthSpec(
    port=8080, path="/health", timeout=0.3, rules=Hysteresis(unhealthy_after=2, healthy_after=2)
)


@pytest.fixture
async def prober() -> AsyncIterator[Prober]:
    probes = Prober(SystemClock(), timeout=0.3)
    yield probes
    await probes.aclose()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def watch(prober: Prober, registry: CollectorRegistry) -> HealthWatch:
    return HealthWatch(prober, SystemClock(), HealthMetrics(registry))


async def rounds(watch: HealthWatch, fly: MachinesClient, n: int, app: str = "shop", spec: HealthSpec = FAST):
    health = None
    for _ in range(n):
        health = await watch.observe(app, await fly.list_machines(app), spec)
    assert health is not None
    return watch.judge(health)[app]


def test_probe_url_brackets_ipv6() -> None:
    """IPv6 private addresses go in brackets, IPv4 as is."""
    assert (
        probe_url("fdaa:0:18:a7b:196:e274:9ce1:2", 8080, "/health")
        == "http://[fdaa:0:18:a7b:196:e274:9ce1:2]:8080/health"
    )
    assert probe_url("127.0.0.5", 8080, "healthz") == "http://127.0.0.5:8080/healthz"


async def test_healthy_fleet(
    control: httpx.AsyncClient, fly: MachinesClient, watch: HealthWatch, registry: CollectorRegistry
) -> None:
    """A healthy fleet is healthy per machine and region (Fly checks, then probes), and exported."""
    await make_app(control, base_latency=0.01)
    first = await rounds(watch, fly, 1)
    assert all("Fly checks passing" in v.reason for v in first.machines.values())  # one probe is not enough
    health = await rounds(watch, fly, 1)
    assert all("status 200" in v.reason for v in health.machines.values())
    assert {r.state for r in health.regions.values()} == {RegionState.HEALTHY}
    assert all(v.verdict is Verdict.HEALTHY for v in health.machines.values())
    assert (
        registry.get_sample_value(
            "flywatch_probes_total", {"fly_app": "shop", "fly_region": "iad", "result": "ok"}
        )
        == 4
    )
    assert (
        registry.get_sample_value(
            "flywatch_region_health", {"fly_app": "shop", "fly_region": "iad", "state": "healthy"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "flywatch_region_health", {"fly_app": "shop", "fly_region": "iad", "state": "down"}
        )
        == 0
    )
    machine = next(iter(health.machines))
    region = health.machines[machine].region
    assert (
        registry.get_sample_value(
            "flywatch_machine_healthy", {"fly_app": "shop", "fly_region": region, "machine": machine}
        )
        == 1
    )


async def test_unhealthy_machine_degrades_its_region(
    control: httpx.AsyncClient, api: httpx.AsyncClient, fly: MachinesClient, watch: HealthWatch
) -> None:
    """One machine answering 500 makes its region degraded, with the reason and numbers."""
    await make_app(control, base_latency=0.01)
    await control.post("/images", json={"image": "registry.fly.io/shop:bad", "mode": "unhealthy"})
    iad = [m for m in await fly.list_machines("shop") if m.region == "iad"]
    config = iad[0].config
    assert config is not None
    await fly.update_machine("shop", iad[0].id, config.copy_with(image="registry.fly.io/shop:bad"))
    await fly.wait("shop", iad[0].id, "started")
    health = await rounds(watch, fly, 2, spec=HealthSpec(port=8080, path="/health", timeout=0.3))
    assert health.regions["iad"].state is RegionState.DEGRADED
    assert "status 500" in health.regions["iad"].reason
    assert health.regions["cdg"].state is RegionState.HEALTHY


async def test_region_outage_is_down_and_recovers(
    control: httpx.AsyncClient, fly: MachinesClient, watch: HealthWatch
) -> None:
    """A region outage makes that region down (unreachable); the others stay healthy; it comes back."""
    await make_app(control, base_latency=0.01)
    await rounds(watch, fly, 2)
    await control.post("/faults", json={"kind": "region_outage", "region": "cdg"})
    health = await rounds(watch, fly, 2)
    assert health.regions["cdg"].state is RegionState.DOWN
    assert "unreachable" in health.regions["cdg"].reason
    assert health.regions["iad"].state is RegionState.HEALTHY
    await control.delete("/faults")
    health = await rounds(watch, fly, 2)
    assert health.regions["cdg"].state is RegionState.HEALTHY


async def test_slow_answers_fail_the_latency_condition(
    control: httpx.AsyncClient, fly: MachinesClient, watch: HealthWatch
) -> None:
    """Answers slower than max_latency count as failures."""
    await make_app(control, base_latency=0.15, regions={"iad": 1})
    spec = HealthSpec(port=8080, path="/health", timeout=1.0, conditions=ProbeConditions(max_latency=0.05))
    health = await rounds(watch, fly, 2, spec=spec)
    assert health.regions["iad"].state is RegionState.DOWN
    assert "latency" in health.regions["iad"].reason


async def test_own_connectivity_in_doubt(
    control: httpx.AsyncClient, fly: MachinesClient, watch: HealthWatch
) -> None:
    """When no machine anywhere answers (while Fly says the hosts are fine), regions are unknown, not down."""
    await make_app(control, base_latency=0.01)
    await rounds(watch, fly, 2)
    # Take the machines' listeners away without telling the API: only our probes fail.
    for region in ("iad", "cdg"):
        await control.post("/faults", json={"kind": "region_outage", "region": region, "mode": "refuse"})
    machines = [m.model_copy(update={"host_status": "ok"}) for m in await fly.list_machines("shop")]
    health = None
    for _ in range(2):
        health = await watch.observe("shop", machines, FAST)
    assert health is not None
    judged = watch.judge(health)["shop"]
    assert {r.state for r in judged.regions.values()} == {RegionState.UNKNOWN}
    assert "connectivity is in doubt" in judged.regions["iad"].reason


async def test_probe_history_is_per_instance(
    control: httpx.AsyncClient, fly: MachinesClient, watch: HealthWatch
) -> None:
    """An update (a new instance_id) starts the probe history afresh: the old unhealthy verdict is gone."""
    await make_app(control, base_latency=0.01, regions={"iad": 1})
    await control.post("/images", json={"image": "registry.fly.io/shop:bad", "mode": "unhealthy"})
    (machine,) = await fly.list_machines("shop")
    good = machine.config
    assert good is not None
    bad = await fly.update_machine("shop", machine.id, good.copy_with(image="registry.fly.io/shop:bad"))
    await fly.wait("shop", machine.id, "started", version=bad.instance_id)
    before = await rounds(watch, fly, 2)
    assert before.machines[machine.id].verdict is Verdict.UNHEALTHY
    assert "status 500" in before.machines[machine.id].reason

    back = await fly.update_machine("shop", machine.id, good)
    assert back.instance_id != bad.instance_id
    await fly.wait("shop", machine.id, "started", version=back.instance_id)
    # one passing probe: under hysteresis (healthy_after=2) an old history would still say unhealthy
    after = (await rounds(watch, fly, 1)).machines[machine.id]
    assert after.verdict is not Verdict.UNHEALTHY, after.reason
    assert "recovering" not in after.reason


async def test_forget_drops_the_history_and_the_exported_verdicts(
    control: httpx.AsyncClient, fly: MachinesClient, watch: HealthWatch, registry: CollectorRegistry
) -> None:
    """After forget, the app's verdict series are gone and, watched again, its machines need the whole
    healthy_after run again: one passing probe is not enough, as after a restart."""
    await make_app(control, base_latency=0.01, regions={"iad": 1})
    await make_app(control, "other", base_latency=0.01, regions={"cdg": 1})
    health = await rounds(watch, fly, 2)
    (machine,) = health.machines
    assert "status 200" in health.machines[machine].reason  # the probes' own verdict: healthy
    await rounds(watch, fly, 2, app="other")
    machine_labels = {"fly_app": "shop", "fly_region": "iad", "machine": machine}
    region_labels = {"fly_app": "shop", "fly_region": "iad", "state": "healthy"}
    assert registry.get_sample_value("flywatch_machine_healthy", machine_labels) == 1
    assert registry.get_sample_value("flywatch_region_health", region_labels) == 1

    watch.forget("shop")
    exported = {
        sample.labels["fly_app"]
        for name in ("flywatch_machine_healthy", "flywatch_region_health")
        for family in registry.collect()
        if family.name == name
        for sample in family.samples
    }
    assert exported == {"other"}  # the other app's series stay
    again = (await rounds(watch, fly, 1)).machines[machine]
    assert "Fly checks passing" in again.reason, again.reason  # one probe of healthy_after=2: no history
    assert "status 200" in (await rounds(watch, fly, 1, app="other")).machines.popitem()[1].reason


def observed(app: str, **regions: Verdict) -> AppHealth:
    """An app's health as observed: one machine per region, failing without an answer when unhealthy."""
    machines = {
        f"{app}-{region}": MachineVerdict(
            f"{app}-{region}",
            region,
            verdict,
            "because",
            no_answer=verdict is Verdict.UNHEALTHY,
            unreachable=False,
        )
        for region, verdict in regions.items()
    }
    return AppHealth(
        app=app,
        at=0.0,
        machines=machines,
        regions={m.region: region_health(m.region, [m]) for m in machines.values()},
    )


def test_judging_an_app_judges_it_alone_unless_it_turns_the_doubt_on_or_off(
    watch: HealthWatch, registry: CollectorRegistry
) -> None:
    """`judge` gives back the app just observed; when that app makes every region everywhere silent (or
    ends it), every app seen is judged again, from what was observed of it, not from what was said of it."""
    u, h = Verdict.UNHEALTHY, Verdict.HEALTHY
    assert list(watch.judge(observed("shop", iad=u, cdg=u))) == ["shop"]  # silent alone: doubted
    assert list(watch.judge(observed("api", nrt=u))) == ["api"]  # silent too: still in doubt, api alone
    assert {r.state for r in watch.judge(observed("api", nrt=u))["api"].regions.values()} == {
        RegionState.UNKNOWN
    }

    recovered = watch.judge(observed("api", nrt=h))  # an answer: the doubt ends, shop is down after all
    assert set(recovered) == {"shop", "api"}
    assert {r.state for r in recovered["shop"].regions.values()} == {RegionState.DOWN}
    assert recovered["api"].regions["nrt"].state is RegionState.HEALTHY
    assert (
        registry.get_sample_value(
            "flywatch_region_health", {"fly_app": "shop", "fly_region": "iad", "state": "down"}
        )
        == 1.0
    )

    rejudged = watch.forget("api")  # the one that answered is gone: shop alone is silent, doubted again
    assert set(rejudged) == {"shop"}
    assert "connectivity is in doubt" in rejudged["shop"].regions["iad"].reason
    labels = {"fly_app": "shop", "fly_region": "iad", "state": "unknown"}
    assert registry.get_sample_value("flywatch_region_health", labels) == 1.0
    assert watch.forget("shop") == {}  # nothing else left to judge
