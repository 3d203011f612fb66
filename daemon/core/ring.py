"""Which live instance should own which app: rendezvous (highest random weight) hashing.

Every instance computes the same answer from the same member list, with no coordination: an app goes to the
member whose hash of (member, app) is highest. That is consistent hashing in the sense that matters here:
when a member leaves, only its own apps move (each to the member that came second for it); when one joins,
only the apps it now wins (about 1/N of them) move to it, and nothing moves between the others. Unlike a
ring of virtual nodes it needs no tuning for an even spread, and it is exact for any number of members.

Pure: the answer depends only on the names (BLAKE2b, not Python's salted hash()), so it is the same in every
process and across restarts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(member: str, app: str) -> int:
    """The member's score for the app: 64 bits of BLAKE2b over both names (a NUL between them keeps
    ("ab", "c") apart from ("a", "bc"))."""
    digest = hashlib.blake2b(f"{member}\0{app}".encode(errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner_of(app: str, members: Iterable[str]) -> str | None:
    """The member that should own `app`, or None when there are no members. Ties (64-bit collisions) go to
    the smaller name, so the answer never depends on the order the members are given in."""
    best: tuple[int, str] | None = None
    for member in members:
        score = weight(member, app)
        if best is None or score > best[0] or (score == best[0] and member < best[1]):
            best = (score, member)
    return None if best is None else best[1]


def assign(apps: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """Every app's owner among `members` (empty when there are none)."""
    pool = sorted(set(members))
    if not pool:
        return {}
    return {app: owner for app in apps if (owner := owner_of(app, pool)) is not None}


def share(apps: Iterable[str], members: Iterable[str], member: str) -> set[str]:
    """The apps `member` should own when `members` are live (it counts as live itself)."""
    pool = sorted({*members, member})
    return {app for app in apps if owner_of(app, pool) == member}
