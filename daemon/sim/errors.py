"""The errors the simulated API answers with, shaped as Fly's are (see machines-api.md §2 and §7)."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An answer other than success: the HTTP status and the JSON body Fly would send."""

    def __init__(self, status: int, message: str, *, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body: dict[str, Any] = body if body is not None else {"error": message}


def bad_request(message: str) -> ApiError:
    return ApiError(400, f"invalid_argument: {message}")


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found")


def precondition(message: str) -> ApiError:
    return ApiError(412, f"failed_precondition: {message}")


def conflict(message: str) -> ApiError:
    return ApiError(409, f"aborted: {message}")


def insufficient_capacity(region: str) -> ApiError:
    message = (
        "unknown: could not reserve resource for machine: "
        f"insufficient memory available to fulfill request in region {region}"
    )
    return ApiError(412, message, body={"error": message, "status": "insufficient_capacity"})


def lease_envelope_error(status: int, message: str, code: str) -> ApiError:
    """Lease endpoints answer in the envelope Fly uses for leases: {"status": "error", ...}."""
    return ApiError(
        status, message, body={"status": "error", "message": message, "code": code, "error": message}
    )
