"""The backends the store's contract runs against, each as a URL for `open_store`.

SQLite (a file under tmp_path, and :memory:) and PostgreSQL (the database at FLYWATCH_TEST_POSTGRES_URL,
by default postgresql://postgres@127.0.0.1:5432/flywatch_test, which .ci/run creates): every test of
test_contract.py runs against each unchanged. Each PostgreSQL test gets a schema of its own (through the
URL's search_path), dropped afterwards, so tests never see each other's rows. When the database cannot be
reached the PostgreSQL tests are skipped, except under CI (the CI variable set), where they fail.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from daemon.store import Store, open_store


@dataclass(frozen=True)
class Backend:
    """One backend under test: the URL that opens it, what its error messages call it, and whether what it
    holds outlives the store object (a file does; :memory: does not)."""

    url: str
    shown_as: str
    durable: bool
    drop: Callable[[], None] | None = None  # removes what the backend holds, after the test


def _sqlite_file(tmp_path: Path) -> Backend:
    path = tmp_path / "state" / "flywatch.db"
    return Backend(url=f"sqlite:///{path}", shown_as=str(path), durable=True)


def _sqlite_memory(tmp_path: Path) -> Backend:
    return Backend(url="sqlite:///:memory:", shown_as=":memory:", durable=False)


POSTGRES_URL = os.environ.get(
    "FLYWATCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/flywatch_test"
)


@functools.cache
def _postgres_problem() -> str | None:
    """Why the test database cannot be used, or None; asked once per session."""
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=5):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL test database {POSTGRES_URL} is unreachable: {exc}"


def require_postgres() -> None:
    """Skip the test when the test database is unreachable; fail it instead under CI, which must run it."""
    if (problem := _postgres_problem()) is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{problem} (CI is set, so the PostgreSQL tests must run)")
        pytest.skip(problem)


def postgres_schema_url(schema: str) -> str:
    """The test database's URL with `schema` first on the search_path."""
    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"


def new_postgres_schema() -> tuple[str, Callable[[], None]]:
    """A fresh, empty schema in the test database, and what drops it."""
    require_postgres()
    schema = f"flywatch_test_{uuid.uuid4().hex}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    return schema, drop


def _postgres(tmp_path: Path) -> Backend:
    schema, drop = new_postgres_schema()
    url = postgres_schema_url(schema)
    return Backend(url=url, shown_as=url, durable=True, drop=drop)


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "sqlite": _sqlite_file,
    "sqlite-memory": _sqlite_memory,
    "postgres": _postgres,
}
DURABLE = ["sqlite", "postgres"]  # the backends whose Backend.durable is true


def _made(name: str, tmp_path: Path) -> Iterator[Backend]:
    made = BACKENDS[name](tmp_path)
    yield made
    if made.drop is not None:
        made.drop()


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn."""
    yield from _made(request.param, tmp_path)


@pytest.fixture(params=DURABLE)
def durable_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend whose data outlives the process that wrote it."""
    yield from _made(request.param, tmp_path)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    """An open, empty store of each backend, closed after the test."""
    opened = open_store(backend.url)
    yield opened
    await opened.close()
