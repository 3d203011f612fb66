"""The Machines API client over real HTTP against the simulator: every call, errors, retries, leases, waits.

Every exchange is validated against Fly's OpenAPI document by the contract checker of the `sim` fixtures, so
each request the client sends here is checked against the spec too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemon.clock import Clock, ManualClock, SystemClock
from daemon.core.ratelimit import limit_for
from daemon.fly import errors
from daemon.fly.client import (
    IDEMPOTENCY_KEY,
    LEASE_NONCE_HEADER,
    NO_BACKOFF,
    MachinesClient,
    RetryPolicy,
)
from daemon.fly.models import MachineConfig
from daemon.sim.api import Exchange
from daemon.sim.model import SimSettings
from daemon.sim.server import SimServer
from daemon.telemetry.metrics import ApiMetrics
from tests.conftest import TOKEN, eventually
from tests.sim.helpers import make_app

IMAGE = "registry.fly.io/shop:deployment-2"
ClientFactory = Callable[..., MachinesClient]


def retries(attempts: int) -> RetryPolicy:
    """A policy of `attempts` tries with no waiting between them."""
    return RetryPolicy(attempts=attempts, base=0.0, cap=0.0, jitter=0.0)


# ---------------------------------------------------------------------------------------------- harness


class Wire:
    """Every exchange the simulator answers, with the time of the simulator's clock at the answer."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.seen: list[tuple[float, Exchange]] = []
        server.observers.append(self._observe)

    def _observe(self, exchange: Exchange) -> None:
        self.seen.append((self.server.clock.now(), exchange))

    def of(self, operation: str) -> list[Exchange]:
        return [e for _, e in self.seen if e.operation == operation]

    def times(self, operation: str) -> list[float]:
        return [t for t, e in self.seen if e.operation == operation]

    def statuses(self, operation: str) -> list[int]:
        return [e.status for e in self.of(operation)]

    def count(self, operation: str) -> int:
        return len(self.of(operation))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """Build clients (each on its own registry unless given one); all are closed at the end of the test.

    The limiter is off unless asked for: the wall-clock `sim` has Fly's limits off, and waiting on real
    buckets would only slow the tests down. The limiter is tested on the ManualClock (`manual_client`).
    """
    made: list[MachinesClient] = []

    def make(
        url: str,
        *,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
        token: str = TOKEN,
        retry: RetryPolicy = NO_BACKOFF,
        rate_limit: bool = False,
        **options: Any,
    ) -> MachinesClient:
        client = MachinesClient(
            url,
            token,
            clock=clock or SystemClock(),
            metrics=ApiMetrics(registry or CollectorRegistry()),
            retry=retry,
            rate_limit=rate_limit,
            **options,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
def client(sim: SimServer, make_client: ClientFactory, registry: CollectorRegistry) -> MachinesClient:
    """A client of the wall-clock simulator, no backoff, metrics on `registry`."""
    return make_client(sim.api_url, registry=registry)


@pytest.fixture
def manual_client(
    manual_sim: SimServer, make_client: ClientFactory, clock: ManualClock, registry: CollectorRegistry
) -> MachinesClient:
    """A client of the ManualClock simulator on the same clock, with its rate limiter on."""
    return make_client(manual_sim.api_url, clock=clock, registry=registry, rate_limit=True)


@pytest.fixture
def wire(sim: SimServer) -> Wire:
    return Wire(sim)


@pytest.fixture
def manual_wire(manual_sim: SimServer) -> Wire:
    return Wire(manual_sim)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def ids_in(app: dict[str, Any], state: str | None = None, region: str | None = None) -> list[str]:
    """Machine ids of a control-API app summary, by state and region."""
    return [
        m["id"]
        for m in app["machines"]
        if (state is None or m["state"] == state) and (region is None or m["region"] == region)
    ]


async def summary(control: httpx.AsyncClient, app: str = "shop") -> dict[str, Any]:
    response = await control.get(f"/apps/{app}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def add_fault(control: httpx.AsyncClient, **spec: Any) -> dict[str, Any]:
    response = await control.post("/faults", json=spec)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def counters(control: httpx.AsyncClient) -> dict[str, Any]:
    result: dict[str, Any] = (await control.get("/counters")).json()
    return result


async def one_started(control: httpx.AsyncClient) -> str:
    """An app `shop` with one started machine in iad; its id."""
    (machine_id,) = ids_in(await make_app(control, regions={"iad": 1}))
    return machine_id


def waiters(server: SimServer, machine_id: str) -> int:
    """How many wait calls the simulator holds open on the machine."""
    return sum(1 for _, future in server.platform._waiters.get(machine_id, []) if not future.done())


async def done(task: asyncio.Future[Any]) -> Any:
    """The task's result once it has finished (bounded on the wall clock)."""

    async def finished() -> bool:
        return task.done()

    await eventually(finished)
    return task.result()


# ---------------------------------------------------------------------------------------------- every call


async def test_list_apps_and_get_app(client: MachinesClient, control: httpx.AsyncClient) -> None:
    """list_apps lists the org's apps and get_app reads one, with its machine count and organization."""
    await make_app(control, "shop")
    await make_app(control, "blog", regions={"cdg": 1})
    apps = await client.list_apps("personal")
    assert sorted(a.name for a in apps) == ["blog", "shop"]
    shop = await client.get_app("shop")
    assert shop.name == "shop"
    assert shop.machine_count == 3
    assert shop.organization["slug"] == "personal"
    assert shop.id


async def test_list_machines_filters(
    client: MachinesClient, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """list_machines filters by region, states and metadata, gives summaries, shows destroyed on request."""
    app = await make_app(control, regions={"iad": 2, "cdg": {"started": 1, "stopped": 1}})
    everything = await client.list_machines("shop")
    assert sorted(m.id for m in everything) == sorted(ids_in(app))
    assert all(m.config is not None and m.config.image for m in everything)

    cdg = await client.list_machines("shop", region="cdg")
    assert sorted(m.id for m in cdg) == sorted(ids_in(app, region="cdg"))
    stopped = await client.list_machines("shop", states=["stopped"])
    assert [m.id for m in stopped] == ids_in(app, "stopped")
    both = await client.list_machines("shop", states=["started", "stopped"])
    assert len(both) == 4

    tagged = ids_in(app, "started", "iad")[0]
    await client.set_metadata("shop", tagged, "role", "primary")
    by_meta = await client.list_machines("shop", metadata={"role": "primary", "fly_process_group": "app"})
    assert [m.id for m in by_meta] == [tagged]
    assert await client.list_machines("shop", metadata={"role": "replica"}) == []

    brief = await client.list_machines("shop", summary=True)
    assert len(brief) == 4
    assert all(m.config is None and m.state for m in brief)

    victim = ids_in(app, "stopped")[0]
    await client.destroy_machine("shop", victim)
    await client.wait("shop", victim, "destroyed")
    assert victim not in {m.id for m in await client.list_machines("shop")}
    with_deleted = await client.list_machines("shop", include_deleted=True)
    assert {m.id: m.state for m in with_deleted}[victim] == "destroyed"


async def test_get_machine(
    client: MachinesClient, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """get_machine returns the machine as the API shows it: state, region, version, config, image."""
    machine_id = await one_started(control)
    raw = (await api.get(f"/apps/shop/machines/{machine_id}")).json()
    machine = await client.get_machine("shop", machine_id)
    assert machine.id == machine_id
    assert machine.state == "started"
    assert machine.region == "iad"
    assert machine.instance_id == raw["instance_id"]
    assert machine.private_ip == raw["private_ip"]
    assert machine.config is not None
    assert machine.config.to_api() == raw["config"]
    assert machine.image == raw["config"]["image"]
    assert machine.host_status == "ok"


async def test_create_machine_in_region_launches_or_skips_launch(
    manual_client: MachinesClient, manual_control: httpx.AsyncClient, clock: ManualClock
) -> None:
    """create_machine places the machine in the region and boots it, unless skip_launch keeps it created."""
    await make_app(manual_control, regions={"iad": 1})
    config = MachineConfig(image=IMAGE, metadata={"fly_process_group": "app"})
    launched = await manual_client.create_machine("shop", config, region="cdg", name="web-1")
    parked = await manual_client.create_machine("shop", config, region="nrt", skip_launch=True)
    assert (launched.region, launched.name, launched.image) == ("cdg", "web-1", IMAGE)
    assert parked.region == "nrt"
    assert launched.metadata["fly_process_group"] == "app"
    assert launched.metadata[IDEMPOTENCY_KEY] != parked.metadata[IDEMPOTENCY_KEY]
    assert launched.nonce is None
    assert config.metadata == {"fly_process_group": "app"}  # the caller's config is not changed
    await clock.advance(5)
    assert (await manual_client.get_machine("shop", launched.id)).state == "started"
    assert (await manual_client.get_machine("shop", parked.id)).state == "created"


async def test_create_machine_with_lease_ttl_returns_the_nonce(
    client: MachinesClient, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """create_machine with lease_ttl answers the lease's nonce, which alone unlocks the new machine."""
    await make_app(control, regions={"iad": 1})
    created = await client.create_machine(
        "shop", MachineConfig(image=IMAGE), region="iad", skip_launch=True, lease_ttl=30
    )
    assert created.nonce
    lease = await client.get_lease("shop", created.id)
    assert lease is not None
    assert lease.nonce == created.nonce
    with pytest.raises(errors.LeaseHeld):
        await client.start_machine("shop", created.id)
    assert (await client.start_machine("shop", created.id, nonce=created.nonce))[
        "previous_state"
    ] == "created"


async def test_update_machine_sends_the_whole_config_and_checks_the_version(
    client: MachinesClient, control: httpx.AsyncClient, wire: Wire
) -> None:
    """update_machine replaces the whole config with current_version; a stale version is a VersionConflict."""
    machine_id = await one_started(control)
    machine = await client.get_machine("shop", machine_id)
    assert machine.config is not None
    wanted = machine.config.copy_with(image=IMAGE)
    updated = await client.update_machine("shop", machine_id, wanted, current_version=machine.instance_id)
    assert updated.instance_id != machine.instance_id
    assert updated.image == IMAGE
    (sent,) = wire.of("Machines_update")
    assert b'"current_version"' in sent.body
    for key in ("services", "checks", "guest", "restart", "metadata"):
        assert f'"{key}"'.encode() in sent.body  # the whole config, not a patch

    await client.wait("shop", machine_id, "started", version=updated.instance_id)
    with pytest.raises(errors.VersionConflict) as caught:
        await client.update_machine(
            "shop", machine_id, wanted.copy_with(image="x:3"), current_version=machine.instance_id
        )
    assert caught.value.status == 409
    assert (await client.get_machine("shop", machine_id)).image == IMAGE


async def test_lifecycle_start_stop_suspend_restart_destroy(
    client: MachinesClient, control: httpx.AsyncClient
) -> None:
    """stop, start, suspend, restart and destroy (force for a running machine) move the machine as asked."""
    machine_id = await one_started(control)
    version = (await client.get_machine("shop", machine_id)).instance_id
    assert await client.stop_machine("shop", machine_id) == {"ok": True}
    stopped = await client.wait("shop", machine_id, "stopped", version=version)
    assert (stopped.ok, stopped.state, stopped.version) == (True, "stopped", version)
    assert stopped.event_id

    started = await client.start_machine("shop", machine_id)
    assert started["previous_state"] == "stopped"
    assert (await client.wait("shop", machine_id)).state == "started"

    assert await client.suspend_machine("shop", machine_id) == {"ok": True}
    assert (await client.wait("shop", machine_id, "suspended")).state == "suspended"
    await client.start_machine("shop", machine_id)
    await client.wait("shop", machine_id, "started")

    assert await client.restart_machine("shop", machine_id) == {"ok": True}
    await client.wait("shop", machine_id, "started")

    with pytest.raises(errors.PreconditionFailed):
        await client.destroy_machine("shop", machine_id)  # running: needs force
    await client.destroy_machine("shop", machine_id, force=True)
    assert (await client.wait("shop", machine_id, "destroyed")).state == "destroyed"


async def test_wait_for_states_and_versions(client: MachinesClient, control: httpx.AsyncClient) -> None:
    """wait takes several states and a version; waiting for stopped needs the version (400 without it)."""
    machine_id = await one_started(control)
    version = (await client.get_machine("shop", machine_id)).instance_id
    either = await client.wait("shop", machine_id, ["stopped", "started"], version=version, timeout=5)
    assert either.state == "started"
    with pytest.raises(errors.BadRequest) as caught:
        await client.wait("shop", machine_id, "stopped", timeout=5)
    assert "instance_id required" in caught.value.message
    await client.stop_machine("shop", machine_id)
    assert (await client.wait("shop", machine_id, "stopped", version=version, timeout=5)).state == "stopped"


async def test_acquire_get_refresh_release_lease(client: MachinesClient, control: httpx.AsyncClient) -> None:
    """A lease is acquired, read, refreshed under the same nonce, released; then it is gone."""
    machine_id = await one_started(control)
    assert await client.get_lease("shop", machine_id) is None
    lease = await client.acquire_lease("shop", machine_id, ttl=30, description="scale-down")
    assert lease.nonce
    assert lease.owner == "sim@tokens.fly.io"
    assert lease.description.startswith("scale-down")  # with a tag of its own, to know it again
    assert lease.version == (await client.get_machine("shop", machine_id)).instance_id
    shown = await client.get_lease("shop", machine_id)
    assert shown is not None
    assert shown.nonce == lease.nonce
    refreshed = await client.refresh_lease("shop", machine_id, lease.nonce, ttl=60)
    assert refreshed.nonce == lease.nonce
    assert refreshed.expires_at > lease.expires_at
    assert await client.release_lease("shop", machine_id, lease.nonce) is True
    assert await client.get_lease("shop", machine_id) is None
    assert await client.release_lease("shop", machine_id, lease.nonce) is False  # already gone: 404


async def test_lease_context_holds_and_refreshes_past_its_ttl(
    manual_client: MachinesClient,
    manual_control: httpx.AsyncClient,
    manual_api: httpx.AsyncClient,
    manual_wire: Wire,
    clock: ManualClock,
) -> None:
    """lease() refreshes in the background, so it holds the machine well past its ttl, then releases it."""
    (machine_id,) = ids_in(await make_app(manual_control, regions={"iad": 1}))
    path = f"/apps/shop/machines/{machine_id}/lease"
    async with manual_client.lease("shop", machine_id, ttl=3) as held:
        nonce = held.nonce
        for second in range(1, 10):
            await clock.advance(1.0)

            async def refreshed(n: int = second) -> bool:
                return manual_wire.count("Machines_create_lease") >= 1 + n

            await eventually(refreshed)
        shown = (await manual_api.get(path)).json()["data"]
        assert shown["nonce"] == nonce
        assert shown["expires_at"] >= clock.now() + 2
        assert held.lost == ""
        assert held.lease.expires_at == shown["expires_at"]
        # the nonce works while held, and nobody else gets in
        stop = await manual_api.post(f"/apps/shop/machines/{machine_id}/stop")
        assert stop.status_code == 409
        assert (await manual_client.stop_machine("shop", machine_id, nonce=nonce)) == {"ok": True}
    assert all(e.status == 201 for e in manual_wire.of("Machines_create_lease"))
    refreshes = manual_wire.of("Machines_create_lease")[1:]
    assert all(e.headers.get(LEASE_NONCE_HEADER) == nonce for e in refreshes)
    assert manual_wire.statuses("Machines_release_lease") == [200]
    assert (await manual_api.get(path)).status_code == 404


async def test_lease_context_raises_lease_held_when_another_holds_it(
    client: MachinesClient, control: httpx.AsyncClient, api: httpx.AsyncClient, wire: Wire
) -> None:
    """lease() raises LeaseHeld at once when someone else holds the lease, and leaves theirs alone."""
    machine_id = await one_started(control)
    path = f"/apps/shop/machines/{machine_id}/lease"
    theirs = (await api.post(path, json={"ttl": 60, "description": "fly deploy"})).json()["data"]["nonce"]
    with pytest.raises(errors.LeaseHeld) as caught:
        async with client.lease("shop", machine_id):
            pytest.fail("entered the block without the lease")
    assert caught.value.status == 409
    assert caught.value.endpoint == "Machines_create_lease"
    assert wire.count("Machines_release_lease") == 0
    assert (await api.get(path)).json()["data"]["nonce"] == theirs


async def test_lease_context_releases_after_an_exception(
    client: MachinesClient, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """An exception inside the lease() block still releases the lease and stops the refresher."""
    machine_id = await one_started(control)
    path = f"/apps/shop/machines/{machine_id}/lease"

    class BoomError(Exception):
        pass

    async def fail_inside() -> None:
        async with client.lease("shop", machine_id, ttl=30) as held:
            assert (await api.get(path)).json()["data"]["nonce"] == held.nonce
            raise BoomError

    with pytest.raises(BoomError):
        await fail_inside()
    assert (await api.get(path)).status_code == 404
    assert (await api.post(f"/apps/shop/machines/{machine_id}/stop")).status_code == 200


async def test_metadata_get_set_delete(client: MachinesClient, control: httpx.AsyncClient) -> None:
    """set_metadata adds a key, get_metadata reads them all, delete_metadata removes one."""
    machine_id = await one_started(control)
    before = await client.get_metadata("shop", machine_id)
    assert before["fly_process_group"] == "app"
    await client.set_metadata("shop", machine_id, "flywatch_role", "canary")
    assert (await client.get_metadata("shop", machine_id)) == {**before, "flywatch_role": "canary"}
    assert (await client.get_machine("shop", machine_id)).metadata["flywatch_role"] == "canary"
    await client.delete_metadata("shop", machine_id, "flywatch_role")
    assert await client.get_metadata("shop", machine_id) == before


async def test_list_versions_and_events(client: MachinesClient, control: httpx.AsyncClient) -> None:
    """list_versions gives every config newest first; list_events the newest events up to the limit."""
    machine_id = await one_started(control)
    machine = await client.get_machine("shop", machine_id)
    assert machine.config is not None
    updated = await client.update_machine("shop", machine_id, machine.config.copy_with(image=IMAGE))
    await client.wait("shop", machine_id, "started", version=updated.instance_id)
    versions = await client.list_versions("shop", machine_id)
    assert [v.version for v in versions] == [updated.instance_id, machine.instance_id]
    assert versions[0].user_config.image == IMAGE
    assert versions[1].user_config.to_api() == machine.config.to_api()

    events = await client.list_events("shop", machine_id, limit=3)
    assert len(events) == 3
    assert [e.timestamp for e in events] == sorted((e.timestamp for e in events), reverse=True)
    assert (events[0].type, events[0].status) == ("update", "started")
    assert len(await client.list_events("shop", machine_id)) > 3


# ------------------------------------------------------------------------------------------- lossless config


async def test_config_round_trip_keeps_unknown_fields(
    client: MachinesClient, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """A config read and written back by the client keeps every field it does not know, unchanged."""
    machine_id = await one_started(control)
    path = f"/apps/shop/machines/{machine_id}"
    config = (await api.get(path)).json()["config"]
    config["x_future_field"] = {"nested": {"list": [1, 2.5, None, "s", {"deep": True}]}, "empty": {}}
    config["services"][0]["x_service_field"] = {"proxy_proto_options": {"version": "v2"}}
    config["services"][0]["ports"][0]["x_port_field"] = [443, "tls"]
    config["checks"]["health"]["x_check_field"] = "later"
    config["guest"]["x_guest_field"] = 7
    config["x_null_field"] = None
    config["standbys"] = []
    written = await api.post(path, json={"config": config})
    assert written.status_code == 200, written.text
    await client.wait("shop", machine_id, "started", version=written.json()["instance_id"])

    machine = await client.get_machine("shop", machine_id)
    assert machine.config is not None
    assert machine.config.to_api() == config
    updated = await client.update_machine(
        "shop", machine_id, machine.config.copy_with(image=IMAGE), current_version=machine.instance_id
    )
    await client.wait("shop", machine_id, "started", version=updated.instance_id)
    assert (await api.get(path)).json()["config"] == {**config, "image": IMAGE}

    # the same through a list, unchanged: exactly what was there
    (listed,) = await client.list_machines("shop")
    assert listed.config is not None
    again = await client.update_machine("shop", machine_id, listed.config, current_version=listed.instance_id)
    await client.wait("shop", machine_id, "started", version=again.instance_id)
    assert (await api.get(path)).json()["config"] == {**config, "image": IMAGE}


# ---------------------------------------------------------------------------------------------- the token


async def test_plain_token_is_sent_as_bearer(
    client: MachinesClient, control: httpx.AsyncClient, wire: Wire
) -> None:
    """A plain token goes out as `Authorization: Bearer TOKEN` on every request."""
    await make_app(control)
    await client.list_apps("personal")
    await client.list_machines("shop")
    assert [e.headers["Authorization"] for _, e in wire.seen] == [f"Bearer {TOKEN}"] * 2


async def test_flyv1_token_is_sent_as_is(
    sim: SimServer, settings: SimSettings, make_client: ClientFactory, control: httpx.AsyncClient, wire: Wire
) -> None:
    """A `FlyV1 ...` macaroon is sent as the whole Authorization header, with no Bearer in front."""
    settings.tokens["fm2_macaroon,fm2_discharge"] = "deploy@tokens.fly.io"
    await make_app(control)
    client = make_client(sim.api_url, token="FlyV1 fm2_macaroon,fm2_discharge")
    assert [a.name for a in await client.list_apps("personal")] == ["shop"]
    (exchange,) = wire.of("Apps_list")
    assert exchange.headers["Authorization"] == "FlyV1 fm2_macaroon,fm2_discharge"


SECRET = "fm2_very-secret-token-value"


async def _provoke_401(client: MachinesClient, bad: MachinesClient, machine_id: str) -> None:
    await bad.get_machine("shop", machine_id)


async def _provoke_404(client: MachinesClient, bad: MachinesClient, machine_id: str) -> None:
    await client.get_machine("shop", "0000000000000")


async def _provoke_409(client: MachinesClient, bad: MachinesClient, machine_id: str) -> None:
    await client.acquire_lease("shop", machine_id, ttl=30)
    await client.stop_machine("shop", machine_id)


async def _provoke_5xx(client: MachinesClient, bad: MachinesClient, machine_id: str) -> None:
    await client.list_machines("oops")  # an app named for the fault below


async def _provoke_timeout(client: MachinesClient, bad: MachinesClient, machine_id: str) -> None:
    await client.get_app("slow")


@pytest.mark.parametrize(
    ("provoke", "expected"),
    [
        (_provoke_401, errors.Unauthorized),
        (_provoke_404, errors.NotFound),
        (_provoke_409, errors.LeaseHeld),
        (_provoke_5xx, errors.ServerError),
        (_provoke_timeout, errors.TransportError),
    ],
    ids=["401", "404", "409", "5xx", "timeout"],
)
async def test_token_never_leaks_into_errors_repr_or_logs(
    sim: SimServer,
    settings: SimSettings,
    make_client: ClientFactory,
    control: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    provoke: Callable[[MachinesClient, MachinesClient, str], Awaitable[None]],
    expected: type[errors.FlyApiError],
) -> None:
    """The token is in no raised error (str, repr, cause, context), not in the client's repr, not in logs."""
    caplog.set_level(logging.DEBUG)
    settings.tokens[SECRET] = "me@tokens.fly.io"
    machine_id = await one_started(control)
    await add_fault(
        control, endpoint="Machines_list", app="oops", status=502, body="<html>bad gateway</html>"
    )
    await add_fault(control, endpoint="Apps_show", app="slow", timeout=True)
    client = make_client(sim.api_url, token=SECRET, retry=retries(2), timeout=0.2)
    bad = make_client(sim.api_url, token=f"FlyV1 {SECRET}-revoked", retry=retries(2))
    with pytest.raises(expected) as caught:
        await provoke(client, bad, machine_id)
    texts = [str(caught.value), repr(caught.value), repr(client), repr(bad), caplog.text]
    texts += [str(caught.value.__cause__), str(caught.value.__context__), str(caught.getrepr())]
    texts += [record.getMessage() for record in caplog.records]
    for text in texts:
        assert SECRET not in text


async def test_token_echoed_by_a_proxy_is_redacted(
    sim: SimServer,
    settings: SimSettings,
    make_client: ClientFactory,
    control: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 5xx page that echoes the Authorization header does not carry the token into the error or the logs."""
    caplog.set_level(logging.DEBUG)
    settings.tokens[SECRET] = "me@tokens.fly.io"
    await make_app(control)
    page = f"<pre>upstream error; request headers: Authorization: Bearer {SECRET}</pre>"
    await add_fault(control, endpoint="Apps_show", status=502, body=page)
    client = make_client(sim.api_url, token=SECRET, retry=retries(2))
    with pytest.raises(errors.ServerError) as caught:
        await client.get_app("shop")
    assert "upstream error" in caught.value.message
    for text in (str(caught.value), repr(caught.value), caught.value.message, caplog.text):
        assert SECRET not in text


# ---------------------------------------------------------------------------------------------- typed errors


Provoke = Callable[[MachinesClient, MachinesClient, str, str], Awaitable[Any]]
# each case: how to provoke it from (client, stranger, a free machine, a machine someone else leased),
# then the error type, the endpoint and the status
ERROR_CASES: dict[str, tuple[Provoke, type[errors.FlyApiError], str, int]] = {
    "404 machine": (
        lambda c, _s, _f, _l: c.get_machine("shop", "0000000000000"),
        errors.NotFound,
        "Machines_show",
        404,
    ),
    "404 app": (lambda c, _s, _f, _l: c.get_app("nope"), errors.NotFound, "Apps_show", 404),
    "401": (lambda _c, s, _f, _l: s.list_machines("shop"), errors.Unauthorized, "Machines_list", 401),
    "409 lease held (lease)": (
        lambda c, _s, _f, leased: c.acquire_lease("shop", leased, ttl=10),
        errors.LeaseHeld,
        "Machines_create_lease",
        409,
    ),
    "409 lease held (gated call)": (
        lambda c, _s, _f, leased: c.restart_machine("shop", leased),
        errors.LeaseHeld,
        "Machines_restart",
        409,
    ),
    "409 version": (
        lambda c, _s, free, _l: c.update_machine(
            "shop", free, MachineConfig(image=IMAGE), current_version="01STALE"
        ),
        errors.VersionConflict,
        "Machines_update",
        409,
    ),
    "412": (
        lambda c, _s, free, _l: c.start_machine("shop", free),
        errors.PreconditionFailed,
        "Machines_start",
        412,
    ),
    "412 capacity": (
        lambda c, _s, _f, _l: c.create_machine("shop", MachineConfig(image=IMAGE), region="cdg"),
        errors.InsufficientCapacity,
        "Machines_create",
        412,
    ),
    "400 wait": (
        lambda c, _s, free, _l: c.wait("shop", free, "stopped", timeout=5),
        errors.BadRequest,
        "Machines_wait",
        400,
    ),
    "400 create": (
        lambda c, _s, _f, _l: c.create_machine("shop", MachineConfig(image=""), region="iad"),
        errors.BadRequest,
        "Machines_create",
        400,
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
async def test_typed_errors_carry_endpoint_status_and_request_id(
    sim: SimServer,
    client: MachinesClient,
    make_client: ClientFactory,
    control: httpx.AsyncClient,
    api: httpx.AsyncClient,
    wire: Wire,
    case: str,
) -> None:
    """An error answer raises its own type, with the endpoint, the status and the answer's fly-request-id."""
    provoke, kind, endpoint, status = ERROR_CASES[case]
    free, leased = ids_in(await make_app(control, regions={"iad": 2}))
    assert (await api.post(f"/apps/shop/machines/{leased}/lease", json={"ttl": 60})).status_code == 201
    await add_fault(control, kind="capacity", region="cdg")
    stranger = make_client(sim.api_url, token="not-a-known-token")
    before = wire.count(endpoint)
    with pytest.raises(errors.FlyApiError) as caught:
        await provoke(client, stranger, free, leased)
    error = caught.value
    assert type(error) is kind, repr(error)
    assert (error.endpoint, error.status) == (endpoint, status)
    (answer,) = wire.of(endpoint)[before:]  # one request: not retried
    assert answer.status == status
    assert error.request_id == answer.response_headers["fly-request-id"]
    assert error.request_id in str(error)
    assert error.message


# ---------------------------------------------------------------------------------------------- retries


async def test_5xx_burst_is_retried_and_succeeds(
    client: MachinesClient, control: httpx.AsyncClient, registry: CollectorRegistry, wire: Wire
) -> None:
    """Two 503s in a row are retried; the third try succeeds, and the retries are counted as 5xx."""
    await make_app(control)
    await add_fault(control, endpoint="Machines_list", status=503, count=2)
    assert len(await client.list_machines("shop")) == 3
    assert wire.statuses("Machines_list") == [503, 503, 200]
    assert sample(registry, "flywatch_api_retries_total", endpoint="Machines_list", reason="5xx") == 2
    assert sample(registry, "flywatch_api_requests_total", endpoint="Machines_list", code="503") == 2
    assert sample(registry, "flywatch_api_requests_total", endpoint="Machines_list", code="200") == 1


async def test_persistent_503_gives_up_after_attempts(
    sim: SimServer, make_client: ClientFactory, control: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    """A 503 that never ends raises ServerError after exactly `attempts` requests."""
    await make_app(control)
    await add_fault(control, endpoint="Machines_list", status=503)
    client = make_client(sim.api_url, retry=retries(4), registry=registry)
    with pytest.raises(errors.ServerError) as caught:
        await client.list_machines("shop")
    assert caught.value.status == 503
    assert (await counters(control))["responses"]["Machines_list"] == {"503": 4}
    assert sample(registry, "flywatch_api_retries_total", endpoint="Machines_list", reason="5xx") == 3


async def test_429_is_retried(
    client: MachinesClient, control: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    """429 answers are retried until the call goes through, counted with reason 429."""
    machine_id = await one_started(control)
    await add_fault(control, endpoint="Machines_stop", status=429, count=3)
    assert await client.stop_machine("shop", machine_id) == {"ok": True}
    assert (await counters(control))["responses"]["Machines_stop"] == {"429": 3, "200": 1}
    assert sample(registry, "flywatch_api_retries_total", endpoint="Machines_stop", reason="429") == 3


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(
    manual_sim: SimServer,
    make_client: ClientFactory,
    manual_control: httpx.AsyncClient,
    manual_wire: Wire,
    clock: ManualClock,
    registry: CollectorRegistry,
    status: int,
) -> None:
    """After an answer with Retry-After: 5 the retry goes out 5 s later, not before, whatever the backoff."""
    await make_app(manual_control)
    await add_fault(manual_control, endpoint="Machines_list", status=status, retry_after=5, count=1)
    client = make_client(
        manual_sim.api_url, clock=clock, registry=registry, retry=RetryPolicy(base=0.01), rate_limit=True
    )
    started = clock.now()
    task = asyncio.create_task(client.list_machines("shop"))

    reason = "429" if status == 429 else "5xx"

    async def retry_scheduled() -> bool:
        return sample(registry, "flywatch_api_retries_total", endpoint="Machines_list", reason=reason) == 1

    await eventually(retry_scheduled)
    await clock.advance(4.9)
    await summary(manual_control)  # a round trip through the simulator
    assert manual_wire.statuses("Machines_list") == [status]
    assert not task.done()
    await clock.advance(0.1)
    assert len(await done(task)) == 3
    assert manual_wire.statuses("Machines_list") == [status, 200]
    assert manual_wire.times("Machines_list") == [started, started + 5.0]


async def test_timeouts_are_retried_then_raise_transport_error(
    sim: SimServer, make_client: ClientFactory, control: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    """A server that never answers is given up on per try at the client's timeout, retried, then raised."""
    await make_app(control)
    fault = await add_fault(control, endpoint="Apps_show", timeout=True)
    client = make_client(sim.api_url, retry=retries(3), timeout=0.2, registry=registry)
    with pytest.raises(errors.TransportError) as caught:
        await client.get_app("shop")
    assert caught.value.status == 0
    assert caught.value.endpoint == "Apps_show"
    (listed,) = (await control.get("/faults")).json()
    assert listed["id"] == fault["id"]
    assert listed["hits"] == 3
    assert sample(registry, "flywatch_api_requests_total", endpoint="Apps_show", code="timeout") == 3
    assert sample(registry, "flywatch_api_retries_total", endpoint="Apps_show", reason="timeout") == 2


async def test_connection_refused_is_retried_then_raises_transport_error(
    make_client: ClientFactory, registry: CollectorRegistry
) -> None:
    """A closed port is retried `attempts` times, then TransportError."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(f"http://127.0.0.1:{port}", retry=retries(3), registry=registry)
    with pytest.raises(errors.TransportError) as caught:
        await client.list_apps("personal")
    assert caught.value.endpoint == "Apps_list"
    assert "connect" in caught.value.message
    assert sample(registry, "flywatch_api_requests_total", endpoint="Apps_list", code="error") == 3
    assert sample(registry, "flywatch_api_retries_total", endpoint="Apps_list", reason="connection") == 2


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, errors.BadRequest),
        (401, errors.Unauthorized),
        (403, errors.Forbidden),
        (404, errors.NotFound),
        (409, errors.Conflict),
        (412, errors.PreconditionFailed),
        (422, errors.Unprocessable),
    ],
)
async def test_other_4xx_are_not_retried(
    client: MachinesClient,
    control: httpx.AsyncClient,
    registry: CollectorRegistry,
    status: int,
    kind: type[errors.FlyApiError],
) -> None:
    """A 4xx other than 429 raises its type after one request: the simulator counts exactly one."""
    machine_id = await one_started(control)
    await add_fault(control, endpoint="Machines_show", status=status)
    with pytest.raises(kind) as caught:
        await client.get_machine("shop", machine_id)
    assert type(caught.value) is kind
    assert caught.value.status == status
    assert (await counters(control))["responses"]["Machines_show"] == {str(status): 1}
    assert sample(registry, "flywatch_api_retries_total", endpoint="Machines_show", reason="5xx") == 0


async def test_408_is_retried_where_repeating_is_safe(
    client: MachinesClient, control: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    """Fly's own deadline (408) on a read is transient, as flyctl treats it: retried, then it succeeds."""
    machine_id = await one_started(control)
    await add_fault(control, endpoint="Machines_show", status=408, count=1)
    machine = await client.get_machine("shop", machine_id)
    assert machine.id == machine_id
    assert (await counters(control))["responses"]["Machines_show"] == {"408": 1, "200": 1}
    assert sample(registry, "flywatch_api_retries_total", endpoint="Machines_show", reason="408") == 1


# ---------------------------------------------------------------------------------------------- create


async def test_create_after_a_lost_408_returns_the_created_machine(
    client: MachinesClient, control: httpx.AsyncClient, wire: Wire
) -> None:
    """A 408 after the machine was created: the client finds it by its key instead of creating another."""
    await make_app(control, regions={"iad": 1})
    await add_fault(control, endpoint="Machines_create", status=408, after=True, count=1)
    created = await client.create_machine("shop", MachineConfig(image=IMAGE), region="cdg")
    assert wire.statuses("Machines_create") == [408]
    assert wire.statuses("Machines_list") == [200]
    new = ids_in(await summary(control), region="cdg")
    assert new == [created.id]
    assert created.region == "cdg"
    assert created.metadata[IDEMPOTENCY_KEY]


async def test_create_after_a_503_before_creation_retries_once(
    client: MachinesClient, control: httpx.AsyncClient, wire: Wire, registry: CollectorRegistry
) -> None:
    """A 503 that created nothing: the lookup finds nothing, the client creates exactly one machine."""
    await make_app(control, regions={"iad": 1})
    await add_fault(control, endpoint="Machines_create", status=503, count=1)
    created = await client.create_machine(
        "shop", MachineConfig(image=IMAGE), region="cdg", idempotency_key="k-1"
    )
    assert wire.statuses("Machines_create") == [503, 200]
    assert wire.statuses("Machines_list") == [200, 200]  # looked up twice (the list lags), then created
    assert ids_in(await summary(control), region="cdg") == [created.id]
    assert created.metadata[IDEMPOTENCY_KEY] == "k-1"
    assert sample(registry, "flywatch_api_retries_total", endpoint="Machines_create", reason="ambiguous") == 1
    assert sample(registry, "flywatch_api_retries_total", endpoint="Machines_create", reason="5xx") == 0


async def test_create_persistent_503_raises_after_bounded_tries_without_duplicates(
    sim: SimServer, make_client: ClientFactory, control: httpx.AsyncClient, wire: Wire
) -> None:
    """A create that keeps failing raises ServerError after `attempts` tries, having created nothing."""
    await make_app(control, regions={"iad": 1})
    await add_fault(control, endpoint="Machines_create", status=503)
    client = make_client(sim.api_url, retry=retries(3))
    with pytest.raises(errors.ServerError):
        await client.create_machine("shop", MachineConfig(image=IMAGE), region="cdg")
    assert wire.statuses("Machines_create") == [503] * 3
    assert wire.statuses("Machines_list") == [200] * 6  # two lookups after each ambiguous failure
    assert ids_in(await summary(control), region="cdg") == []


async def test_create_whose_answers_keep_getting_lost_makes_one_machine(
    client: MachinesClient, control: httpx.AsyncClient, wire: Wire
) -> None:
    """When every create is carried out but answered 503, the first one is found: one machine, not five."""
    await make_app(control, regions={"iad": 1})
    await add_fault(control, endpoint="Machines_create", status=503, after=True)
    created = await client.create_machine("shop", MachineConfig(image=IMAGE), region="cdg")
    assert wire.statuses("Machines_create") == [503]
    assert ids_in(await summary(control), region="cdg") == [created.id]


async def test_create_whose_answer_never_comes_is_found(
    sim: SimServer, make_client: ClientFactory, control: httpx.AsyncClient, wire: Wire
) -> None:
    """A create carried out whose answer never arrives (client timeout) is looked up and returned."""
    await make_app(control, regions={"iad": 1})
    await add_fault(control, endpoint="Machines_create", timeout=True, after=True, count=1)
    client = make_client(sim.api_url, timeout=0.3)
    created = await client.create_machine("shop", MachineConfig(image=IMAGE), region="cdg")
    assert wire.count("Machines_create") == 0  # the only create was never answered
    assert ids_in(await summary(control), region="cdg") == [created.id]


async def test_create_with_lease_ttl_after_a_lost_answer_still_returns_the_nonce(
    client: MachinesClient, control: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    """A create with lease_ttl found after a lost answer still carries the lease's nonce, to use it with."""
    await make_app(control, regions={"iad": 1})
    await add_fault(control, endpoint="Machines_create", status=408, after=True, count=1)
    created = await client.create_machine(
        "shop", MachineConfig(image=IMAGE), region="cdg", skip_launch=True, lease_ttl=30
    )
    lease = (await api.get(f"/apps/shop/machines/{created.id}/lease")).json()["data"]
    assert created.nonce == lease["nonce"]
    await client.start_machine("shop", created.id, nonce=created.nonce)
    assert await client.release_lease("shop", created.id, created.nonce) is True


async def test_create_4xx_is_neither_retried_nor_looked_up(
    client: MachinesClient, control: httpx.AsyncClient, wire: Wire
) -> None:
    """A create refused outright (400) raises at once: no retry, no lookup."""
    await make_app(control, regions={"iad": 1})
    with pytest.raises(errors.BadRequest):
        await client.create_machine("shop", MachineConfig(image=IMAGE), region="nowhere")
    assert wire.statuses("Machines_create") == [400]
    assert wire.count("Machines_list") == 0


# -------------------------------------------------------------------------------------------- wait past 60 s


async def test_wait_loops_over_408_and_gives_up_at_its_timeout(
    manual_sim: SimServer,
    manual_client: MachinesClient,
    manual_control: httpx.AsyncClient,
    manual_wire: Wire,
    clock: ManualClock,
) -> None:
    """wait(timeout=150) for a machine that stays stopped makes three waits (60, 60, 30 s): RequestTimeout."""
    (machine_id,) = ids_in(await make_app(manual_control, regions={"iad": {"stopped": 1}}))
    t0 = clock.now()
    task = asyncio.create_task(manual_client.wait("shop", machine_id, "started", timeout=150))
    for step, seconds in enumerate([60, 60, 30]):

        async def held(n: int = step) -> bool:
            return waiters(manual_sim, machine_id) == 1 and manual_wire.count("Machines_wait") == n

        await eventually(held)
        await clock.advance(seconds)
    with pytest.raises(errors.RequestTimeout) as caught:
        await done(task)
    assert caught.value.endpoint == "Machines_wait"
    waits = manual_wire.of("Machines_wait")
    assert [e.status for e in waits] == [408, 408, 408]
    assert [dict(e.query)["timeout"] for e in waits] == ["60", "60", "30"]
    assert manual_wire.times("Machines_wait") == [t0 + 60, t0 + 120, t0 + 150]


async def test_wait_past_60_seconds_ends_when_the_machine_starts(
    manual_sim: SimServer,
    manual_client: MachinesClient,
    manual_control: httpx.AsyncClient,
    manual_api: httpx.AsyncClient,
    manual_wire: Wire,
    clock: ManualClock,
) -> None:
    """wait(timeout=150) for a machine started at t=90 s returns it started, over a 408 and a second wait."""
    (machine_id,) = ids_in(await make_app(manual_control, regions={"iad": {"stopped": 1}}))
    t0 = clock.now()
    task = asyncio.create_task(manual_client.wait("shop", machine_id, "started", timeout=150))

    async def held(n: int) -> bool:
        return waiters(manual_sim, machine_id) == 1 and manual_wire.count("Machines_wait") == n

    await eventually(lambda: held(0))
    await clock.advance(60)
    await eventually(lambda: held(1))
    await clock.advance(30)
    assert (await manual_api.post(f"/apps/shop/machines/{machine_id}/start")).status_code == 200
    await clock.advance(1)
    result = await done(task)
    assert result.state == "started"
    assert manual_wire.statuses("Machines_wait") == [408, 200]
    assert manual_wire.times("Machines_wait") == [t0 + 60, t0 + 91]


# ---------------------------------------------------------------------------------------------- rate limits


BURSTS = {
    "Machines_stop": 10,
    "Machines_create_lease": 10,
    "Machines_show": 16,
}


async def _burst(client: MachinesClient, operation: str, machine_id: str, nonce: str) -> list[Any]:
    calls: list[Awaitable[Any]]
    count = BURSTS[operation]
    if operation == "Machines_stop":
        calls = [client.stop_machine("shop", machine_id) for _ in range(count)]
    elif operation == "Machines_create_lease":
        calls = [client.refresh_lease("shop", machine_id, nonce, ttl=600) for _ in range(count)]
    else:
        calls = [client.get_machine("shop", machine_id) for _ in range(count)]
    return await asyncio.gather(*calls, return_exceptions=True)


async def _prepare(client: MachinesClient, control: httpx.AsyncClient, operation: str) -> tuple[str, str]:
    """An app with one started machine, and a lease on it when the burst refreshes one (taken by `client`)."""
    machine_id = await one_started(control)
    nonce = ""
    if operation == "Machines_create_lease":
        nonce = (await client.acquire_lease("shop", machine_id, ttl=600)).nonce
    return machine_id, nonce


@pytest.mark.parametrize("operation", list(BURSTS))
async def test_client_limiter_keeps_a_burst_under_fly_limits(
    manual_client: MachinesClient,
    manual_control: httpx.AsyncClient,
    manual_wire: Wire,
    clock: ManualClock,
    operation: str,
) -> None:
    """A concurrent burst at one machine is paced by the client's buckets: no 429 at all, all done in time."""
    machine_id, nonce = await _prepare(manual_client, manual_control, operation)
    before = manual_wire.count(operation)
    limit = limit_for(operation)
    task = asyncio.ensure_future(_burst(manual_client, operation, machine_id, nonce))
    total = BURSTS[operation]

    async def sent() -> int:
        await summary(manual_control)  # a round trip through the simulator, behind what went out before
        return manual_wire.count(operation) - before

    first_wave = await eventually(sent)
    assert first_wave == await sent()  # nothing more goes out while the clock stands still
    assert first_wave <= limit.burst - before  # never more than Fly's burst
    elapsed = 0
    while not task.done():
        await clock.advance(1.0)
        elapsed += 1
        assert await sent() <= limit.burst - before + elapsed * limit.rate
        assert elapsed <= total
    results = await done(task)
    assert not [r for r in results if isinstance(r, BaseException)]
    assert (await counters(manual_control))["rate_limited_total"] == 0
    assert set(manual_wire.statuses(operation)) == {201 if operation == "Machines_create_lease" else 200}
    assert manual_wire.count(operation) - before == total
    assert elapsed >= (total - (limit.burst - before)) / limit.rate


async def test_a_change_to_an_app_no_longer_ours_is_refused_before_the_limiter_and_after_its_wait(
    manual_sim: SimServer,
    make_client: ClientFactory,
    manual_control: httpx.AsyncClient,
    manual_wire: Wire,
    clock: ManualClock,
) -> None:
    """The guard is asked before a request waits for the limiter (not ours: it waits for nothing) and again
    after (the lease may have lapsed in the wait): calls paced behind a burst, still waiting when the app
    is lost, are refused once their turn comes and never sent; reads still go."""
    why: list[str] = []
    client = make_client(
        manual_sim.api_url, clock=clock, rate_limit=True, guard=lambda app: why[0] if why else None
    )
    machine_id = await one_started(manual_control)
    before = manual_wire.count("Machines_stop")
    burst = asyncio.ensure_future(
        _burst(client, "Machines_stop", machine_id, nonce="")  # more than the bucket holds
    )

    async def sent() -> int:
        await summary(manual_control)
        return manual_wire.count("Machines_stop") - before

    first_wave = await eventually(sent)
    assert 0 < first_wave < BURSTS["Machines_stop"]
    why.append("b/2f00aa owns it")
    # refused at once, with the clock standing still: it did not wait for the limiter
    with pytest.raises(errors.NotOwner, match="b/2f00aa owns it"):
        await asyncio.wait_for(client.stop_machine("shop", machine_id), timeout=5.0)
    while not burst.done():
        await clock.advance(1.0)
    results = await done(burst)
    refused = [r for r in results if isinstance(r, errors.NotOwner)]
    assert len(refused) == BURSTS["Machines_stop"] - first_wave, results
    assert await sent() == first_wave  # the ones that waited were never sent
    assert (await client.get_machine("shop", machine_id)).id == machine_id


async def test_without_the_limiter_a_burst_gets_429s_that_are_retried(
    manual_sim: SimServer,
    make_client: ClientFactory,
    manual_control: httpx.AsyncClient,
    manual_wire: Wire,
    clock: ManualClock,
    registry: CollectorRegistry,
) -> None:
    """With rate_limit=False a burst draws 429s from Fly; with backoff they are retried and all succeed."""
    client = make_client(
        manual_sim.api_url,
        clock=clock,
        registry=registry,
        rate_limit=False,
        retry=RetryPolicy(attempts=20, base=1.0, cap=1.0, jitter=0.0),
    )
    machine_id = await one_started(manual_control)
    task = asyncio.ensure_future(_burst(client, "Machines_stop", machine_id, ""))
    for _ in range(20):
        await summary(manual_control)  # a round trip through the simulator, behind the requests sent
        if task.done():
            break
        await clock.advance(1.0)
    results = await done(task)
    assert results == [{"ok": True}] * BURSTS["Machines_stop"]
    limited = (await counters(manual_control))["rate_limited"]["Machines_stop"]
    assert limited > 0
    assert sample(registry, "flywatch_api_retries_total", endpoint="Machines_stop", reason="429") == limited


async def test_without_the_limiter_and_backoff_a_burst_raises_rate_limited(
    manual_sim: SimServer,
    make_client: ClientFactory,
    manual_control: httpx.AsyncClient,
    clock: ManualClock,
) -> None:
    """With rate_limit=False and no backoff, a burst's 429s are retried `attempts` times, then RateLimited."""
    client = make_client(manual_sim.api_url, clock=clock, rate_limit=False, retry=retries(5))
    machine_id = await one_started(manual_control)
    task = asyncio.ensure_future(_burst(client, "Machines_stop", machine_id, ""))
    while not task.done():
        await clock.advance(0)  # a ManualClock's sleep(0) ends at the next advance; time stands still
    results = task.result()
    assert results.count({"ok": True}) == 3
    raised = [r for r in results if isinstance(r, BaseException)]
    assert len(raised) == 7
    assert all(isinstance(r, errors.RateLimited) and r.status == 429 for r in raised)
    assert (await counters(manual_control))["rate_limited"]["Machines_stop"] == 7 * 5


# ---------------------------------------------------------------------------------------------- metrics


async def test_metrics_count_requests_and_durations_per_endpoint(
    client: MachinesClient, control: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    """Each call is counted by endpoint and code, and its duration observed, on the injected registry."""
    machine_id = await one_started(control)
    await client.list_machines("shop")
    await client.list_machines("shop", region="iad")
    await client.get_machine("shop", machine_id)
    with pytest.raises(errors.NotFound):
        await client.get_machine("shop", "0000000000000")
    assert sample(registry, "flywatch_api_requests_total", endpoint="Machines_list", code="200") == 2
    assert sample(registry, "flywatch_api_requests_total", endpoint="Machines_show", code="200") == 1
    assert sample(registry, "flywatch_api_requests_total", endpoint="Machines_show", code="404") == 1
    assert sample(registry, "flywatch_api_request_duration_seconds_count", endpoint="Machines_list") == 2
    assert sample(registry, "flywatch_api_request_duration_seconds_count", endpoint="Machines_show") == 2
    assert sample(registry, "flywatch_api_request_duration_seconds_sum", endpoint="Machines_show") > 0
    assert sample(registry, "flywatch_api_requests_total", endpoint="Apps_list", code="200") == 0
    assert registry.get_sample_value("flywatch_api_retries_total", {"endpoint": "x", "reason": "5xx"}) is None


async def test_a_client_without_metrics_still_works(sim: SimServer, control: httpx.AsyncClient) -> None:
    """Metrics are optional: a client built without them makes calls and retries just the same."""
    await make_app(control)
    await add_fault(control, endpoint="Apps_show", status=500, count=1)
    async with MachinesClient(sim.api_url, TOKEN, clock=SystemClock(), retry=NO_BACKOFF) as client:
        assert (await client.get_app("shop")).name == "shop"
    assert repr(client).startswith("MachinesClient(http://127.0.0.1:")


async def test_update_whose_answer_was_lost_is_recognised_as_done(
    client: MachinesClient, control: httpx.AsyncClient, wire: Wire
) -> None:
    """An update applied but answered 503 is retried, gets 409 (version moved), and is found to be done."""
    machine_id = await one_started(control)
    machine = await client.get_machine("shop", machine_id)
    assert machine.config is not None
    wanted = machine.config.copy_with(image="registry.fly.io/shop:v2")
    await add_fault(control, endpoint="Machines_update", status=503, after=True, count=1)
    updated = await client.update_machine("shop", machine_id, wanted, current_version=machine.instance_id)
    assert updated.config is not None
    assert updated.config.image == "registry.fly.io/shop:v2"
    assert wire.statuses("Machines_update") == [503, 409]
    assert len(await client.list_versions("shop", machine_id)) == 2  # applied once, not twice


async def test_a_real_version_conflict_still_raises(
    client: MachinesClient, control: httpx.AsyncClient
) -> None:
    """A stale current_version for a config the machine does not hold is a VersionConflict."""
    machine_id = await one_started(control)
    machine = await client.get_machine("shop", machine_id)
    assert machine.config is not None
    with pytest.raises(errors.VersionConflict):
        await client.update_machine(
            "shop",
            machine_id,
            machine.config.copy_with(image="x:y"),
            current_version="01STALEVERSION0000000000000",
        )
