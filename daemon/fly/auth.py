"""How a Fly token goes into an Authorization header: `FlyV1 ...` macaroons as they are, others as Bearer.

Used by the Machines API client and by the PromQL source (Fly's managed Prometheus takes the same tokens).
"""

from __future__ import annotations


def authorization(token: str) -> str:
    token = token.strip()
    return token if token.startswith("FlyV1 ") else f"Bearer {token}"
