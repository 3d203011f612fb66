"""The SQLite backend: one file (or :memory:), one connection, every call off the event loop.

Why it survives a kill -9 or a power cut at any moment: every write is a single statement, hence a single
transaction, committed before the call returns; WAL mode with synchronous=FULL syncs the log on every
commit, so a write that returned is on disk, and a write cut short is rolled back on the next open.
WAL also lets another process (`flywatch status`) read while the daemon writes.

One connection serves all calls. SQLite work runs in a worker thread (asyncio.to_thread) so the event loop
never waits on the disk; an asyncio lock queues callers without tying up a thread each, and a thread lock
keeps the connection to one statement at a time even when a cancelled caller's statement is still running.
A cancelled write may still land: the caller cannot know, as with any store across a crash.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from daemon.store.base import Entry, StoreError, decode, encode, redact_url

_T = TypeVar("_T")

_URL_PREFIX = "sqlite:///"
MEMORY = ":memory:"
_URL_FORMS = "sqlite:///relative/path.db, sqlite:////absolute/path.db or sqlite:///:memory:"
_BUSY_TIMEOUT = 5.0  # seconds to wait while another process holds the write lock
_MIN_SQLITE = (3, 37, 0)  # STRICT tables

# _MIGRATIONS[n] brings a file from schema version n to n + 1, in one transaction with the version row.
# Append only, never edit: files in the field were made by the old ones.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE documents (
            namespace TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (namespace, key)
        ) STRICT, WITHOUT ROWID""",
        # AUTOINCREMENT: ids are never reused, even after a trim took the newest entries away,
        # so paging with `before` and "greater than every id given before" hold across restarts.
        """CREATE TABLE entries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            stream TEXT NOT NULL,
            at REAL NOT NULL,
            key TEXT NOT NULL,
            record TEXT NOT NULL
        ) STRICT""",
        "CREATE INDEX entries_by_stream ON entries (stream, id)",
        "CREATE INDEX entries_by_stream_key ON entries (stream, key, id)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


def sqlite_path(url: str) -> str:
    """The path in a sqlite:/// URL, as written: relative to the working directory unless it starts with /."""
    shown = repr(redact_url(url))
    if url[: len(_URL_PREFIX)].lower() != _URL_PREFIX:
        raise StoreError(f"SQLite store URL {shown}: expected {_URL_FORMS}")
    path = url[len(_URL_PREFIX) :]
    if not path or path == "/":
        raise StoreError(f"SQLite store URL {shown} names no file: expected {_URL_FORMS}")
    if "?" in path or "#" in path:
        raise StoreError(f"SQLite store URL {shown}: options (?...) are not supported: expected {_URL_FORMS}")
    return path


class SQLiteStore:
    """The `Store` on SQLite. Make one with `SQLiteStore.open(path)` (or `open_store(url)`)."""

    def __init__(self, connection: sqlite3.Connection, name: str) -> None:
        self._connection: sqlite3.Connection | None = connection
        self._name = name
        self._queue = asyncio.Lock()
        self._statement = threading.Lock()

    @classmethod
    def open(cls, path: str) -> SQLiteStore:
        """Open (creating it, its directories and its tables if missing) the database at `path`.

        Blocking: meant for startup, before the event loop has work to do.
        """
        file = None if path == MEMORY else Path(path).absolute()
        target = MEMORY if file is None else str(file)
        name = f"SQLite store {target}"
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise StoreError(
                f"{name}: SQLite {sqlite3.sqlite_version} is too old, flywatch needs 3.37 or newer"
            )
        if file is not None:
            if file.is_dir():
                raise StoreError(f"{name}: is a directory, not a database file")
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{name}: cannot create its directory: {exc}") from None
        connection: sqlite3.Connection | None = None
        try:
            connection = sqlite3.connect(
                target, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            _prepare(connection, name, durable=file is not None)
        except sqlite3.Error as exc:
            if connection is not None:
                connection.close()
            raise StoreError(f"{name}: cannot open: {exc}") from None
        except StoreError:
            if connection is not None:
                connection.close()
            raise
        return cls(connection, name)

    def __repr__(self) -> str:
        return f"<{self._name}>"

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        where = _document(namespace, key)

        def work(connection: sqlite3.Connection) -> dict[str, Any] | None:
            row = connection.execute(
                "SELECT value FROM documents WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
            return None if row is None else decode(row[0], self._name, where)

        return await self._run(f"get {where}", work)

    async def put(self, namespace: str, key: str, value: dict[str, Any]) -> None:
        what = f"put {_document(namespace, key)}"
        text = encode(value, store=self._name, what=what)

        def work(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT INTO documents (namespace, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
                (namespace, key, text),
            )

        await self._run(what, work)

    async def delete(self, namespace: str, key: str) -> None:
        def work(connection: sqlite3.Connection) -> None:
            connection.execute("DELETE FROM documents WHERE namespace = ? AND key = ?", (namespace, key))

        await self._run(f"delete {_document(namespace, key)}", work)

    async def scan(self, namespace: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        def work(connection: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            # Keys compare as UTF-8 bytes, which is code point order: the keys that start with `prefix`
            # are the run that begins at the first key >= prefix. Exact for any string, NULs included,
            # where LIKE would need escaping and substr/length stop at a NUL.
            rows = connection.execute(
                "SELECT key, value FROM documents WHERE namespace = ? AND key >= ? ORDER BY key",
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

        def work(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(
                "INSERT INTO entries (stream, at, key, record) VALUES (?, ?, ?, ?)", (stream, at, key, text)
            )
            if cursor.lastrowid is None:  # pragma: no cover - an INSERT into a rowid table always sets it
                raise StoreError(f"{self._name}: {what}: SQLite gave no id")
            return cursor.lastrowid

        return await self._run(what, work)

    async def read(
        self, stream: str, *, key: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[Entry]:
        what = f"read {stream}"
        if limit < 0:
            raise StoreError(f"{self._name}: {what}: limit must be 0 or more, not {limit}")
        sql = "SELECT id, at, key, record FROM entries WHERE stream = ?"
        parameters: list[object] = [stream]
        if key is not None:
            sql += " AND key = ?"
            parameters.append(key)
        if before is not None:
            sql += " AND id < ?"
            parameters.append(before)
        sql += " ORDER BY id DESC LIMIT ?"
        parameters.append(limit)

        def work(connection: sqlite3.Connection) -> list[Entry]:
            return [
                Entry(id=id_, at=at, key=entry_key, record=decode(text, self._name, f"{stream} entry {id_}"))
                for id_, at, entry_key, text in connection.execute(sql, parameters)
            ]

        return await self._run(what, work)

    async def trim(self, stream: str, keep: int) -> int:
        what = f"trim {stream}"
        if keep < 0:
            raise StoreError(f"{self._name}: {what}: keep must be 0 or more, not {keep}")

        def work(connection: sqlite3.Connection) -> int:
            # Everything up to the newest entry that goes: the one just past the `keep` newest.
            cursor = connection.execute(
                "DELETE FROM entries WHERE stream = ?1 AND id <= ("
                " SELECT id FROM entries WHERE stream = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                (stream, keep),
            )
            return cursor.rowcount

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
            except sqlite3.Error as exc:
                raise StoreError(f"{self._name}: close failed: {exc}") from None

    async def _run(self, what: str, work: Callable[[sqlite3.Connection], _T]) -> _T:
        async with self._queue:
            return await asyncio.to_thread(self._call, what, work)

    def _call(self, what: str, work: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._statement:
            if self._connection is None:
                raise StoreError(f"{self._name}: {what}: the store is closed")
            try:
                return work(self._connection)
            except (sqlite3.Error, OverflowError, UnicodeError) as exc:
                # OverflowError: an integer beyond SQLite's 64 bits; UnicodeError: a lone surrogate in a name.
                raise StoreError(f"{self._name}: {what} failed: {exc}") from None


def _document(namespace: str, key: str) -> str:
    return f"{namespace}[{key!r}]"


def _prepare(connection: sqlite3.Connection, name: str, *, durable: bool) -> None:
    """Journal, durability and schema, on a fresh connection. Also the first read of the file: a file that
    is not a database fails here, at startup, rather than at the first tick."""
    (mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
    if durable and str(mode).lower() != "wal":
        raise StoreError(
            f"{name}: cannot use WAL mode (journal mode is {mode}); is it on a network filesystem?"
        )
    connection.execute("PRAGMA synchronous=FULL")  # sync the WAL at every commit: a write that returned stays
    connection.execute("BEGIN IMMEDIATE")
    try:
        current = _schema_version(connection, name)
        for version in range(current, SCHEMA_VERSION):
            for statement in _MIGRATIONS[version]:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_version VALUES (?, ?)", (version + 1, time.time()))
    except BaseException:
        connection.rollback()
        raise
    connection.execute("COMMIT")


def _schema_version(connection: sqlite3.Connection, name: str) -> int:
    """The file's schema version (0 for a new file); StoreError for a file made by a newer flywatch."""
    connection.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL) STRICT"
    )
    (current,) = connection.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"{name}: its schema is version {current}, newer than this flywatch knows ({SCHEMA_VERSION});"
            " upgrade flywatch or point FLYWATCH_STATE_URL at another file"
        )
    return int(current)
