"""Small helpers for simulator tests."""

from __future__ import annotations

from typing import Any

import httpx


async def make_app(control: httpx.AsyncClient, name: str = "shop", **spec: Any) -> dict[str, Any]:
    """Create an app through the control API; regions default to two started machines in iad, one in cdg."""
    body = {"name": name, "regions": {"iad": 2, "cdg": 1}, **spec}
    response = await control.post("/apps", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def machine_ids(api: httpx.AsyncClient, app: str = "shop", **params: str) -> list[str]:
    response = await api.get(f"/apps/{app}/machines", params=params)
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()]


async def wait_state(
    api: httpx.AsyncClient, app: str, machine_id: str, state: str, **params: Any
) -> httpx.Response:
    return await api.get(
        f"/apps/{app}/machines/{machine_id}/wait", params={"state": state, "timeout": 5, **params}
    )


async def mark_image(control: httpx.AsyncClient, image: str, **behaviour: Any) -> None:
    """Say through the control API how an image's instances behave (mode or fields)."""
    response = await control.post("/images", json={"image": image, **behaviour})
    assert response.status_code == 200, response.text
