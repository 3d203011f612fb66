"""The PostgreSQL backend: one connection, autocommit, every call off the event loop.

Why a write that returned survives a kill -9 of flywatch: the connection is in autocommit mode, so every
write is a single statement, hence a single transaction, committed by the server before the call returns
(and made durable by the server's WAL, as configured there).

Values are stored as JSON text (a `text` column), not `jsonb`: jsonb reorders keys, refuses NUL and lone
surrogate escapes and rewrites numbers, while the contract is that a store gives back exactly what it was
given. Keys and names are `COLLATE "C"`, so they compare as UTF-8 bytes (code point order), as in SQLite.

The operations themselves are sql.py's, shared with the SQLite backend (psycopg's blocking calls in a
worker thread, one statement at a time).

The schema is created or migrated at open, in one transaction under an advisory lock, so instances starting
at once on one database do not race. The tables live in the connection's current schema (search_path), so
one database can hold several flywatch states (`?options=-csearch_path%3Dname`).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote

import psycopg

from daemon.store.base import StoreError, redact_url
from daemon.store.sql import SqlStore

_CONNECT_TIMEOUT = 10  # seconds, unless the URL sets connect_timeout
_SCHEMA_LOCK = 0x666C7977  # "flyw": the advisory lock held while the schema is checked and migrated

# _MIGRATIONS[n] brings a database from schema version n to n + 1, in one transaction with the version
# row. Append only, never edit: databases in the field were made by the old ones.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE flywatch_documents (
            namespace TEXT COLLATE "C" NOT NULL,
            key TEXT COLLATE "C" NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (namespace, key)
        )""",
        # A sequence never gives an id twice, even after a trim took the newest entries away, so paging
        # with `before` and "greater than every id given before" hold across restarts.
        """CREATE TABLE flywatch_streams (
            id BIGSERIAL PRIMARY KEY,
            stream TEXT COLLATE "C" NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            key TEXT COLLATE "C" NOT NULL,
            record TEXT NOT NULL
        )""",
        "CREATE INDEX flywatch_streams_by_stream ON flywatch_streams (stream, id)",
        "CREATE INDEX flywatch_streams_by_stream_key ON flywatch_streams (stream, key, id)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


def postgres_conninfo(url: str) -> str:
    """The URL as libpq takes it: postgres:// and postgresql:// as they are, postgresql+driver:// (the
    SQLAlchemy form) without its driver, since flywatch brings its own."""
    scheme, separator, rest = url.partition("://")
    base = scheme.lower().partition("+")[0]
    if not separator or base not in {"postgres", "postgresql"}:
        raise StoreError(
            f"PostgreSQL store URL {redact_url(url)!r}: expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    return f"{base}://{rest}"


class PostgresStore(SqlStore):
    """The `Store` on PostgreSQL. Make one with `PostgresStore.open(url)` (or `open_store(url)`)."""

    DOCUMENTS = "flywatch_documents"
    ENTRIES = "flywatch_streams"
    P = "%s"
    # DataError: a NUL in a name, an integer beyond 64 bits; UnicodeError: a lone surrogate in a name;
    # ValueError: psycopg refusing a NUL in a parameter
    ERRORS = (psycopg.Error, OverflowError, UnicodeError, ValueError)

    def __init__(self, connection: psycopg.Connection[Any], name: str, secrets: tuple[str, ...]) -> None:
        super().__init__(connection, name)
        self._secrets = secrets

    @classmethod
    def open(cls, url: str) -> PostgresStore:
        """Connect to the database at `url` and create (or migrate) its tables.

        Blocking: meant for startup, before the event loop has work to do.
        """
        name = f"PostgreSQL store {redact_url(url)}"
        secrets = _secrets(url)
        conninfo = postgres_conninfo(url)
        connection: psycopg.Connection[Any] | None = None
        try:
            connection = psycopg.connect(conninfo, autocommit=True, **_connect_defaults(conninfo))
            _prepare(connection, name)
        except psycopg.Error as exc:
            if connection is not None:
                connection.close()
            raise StoreError(f"{name}: cannot open: {_scrub(str(exc), secrets)}") from None
        except StoreError:
            if connection is not None:
                connection.close()
            raise
        return cls(connection, name, secrets)

    def _scrub(self, message: str) -> str:
        return _scrub(message, self._secrets)  # libpq quotes parts of a URL it cannot parse

    def _insert(
        self, connection: psycopg.Connection[Any], stream: str, at: float, key: str, text: str
    ) -> int:
        row = connection.execute(
            "INSERT INTO flywatch_streams (stream, at, key, record) VALUES (%s, %s, %s, %s) RETURNING id",
            (stream, at, key, text),
        ).fetchone()
        if row is None:  # pragma: no cover - INSERT ... RETURNING of one row always gives one
            raise StoreError(f"{self._name}: append to {stream}: PostgreSQL gave no id")
        return int(row[0])


def _connect_defaults(conninfo: str) -> dict[str, Any]:
    """connect_timeout, unless the URL sets it: a host that drops packets fails at startup, not never."""
    return {} if "connect_timeout" in conninfo else {"connect_timeout": _CONNECT_TIMEOUT}


def _secrets(url: str) -> tuple[str, ...]:
    """The URL's password, as written and percent-decoded, to scrub from driver messages (libpq quotes parts
    of a URL it cannot parse). Found as crudely as redact_url finds it, so a password holding / # @ counts."""
    found: list[str] = []
    _, separator, rest = url.partition("://")
    if separator and "@" in rest:
        credentials = rest.rpartition("@")[0]
        _, has_password, password = credentials.partition(":")
        if has_password and password:
            found.append(password)
    for parameter in url.replace("?", "&").split("&"):
        name, has_value, value = parameter.partition("=")
        if has_value and value and name.lower() in {"password", "pass", "passwd", "pwd", "sslpassword"}:
            found.append(value.partition("#")[0])
    return tuple({piece for secret in found for piece in (secret, unquote(secret)) if piece})


def _scrub(message: str, secrets: tuple[str, ...]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def _prepare(connection: psycopg.Connection[Any], name: str) -> None:
    """The schema, on a fresh connection, under the advisory lock, in one transaction."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS flywatch_schema_version"
            " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        row = connection.execute("SELECT coalesce(max(version), 0) FROM flywatch_schema_version").fetchone()
        current = 0 if row is None else int(row[0])
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{name}: its schema is version {current}, newer than this flywatch knows ({SCHEMA_VERSION});"
                " upgrade flywatch or point FLYWATCH_STATE_URL at another database or schema"
            )
        for version in range(current, SCHEMA_VERSION):
            for statement in _MIGRATIONS[version]:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO flywatch_schema_version VALUES (%s, %s)", (version + 1, time.time())
            )
