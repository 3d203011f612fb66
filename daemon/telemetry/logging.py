"""Logging: structlog and the standard library's logging through one renderer, with secrets kept out.

flywatch holds a token that can change production (FLY_API_TOKEN) and webhook URLs that are credentials
in themselves. A log line is read by more people than the token should be, so every line is scrubbed
before it is written:

- a value under a key that names a secret (token, authorization, password, secret, api_key, ...) becomes
  "[redacted]", at any depth of nested dicts and lists;
- a registered secret (`register_secret`) is cut out of every string: the event, any value, the rendered
  traceback of `log.exception`, and finally the rendered line itself (which catches a secret inside the
  repr of an object that was logged as is).

`redact(obj)` applies the same two rules to any JSON-like value; the HTTP server passes its answers
through it. Records from `logging.getLogger(...)` (the daemon's own modules, aiohttp, httpx) go through
the same processors and renderer as structlog's, so the output is one format, JSON lines or console.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any, Final
from urllib.parse import urlsplit

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED: Final = "[redacted]"
SECRET_KEY: Final = re.compile(r"token|authorization|password|secret|api[_-]?key", re.IGNORECASE)
FORMATS: Final = ("json", "console", "auto")
LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
MIN_URL_PART = 8  # the path of a webhook URL is registered too, unless it is too short to be the secret


class _SecretBook:
    """The registered secrets, longest first (so a secret that contains another is cut out whole).

    The tuple is replaced, never mutated: a thread that is writing a log line while another registers a
    secret reads one consistent tuple.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.secrets: tuple[str, ...] = ()

    def add(self, *values: str) -> None:
        with self._lock:
            known = set(self.secrets) | {value for value in values if value}
            self.secrets = tuple(sorted(known, key=len, reverse=True))

    def scrub(self, text: str, *, rendered: bool = False) -> str:
        """`text` without any registered secret. A `rendered` line may hold a secret escaped by the
        renderer (JSON's \\" and \\uXXXX, repr's \\' and \\\\), so those spellings are cut out too."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
            if rendered:
                for spelling in (json.dumps(secret)[1:-1], repr(secret)[1:-1]):
                    if spelling != secret and spelling in text:
                        text = text.replace(spelling, REDACTED)
        return text


_BOOK = _SecretBook()


def register_secret(value: str | None) -> None:
    """Never let `value` appear in a log line or an HTTP answer. None and blank values are ignored.

    For a URL (a webhook), its path and query are registered as well when they are long enough to be
    the secret part: a client may log the URL normalised (host lower-cased, default port dropped).
    """
    if value is None or not value.strip():
        return
    value = value.strip()
    parts = [value]
    if "://" in value:
        url = urlsplit(value)
        tail = url.path + (f"?{url.query}" if url.query else "")
        if len(tail) >= MIN_URL_PART:
            parts.append(tail)
    _BOOK.add(*parts)


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and SECRET_KEY.search(key) is not None


def redact(obj: Any) -> Any:
    """A copy of `obj` with the values of secret-named keys masked and registered secrets cut out of
    every string, through nested mappings, lists and tuples. None and booleans under a secret-named key
    are kept: they say whether a secret is set without showing it."""
    if isinstance(obj, str):
        return _BOOK.scrub(obj)
    if isinstance(obj, Mapping):
        return {
            (_BOOK.scrub(key) if isinstance(key, str) else key): (
                REDACTED
                if _is_secret_key(key) and value is not None and not isinstance(value, bool)
                else redact(value)
            )
            for key, value in obj.items()
        }
    if isinstance(obj, list):
        return [redact(item) for item in obj]
    if isinstance(obj, tuple):
        return tuple(redact(item) for item in obj)
    return obj


def redact_event(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """The structlog processor form of `redact`; it runs after the exception is rendered to text."""
    return dict(redact(event_dict))


def _essentials_first(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Timestamp, level, logger and event lead each JSON line, whatever order they were added in."""
    lead = {
        key: event_dict.pop(key) for key in ("timestamp", "level", "logger", "event") if key in event_dict
    }
    return {**lead, **event_dict}


class _Scrubbed:
    """A renderer whose rendered line is scrubbed once more: the last line of defence."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        line = self._renderer(logger, method_name, event_dict)
        text = line if isinstance(line, str) else str(line)
        return _BOOK.scrub(text, rendered=True)


class _Handler(logging.StreamHandler[IO[str]]):
    """The handler `configure_logging` installs on the root logger (recognised to replace it)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        # logging's own handleError prints the raw record (message and arguments, unredacted) to
        # stderr: a line that fails to render is reported by its logger's name and the error's type only.
        error = sys.exc_info()[1]
        try:
            self.stream.write(f"logging error: {type(error).__name__} in a line from {record.name}\n")
            self.flush()
        except Exception:  # noqa: BLE001, S110 - nowhere left to report to
            pass


def _renderer(fmt: str, stream: IO[str]) -> Processor:
    if fmt == "auto":
        fmt = "console" if _isatty(stream) else "json"
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    colors = _isatty(stream) and "NO_COLOR" not in os.environ
    return structlog.dev.ConsoleRenderer(colors=colors)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def configure_logging(fmt: str, level: str = "info", stream: IO[str] | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (default: the current sys.stderr) in one format.

    `fmt` is "json" (one JSON object per line), "console" (readable key=value lines) or "auto" (console
    on a terminal, else JSON). Every line has an ISO timestamp (UTC), the level and the logger's name.
    Calling it again replaces the previous configuration (and its handler) rather than adding to it.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    out = sys.stderr if stream is None else stream

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    common: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        timestamper,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *common,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger made before a reconfiguration (or by a test's capture) follows the new one.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*common, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # The traceback becomes text before redaction, so a secret in an exception's message (or in a
            # line of source shown in the traceback) is cut out like any other string.
            structlog.processors.format_exc_info,
            redact_event,
            _essentials_first,
            _Scrubbed(_renderer(fmt, out)),
        ],
    )
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    # libraries that narrate every request or job run: their warnings matter, their chatter does not
    for chatty in ("httpx", "apscheduler", "aiohttp.access"):
        logging.getLogger(chatty).setLevel(max(numeric, logging.WARNING))
