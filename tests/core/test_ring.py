"""Rendezvous hashing: the same answer everywhere, an even spread, and only the apps that must move move."""

from __future__ import annotations

from collections import Counter

from daemon.core.ring import assign, owner_of, share

APPS = [f"app-{n:04d}" for n in range(5000)]
MEMBERS = ["iad-1/a1b2c3", "cdg-1/d4e5f6", "nrt-1/0a0b0c"]


def test_the_answer_depends_only_on_the_names_not_their_order() -> None:
    forward = assign(APPS, MEMBERS)
    backward = assign(APPS, list(reversed(MEMBERS)))
    assert forward == backward
    assert set(forward.values()) == set(MEMBERS)
    # a known value: the hash is BLAKE2b, not Python's salted hash(), so every process agrees
    assert owner_of("shop", MEMBERS) == owner_of("shop", sorted(MEMBERS))


def test_the_apps_are_spread_evenly() -> None:
    counts = Counter(assign(APPS, MEMBERS).values())
    expected = len(APPS) / len(MEMBERS)
    for member in MEMBERS:
        assert abs(counts[member] - expected) < 0.08 * expected, counts


def test_when_a_member_leaves_only_its_apps_move() -> None:
    before = assign(APPS, MEMBERS)
    gone = MEMBERS[1]
    after = assign(APPS, [m for m in MEMBERS if m != gone])
    moved = {app for app in APPS if before[app] != after[app]}
    assert moved == {app for app, owner in before.items() if owner == gone}
    assert gone not in after.values()


def test_when_a_member_joins_it_takes_about_its_share_and_nothing_else_moves() -> None:
    before = assign(APPS, MEMBERS)
    new = "ams-1/123456"
    after = assign(APPS, [*MEMBERS, new])
    moved = {app for app in APPS if before[app] != after[app]}
    assert all(after[app] == new for app in moved)  # nothing moves between the old members
    assert abs(len(moved) - len(APPS) / 4) < 0.1 * len(APPS) / 4


def test_share_counts_the_member_itself_as_live() -> None:
    alone = share(APPS[:50], [], "iad-1/a1b2c3")
    assert alone == set(APPS[:50])
    mine = share(APPS, MEMBERS[1:], MEMBERS[0])
    assert mine == {app for app, owner in assign(APPS, MEMBERS).items() if owner == MEMBERS[0]}


def test_no_members_no_owner() -> None:
    assert owner_of("shop", []) is None
    assert assign(APPS[:3], []) == {}
