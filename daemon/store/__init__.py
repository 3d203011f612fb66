"""The state store: what must survive a restart (cooldown clocks, stabilization history, decision records,
known-good releases), behind one interface (`Store`) whatever holds it.

`open_store(FLYWATCH_STATE_URL)` picks the backend from the URL: SQLite or PostgreSQL; the same contract
test suite (tests/store) runs against each.
"""

from __future__ import annotations

from daemon.store.base import Entry, Store, StoreError, redact_url
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SQLiteStore, sqlite_path

__all__ = ["DEFAULT_URL", "Entry", "PostgresStore", "SQLiteStore", "Store", "StoreError", "open_store"]

DEFAULT_URL = "sqlite:///data/flywatch.db"


def open_store(url: str) -> Store:
    """The store at `url`: sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:///:memory:,
    or postgresql://USER:PASSWORD@HOST:PORT/DATABASE (also postgres://, and any libpq URL parameters).

    Creates the file, its directories and its tables (or the database's tables) if missing. Blocking (a file
    is opened or a server connected to, and the schema checked): call it at startup. Raises StoreError, whose
    message never holds the URL's password.
    """
    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        return SQLiteStore.open(sqlite_path(url))
    if scheme in {"postgres", "postgresql"} or scheme.startswith("postgresql+"):
        return PostgresStore.open(url)
    raise StoreError(
        f"state store URL {redact_url(url)!r} is not supported:"
        " expected sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:///:memory:"
        " or postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
    )
