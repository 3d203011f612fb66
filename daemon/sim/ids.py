"""Identifiers shaped like Fly's: 14-hex machine ids, ULID versions, adjective-noun-NNNN names, 12-hex nonces.

All drawn from one seeded generator so that a simulated world is reproducible run after run.
"""

from __future__ import annotations

import random
import string

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ADJECTIVES = (
    "aged",
    "ancient",
    "autumn",
    "billowing",
    "bitter",
    "black",
    "blue",
    "bold",
    "broken",
    "cold",
    "cool",
    "crimson",
    "damp",
    "dark",
    "dawn",
    "delicate",
    "divine",
    "dry",
    "empty",
    "falling",
    "floral",
    "fragrant",
    "frosty",
    "green",
    "hidden",
    "holy",
    "icy",
    "late",
    "lingering",
    "little",
    "lively",
    "long",
    "misty",
    "morning",
    "muddy",
    "nameless",
    "old",
    "patient",
    "polished",
    "proud",
    "purple",
    "quiet",
    "red",
    "restless",
    "rough",
    "shy",
    "silent",
    "small",
    "snowy",
    "solitary",
    "sparkling",
    "spring",
    "still",
    "summer",
    "throbbing",
    "twilight",
    "wandering",
    "weathered",
    "white",
    "wild",
    "winter",
    "wispy",
    "withered",
    "young",
)
_NOUNS = (
    "bird",
    "breeze",
    "brook",
    "bush",
    "butterfly",
    "cherry",
    "cloud",
    "darkness",
    "dawn",
    "dew",
    "dream",
    "dust",
    "feather",
    "field",
    "fire",
    "firefly",
    "flower",
    "fog",
    "forest",
    "frog",
    "frost",
    "glade",
    "glitter",
    "grass",
    "haze",
    "hill",
    "lake",
    "leaf",
    "meadow",
    "moon",
    "morning",
    "mountain",
    "night",
    "paper",
    "pine",
    "pond",
    "rain",
    "resonance",
    "river",
    "sea",
    "shadow",
    "shape",
    "silence",
    "sky",
    "smoke",
    "snow",
    "snowflake",
    "sound",
    "star",
    "sun",
    "sunset",
    "surf",
    "thunder",
    "tree",
    "violet",
    "voice",
    "water",
    "waterfall",
    "wave",
    "wildflower",
    "wind",
    "wood",
)


class IdSource:
    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def machine_id(self) -> str:
        return "".join(self._rng.choice("0123456789abcdef") for _ in range(14))

    def nonce(self) -> str:
        return "".join(self._rng.choice("0123456789abcdef") for _ in range(12))

    def ulid(self, now: float) -> str:
        """A 26-character ULID: 48 bits of milliseconds, then 80 random bits, Crockford base32."""
        value = (int(now * 1000) & ((1 << 48) - 1)) << 80 | self._rng.getrandbits(80)
        chars = []
        for _ in range(26):
            chars.append(_CROCKFORD[value & 31])
            value >>= 5
        return "".join(reversed(chars))

    def machine_name(self) -> str:
        return f"{self._rng.choice(_ADJECTIVES)}-{self._rng.choice(_NOUNS)}-{self._rng.randint(1000, 9999)}"

    def release_id(self) -> str:
        return "".join(self._rng.choice(string.ascii_letters + string.digits) for _ in range(25))

    def volume_id(self) -> str:
        return "vol_" + "".join(self._rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(16))

    def app_id(self) -> str:
        return "".join(self._rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(14))
