"""What is PostgreSQL's own, beyond the shared contract (test_contract.py): connection failures, the schema
made at open (idempotently, also by instances starting at once), and stores sharing one database."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from daemon.store import PostgresStore, StoreError, open_store
from daemon.store.postgres import LISTENER, SCHEMA_VERSION, PostgresLeases
from tests.store.conftest import new_postgres_schema, postgres_schema_url, require_postgres


@pytest.fixture
def url() -> Iterator[str]:
    """The URL of a fresh, empty schema in the test database, dropped afterwards."""
    schema, drop = new_postgres_schema()
    yield postgres_schema_url(schema)
    drop()


def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as connection:
        return connection.execute(sql).fetchall()


@pytest.mark.parametrize(
    ("bad_url", "named", "says"),
    [
        (
            "postgresql://postgres:s3cr3t-pw@127.0.0.1:1/flywatch_test",
            "127.0.0.1:1/flywatch_test",
            "refused",
        ),
        (
            "postgresql://postgres:s3cr3t-pw@db.invalid/flywatch_test?connect_timeout=2",
            "db.invalid/flywatch_test",
            "db.invalid",
        ),
        (
            "postgresql://postgres:s3cr3t-pw@127.0.0.1:5432/flywatch_no_such_database",
            "flywatch_no_such_database",
            "does not exist",
        ),
        (
            "postgresql://127.0.0.1:5432/flywatch_test?user=postgres&password=s3cr3t-pw&sslmode=bogus",
            "password=***",
            "sslmode",
        ),
        ("postgres://u:s3cr3t/pw#with@signs@127.0.0.1:1/state", "u:***@127.0.0.1:1/state", "cannot open"),
    ],
)
def test_a_server_or_database_that_cannot_be_used_is_a_store_error_naming_it(
    bad_url: str, named: str, says: str
) -> None:
    """A bad host, port, database or option fails at open: a StoreError naming the URL and the cause, with
    the password masked, and no driver exception chained to it (whose text could hold more)."""
    if "127.0.0.1:5432" in bad_url:
        require_postgres()  # the server itself must be up for these
    with pytest.raises(StoreError, match="cannot open") as error:
        open_store(bad_url)
    message = str(error.value)
    assert named in message
    assert says in message
    assert "s3cr3t" not in message
    assert "s3cr3t" not in repr(error.value)
    assert error.value.__cause__ is None


async def test_writes_are_seen_by_a_new_connection(url: str) -> None:
    """What a store wrote is in the database for any other connection, with the store still open."""
    store = open_store(url)
    try:
        await store.put("cooldowns", "shop/iad", {"until": 60.0, "order": {"b": 1, "a": 2}})
        entry_id = await store.append("decisions", {"action": "scale_up"}, at=5.0, key="shop")
        documents = _rows(url, "SELECT namespace, key, value FROM flywatch_documents")
        entries = _rows(url, "SELECT id, stream, at, key, record FROM flywatch_streams")
    finally:
        await store.close()
    assert documents == [("cooldowns", "shop/iad", '{"until":60.0,"order":{"b":1,"a":2}}')]
    assert entries == [(entry_id, "decisions", 5.0, "shop", '{"action":"scale_up"}')]


async def test_the_schema_is_made_once_however_often_and_concurrently_it_is_opened(url: str) -> None:
    """Opening again, or from several threads at once, keeps the data and records the version once."""
    first = open_store(url)
    await first.put("state", "k", {"n": 1})
    await first.close()

    stores: list[object] = []
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            stores.append(PostgresStore.open(url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(stores) == 6
    for store in stores:
        assert isinstance(store, PostgresStore)
        assert await store.get("state", "k") == {"n": 1}
        await store.close()
    assert _rows(url, "SELECT version FROM flywatch_schema_version ORDER BY version") == [
        (version,) for version in range(1, SCHEMA_VERSION + 1)
    ]


async def test_two_stores_on_one_database_see_each_others_writes(url: str) -> None:
    """Two stores (two instances) on one database share documents and streams, and ids stay unique."""
    one, two = open_store(url), open_store(url)
    try:
        await one.put("cooldowns", "shop", {"by": "one"})
        assert await two.get("cooldowns", "shop") == {"by": "one"}
        await two.put("cooldowns", "shop", {"by": "two"})
        assert await one.get("cooldowns", "shop") == {"by": "two"}
        ids = await asyncio.gather(
            *(store.append("decisions", {"n": n}, at=float(n)) for n in range(10) for store in (one, two))
        )
        assert len(set(ids)) == 20
        assert sorted(e.id for e in await one.read("decisions")) == sorted(ids)
        await two.delete("cooldowns", "shop")
        assert await one.get("cooldowns", "shop") is None
    finally:
        await one.close()
        await two.close()


async def test_schemas_keep_two_states_apart_in_one_database(url: str) -> None:
    """Two search_paths in one database are two separate stores."""
    other_schema, drop = new_postgres_schema()
    one, two = open_store(url), open_store(postgres_schema_url(other_schema))
    try:
        await one.put("state", "k", {"n": 1})
        assert await two.get("state", "k") is None
    finally:
        await one.close()
        await two.close()
        drop()


async def test_a_schema_newer_than_this_flywatch_is_refused(url: str) -> None:
    """A database migrated by a newer flywatch is refused at open rather than misread."""
    await open_store(url).close()  # makes the schema
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO flywatch_schema_version VALUES (%s, 0)",
            (SCHEMA_VERSION + 1,),
        )
    with pytest.raises(StoreError, match="newer than this flywatch"):
        open_store(url)


async def test_a_corrupt_row_is_a_store_error_naming_it(url: str) -> None:
    """A row that is not a JSON object (written by hand, say) is a StoreError naming the document."""
    store = open_store(url)
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("INSERT INTO flywatch_documents VALUES ('state', 'k', '[1, 2')")
        with pytest.raises(StoreError, match=r"state\['k'\] holds corrupt JSON"):
            await store.get("state", "k")
    finally:
        await store.close()


@pytest.mark.parametrize("key", ["with\x00nul", "lone \ud800 surrogate"])
async def test_a_key_postgresql_cannot_hold_is_a_store_error(url: str, key: str) -> None:
    """PostgreSQL text holds no NUL and no lone surrogate: such a key is a StoreError; the store works on."""
    store = open_store(url)
    try:
        with pytest.raises(StoreError, match=r"put state\["):
            await store.put("state", key, {"n": 1})
        with pytest.raises(StoreError, match="get state"):
            await store.get("state", key)
        await store.put("state", "fine", {"n": 1})
        assert await store.get("state", "fine") == {"n": 1}
    finally:
        await store.close()


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def test_a_store_whose_connection_the_server_dropped_connects_again(url: str) -> None:
    """A server restart, a failover or a reset drops the connection: the statement caught in it fails (a
    StoreError, as any), and the next call connects again instead of failing for ever."""
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    try:
        await store.put("state", "k", {"n": 1})
        _terminate(url, store._connection.info.backend_pid)
        with pytest.raises(StoreError, match="put state"):
            await store.put("state", "k", {"n": 2})
        await store.put("state", "k", {"n": 3})
        assert await store.get("state", "k") == {"n": 3}
    finally:
        await store.close()


async def test_the_lease_table_connects_again_after_its_connection_was_dropped(url: str) -> None:
    leases = PostgresLeases.open(url)
    try:
        await leases.join("a/1", "iad", 0.0, 5.0)
        _terminate(url, leases._connection.info.backend_pid)
        with pytest.raises(StoreError):
            await leases.join("a/1", "iad", 0.0, 5.0)
        roster = await leases.join("a/1", "iad", 0.0, 5.0)
        assert [m.member for m in roster.members if m.live] == ["a/1"]
    finally:
        await leases.close()


# ---------------------------------------------------------------------------------------------- telling


Heard = asyncio.Queue[str | StoreError]


async def _heard(leases: PostgresLeases, member: str) -> tuple[Heard, asyncio.Task[None]]:
    """What `member` hears on `leases` (its listener's StoreError last), once listening."""
    heard: Heard = asyncio.Queue()

    async def listen() -> None:
        try:
            async for teller in leases.changes(member):
                await heard.put(teller)
        except StoreError as exc:
            await heard.put(exc)

    task = asyncio.ensure_future(listen())
    assert await asyncio.wait_for(heard.get(), 10) == "", "not listening"
    return heard, task


async def _next(heard: Heard) -> str | StoreError:
    return await asyncio.wait_for(heard.get(), 10)


async def test_a_member_is_told_of_joins_withdrawals_releases_and_leaves_of_the_others_and_of_nothing_else(
    url: str,
) -> None:
    """NOTIFY on what changes another member's next look (cluster.py): a member new among the live ones (or
    back after its row expired), one withdrawing or leaving, leases released. Not renewals, takes, a member's
    own changes, nor another schema's. Each negative is followed by a marker: the next thing heard is it."""
    schema, drop = new_postgres_schema()
    listener, other = PostgresLeases.open(url), PostgresLeases.open(url)
    elsewhere = PostgresLeases.open(postgres_schema_url(schema))
    heard, task = await _heard(listener, "me/1")
    try:
        await listener.join("me/1", "iad", 0.0, 5.0)  # its own
        await other.join("b/1", "cdg", 0.0, 5.0)
        assert await _next(heard) == "b/1"  # new

        await other.join("b/1", "cdg", 0.0, 5.0)  # a renewal
        _, taken = await other.exchange("b/1", 5.0, renew={}, release={}, acquire=["x", "y"])
        await other.exchange("b/1", 5.0, renew=taken, release={}, acquire=[])
        await elsewhere.join("e/1", "nrt", 0.0, 5.0)  # another schema's
        await elsewhere.leave("e/1")
        await other.join("marker/1", "cdg", 0.0, 5.0)
        assert await _next(heard) == "marker/1"

        await other.exchange("b/1", 5.0, renew={"y": taken["y"]}, release={"x": taken["x"]}, acquire=[])
        assert await _next(heard) == "b/1"  # released
        await other.withdraw("marker/1")
        assert await _next(heard) == "marker/1"
        await other.join("marker/1", "cdg", 0.0, 5.0)
        assert await _next(heard) == "marker/1"  # back after withdrawing
        await other.leave("b/1")
        assert await _next(heard) == "b/1"

        await other.join("short/1", "cdg", 0.0, 0.05)
        assert await _next(heard) == "short/1"
        deadline = asyncio.get_running_loop().time() + 5

        async def live() -> set[str]:
            return {m.member for m in (await listener.join("me/1", "iad", 0.0, 5.0)).members if m.live}

        while "short/1" in await live():
            assert asyncio.get_running_loop().time() < deadline, "short/1's row never expired"
            await asyncio.sleep(0.02)
        await other.join("short/1", "cdg", 0.0, 5.0)
        assert await _next(heard) == "short/1"  # back after its row expired (a partition healed)
        assert heard.empty()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for leases in (listener, other, elsewhere):
            await leases.close()
        drop()


async def test_a_listener_whose_connection_is_dropped_says_so_and_a_new_one_hears_again(url: str) -> None:
    listener, other = PostgresLeases.open(url), PostgresLeases.open(url)
    member = f"me/{uuid.uuid4().hex[:8]}"  # its listener's name is unique on the server
    heard, task = await _heard(listener, member)
    try:
        with psycopg.connect(url) as connection:
            row = connection.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                (LISTENER + member,),
            ).fetchone()
        assert row is not None, "no listening connection named after its member"
        _terminate(url, int(row[0]))
        failed = await _next(heard)
        assert isinstance(failed, StoreError)
        assert "listening for the other members failed" in str(failed)
        assert "PostgreSQL leases" in str(failed)
        await task
        heard, task = await _heard(listener, member)
        await other.join("b/1", "cdg", 0.0, 5.0)
        assert await _next(heard) == "b/1"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await listener.close()
        await other.close()
