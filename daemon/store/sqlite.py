"""The SQLite backend: one file (or :memory:), one connection, every call off the event loop.

Why it survives a kill -9 or a power cut at any moment: every write is a single statement, hence a single
transaction, committed before the call returns; WAL mode with synchronous=FULL syncs the log on every
commit, so a write that returned is on disk, and a write cut short is rolled back on the next open.
WAL also lets another process (`flywatch status`) read while the daemon writes.

One connection serves all calls, each in a worker thread so the event loop never waits on the disk: the
operations themselves are sql.py's, shared with the PostgreSQL backend.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from daemon.store.base import StoreError, redact_url
from daemon.store.sql import SqlStore

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
    ("CREATE INDEX entries_by_stream_at ON entries (stream, at)",),  # expire(): by age, not by a scan
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


class SQLiteStore(SqlStore):
    """The `Store` on SQLite. Make one with `SQLiteStore.open(path)` (or `open_store(url)`)."""

    DOCUMENTS = "documents"
    ENTRIES = "entries"
    P = "?"
    # OverflowError: an integer beyond SQLite's 64 bits; UnicodeError: a lone surrogate in a name
    ERRORS = (sqlite3.Error, OverflowError, UnicodeError)

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

    def _insert(self, connection: sqlite3.Connection, stream: str, at: float, key: str, text: str) -> int:
        cursor = connection.execute(
            "INSERT INTO entries (stream, at, key, record) VALUES (?, ?, ?, ?)", (stream, at, key, text)
        )
        if cursor.lastrowid is None:  # pragma: no cover - an INSERT into a rowid table always sets it
            raise StoreError(f"{self._name}: append to {stream}: SQLite gave no id")
        return cursor.lastrowid


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
