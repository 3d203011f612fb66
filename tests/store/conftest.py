"""The backends the store's contract runs against, each as a URL for `open_store`.

Only SQLite for now (a file under tmp_path, and :memory:). PostgreSQL joins `BACKENDS` and `DURABLE` when
it arrives; every test of test_contract.py then runs against it unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.store import Store, open_store


@dataclass(frozen=True)
class Backend:
    """One backend under test: the URL that opens it, what its error messages call it, and whether what it
    holds outlives the store object (a file does; :memory: does not)."""

    url: str
    shown_as: str
    durable: bool


def _sqlite_file(tmp_path: Path) -> Backend:
    path = tmp_path / "state" / "flywatch.db"
    return Backend(url=f"sqlite:///{path}", shown_as=str(path), durable=True)


def _sqlite_memory(tmp_path: Path) -> Backend:
    return Backend(url="sqlite:///:memory:", shown_as=":memory:", durable=False)


BACKENDS: dict[str, Callable[[Path], Backend]] = {"sqlite": _sqlite_file, "sqlite-memory": _sqlite_memory}
DURABLE = ["sqlite"]  # the backends whose Backend.durable is true


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn."""
    return BACKENDS[request.param](tmp_path)


@pytest.fixture(params=DURABLE)
def durable_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend whose data outlives the process that wrote it."""
    return BACKENDS[request.param](tmp_path)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    """An open, empty store of each backend, closed after the test."""
    opened = open_store(backend.url)
    yield opened
    await opened.close()
