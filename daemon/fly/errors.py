"""Typed errors of the Machines API, raised only by the client (fly/client.py).

Each carries the endpoint (the OpenAPI operationId), the HTTP status, Fly's message and its
fly-request-id, and never the token: messages are built from the response body, never the request.
"""

from __future__ import annotations


class FlyApiError(Exception):
    """An answer from the Machines API that is not a success."""

    status: int = 0

    def __init__(
        self, endpoint: str, message: str, *, status: int | None = None, request_id: str = ""
    ) -> None:
        self.endpoint = endpoint
        self.message = message
        self.request_id = request_id
        if status is not None:
            self.status = status
        suffix = f" (fly-request-id {request_id})" if request_id else ""
        super().__init__(f"{endpoint}: {self.status} {message}{suffix}")


class BadRequest(FlyApiError):
    status = 400


class Unauthorized(FlyApiError):
    status = 401


class Forbidden(FlyApiError):
    status = 403


class NotFound(FlyApiError):
    status = 404


class RequestTimeout(FlyApiError):
    """408: Fly's own deadline passed. On create it is ambiguous: the machine may exist."""

    status = 408


class Conflict(FlyApiError):
    status = 409


class LeaseHeld(Conflict):
    """Someone else (a deploy, a human) holds the machine's lease: skip it, never fight it."""


class VersionConflict(Conflict):
    """current_version no longer matches: the machine changed under us."""


class PreconditionFailed(FlyApiError):
    status = 412


class InsufficientCapacity(PreconditionFailed):
    """The region has no room for the machine."""


class Unprocessable(FlyApiError):
    status = 422


class RateLimited(FlyApiError):
    status = 429


class ServerError(FlyApiError):
    status = 500


class BadResponse(FlyApiError):
    """A success status with a body that is not what the API documents (not JSON, or the wrong shape)."""


class LeaseLost(FlyApiError):
    """Our lease could not be refreshed and may have expired: nothing more may be changed under it."""


class NotOwner(Exception):
    """Never sent: this instance does not hold the app's lease (another instance has it, or ours lapsed).

    Not a FlyApiError: nothing was asked of Fly, and no handler of Fly's errors may take it for one of
    them and go on with the next step (the next create, the next machine of a rollout). It ends the whole
    tick it was raised in; the app's new owner looks at the world afresh."""

    def __init__(self, endpoint: str, reason: str) -> None:
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"{endpoint}: not sent: {reason}")


class TransportError(FlyApiError):
    """No answer at all: connection refused or reset, or our own timeout."""

    status = 0


_BY_STATUS: dict[int, type[FlyApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    408: RequestTimeout,
    409: Conflict,
    412: PreconditionFailed,
    422: Unprocessable,
    429: RateLimited,
}


def error_for(
    endpoint: str, status: int, message: str, request_id: str, *, capacity: bool = False
) -> FlyApiError:
    """The typed error for an answer, told apart by status and by what Fly says in the body."""
    cls: type[FlyApiError]
    if status == 409 and "lease currently held" in message:
        cls = LeaseHeld
    elif status == 409 and "current version" in message:
        cls = VersionConflict
    elif capacity or ("insufficient" in message and "resource" in message):
        cls = InsufficientCapacity
    elif status >= 500:
        cls = ServerError
    else:
        cls = _BY_STATUS.get(status, FlyApiError)
    return cls(endpoint, message, status=status, request_id=request_id)
