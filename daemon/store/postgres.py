"""The PostgreSQL backend: one connection, autocommit, every call off the event loop.

Why a write that returned survives a kill -9 of flywatch: the connection is in autocommit mode, so every
write is a single statement, hence a single transaction, committed by the server before the call returns
(and made durable by the server's WAL, as configured there).

Values are stored as JSON text (a `text` column), not `jsonb`: jsonb reorders keys, refuses NUL and lone
surrogate escapes and rewrites numbers, while the contract is that a store gives back exactly what it was
given. Keys and names are `COLLATE "C"`, so they compare as UTF-8 bytes (code point order), as in SQLite.

As in sqlite.py, psycopg's blocking calls run in a worker thread (asyncio.to_thread); an asyncio lock queues
callers without tying up a thread each, and a thread lock keeps the connection to one statement at a time
even when a cancelled caller's statement is still running. A cancelled write may still land.

The schema is created or migrated at open, in one transaction under an advisory lock, so instances starting
at once on one database do not race. The tables live in the connection's current schema (search_path), so
one database can hold several flywatch states (`?options=-csearch_path%3Dname`).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote

import psycopg

from daemon.store.base import Entry, StoreError, decode, encode, redact_url

_T = TypeVar("_T")

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


class PostgresStore:
    """The `Store` on PostgreSQL. Make one with `PostgresStore.open(url)` (or `open_store(url)`)."""

    def __init__(self, connection: psycopg.Connection[Any], name: str, secrets: tuple[str, ...]) -> None:
        self._connection: psycopg.Connection[Any] | None = connection
        self._name = name
        self._secrets = secrets
        self._queue = asyncio.Lock()
        self._statement = threading.Lock()

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

    def __repr__(self) -> str:
        return f"<{self._name}>"

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        where = _document(namespace, key)

        def work(connection: psycopg.Connection[Any]) -> dict[str, Any] | None:
            row = connection.execute(
                "SELECT value FROM flywatch_documents WHERE namespace = %s AND key = %s", (namespace, key)
            ).fetchone()
            return None if row is None else decode(row[0], self._name, where)

        return await self._run(f"get {where}", work)

    async def put(self, namespace: str, key: str, value: dict[str, Any]) -> None:
        what = f"put {_document(namespace, key)}"
        text = encode(value, store=self._name, what=what)

        def work(connection: psycopg.Connection[Any]) -> None:
            connection.execute(
                "INSERT INTO flywatch_documents (namespace, key, value) VALUES (%s, %s, %s)"
                " ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
                (namespace, key, text),
            )

        await self._run(what, work)

    async def delete(self, namespace: str, key: str) -> None:
        def work(connection: psycopg.Connection[Any]) -> None:
            connection.execute(
                "DELETE FROM flywatch_documents WHERE namespace = %s AND key = %s", (namespace, key)
            )

        await self._run(f"delete {_document(namespace, key)}", work)

    async def scan(self, namespace: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        def work(connection: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
            # Keys are COLLATE "C", compared as UTF-8 bytes, which is code point order: the keys that start
            # with `prefix` are the run that begins at the first key >= prefix. No LIKE, so no escaping.
            rows = connection.execute(
                "SELECT key, value FROM flywatch_documents WHERE namespace = %s AND key >= %s ORDER BY key",
                (namespace, prefix),
            )
            found: dict[str, dict[str, Any]] = {}
            for key, text in rows:
                if not key.startswith(prefix):
                    break
                found[key] = decode(text, self._name, _document(namespace, key))
            return found

        return await self._run(f"scan {namespace} for {prefix!r}", work)

    async def append(self, stream: str, record: dict[str, Any], *, at: float, key: str = "") -> int:
        what = f"append to {stream}"
        if not math.isfinite(at):
            raise StoreError(f"{self._name}: {what}: `at` must be a finite time, not {at!r}")
        text = encode(record, store=self._name, what=what)

        def work(connection: psycopg.Connection[Any]) -> int:
            row = connection.execute(
                "INSERT INTO flywatch_streams (stream, at, key, record) VALUES (%s, %s, %s, %s) RETURNING id",
                (stream, float(at), key, text),
            ).fetchone()
            if row is None:  # pragma: no cover - INSERT ... RETURNING of one row always gives one
                raise StoreError(f"{self._name}: {what}: PostgreSQL gave no id")
            return int(row[0])

        return await self._run(what, work)

    async def read(
        self, stream: str, *, key: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[Entry]:
        what = f"read {stream}"
        if limit < 0:
            raise StoreError(f"{self._name}: {what}: limit must be 0 or more, not {limit}")
        sql = "SELECT id, at, key, record FROM flywatch_streams WHERE stream = %s"
        parameters: list[object] = [stream]
        if key is not None:
            sql += " AND key = %s"
            parameters.append(key)
        if before is not None:
            sql += " AND id < %s"
            parameters.append(before)
        sql += " ORDER BY id DESC LIMIT %s"
        parameters.append(limit)

        def work(connection: psycopg.Connection[Any]) -> list[Entry]:
            return [
                Entry(
                    id=int(id_),
                    at=float(at),
                    key=entry_key,
                    record=decode(text, self._name, f"{stream} entry {id_}"),
                )
                for id_, at, entry_key, text in connection.execute(sql, parameters)
            ]

        return await self._run(what, work)

    async def trim(self, stream: str, keep: int) -> int:
        what = f"trim {stream}"
        if keep < 0:
            raise StoreError(f"{self._name}: {what}: keep must be 0 or more, not {keep}")

        def work(connection: psycopg.Connection[Any]) -> int:
            # Everything up to the newest entry that goes: the one just past the `keep` newest.
            cursor = connection.execute(
                "DELETE FROM flywatch_streams WHERE stream = %(stream)s AND id <= ("
                " SELECT id FROM flywatch_streams WHERE stream = %(stream)s"
                " ORDER BY id DESC LIMIT 1 OFFSET %(keep)s)",
                {"stream": stream, "keep": keep},
            )
            return max(cursor.rowcount, 0)

        return await self._run(what, work)

    async def close(self) -> None:
        async with self._queue:
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._statement:
            connection, self._connection = self._connection, None
            if connection is None:
                return
            try:
                connection.close()
            except psycopg.Error as exc:  # pragma: no cover - closing a connection does not fail in practice
                raise StoreError(f"{self._name}: close failed: {_scrub(str(exc), self._secrets)}") from None

    async def _run(self, what: str, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        async with self._queue:
            return await asyncio.to_thread(self._call, what, work)

    def _call(self, what: str, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        with self._statement:
            if self._connection is None:
                raise StoreError(f"{self._name}: {what}: the store is closed")
            try:
                return work(self._connection)
            except (psycopg.Error, OverflowError, UnicodeError, ValueError) as exc:
                # psycopg.DataError: a NUL in a name, an integer beyond 64 bits; UnicodeError: a lone
                # surrogate in a name; ValueError: psycopg refusing a NUL in a parameter.
                raise StoreError(f"{self._name}: {what} failed: {_scrub(str(exc), self._secrets)}") from None


def _document(namespace: str, key: str) -> str:
    return f"{namespace}[{key!r}]"


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
