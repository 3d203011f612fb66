"""The store's contract: every test runs against every backend (see conftest.py), so they all behave alike."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import signal
import sys
from typing import Any

import pytest

from daemon.store import Store, StoreError, open_store
from tests.store.conftest import Backend

DEADLINE = 20.0  # seconds a writer subprocess may take to start and report; far above its usual 0.1 s


# Documents


async def test_get_of_a_missing_key_is_none(store: Store) -> None:
    """A key never written reads as None."""
    assert await store.get("cooldowns", "shop/iad") is None


async def test_put_then_get_gives_the_value_back(store: Store) -> None:
    """A document put is the document got."""
    await store.put("cooldowns", "shop/iad", {"until": 1_700_000_060.5, "action": "scale_up"})
    assert await store.get("cooldowns", "shop/iad") == {"until": 1_700_000_060.5, "action": "scale_up"}


async def test_put_replaces_the_whole_document(store: Store) -> None:
    """A second put to the same key replaces the document; nothing of the first is merged in."""
    await store.put("cooldowns", "shop/iad", {"until": 1.0, "action": "scale_up"})
    await store.put("cooldowns", "shop/iad", {"until": 2.0})
    assert await store.get("cooldowns", "shop/iad") == {"until": 2.0}


async def test_namespaces_keep_the_same_key_apart(store: Store) -> None:
    """The same key in two namespaces is two documents."""
    await store.put("cooldowns", "shop", {"n": 1})
    await store.put("releases", "shop", {"n": 2})
    assert await store.get("cooldowns", "shop") == {"n": 1}
    assert await store.get("releases", "shop") == {"n": 2}


async def test_delete_removes_the_document_and_ignores_absent_keys(store: Store) -> None:
    """Delete removes one document, leaves its neighbours, and is a no-op for a key that is not there."""
    await store.put("cooldowns", "a", {"n": 1})
    await store.put("cooldowns", "b", {"n": 2})
    await store.delete("cooldowns", "a")
    await store.delete("cooldowns", "never-written")
    assert await store.get("cooldowns", "a") is None
    assert await store.get("cooldowns", "b") == {"n": 2}


_SCAN_KEYS = [
    "shop",
    "shop/iad",
    "shop/cdg",
    "shop/iad/web",
    "shopping/iad",
    "api/iad",
    "a%b",
    "a_b",
    "aXb",
    "é/1",
]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", sorted(_SCAN_KEYS)),
        ("shop/", ["shop/cdg", "shop/iad", "shop/iad/web"]),
        ("shop", ["shop", "shop/cdg", "shop/iad", "shop/iad/web", "shopping/iad"]),
        ("shop/iad", ["shop/iad", "shop/iad/web"]),
        ("a%", ["a%b"]),  # no LIKE wildcards: % and _ are themselves
        ("a_", ["a_b"]),
        ("é", ["é/1"]),
        ("zzz", []),
    ],
)
async def test_scan_returns_the_keys_that_start_with_the_prefix(
    store: Store, prefix: str, expected: list[str]
) -> None:
    """Scan finds exactly the keys starting with the prefix (character by character, no wildcards), by key."""
    for key in _SCAN_KEYS:
        await store.put("health", key, {"key": key})
    await store.put("other", "shop/iad", {"key": "elsewhere"})
    found = await store.scan("health", prefix)
    assert sorted(found) == expected
    assert all(value == {"key": key} for key, value in found.items())


async def test_scan_of_an_empty_namespace_is_empty(store: Store) -> None:
    """Scanning a namespace with no documents gives an empty dict."""
    assert await store.scan("nothing-here") == {}


# Streams


async def test_append_gives_increasing_ids_across_streams(store: Store) -> None:
    """Every append returns an id greater than every id returned before, whatever the stream."""
    ids = [await store.append(f"stream-{n % 3}", {"n": n}, at=float(n)) for n in range(9)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_read_gives_entries_newest_first_with_their_fields(store: Store) -> None:
    """Read returns the stream's entries newest first, each with its id, time, key and record."""
    first = await store.append("decisions", {"action": "scale_up"}, at=100.0, key="shop")
    second = await store.append("decisions", {"action": "none"}, at=160.5, key="api")
    await store.append("elsewhere", {"action": "other"}, at=170.0)
    entries = await store.read("decisions")
    assert [(e.id, e.at, e.key, e.record) for e in entries] == [
        (second, 160.5, "api", {"action": "none"}),
        (first, 100.0, "shop", {"action": "scale_up"}),
    ]


async def test_read_filters_by_key(store: Store) -> None:
    """With `key`, read returns only that key's entries, still newest first; the default key is ''."""
    for n in range(6):
        await store.append("decisions", {"n": n}, at=float(n), key="shop" if n % 2 else "api")
    await store.append("decisions", {"n": 6}, at=6.0)
    assert [e.record["n"] for e in await store.read("decisions", key="shop")] == [5, 3, 1]
    assert [e.record["n"] for e in await store.read("decisions", key="")] == [6]
    assert await store.read("decisions", key="nobody") == []


async def test_read_pages_with_limit_and_before(store: Store) -> None:
    """`limit` caps a page and `before` (the last id seen) fetches the next, until none is left."""
    ids = [await store.append("decisions", {"n": n}, at=float(n), key="shop") for n in range(7)]
    pages: list[list[int]] = []
    before: int | None = None
    while page := await store.read("decisions", key="shop", limit=3, before=before):
        pages.append([e.record["n"] for e in page])
        before = page[-1].id
    assert pages == [[6, 5, 4], [3, 2, 1], [0]]
    assert [e.id for e in await store.read("decisions", limit=2, before=ids[3])] == [ids[2], ids[1]]


async def test_read_with_limit_zero_is_empty_and_a_negative_limit_is_refused(store: Store) -> None:
    """A limit of 0 reads nothing; a negative limit is a StoreError, not "no limit"."""
    await store.append("decisions", {"n": 1}, at=1.0)
    assert await store.read("decisions", limit=0) == []
    with pytest.raises(StoreError, match="limit"):
        await store.read("decisions", limit=-1)


async def test_read_of_an_unknown_stream_is_empty(store: Store) -> None:
    """A stream never appended to reads as an empty list."""
    assert await store.read("never") == []


async def test_trim_keeps_the_newest_and_counts_what_went(store: Store) -> None:
    """Trim keeps the newest `keep` entries of its stream only, and returns how many it removed."""
    for n in range(5):
        await store.append("decisions", {"n": n}, at=float(n))
    await store.append("other", {"n": 99}, at=0.0)
    assert await store.trim("decisions", keep=2) == 3
    assert [e.record["n"] for e in await store.read("decisions")] == [4, 3]
    assert await store.trim("decisions", keep=2) == 0
    assert await store.trim("decisions", keep=10) == 0
    assert [e.record for e in await store.read("other")] == [{"n": 99}]


async def test_trim_to_zero_empties_the_stream_and_ids_still_increase(store: Store) -> None:
    """Trimming everything empties the stream; the next append still gets a greater id than any before."""
    last = 0
    for n in range(3):
        last = await store.append("decisions", {"n": n}, at=float(n))
    assert await store.trim("decisions", keep=0) == 3
    assert await store.read("decisions") == []
    assert await store.append("decisions", {"n": 3}, at=3.0) > last


async def test_expire_removes_what_is_older_than_its_time_in_its_stream_only(store: Store) -> None:
    """Expire removes the stream's entries whose `at` is before the time given (not at it), whatever
    their keys, leaves other streams alone, and counts what went; a time that is not finite is refused."""
    for n in range(6):
        await store.append("decisions", {"n": n}, at=100.0 + n, key=f"app-{n % 2}")
    await store.append("other", {"n": 99}, at=0.0)
    assert await store.expire("decisions", before=103.0) == 3
    assert [e.record["n"] for e in await store.read("decisions")] == [5, 4, 3]
    assert await store.expire("decisions", before=103.0) == 0
    assert await store.expire("never", before=1e12) == 0
    assert [e.record for e in await store.read("other")] == [{"n": 99}]
    with pytest.raises(StoreError, match="finite"):
        await store.expire("decisions", before=float("nan"))
    assert len(await store.read("decisions")) == 3


async def test_trim_refuses_a_negative_keep(store: Store) -> None:
    """A negative `keep` is a StoreError, and nothing is removed."""
    await store.append("decisions", {"n": 1}, at=1.0)
    with pytest.raises(StoreError, match="keep"):
        await store.trim("decisions", keep=-1)
    assert len(await store.read("decisions")) == 1


async def test_concurrent_appends_keep_ids_unique_and_in_each_writers_order(store: Store) -> None:
    """Appends from many tasks at once get unique ids, increasing in each task's own order, all readable."""

    async def writer(task: int) -> list[int]:
        return [await store.append("decisions", {"task": task, "n": n}, at=float(n)) for n in range(10)]

    results = await asyncio.gather(*(writer(task) for task in range(20)))
    all_ids = [entry_id for ids in results for entry_id in ids]
    assert len(set(all_ids)) == 200
    assert all(ids == sorted(ids) for ids in results)
    entries = await store.read("decisions", limit=1000)
    assert [e.id for e in entries] == sorted(all_ids, reverse=True)
    for task, ids in enumerate(results):
        mine = [e for e in reversed(entries) if e.record["task"] == task]
        assert [e.id for e in mine] == ids
        assert [e.record["n"] for e in mine] == list(range(10))


async def test_concurrent_puts_and_gets_see_whole_documents(store: Store) -> None:
    """Concurrent writers and readers of one key only ever see a whole document one of them wrote."""

    async def writer(n: int) -> None:
        await store.put("cooldowns", "shop", {"n": n, "copy": n})

    async def reader() -> dict[str, Any] | None:
        return await store.get("cooldowns", "shop")

    seen = await asyncio.gather(*(coroutine for n in range(20) for coroutine in (writer(n), reader())))
    for value in seen:
        assert value is None or value["n"] == value["copy"]


async def test_cancelled_callers_leave_the_store_consistent_and_usable(store: Store) -> None:
    """Callers cancelled mid-call or while queued break nothing: every append that returned is there, ids
    stay unique and increasing, and the next call works (a cancelled append may or may not have landed)."""
    tasks = [asyncio.ensure_future(store.append("decisions", {"n": n}, at=float(n))) for n in range(20)]
    await asyncio.sleep(0)  # one yield: the first call is in its worker, the others wait their turn
    for task in tasks[::2]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    returned = [result for result in results if isinstance(result, int)]
    assert len(returned) == 10
    assert all(isinstance(result, int | asyncio.CancelledError) for result in results)
    entries = await store.read("decisions")
    ids = [e.id for e in entries]
    assert ids == sorted(set(ids), reverse=True)
    assert set(returned) <= set(ids)
    assert await store.append("decisions", {"n": 20}, at=20.0) > ids[0]


# Values


NESTED: dict[str, Any] = {
    "regions": {"iad": {"history": [1.5, 2.0, -3.25e-7], "ok": True}, "cdg": {"history": [], "ok": False}},
    "reasons": ["p95 above 0.5 s", {"inputs": {"rps": 120, "machines": 3}}],
    "big": 2**80,
    "negative": -(2**63),
    "none": None,
    "empty": {},
    "text": 'quotes " and \\ backslash, tab\t, newline\n, NUL \x00, é, 東京, 🚀, lone surrogate \ud800',
    "": "empty key",
}


async def test_nested_json_round_trips_exactly(store: Store) -> None:
    """Nested objects and arrays, big and negative integers, floats, booleans, nulls and any text come back
    as they went in, in documents and in stream records."""
    await store.put("state", "nested", NESTED)
    assert await store.get("state", "nested") == NESTED
    await store.append("decisions", NESTED, at=1.0)
    (entry,) = await store.read("decisions")
    assert entry.record == NESTED


async def test_floats_round_trip_bit_for_bit(store: Store) -> None:
    """Floats keep every bit: tiny, huge, and the ones decimal text gets wrong."""
    values = [0.1, 1 / 3, 5e-324, 1.7976931348623157e308, 1_700_000_000.123456]
    await store.put("state", "floats", {"values": values})
    got = await store.get("state", "floats")
    assert got is not None
    assert [v.hex() for v in got["values"]] == [v.hex() for v in values]


async def test_tuples_are_stored_as_lists(store: Store) -> None:
    """A tuple is written as a JSON array and comes back as a list."""
    await store.put("state", "pair", {"pair": (1, "a"), "nested": [(2,)]})
    assert await store.get("state", "pair") == {"pair": [1, "a"], "nested": [[2]]}


async def test_values_are_copied_both_ways(store: Store) -> None:
    """Changing a dict after put, or the dict a get returned, changes nothing in the store."""
    value: dict[str, Any] = {"history": [1, 2]}
    await store.put("state", "k", value)
    value["history"].append(3)
    got = await store.get("state", "k")
    assert got == {"history": [1, 2]}
    got["history"].append(4)
    assert await store.get("state", "k") == {"history": [1, 2]}


def _circular() -> dict[str, Any]:
    value: dict[str, Any] = {"a": []}
    value["a"].append(value)
    return value


NOT_JSON = {
    "nan": ({"p95": math.nan}, "$.p95"),
    "infinity": ({"p95": math.inf}, "$.p95"),
    "minus infinity": ({"deep": {"list": [1.0, -math.inf]}}, "$.deep.list[1]"),
    "set": ({"machines": {"a", "b"}}, "$.machines"),
    "bytes": ({"body": b"\x00"}, "$.body"),
    "datetime": ({"when": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}, "$.when"),
    "object": ({"thing": object()}, "$.thing"),
    "integer key": ({"by_count": {1: "a"}}, "$.by_count"),
    "none key": ({None: 1}, "$"),
    "circular": (_circular(), "refers to itself"),
    "a list, not an object": ([1, 2], "JSON object"),
    "a string, not an object": ("text", "JSON object"),
}


@pytest.mark.parametrize(("value", "named"), NOT_JSON.values(), ids=NOT_JSON.keys())
async def test_values_that_are_not_json_are_refused_and_nothing_is_written(
    store: Store, backend: Backend, value: Any, named: str
) -> None:
    """A value JSON cannot hold exactly (NaN, infinities, sets, bytes, non-string keys...) is a StoreError
    naming the store and the offending part, and neither the document nor the record is written."""
    with pytest.raises(StoreError) as put_error:
        await store.put("state", "k", value)
    with pytest.raises(StoreError) as append_error:
        await store.append("decisions", value, at=1.0)
    for error in (put_error, append_error):
        assert backend.shown_as in str(error.value)
        assert named in str(error.value)
    assert await store.get("state", "k") is None
    assert await store.read("decisions") == []


@pytest.mark.parametrize("at", [math.nan, math.inf, -math.inf])
async def test_append_refuses_a_time_that_is_not_finite(store: Store, at: float) -> None:
    """An entry's time must be a finite number."""
    with pytest.raises(StoreError, match="finite"):
        await store.append("decisions", {"n": 1}, at=at)
    assert await store.read("decisions") == []


async def test_a_closed_store_refuses_calls_and_closes_twice(backend: Backend) -> None:
    """After close, every call is a StoreError saying the store is closed; closing again is fine."""
    store = open_store(backend.url)
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed") as error:
        await store.get("state", "k")
    assert backend.shown_as in str(error.value)
    with pytest.raises(StoreError, match="closed"):
        await store.append("decisions", {"n": 1}, at=1.0)


# Durability


async def test_reopening_keeps_everything(durable_backend: Backend) -> None:
    """Documents, stream entries, trims and ids are all there after the store is closed and opened again."""
    store = open_store(durable_backend.url)
    await store.put("cooldowns", "shop/iad", {"until": 60.0})
    await store.put("cooldowns", "gone", {"until": 1.0})
    await store.delete("cooldowns", "gone")
    ids = [await store.append("decisions", {"n": n}, at=float(n), key="shop") for n in range(4)]
    await store.trim("decisions", keep=3)
    await store.close()

    reopened = open_store(durable_backend.url)
    try:
        assert await reopened.scan("cooldowns") == {"shop/iad": {"until": 60.0}}
        assert [(e.id, e.record["n"]) for e in await reopened.read("decisions", key="shop")] == [
            (ids[3], 3),
            (ids[2], 2),
            (ids[1], 1),
        ]
        assert await reopened.append("decisions", {"n": 4}, at=4.0) > ids[-1]
    finally:
        await reopened.close()


_WRITE_THEN_SLEEP = """
import asyncio, sys
from daemon.store import open_store

async def main():
    store = open_store(sys.argv[1])
    await store.put("cooldowns", "shop/iad", {"until": 1700000060.5})
    entry_id = await store.append("decisions", {"action": "scale_up"}, at=1700000000.0, key="shop")
    print("written", entry_id, flush=True)
    await asyncio.sleep(3600)  # still open, never closed: only SIGKILL ends it

asyncio.run(main())
"""

_WRITE_UNTIL_KILLED = """
import asyncio, itertools, sys
from daemon.store import open_store

async def main():
    store = open_store(sys.argv[1])
    for n in itertools.count():
        await store.put("counter", "n", {"n": n})
        await store.append("log", {"n": n}, at=float(n))
        print(n, flush=True)

asyncio.run(main())
"""


async def _start_writer(script: str, url: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def _kill(process: asyncio.subprocess.Process) -> None:
    """SIGKILL (unless it already ended), then wait with a deadline until it is gone and its pipes drained."""
    if process.returncode is None:
        process.send_signal(signal.SIGKILL)
    await asyncio.wait_for(process.communicate(), timeout=DEADLINE)


async def _line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=DEADLINE)
    if not line:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=DEADLINE)
        pytest.fail(f"the writer ended early: {stderr.decode(errors='replace')}")
    return line.decode().strip()


async def test_a_write_that_returned_survives_kill_9(durable_backend: Backend) -> None:
    """Once put and append have returned, SIGKILL of the writing process loses neither."""
    writer = await _start_writer(_WRITE_THEN_SLEEP, durable_backend.url)
    try:
        word, entry_id = (await _line(writer)).split()
    finally:
        await _kill(writer)
    assert writer.returncode == -signal.SIGKILL
    assert word == "written"

    store = open_store(durable_backend.url)
    try:
        assert await store.get("cooldowns", "shop/iad") == {"until": 1700000060.5}
        (entry,) = await store.read("decisions")
        assert (entry.id, entry.at, entry.key, entry.record) == (
            int(entry_id),
            1700000000.0,
            "shop",
            {"action": "scale_up"},
        )
    finally:
        await store.close()


async def test_kill_9_in_the_middle_of_writing_loses_nothing_that_returned(durable_backend: Backend) -> None:
    """A writer killed at an arbitrary moment mid-stream leaves a store that opens cleanly, holds every write
    reported done, and holds no half-written one."""
    writer = await _start_writer(_WRITE_UNTIL_KILLED, durable_backend.url)
    try:
        reported = int(await _line(writer))
        while reported < 25:
            reported = int(await _line(writer))
    finally:
        await _kill(writer)  # the writer keeps writing meanwhile: the kill lands wherever it lands
    assert writer.returncode == -signal.SIGKILL

    store = open_store(durable_backend.url)
    try:
        entries = await store.read("log", limit=100_000)
        logged = [e.record["n"] for e in reversed(entries)]
        assert logged == list(range(len(logged)))  # no gap, no torn record
        assert logged[-1] >= reported
        counter = await store.get("counter", "n")
        assert counter is not None
        assert counter["n"] - logged[-1] in {0, 1}  # killed between the put and the append, or not
        assert await store.append("log", {"n": -1}, at=0.0) > entries[0].id
    finally:
        await store.close()
