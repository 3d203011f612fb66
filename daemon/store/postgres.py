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

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

import psycopg

from daemon.store.base import Fence, StoreError, redact_url
from daemon.store.sql import SqlConnection, SqlStore

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
    (
        # The instances sharing this database (cluster.py): each renews its row; one past expires_at is gone.
        """CREATE TABLE flywatch_members (
            member TEXT COLLATE "C" PRIMARY KEY,
            region TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL
        )""",
        # Who may act on each app: `owner` until `expires_at` (the database's clock), at `epoch`, which goes
        # up with every change of hands and is checked by every fenced write. Rows are never deleted, so an
        # epoch is never given twice for one app.
        """CREATE TABLE flywatch_leases (
            app TEXT COLLATE "C" PRIMARY KEY,
            owner TEXT COLLATE "C",
            epoch BIGINT NOT NULL,
            acquired_at TIMESTAMPTZ NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL
        )""",
        "CREATE INDEX flywatch_leases_by_owner ON flywatch_leases (owner)",
    ),
    ("CREATE INDEX flywatch_streams_by_stream_at ON flywatch_streams (stream, at)",),  # expire(): by age
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


class _PostgresConnection(SqlConnection):
    """A connection to PostgreSQL: psycopg's errors, and the URL's password cut out of its messages."""

    # DataError: a NUL in a name, an integer beyond 64 bits; UnicodeError: a lone surrogate in a name;
    # ValueError: psycopg refusing a NUL in a parameter
    ERRORS = (psycopg.Error, OverflowError, UnicodeError, ValueError)

    def __init__(
        self, connection: psycopg.Connection[Any], name: str, secrets: tuple[str, ...], conninfo: str = ""
    ) -> None:
        super().__init__(connection, name)
        self._secrets = secrets
        self._conninfo = conninfo  # to connect again (it holds the password: never shown)

    def _scrub(self, message: str) -> str:
        return _scrub(message, self._secrets)  # libpq quotes parts of a URL it cannot parse

    def _reopened(self, connection: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
        # A connection psycopg has seen break stays broken: without this, one server restart would cut an
        # instance off for good. A failure here is the statement's StoreError; the next call tries again.
        if not (connection.broken or connection.closed) or not self._conninfo:
            return connection
        with contextlib.suppress(psycopg.Error):
            connection.close()
        return psycopg.connect(self._conninfo, autocommit=True, **_connect_defaults(self._conninfo))


def _connect(url: str, name: str) -> tuple[psycopg.Connection[Any], tuple[str, ...], str]:
    """An autocommit connection to `url` with the schema in place, the URL's secrets, and the conninfo to
    connect again with; StoreError."""
    secrets = url_secrets(url)
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
    return connection, secrets, conninfo


class PostgresStore(SqlStore, _PostgresConnection):
    """The `Store` on PostgreSQL. Make one with `PostgresStore.open(url)` (or `open_store(url)`)."""

    DOCUMENTS = "flywatch_documents"
    ENTRIES = "flywatch_streams"
    P = "%s"

    @classmethod
    def open(cls, url: str) -> PostgresStore:
        """Connect to the database at `url` and create (or migrate) its tables.

        Blocking: meant for startup, before the event loop has work to do.
        """
        name = f"PostgreSQL store {redact_url(url)}"
        connection, secrets, conninfo = _connect(url, name)
        return cls(connection, name, secrets, conninfo)

    def _fenced(
        self, connection: psycopg.Connection[Any], fence: Fence, work: Callable[[Any], _T]
    ) -> _T | None:
        # FOR SHARE: a takeover's UPDATE of the lease row waits until this write has committed, so a write
        # is either before the change of hands or refused, never after it
        with connection.transaction():
            held = connection.execute(
                "SELECT 1 FROM flywatch_leases WHERE app = %s AND owner = %s AND epoch = %s"
                " AND expires_at > now() FOR SHARE",
                (fence.key, fence.owner, fence.epoch),
            ).fetchone()
            return None if held is None else work(connection)

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


@dataclass(frozen=True)
class Member:
    """An instance as the members table knows it; `live` while its row has not expired."""

    member: str
    region: str
    started_at: float
    live: bool


@dataclass(frozen=True)
class Roster:
    """What one look at the tables shows: every member (live or lately gone), and who holds which app."""

    members: tuple[Member, ...]
    owners: dict[str, str]  # app -> the member holding its unexpired lease


_FORGET_MEMBERS_AFTER = 3600  # seconds a member's expired row is still shown (as gone) before it is deleted

# NOTIFY'd (payload: {"schema": ..., "member": ...}) by a member that changes what the others would do at
# their next look: one that joins anew, withdraws, leaves, or releases leases. One channel for every schema
# of the database: a listener heeds only its own schema's.
CHANNEL = "flywatch_members"
LISTENER = "flywatch listener "  # and the member's name: the listening connection's application_name


def _tell(connection: psycopg.Connection[Any], member: str) -> None:
    """Tell the members listening on this schema that `member` changed the tables (sent at commit: this is
    autocommit, so at once, and after the change it follows)."""
    connection.execute(
        "SELECT pg_notify(%s, json_build_object('schema', current_schema(), 'member', %s::text)::text)",
        (CHANNEL, member),
    )


def _teller(payload: str, schema: str) -> str | None:
    """The member that sent `payload` if it is about `schema` (None: another schema's, or not ours)."""
    try:
        told = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(told, dict) or told.get("schema") != schema or not isinstance(told.get("member"), str):
        return None
    return str(told["member"])


class PostgresLeases(_PostgresConnection):
    """The membership and lease tables, on a connection of their own. Every time is the database's
    (now()), so the instances' own clocks never have to agree. Each call is a few autocommit statements:
    no transaction spans two rows' locks, so two instances exchanging apps cannot deadlock."""

    @classmethod
    def open(cls, url: str) -> PostgresLeases:
        name = f"PostgreSQL leases {redact_url(url)}"
        connection, secrets, conninfo = _connect(url, name)
        return cls(connection, name, secrets, conninfo)

    def key(self, app: str) -> str:
        """The lease row of `app`: its name."""
        return app

    async def join(self, member: str, region: str, started_at: float, ttl: float) -> Roster:
        """Renew `member`'s row for `ttl` seconds; the roster as it stands."""

        def work(connection: psycopg.Connection[Any]) -> Roster:
            row = connection.execute(
                # every part of a statement sees the rows as they were before it: `before` is the old row
                "WITH before AS (SELECT expires_at > now() AS live FROM flywatch_members WHERE member = %s)"
                " INSERT INTO flywatch_members (member, region, started_at, expires_at)"
                " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
                " ON CONFLICT (member) DO UPDATE"
                " SET region = excluded.region, expires_at = excluded.expires_at"
                " RETURNING coalesce((SELECT live FROM before), false)",
                (member, member, region, started_at, ttl),
            ).fetchone()
            if row is not None and not row[0]:
                _tell(connection, member)  # new among the live members: the others give it its share now
            connection.execute(
                "DELETE FROM flywatch_members WHERE expires_at < now() - make_interval(secs => %s)",
                (_FORGET_MEMBERS_AFTER,),
            )
            return _roster(connection)

        return await self._run(f"join as {member}", work)

    async def withdraw(self, member: str) -> Roster:
        """Take `member` off the members, keeping its leases (a member draining on its way out: the others
        take its share as its leases are released); the roster as it stands."""

        def work(connection: psycopg.Connection[Any]) -> Roster:
            if connection.execute("DELETE FROM flywatch_members WHERE member = %s", (member,)).rowcount:
                _tell(connection, member)  # once: a draining member withdraws at every look
            return _roster(connection)

        return await self._run(f"withdraw {member}", work)

    async def exchange(
        self,
        member: str,
        ttl: float,
        *,
        renew: dict[str, int],
        release: dict[str, int],
        acquire: list[str],
    ) -> tuple[set[str], dict[str, int]]:
        """Release the leases `member` gives up, renew (for `ttl` s) those it keeps while they are still
        its own and unexpired, and take those it wants that are free or expired. Returns the renewed apps
        and the acquired ones with their new epochs."""

        def work(connection: psycopg.Connection[Any]) -> tuple[set[str], dict[str, int]]:
            if release:
                apps, epochs = _columns(release)
                connection.execute(
                    "UPDATE flywatch_leases AS l SET owner = NULL, expires_at = now()"
                    " FROM unnest(%s::text[], %s::bigint[]) AS r(app, epoch)"
                    " WHERE l.app = r.app AND l.epoch = r.epoch AND l.owner = %s",
                    (apps, epochs, member),
                )
                _tell(connection, member)
            renewed: set[str] = set()
            if renew:
                apps, epochs = _columns(renew)
                renewed = {
                    str(app)
                    for (app,) in connection.execute(
                        "UPDATE flywatch_leases AS l SET expires_at = now() + make_interval(secs => %s)"
                        " FROM unnest(%s::text[], %s::bigint[]) AS h(app, epoch)"
                        " WHERE l.app = h.app AND l.epoch = h.epoch AND l.owner = %s AND l.expires_at > now()"
                        " RETURNING l.app",
                        (ttl, apps, epochs, member),
                    )
                }
            acquired: dict[str, int] = {}
            if acquire:
                acquired = {
                    str(app): int(epoch)
                    for app, epoch in connection.execute(
                        "INSERT INTO flywatch_leases AS l (app, owner, epoch, acquired_at, expires_at)"
                        " SELECT a, %s, 1, now(), now() + make_interval(secs => %s)"
                        " FROM unnest(%s::text[]) AS a"
                        " ON CONFLICT (app) DO UPDATE SET owner = excluded.owner, epoch = l.epoch + 1,"
                        " acquired_at = excluded.acquired_at, expires_at = excluded.expires_at"
                        # free, expired, or still our own (held by this very process, which has
                        # stopped acting on the old epoch itself): the epoch goes up in every case
                        " WHERE l.owner IS NULL OR l.expires_at <= now() OR l.owner = excluded.owner"
                        " RETURNING l.app, l.epoch",
                        (member, ttl, sorted(acquire)),
                    )
                }
            return renewed, acquired

        return await self._run(f"exchange leases of {member}", work)

    async def leave(self, member: str) -> None:
        """Give up every lease of `member` and its membership: the others take over at their next look."""

        def work(connection: psycopg.Connection[Any]) -> None:
            connection.execute(
                "UPDATE flywatch_leases SET owner = NULL, expires_at = now() WHERE owner = %s", (member,)
            )
            connection.execute("DELETE FROM flywatch_members WHERE member = %s", (member,))
            _tell(connection, member)

        await self._run(f"leave as {member}", work)

    async def changes(self, member: str) -> AsyncIterator[str]:
        """Listen, on a connection of its own (on the loop: it only waits), for the other members of this
        schema changing the tables (CHANNEL). Yields "" once listening (anything said before is not heard:
        look again then), then the name of each other member that tells. StoreError when the connection
        fails or cannot be made; what is said until the next listener is up is lost."""
        try:
            async with await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                # who is who in pg_stat_activity, unless the URL (or PGAPPNAME) names the application
                fallback_application_name=LISTENER + member,
                **_connect_defaults(self._conninfo),
            ) as connection:
                row = await (await connection.execute("SELECT current_schema()")).fetchone()
                schema = "" if row is None else str(row[0])
                await connection.execute(f"LISTEN {CHANNEL}")
                yield ""
                async for notice in connection.notifies():
                    teller = _teller(notice.payload, schema)
                    if teller is not None and teller != member:
                        yield teller
        except psycopg.Error as exc:
            failed = self._scrub(str(exc))
            raise StoreError(f"{self._name}: listening for the other members failed: {failed}") from None


def _roster(connection: psycopg.Connection[Any]) -> Roster:
    members = tuple(
        Member(str(name), str(where), float(started), bool(live))
        for name, where, started, live in connection.execute(
            "SELECT member, region, started_at, expires_at > now() FROM flywatch_members ORDER BY member"
        )
    )
    owners = dict(
        connection.execute(
            "SELECT app, owner FROM flywatch_leases WHERE owner IS NOT NULL AND expires_at > now()"
        ).fetchall()
    )
    return Roster(members, owners)


def _columns(held: dict[str, int]) -> tuple[list[str], list[int]]:
    """(apps, epochs) in app order: statements touch rows in one order, whoever sends them."""
    apps = sorted(held)
    return apps, [held[app] for app in apps]


_KEEPALIVES = {  # a server that vanishes without closing the connection is noticed within ~15 s, not hours
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # ms: a statement sent into a black hole fails, and the next call reconnects
}


def _connect_defaults(conninfo: str) -> dict[str, Any]:
    """connect_timeout and TCP keepalives, each unless the URL sets it: a host that drops packets fails at
    startup, and a connection that stops answering fails its statement, instead of hanging for ever."""
    defaults: dict[str, Any] = {"connect_timeout": _CONNECT_TIMEOUT, **_KEEPALIVES}
    return {name: value for name, value in defaults.items() if name not in conninfo}


def url_secrets(url: str) -> tuple[str, ...]:
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
