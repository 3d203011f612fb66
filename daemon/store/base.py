"""The state store's contract, shared by every backend: what survives a restart, and how it fails.

Two shapes of state. Documents: one JSON object per (namespace, key), overwritten in place (cooldown
clocks, stabilization history, known-good releases). Streams: append-only logs of JSON records, newest
first when read, trimmed from the oldest end (decision records). Values are JSON, checked before they
reach a backend, so every backend accepts and refuses the same values and gives back what it was given.

Every failure is a `StoreError` whose message names the store and what went wrong, so the reconciler
can log it and carry on; a URL's password never appears in it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class StoreError(Exception):
    """The store could not do what was asked: bad URL, unreadable file, corrupt data, full disk, bad value."""


class FencedError(StoreError):
    """A fenced write refused: the instance no longer holds the app's lease with that epoch (it expired, or
    another instance took the app over). Nothing was written."""


@dataclass(frozen=True)
class Fence:
    """A write's proof of ownership: `owner` holds `app`'s lease at `epoch`. A store given a fence writes only
    if that lease is still held at that epoch and unexpired, by the database's clock, in the same transaction
    as the write; otherwise it raises FencedError. An instance that lost an app can therefore never overwrite
    what its successor wrote, however late its write arrives."""

    app: str
    owner: str
    epoch: int
    lease: str = ""  # the lease row's key when it is not the app's name (a dry run's leases: cluster.py)

    @property
    def key(self) -> str:
        return self.lease or self.app


Fences = Callable[[str], "Fence | None"]  # the fence for writes about an app (None: none needed)


def no_fence(_app: str) -> Fence | None:
    """An instance alone: its writes need no fence."""
    return None


@dataclass(frozen=True)
class Entry:
    """One record of a stream. `id` increases with every append, across restarts."""

    id: int
    at: float
    key: str
    record: dict[str, Any]


class Store(Protocol):
    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        """The document at (namespace, key), or None."""
        ...

    async def put(
        self, namespace: str, key: str, value: dict[str, Any], *, fence: Fence | None = None
    ) -> None:
        """Write the document at (namespace, key), replacing any there. Durable once it returns. With a
        fence, only while the fence holds (else FencedError)."""
        ...

    async def delete(self, namespace: str, key: str, *, fence: Fence | None = None) -> None:
        """Remove the document at (namespace, key); absent is fine. With a fence, only while it holds."""
        ...

    async def scan(self, namespace: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Every document of the namespace whose key starts with `prefix`, by key."""
        ...

    async def append(
        self, stream: str, record: dict[str, Any], *, at: float, key: str = "", fence: Fence | None = None
    ) -> int:
        """Add a record to the stream; returns its id, greater than every id given before. With a fence,
        only while it holds."""
        ...

    async def read(
        self, stream: str, *, key: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[Entry]:
        """Up to `limit` entries, newest first, only `key`'s if given, only ids below `before` if given."""
        ...

    async def trim(self, stream: str, keep: int) -> int:
        """Keep the newest `keep` entries of the stream; returns how many were removed."""
        ...

    async def expire(self, stream: str, before: float) -> int:
        """Remove the stream's entries recorded (their `at`) before `before`; returns how many."""
        ...

    async def close(self) -> None:
        """Release the store; later calls raise StoreError. Closing twice is fine."""
        ...


def encode(value: object, *, store: str, what: str) -> str:
    """`value` as compact JSON text, or StoreError naming the store, the operation and what is not JSON.

    Refused: anything but a JSON object at the top, keys that are not strings (json.dumps would turn 1
    into "1" and lose the distinction), NaN and infinities (not JSON; Python's json writes them anyway),
    and every type JSON has no word for. Tuples are written as arrays and read back as lists; subclasses
    of str, int and float (enums) as their plain values.
    """
    if not isinstance(value, dict):
        problem: str | None = f"a value must be a JSON object (a dict), not {type(value).__name__}"
    else:
        try:
            problem = _json_problem(value, "$")
        except RecursionError:
            problem = "the value is nested too deeply or refers to itself"
    if problem is not None:
        raise StoreError(f"{store}: {what}: {problem}")
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _json_problem(value: object, path: str) -> str | None:
    """What in `value` JSON cannot hold (the first such thing, with its path), or None."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value!r}, which JSON cannot hold"
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                return f"{path} has the key {name!r}: JSON object keys are strings"
            if problem := _json_problem(item, f"{path}.{name}"):
                return problem
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if problem := _json_problem(item, f"{path}[{index}]"):
                return problem
        return None
    return f"{path} is a {type(value).__name__}, which is not JSON"


def decode(text: object, store: str, where: str) -> dict[str, Any]:
    """The JSON object stored as `text`, or StoreError naming the store and the damaged row."""
    try:
        value = json.loads(text)  # type: ignore[arg-type]  # a damaged row may hold anything
    except (ValueError, TypeError) as exc:
        raise StoreError(f"{store}: {where} holds corrupt JSON: {exc}") from None
    if not isinstance(value, dict):
        raise StoreError(f"{store}: {where} holds a JSON {type(value).__name__} where an object belongs")
    return value


_PASSWORD_PARAMETER = re.compile(r"(?i)\b((?:ssl)?pass(?:word|wd)?|pwd)=[^&#]*")


def redact_url(url: str) -> str:
    """The URL fit for a message: the password (in the authority or as a query parameter) replaced by ***.

    Deliberately cruder than urlsplit: a password holding '/', '#' or '@' would fool a parser into
    showing part of it, so everything between '//' and the last '@' is treated as the credentials.
    """
    scheme, separator, rest = url.partition("://")
    if separator and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user, has_password, _ = credentials.partition(":")
        rest = f"{user}:***@{host}" if has_password else f"{credentials}@{host}"
    return _PASSWORD_PARAMETER.sub(r"\1=***", f"{scheme}{separator}{rest}")
