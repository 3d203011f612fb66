"""open_store: which URLs open what; how a bad URL or an unusable path fails, never showing a password."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.store import DEFAULT_URL, PostgresStore, SQLiteStore, StoreError, open_store
from tests.store.conftest import new_postgres_schema, postgres_schema_url


async def test_a_relative_url_opens_under_the_working_directory_creating_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///data/x/state.db is ./data/x/state.db; its missing directories are created."""
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///data/x/state.db")
    try:
        assert isinstance(store, SQLiteStore)
        await store.put("state", "k", {"n": 1})
    finally:
        await store.close()
    assert (tmp_path / "data" / "x" / "state.db").is_file()


async def test_an_absolute_url_has_four_slashes(tmp_path: Path) -> None:
    """sqlite:////abs/path.db is /abs/path.db."""
    path = tmp_path / "abs" / "state.db"
    store = open_store(f"sqlite:///{path}")
    await store.close()
    assert path.is_file()


async def test_memory_stores_are_separate() -> None:
    """Each sqlite:///:memory: store is its own empty database."""
    first, second = open_store("sqlite:///:memory:"), open_store("sqlite:///:memory:")
    try:
        await first.put("state", "k", {"n": 1})
        assert await second.get("state", "k") is None
    finally:
        await first.close()
        await second.close()


def test_the_default_url_is_a_relative_file_under_data() -> None:
    """The default state store is a SQLite file under ./data."""
    assert DEFAULT_URL.startswith("sqlite:///data/")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "state.db",
        "/var/lib/flywatch/state.db",
        "sqlite:",
        "sqlite://",
        "sqlite:///",
        "sqlite:////",
        "sqlite:state.db",
        "sqlite://host/state.db",
        "sqlite:///state.db?mode=ro",
        "mysql://db.internal/state",
        "redis://cache.internal:6379/0",
    ],
)
def test_a_url_that_is_not_a_store_is_refused_with_the_forms_that_work(url: str) -> None:
    """A URL open_store cannot use is a StoreError that quotes it and shows the accepted forms."""
    with pytest.raises(StoreError, match="sqlite:///") as error:
        open_store(url)
    assert repr(url) in str(error.value)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
async def test_a_postgresql_url_opens_a_postgresql_store(scheme: str) -> None:
    """postgresql://, postgres:// and the SQLAlchemy form postgresql+driver:// all open a PostgresStore."""
    schema, drop = new_postgres_schema()
    try:
        url = postgres_schema_url(schema).replace("postgresql://", f"{scheme}://", 1)
        store = open_store(url)
        try:
            assert isinstance(store, PostgresStore)
            await store.put("state", "k", {"n": 1})
            assert await store.get("state", "k") == {"n": 1}
        finally:
            await store.close()
    finally:
        drop()


def test_an_unreachable_postgresql_server_is_a_store_error_naming_it() -> None:
    """A PostgreSQL URL whose host does not resolve fails at open, naming the URL."""
    with pytest.raises(StoreError, match="cannot open") as error:
        open_store("postgresql://db.invalid/flywatch?connect_timeout=2")
    assert "db.invalid/flywatch" in str(error.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://flywatch:s3cr3t-pw@db.internal:5432/state", "flywatch:***@db.internal:5432/state"),
        ("postgresql+asyncpg://flywatch:s3cr3t-pw@db.internal/state", "flywatch:***@db.internal/state"),
        ("postgres://u:s3cr3t/pw#with@signs@db.internal/state", "u:***@db.internal/state"),
        ("postgresql://db.internal/state?user=u&password=s3cr3t-pw", "password=***"),
        ("mysql://u:s3cr3t-pw@db.internal/state", "u:***@db.internal/state"),
        ("sqlite://u:s3cr3t-pw@db.internal/state.db", "u:***@db.internal/state.db"),
    ],
)
def test_a_password_in_a_url_never_appears_in_the_error(url: str, shown: str) -> None:
    """Whatever the scheme, a refused URL is shown with its password (even one holding / # @) masked."""
    with pytest.raises(StoreError) as error:
        open_store(url)
    assert "s3cr3t" not in str(error.value)
    assert "s3cr3t" not in repr(error.value)
    assert error.value.__cause__ is None
    assert shown in str(error.value)


def test_a_path_under_a_regular_file_is_a_clear_error(tmp_path: Path) -> None:
    """When a parent of the path is a file, the error names the path and says its directory cannot be made."""
    (tmp_path / "taken").write_text("not a directory")
    path = tmp_path / "taken" / "state.db"
    with pytest.raises(StoreError, match="cannot create its directory") as error:
        open_store(f"sqlite:///{path}")
    assert str(path) in str(error.value)


def test_a_path_that_is_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    """A path naming a directory is refused, naming the path."""
    with pytest.raises(StoreError, match="is a directory") as error:
        open_store(f"sqlite:///{tmp_path}")
    assert str(tmp_path) in str(error.value)


def test_a_file_that_is_not_a_database_is_refused_at_open(tmp_path: Path) -> None:
    """A file of something else fails when opened (at startup), naming the path, and is left as it was."""
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not SQLite\n" * 300)
    with pytest.raises(StoreError, match="not a database") as error:
        open_store(f"sqlite:///{path}")
    assert str(path) in str(error.value)
    assert path.read_bytes() == b"this is not SQLite\n" * 300
