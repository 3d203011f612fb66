"""What the probes and the scrapes share: a session with fresh connections, whole-body reads with a cap,
and plain words for what went wrong."""

from __future__ import annotations

import aiohttp


class BodyTooLargeError(Exception):
    pass


def new_session() -> aiohttp.ClientSession:
    """Fresh connections each time: a kept-alive one would hide a machine that stopped accepting new ones."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0, ttl_dns_cache=60))


class LazySession:
    """The session of one reader (probes, scrapes, traffic), made when first needed, inside the running
    loop, and made again if it was closed."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def read_body(response: aiohttp.ClientResponse, cap: int, *, truncate: bool = False) -> bytes:
    """The whole body, however many pieces it comes in; past `cap` bytes an error (or cut, if `truncate`)."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body.extend(chunk)
        if len(body) > cap:
            if truncate:
                return bytes(body[:cap])
            raise BodyTooLargeError(f"body larger than {cap} bytes")
    return bytes(body)


def describe(exc: BaseException, timeout: float | None = None) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"cannot connect within {timeout:g}s" if timeout else "cannot connect in time"
    if isinstance(exc, TimeoutError):
        return f"timeout after {timeout:g}s" if timeout else "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror if exc.os_error else exc}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected before answering"
    if isinstance(exc, BodyTooLargeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
