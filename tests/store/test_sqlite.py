"""What only the SQLite backend has: its file settings, its schema version, how damage in its file shows."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.store import SQLiteStore, StoreError, open_store
from daemon.store.sqlite import SCHEMA_VERSION


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore.open(str(path))
    yield opened
    await opened.close()


def _raw(path: Path, sql: str, parameters: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run SQL on the file behind the store's back, as damage (or another program) would."""
    with sqlite3.connect(path) as connection:
        rows = connection.execute(sql, parameters).fetchall()
    connection.close()
    return rows


async def test_the_file_is_in_wal_mode_with_full_sync(store: SQLiteStore, path: Path) -> None:
    """The file is in WAL mode and the store's connection syncs at every commit (synchronous=FULL)."""
    assert _raw(path, "PRAGMA journal_mode") == [("wal",)]
    assert store._connection is not None
    assert store._connection.execute("PRAGMA synchronous").fetchone() == (2,)


async def test_the_schema_version_is_recorded_once(store: SQLiteStore, path: Path) -> None:
    """A new file records every schema version it went through, once; opening it again adds nothing; the
    last migration's index (the decisions' expiry by age) is there."""
    await store.close()
    await SQLiteStore.open(str(path)).close()
    versions = [(version,) for version in range(1, SCHEMA_VERSION + 1)]
    assert _raw(path, "SELECT version FROM schema_version ORDER BY version") == versions
    indexes = _raw(path, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'entries'")
    assert ("entries_by_stream_at",) in indexes


async def test_a_file_of_the_first_schema_is_migrated_keeping_its_entries(
    store: SQLiteStore, path: Path
) -> None:
    """A file made before the index by age (schema 1, as files in the field are) gets it when opened, and
    what it held is still there and expires by age."""
    await store.append("decisions", {"n": 1}, at=10.0)
    await store.close()
    _raw(path, "DROP INDEX entries_by_stream_at")
    _raw(path, "DELETE FROM schema_version WHERE version > 1")
    reopened = SQLiteStore.open(str(path))
    try:
        assert _raw(path, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
        assert ("entries_by_stream_at",) in _raw(path, "SELECT name FROM sqlite_master WHERE type = 'index'")
        assert await reopened.expire("decisions", before=11.0) == 1
    finally:
        await reopened.close()


@pytest.fixture
def empty_file(path: Path) -> Path:
    path.touch()
    return path


async def test_an_empty_file_becomes_a_store(empty_file: Path, path: Path) -> None:
    """A zero-byte file (say, made by touch) is an empty database and gets the tables."""
    store = SQLiteStore.open(str(path))
    try:
        await store.put("state", "k", {"n": 1})
        assert await store.get("state", "k") == {"n": 1}
    finally:
        await store.close()


async def test_a_file_from_a_newer_flywatch_is_refused(store: SQLiteStore, path: Path) -> None:
    """A file whose schema is newer than this code knows is refused at open, saying both versions."""
    await store.close()
    _raw(path, "INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 98,))
    with pytest.raises(StoreError, match=f"version {SCHEMA_VERSION + 98}, newer") as error:
        open_store(f"sqlite:///{path}")
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("damage", "found"), [("{not json", "corrupt JSON"), ("[1, 2]", "JSON list where an object belongs")]
)
async def test_a_damaged_document_is_a_store_error_naming_it(
    store: SQLiteStore, path: Path, damage: str, found: str
) -> None:
    """A stored document that is not a JSON object fails get and scan, naming path, namespace and key."""
    await store.put("cooldowns", "shop/iad", {"until": 1.0})
    _raw(path, "UPDATE documents SET value = ?", (damage,))
    for call in (store.get("cooldowns", "shop/iad"), store.scan("cooldowns")):
        with pytest.raises(StoreError, match=found) as error:
            await call
        assert str(path) in str(error.value)
        assert "cooldowns['shop/iad']" in str(error.value)


async def test_a_damaged_entry_is_a_store_error_naming_it(store: SQLiteStore, path: Path) -> None:
    """A stream entry whose stored text is not JSON fails read with the path, stream and entry id."""
    entry_id = await store.append("decisions", {"n": 1}, at=1.0)
    _raw(path, "UPDATE entries SET record = 'oops'")
    with pytest.raises(StoreError, match=f"decisions entry {entry_id} holds corrupt JSON") as error:
        await store.read("decisions")
    assert str(path) in str(error.value)


async def test_a_full_disk_is_a_store_error_and_the_store_recovers(store: SQLiteStore, path: Path) -> None:
    """When the database cannot grow (disk full), the write is a StoreError naming the store and the
    operation, the old value stays, and writes work again once there is room."""
    await store.put("state", "k", {"n": 1})
    assert store._connection is not None
    (pages,) = store._connection.execute("PRAGMA page_count").fetchone()
    store._connection.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreError, match="full") as error:
        await store.put("state", "k", {"n": 2, "padding": "x" * 100_000})
    assert str(path) in str(error.value)
    assert "put state['k']" in str(error.value)
    assert await store.get("state", "k") == {"n": 1}
    store._connection.execute("PRAGMA max_page_count = 1000000")
    await store.put("state", "k", {"n": 2, "padding": "x" * 100_000})
    assert (await store.get("state", "k") or {})["n"] == 2


async def test_a_name_sqlite_cannot_store_is_a_store_error(store: SQLiteStore) -> None:
    """A key that is not valid Unicode (a lone surrogate) or an id past 64 bits is a StoreError."""
    with pytest.raises(StoreError, match="put state"):
        await store.put("state", "\ud800", {"n": 1})
    with pytest.raises(StoreError, match="read decisions"):
        await store.read("decisions", before=2**64)
    await store.put("state", "fine", {"n": 1})
