"""The membership and lease tables (PostgresLeases) and the fenced writes that rest on them, against the real
database: rows live for their ttl and then not, epochs only go up, renewals hold only what is still held,
a fenced write lands only while its lease holds (and nothing is written otherwise), and two members racing
for the same apps never both get one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import psycopg
import pytest

from daemon.store import Store, StoreError, open_store
from daemon.store.base import Fence, FencedError
from daemon.store.postgres import PostgresLeases, Roster
from tests.store.conftest import new_postgres_schema, postgres_schema_url

LONG = 30.0  # seconds: a ttl no test outlives
SHORT = 0.5  # seconds: a ttl a test waits out


@pytest.fixture
def url() -> Iterator[str]:
    """The URL of a fresh, empty schema in the test database, dropped afterwards."""
    schema, drop = new_postgres_schema()
    yield postgres_schema_url(schema)
    drop()


@pytest.fixture
async def leases(url: str) -> AsyncIterator[PostgresLeases]:
    opened = PostgresLeases.open(url)
    yield opened
    await opened.close()


@pytest.fixture
async def other(url: str) -> AsyncIterator[PostgresLeases]:
    """A second connection to the same tables, as another instance has."""
    opened = PostgresLeases.open(url)
    yield opened
    await opened.close()


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    opened = open_store(url)
    yield opened
    await opened.close()


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Poll `predicate` every 50 ms until it holds; the seconds that took. Fails after `timeout`."""
    start = time.monotonic()
    while not await predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as connection:
        return connection.execute(sql).fetchall()


async def _acquire(leases: PostgresLeases, member: str, *apps: str, ttl: float = LONG) -> dict[str, int]:
    return (await leases.exchange(member, ttl, renew={}, release={}, acquire=list(apps)))[1]


async def _renew(leases: PostgresLeases, member: str, held: dict[str, int], ttl: float = LONG) -> set[str]:
    return (await leases.exchange(member, ttl, renew=held, release={}, acquire=[]))[0]


async def _release(leases: PostgresLeases, member: str, held: dict[str, int]) -> None:
    assert await leases.exchange(member, LONG, renew={}, release=held, acquire=[]) == (set(), {})


async def _owners(leases: PostgresLeases) -> dict[str, str]:
    """Who holds which app now, as a join by an onlooker sees it."""
    return (await leases.join("onlooker", "ord", 0.0, LONG)).owners


def _live(roster: Roster) -> dict[str, bool]:
    return {m.member: m.live for m in roster.members}


# ---------------------------------------------------------------------------------------------- join


async def test_a_members_row_is_live_for_its_ttl_and_then_not(leases: PostgresLeases) -> None:
    """join renews the member's row for ttl seconds: the roster shows it live until then, gone after."""
    started = time.monotonic()
    roster = await leases.join("a/1", "iad", 1000.0, SHORT)
    assert _live(roster) == {"a/1": True}

    async def gone() -> bool:
        return not _live(await leases.join("b/1", "ams", 2000.0, LONG))["a/1"]

    await until(gone, timeout=SHORT + 3)
    assert time.monotonic() - started >= SHORT - 0.05  # not before its ttl ran out (the database's clock)
    roster = await leases.join("b/1", "ams", 2000.0, LONG)
    assert _live(roster) == {"a/1": False, "b/1": True}  # an expired member is still listed, as gone
    # renewing brings it back
    assert _live(await leases.join("a/1", "iad", 1000.0, LONG))["a/1"] is True


async def test_the_roster_lists_every_member_with_its_region_and_liveness(leases: PostgresLeases) -> None:
    await leases.join("b/2", "ams", 20.5, LONG)
    await leases.join("a/1", "iad", 10.25, LONG)
    roster = await leases.join("c/3", "syd", 30.0, LONG)
    assert [(m.member, m.region, m.started_at, m.live) for m in roster.members] == [
        ("a/1", "iad", 10.25, True),
        ("b/2", "ams", 20.5, True),
        ("c/3", "syd", 30.0, True),
    ]
    # a rejoin updates the region, keeps the start time
    roster = await leases.join("a/1", "lhr", 99.0, LONG)
    assert roster.members[0].member == "a/1"
    assert (roster.members[0].region, roster.members[0].started_at) == ("lhr", 10.25)


async def test_the_owners_map_shows_unexpired_leases_only(leases: PostgresLeases) -> None:
    await _acquire(leases, "a/1", "short-app", ttl=SHORT)
    held = await _acquire(leases, "a/1", "long-app", "freed-app")
    await _release(leases, "a/1", {"freed-app": held["freed-app"]})
    assert await _owners(leases) == {"short-app": "a/1", "long-app": "a/1"}

    async def expired() -> bool:
        return "short-app" not in await _owners(leases)

    await until(expired, timeout=SHORT + 3)
    assert await _owners(leases) == {"long-app": "a/1"}


# ---------------------------------------------------------------------------------------------- exchange


async def test_a_free_app_is_acquired_at_epoch_1_and_an_unexpired_lease_cannot_be_taken(
    leases: PostgresLeases, other: PostgresLeases
) -> None:
    assert await _acquire(leases, "a/1", "shop", "blog") == {"shop": 1, "blog": 1}
    assert await _acquire(other, "b/1", "shop", "blog", "wiki") == {"wiki": 1}
    assert await _owners(leases) == {"shop": "a/1", "blog": "a/1", "wiki": "b/1"}


async def test_an_expired_lease_is_taken_by_another_member_at_a_higher_epoch(
    leases: PostgresLeases, other: PostgresLeases
) -> None:
    assert await _acquire(leases, "a/1", "shop", ttl=SHORT) == {"shop": 1}
    assert await _acquire(other, "b/1", "shop") == {}

    async def taken() -> bool:
        return await _acquire(other, "b/1", "shop") == {"shop": 2}

    await until(taken, timeout=SHORT + 3)
    assert await _owners(leases) == {"shop": "b/1"}
    # the old owner's renewal at its old epoch is refused now
    assert await _renew(leases, "a/1", {"shop": 1}) == set()
    assert await _owners(leases) == {"shop": "b/1"}


async def test_epochs_only_go_up_also_after_a_release(
    url: str, leases: PostgresLeases, other: PostgresLeases
) -> None:
    """A released lease's row stays, so re-acquiring it (by anyone) gives a higher epoch, never one used."""
    assert await _acquire(leases, "a/1", "shop") == {"shop": 1}
    await _release(leases, "a/1", {"shop": 1})
    assert await _acquire(leases, "a/1", "shop") == {"shop": 2}  # the same member again: still higher
    await _release(leases, "a/1", {"shop": 2})
    assert await _acquire(other, "b/1", "shop") == {"shop": 3}
    await _release(other, "b/1", {"shop": 3})
    assert await _acquire(leases, "a/1", "shop") == {"shop": 4}
    # acquiring a lease still one's own (a restarted heartbeat) moves the epoch up too
    assert await _acquire(leases, "a/1", "shop") == {"shop": 5}
    assert _rows(url, "SELECT app, owner, epoch FROM flywatch_leases") == [("shop", "a/1", 5)]


async def test_renew_extends_only_leases_still_held_at_that_epoch_and_unexpired(
    leases: PostgresLeases, other: PostgresLeases
) -> None:
    held = await _acquire(leases, "a/1", "kept", "stale", "lapsed", "stolen", ttl=SHORT)
    assert held == {"kept": 1, "stale": 1, "lapsed": 1, "stolen": 1}
    # kept: renewed for long, so it outlives its first ttl
    assert await _renew(leases, "a/1", {"kept": 1}) == {"kept"}
    # stale: renewed with an epoch it is not at
    assert await _renew(leases, "a/1", {"stale": 0}) == set()
    assert await _renew(leases, "a/1", {"stale": 2}) == set()
    # not the owner: nothing
    assert await _renew(other, "b/1", {"lapsed": 1}) == set()

    async def lapsed() -> bool:
        return set(await _owners(leases)) == {"kept"}

    await until(lapsed, timeout=SHORT + 3)
    assert await _acquire(other, "b/1", "stolen") == {"stolen": 2}
    # after expiry (no one took it) and after another took it: the renewal gives nothing back, holds nothing
    assert await _renew(leases, "a/1", {"lapsed": 1, "stolen": 1, "kept": 1}) == {"kept"}
    assert await _owners(leases) == {"kept": "a/1", "stolen": "b/1"}
    assert await _acquire(other, "b/1", "lapsed") == {"lapsed": 2}


async def test_release_frees_at_once_and_only_at_the_owners_epoch(
    leases: PostgresLeases, other: PostgresLeases
) -> None:
    assert await _acquire(leases, "a/1", "shop", "blog") == {"shop": 1, "blog": 1}
    await _release(other, "b/1", {"shop": 1})  # not the owner: no effect
    await _release(leases, "a/1", {"blog": 7})  # not its epoch: no effect
    assert await _owners(leases) == {"shop": "a/1", "blog": "a/1"}
    await _release(leases, "a/1", {"shop": 1, "blog": 1})
    assert await _owners(leases) == {}
    assert await _acquire(other, "b/1", "shop", "blog") == {"shop": 2, "blog": 2}  # at once, no wait


async def test_leave_releases_every_lease_of_the_member_and_deletes_its_row(
    leases: PostgresLeases, other: PostgresLeases
) -> None:
    await leases.join("a/1", "iad", 1.0, LONG)
    await other.join("b/1", "ams", 2.0, LONG)
    assert await _acquire(leases, "a/1", "shop", "blog") == {"shop": 1, "blog": 1}
    assert await _acquire(other, "b/1", "wiki") == {"wiki": 1}
    await leases.leave("a/1")
    roster = await other.join("b/1", "ams", 2.0, LONG)
    assert [m.member for m in roster.members] == ["b/1"]
    assert roster.owners == {"wiki": "b/1"}
    assert await _acquire(other, "b/1", "shop", "blog") == {"shop": 2, "blog": 2}
    await leases.leave("a/1")  # leaving twice is fine


# ---------------------------------------------------------------------------------------------- fences


async def _state(store: Store) -> tuple[dict[str, object] | None, list[tuple[int, dict[str, object]]]]:
    """The document and the stream the fenced writes aim at."""
    document = await store.get("cooldowns", "shop/iad")
    entries = [(e.id, e.record) for e in await store.read("decisions")]
    return document, entries


async def _refused(store: Store, fence: Fence) -> list[FencedError]:
    """Each fenced write refused with FencedError, and nothing of any of them written."""
    before = await _state(store)
    errors: list[FencedError] = []
    with pytest.raises(FencedError) as put:
        await store.put("cooldowns", "shop/iad", {"until": 999.0}, fence=fence)
    errors.append(put.value)
    with pytest.raises(FencedError) as delete:
        await store.delete("cooldowns", "shop/iad", fence=fence)
    errors.append(delete.value)
    with pytest.raises(FencedError) as append:
        await store.append("decisions", {"action": "late"}, at=9.0, key="shop", fence=fence)
    errors.append(append.value)
    assert await _state(store) == before
    return errors


async def _written(store: Store, fence: Fence) -> None:
    """put, append and delete with the fence all land."""
    await store.put("cooldowns", "shop/iad", {"until": 1.0}, fence=fence)
    assert await store.get("cooldowns", "shop/iad") == {"until": 1.0}
    entry = await store.append("decisions", {"action": "fenced"}, at=2.0, key="shop", fence=fence)
    assert (await store.read("decisions"))[0].id == entry
    await store.delete("cooldowns", "shop/iad", fence=fence)
    assert await store.get("cooldowns", "shop/iad") is None
    await store.put("cooldowns", "shop/iad", {"until": 1.0}, fence=fence)


async def test_fenced_writes_land_while_the_lease_is_held_at_that_epoch(
    leases: PostgresLeases, store: Store
) -> None:
    assert await _acquire(leases, "a/1", "shop") == {"shop": 1}
    await _written(store, Fence("shop", "a/1", 1))
    assert await store.get("cooldowns", "shop/iad") == {"until": 1.0}


async def test_a_fenced_write_at_a_stale_epoch_is_refused(leases: PostgresLeases, store: Store) -> None:
    assert await _acquire(leases, "a/1", "shop") == {"shop": 1}
    await _written(store, Fence("shop", "a/1", 1))
    assert await _acquire(leases, "a/1", "shop") == {"shop": 2}  # the same member, a new epoch
    await _refused(store, Fence("shop", "a/1", 1))
    await _written(store, Fence("shop", "a/1", 2))


async def test_a_fenced_write_by_another_owner_is_refused(
    leases: PostgresLeases, other: PostgresLeases, store: Store
) -> None:
    assert await _acquire(leases, "a/1", "shop") == {"shop": 1}
    await _written(store, Fence("shop", "a/1", 1))
    await _refused(store, Fence("shop", "b/1", 1))  # the right epoch, the wrong owner
    await _refused(store, Fence("blog", "a/1", 1))  # an app no one ever leased


async def test_a_fenced_write_after_the_lease_expired_is_refused(
    leases: PostgresLeases, store: Store
) -> None:
    assert await _acquire(leases, "a/1", "shop", ttl=SHORT) == {"shop": 1}
    await _written(store, Fence("shop", "a/1", 1))

    async def expired() -> bool:
        return "shop" not in await _owners(leases)

    await until(expired, timeout=SHORT + 3)
    await _refused(store, Fence("shop", "a/1", 1))


async def test_a_fenced_write_after_the_lease_was_released_or_left_is_refused(
    leases: PostgresLeases, store: Store
) -> None:
    assert await _acquire(leases, "a/1", "shop", "blog") == {"shop": 1, "blog": 1}
    await _written(store, Fence("shop", "a/1", 1))
    await _release(leases, "a/1", {"shop": 1})
    await _refused(store, Fence("shop", "a/1", 1))
    await store.put("other", "blog", {"v": 1}, fence=Fence("blog", "a/1", 1))
    await leases.leave("a/1")
    with pytest.raises(FencedError):
        await store.put("other", "blog", {"v": 2}, fence=Fence("blog", "a/1", 1))
    assert await store.get("other", "blog") == {"v": 1}


async def test_an_unfenced_write_still_works_whoever_holds_the_lease(
    leases: PostgresLeases, store: Store
) -> None:
    assert await _acquire(leases, "b/1", "shop") == {"shop": 1}
    await store.put("cooldowns", "shop/iad", {"until": 5.0})
    await store.append("decisions", {"action": "unfenced"}, at=1.0, key="shop")
    assert await _state(store) == ({"until": 5.0}, [(1, {"action": "unfenced"})])
    await store.delete("cooldowns", "shop/iad")
    assert await store.get("cooldowns", "shop/iad") is None


async def test_the_fenced_error_names_the_app_owner_and_epoch_and_never_the_password(url: str) -> None:
    secret_url = url.replace("postgresql://postgres@", "postgresql://postgres:s3cr3t-pw@")
    assert secret_url != url
    leases = PostgresLeases.open(secret_url)
    store = open_store(secret_url)
    try:
        assert await _acquire(leases, "b/1", "shop-app") == {"shop-app": 1}
        errors = await _refused(store, Fence("shop-app", "a/7", 41))
        for error in errors:
            message = str(error)
            assert "shop-app" in message
            assert "a/7" in message
            assert "41" in message
            assert "s3cr3t" not in message
            assert "s3cr3t" not in repr(error)
            assert isinstance(error, StoreError)
    finally:
        await store.close()
        await leases.close()


_FENCED_WRITES: dict[str, Callable[[Store, Fence], Awaitable[object]]] = {
    "put": lambda store, fence: store.put("cooldowns", "shop/iad", {"until": 2.0}, fence=fence),
    "delete": lambda store, fence: store.delete("cooldowns", "shop/iad", fence=fence),
    "append": lambda store, fence: store.append("decisions", {"action": "x"}, at=1.0, fence=fence),
}


@pytest.mark.parametrize("write", list(_FENCED_WRITES))
async def test_a_sqlite_store_refuses_every_fence(write: str) -> None:
    """SQLite holds no leases: a fenced write is a StoreError saying fenced writes need PostgreSQL (not a
    FencedError: no lease was lost, the store cannot check one), nothing written; unfenced writes work."""
    store = open_store("sqlite:///:memory:")
    try:
        await store.put("cooldowns", "shop/iad", {"until": 1.0})
        before = await _state(store)
        fence = Fence("shop", "a/1", 1)
        with pytest.raises(StoreError, match=r"fenced writes need .*PostgreSQL") as error:
            await _FENCED_WRITES[write](store, fence)
        assert not isinstance(error.value, FencedError)
        assert await _state(store) == before
        await store.append("decisions", {"action": "y"}, at=1.0)
        await store.delete("cooldowns", "shop/iad")
        assert await _state(store) == (None, [(1, {"action": "y"})])
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("rows", ["new", "released"])
async def test_two_members_racing_for_the_same_apps_never_both_get_one(
    url: str, leases: PostgresLeases, other: PostgresLeases, rows: str
) -> None:
    """Two members acquire the same 200 free apps at once, each on its own connection: every app ends with
    exactly one owner, the one the exchange said acquired it, at the epoch it said. For apps never leased
    (the INSERT path) and for released ones (the UPDATE path); three rounds, all released between them."""
    apps = [f"app-{i:03d}" for i in range(200)]
    if rows == "released":
        seeded = await _acquire(leases, "seed/1", *apps)
        assert len(seeded) == 200
        await _release(leases, "seed/1", seeded)
    for _ in range(3):
        a, b = await asyncio.gather(
            leases.exchange("a/1", LONG, renew={}, release={}, acquire=apps),
            other.exchange("b/1", LONG, renew={}, release={}, acquire=list(reversed(apps))),
        )
        won_a, won_b = a[1], b[1]
        assert not set(won_a) & set(won_b)
        assert set(won_a) | set(won_b) == set(apps)
        assert _held_by(url) == {
            **{app: (epoch, "a/1") for app, epoch in won_a.items()},
            **{app: (epoch, "b/1") for app, epoch in won_b.items()},
        }
        await _release(leases, "a/1", won_a)
        await _release(other, "b/1", won_b)
        assert _held_by(url) == {}


def _held_by(url: str) -> dict[str, tuple[int, str]]:
    """The leases held (unexpired or not) in the database: app -> (epoch, owner)."""
    return {
        str(app): (int(str(epoch)), str(owner))
        for app, epoch, owner in _rows(
            url, "SELECT app, epoch, owner FROM flywatch_leases WHERE owner IS NOT NULL"
        )
    }
