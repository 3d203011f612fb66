"""What the SQL backends share: the Store's operations as SQL over one connection, every call off the loop.

A backend (sqlite.py, postgres.py) says only what differs: its table names, its parameter placeholder, the
driver's errors, how an insert gives back its id, and what must be scrubbed from a driver's message. The
statements, the value checks and the error wording are written once here, so both backends accept and
refuse the same things in the same words.

Blocking driver calls run in a worker thread (asyncio.to_thread); an asyncio lock queues callers without
tying up a thread each, and a thread lock keeps the connection to one statement at a time even when a
cancelled caller's statement is still running. A cancelled write may still land: the caller cannot know, as
with any store across a crash.
"""

# ruff: noqa: S608 - the SQL is built from the backends' own table names and placeholder, class constants;
# every value is a bound parameter
from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from daemon.store.base import Entry, Fence, FencedError, StoreError, decode, encode

_T = TypeVar("_T")
_EXPIRE_BATCH = 5000  # entries one statement of expire() removes at most


def document(namespace: str, key: str) -> str:
    """How an error names a document."""
    return f"{namespace}[{key!r}]"


class SqlConnection:
    """One DB-API connection used off the loop, one statement at a time, every failure a StoreError that
    names `name`. The base of the stores and of the lease table (which keeps a connection of its own, so a
    heartbeat never queues behind the store's work)."""

    ERRORS: ClassVar[tuple[type[Exception], ...]]  # what the driver raises for a statement that fails

    def __init__(self, connection: Any, name: str) -> None:
        self._connection: Any = connection
        self._name = name
        self._queue = asyncio.Lock()
        self._statement = threading.Lock()

    def __repr__(self) -> str:
        return f"<{self._name}>"

    def _scrub(self, message: str) -> str:
        """A driver's message fit for an error (a backend whose driver may quote a secret cuts it out)."""
        return message

    def _reopened(self, connection: Any) -> Any:
        """The connection to use for the next statement: `connection`, or a new one in its place when the
        old one broke (a server restart, a failover, a network reset). A backend that cannot reconnect
        returns it as it is."""
        return connection

    def _fenced(self, connection: Any, fence: Fence, work: Callable[[Any], _T]) -> _T | None:  # noqa: ARG002
        """Run `work` in one transaction with a check that `fence` holds, or None (and nothing done) if it
        does not. A backend without leases (a single instance's store) refuses every fence."""
        raise StoreError(f"{self._name}: fenced writes need a store that holds leases (PostgreSQL)")

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
            except self.ERRORS as exc:  # pragma: no cover - closing a connection does not fail in practice
                raise StoreError(f"{self._name}: close failed: {self._scrub(str(exc))}") from None

    async def _run(self, what: str, work: Callable[[Any], _T], fence: Fence | None = None) -> _T:
        async with self._queue:
            return await asyncio.to_thread(self._call, what, work, fence)

    def _call(self, what: str, work: Callable[[Any], _T], fence: Fence | None = None) -> _T:
        with self._statement:
            if self._connection is None:
                raise StoreError(f"{self._name}: {what}: the store is closed")
            try:
                self._connection = self._reopened(self._connection)
                if fence is None:
                    return work(self._connection)
                done = self._fenced(self._connection, fence, lambda connection: (work(connection),))
            except self.ERRORS as exc:
                raise StoreError(f"{self._name}: {what} failed: {self._scrub(str(exc))}") from None
            if done is None:
                raise FencedError(
                    f"{self._name}: {what} refused: {fence.owner} no longer holds {fence.app}'s lease"
                    f" at epoch {fence.epoch} (expired, or taken over)"
                )
            return done[0]


class SqlStore(SqlConnection):
    """The `Store` over one DB-API connection; subclasses set the class attributes and `_insert`."""

    DOCUMENTS: ClassVar[str]  # the documents table
    ENTRIES: ClassVar[str]  # the streams' entries table
    P: ClassVar[str]  # the driver's parameter placeholder

    def _insert(self, connection: Any, stream: str, at: float, key: str, text: str) -> int:
        """Append one entry; its id."""
        raise NotImplementedError

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        where, p = document(namespace, key), self.P
        sql = f"SELECT value FROM {self.DOCUMENTS} WHERE namespace = {p} AND key = {p}"

        def work(connection: Any) -> dict[str, Any] | None:
            row = connection.execute(sql, (namespace, key)).fetchone()
            return None if row is None else decode(row[0], self._name, where)

        return await self._run(f"get {where}", work)

    async def put(
        self, namespace: str, key: str, value: dict[str, Any], *, fence: Fence | None = None
    ) -> None:
        what, p = f"put {document(namespace, key)}", self.P
        text = encode(value, store=self._name, what=what)
        sql = (
            f"INSERT INTO {self.DOCUMENTS} (namespace, key, value) VALUES ({p}, {p}, {p})"
            " ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value"
        )
        await self._run(what, lambda connection: connection.execute(sql, (namespace, key, text)), fence)

    async def delete(self, namespace: str, key: str, *, fence: Fence | None = None) -> None:
        p = self.P
        sql = f"DELETE FROM {self.DOCUMENTS} WHERE namespace = {p} AND key = {p}"
        await self._run(
            f"delete {document(namespace, key)}",
            lambda connection: connection.execute(sql, (namespace, key)),
            fence,
        )

    async def scan(self, namespace: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        p = self.P
        # Keys compare as UTF-8 bytes (code point order): the keys that start with `prefix` are the run that
        # begins at the first key >= prefix. Exact for any string, where LIKE would need escaping.
        sql = f"SELECT key, value FROM {self.DOCUMENTS} WHERE namespace = {p} AND key >= {p} ORDER BY key"

        def work(connection: Any) -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for key, text in connection.execute(sql, (namespace, prefix)):
                if not key.startswith(prefix):
                    break
                found[key] = decode(text, self._name, document(namespace, key))
            return found

        return await self._run(f"scan {namespace} for {prefix!r}", work)

    async def append(
        self, stream: str, record: dict[str, Any], *, at: float, key: str = "", fence: Fence | None = None
    ) -> int:
        what = f"append to {stream}"
        if not math.isfinite(at):
            raise StoreError(f"{self._name}: {what}: `at` must be a finite time, not {at!r}")
        text = encode(record, store=self._name, what=what)
        return await self._run(
            what, lambda connection: self._insert(connection, stream, float(at), key, text), fence
        )

    async def read(
        self, stream: str, *, key: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[Entry]:
        what, p = f"read {stream}", self.P
        if limit < 0:
            raise StoreError(f"{self._name}: {what}: limit must be 0 or more, not {limit}")
        sql = f"SELECT id, at, key, record FROM {self.ENTRIES} WHERE stream = {p}"
        parameters: list[object] = [stream]
        if key is not None:
            sql += f" AND key = {p}"
            parameters.append(key)
        if before is not None:
            sql += f" AND id < {p}"
            parameters.append(before)
        sql += f" ORDER BY id DESC LIMIT {p}"
        parameters.append(limit)

        def work(connection: Any) -> list[Entry]:
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

    async def expire(self, stream: str, before: float) -> int:
        what, p = f"expire {stream}", self.P
        if not math.isfinite(before):
            raise StoreError(f"{self._name}: {what}: `before` must be a finite time, not {before!r}")
        # in batches, each a statement of its own: the other writers (every tick's) wait for a batch at
        # most, not for a first expiry of millions of entries
        sql = (
            f"DELETE FROM {self.ENTRIES} WHERE id IN ("
            f" SELECT id FROM {self.ENTRIES} WHERE stream = {p} AND at < {p} LIMIT {_EXPIRE_BATCH})"
        )
        gone = 0
        while True:
            batch: int = await self._run(
                what, lambda connection: max(connection.execute(sql, (stream, float(before))).rowcount, 0)
            )
            gone += batch
            if batch < _EXPIRE_BATCH:
                return gone

    async def trim(self, stream: str, keep: int) -> int:
        what, p = f"trim {stream}", self.P
        if keep < 0:
            raise StoreError(f"{self._name}: {what}: keep must be 0 or more, not {keep}")
        # Everything up to the newest entry that goes: the one just past the `keep` newest.
        sql = (
            f"DELETE FROM {self.ENTRIES} WHERE stream = {p} AND id <= ("
            f" SELECT id FROM {self.ENTRIES} WHERE stream = {p} ORDER BY id DESC LIMIT 1 OFFSET {p})"
        )
        return await self._run(
            what, lambda connection: max(connection.execute(sql, (stream, stream, keep)).rowcount, 0)
        )
