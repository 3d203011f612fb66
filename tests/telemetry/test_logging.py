"""Logging: JSON lines or console text, stdlib logging in the same format, and no secret ever written."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from typing import Any

import pytest
import structlog

from daemon.telemetry import logging as telemetry_logging
from daemon.telemetry.logging import REDACTED, configure_logging, redact, register_secret
from tests.telemetry.conftest import SECRET, WEBHOOK

pytestmark = pytest.mark.usefixtures("restore_logging")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def configured(fmt: str, level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(fmt, level, stream=stream)
    return stream


def test_json_lines_carry_event_level_timestamp_and_logger() -> None:
    """A structlog call is one JSON line: event, level, ISO UTC timestamp, logger name and its keys."""
    stream = configured("json")
    structlog.get_logger("daemon.reconciler").info("tick done", app="shop", regions=3)
    (line,) = lines_of(stream)
    assert line["event"] == "tick done"
    assert line["level"] == "info"
    assert line["logger"] == "daemon.reconciler"
    assert line["app"] == "shop"
    assert line["regions"] == 3
    assert line["timestamp"].endswith("Z")
    assert datetime.fromisoformat(line["timestamp"]).utcoffset().total_seconds() == 0
    assert list(line)[:4] == ["timestamp", "level", "logger", "event"]


def test_stdlib_logging_comes_out_in_the_same_json_format() -> None:
    """A logging.getLogger() record (aiohttp, httpx, the daemon's modules) becomes the same JSON line, with
    its %-arguments applied and its `extra` fields kept."""
    stream = configured("json")
    logging.getLogger("aiohttp.server").warning("slow answer: %.1fs", 2.5, extra={"path": "/status"})
    (line,) = lines_of(stream)
    assert line["event"] == "slow answer: 2.5s"
    assert line["level"] == "warning"
    assert line["logger"] == "aiohttp.server"
    assert line["path"] == "/status"
    assert "timestamp" in line


def test_the_level_filters_structlog_and_stdlib_alike() -> None:
    """At level warning, info lines from either API are dropped and warnings are kept."""
    stream = configured("json", "warning")
    structlog.get_logger("a").info("quiet")
    logging.getLogger("b").info("quiet too")
    structlog.get_logger("a").warning("loud")
    logging.getLogger("b").error("louder")
    assert [line["event"] for line in lines_of(stream)] == ["loud", "louder"]


def test_console_format_is_readable_text() -> None:
    """The console format is one human-readable line: timestamp, level, event, logger and key=value pairs."""
    stream = configured("console")
    structlog.get_logger("daemon.reconciler").info("tick done", app="shop")
    logging.getLogger("uvicorn").info("HTTP Request: GET /v1/apps")  # any stdlib logger, same format
    first, second = stream.getvalue().splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)
    assert "info" in first
    assert "tick done" in first
    assert "app=shop" in first
    assert "daemon.reconciler" in first
    assert first[:4].isdigit()  # the ISO timestamp leads the line
    assert "\x1b[" not in first  # no colours when the stream is not a terminal
    assert "HTTP Request: GET /v1/apps" in second
    assert "uvicorn" in second


@pytest.mark.parametrize(("stream", "is_json"), [(io.StringIO(), True), (Tty(), False)])
def test_auto_is_console_on_a_terminal_and_json_elsewhere(stream: io.StringIO, is_json: bool) -> None:
    """fmt=auto renders JSON to a pipe or file and console text to a terminal."""
    configure_logging("auto", stream=stream)
    structlog.get_logger("x").info("hello")
    text = stream.getvalue().strip()
    assert text.startswith("{") is is_json


@pytest.mark.parametrize(("fmt", "level"), [("yaml", "info"), ("json", "verbose"), ("", "info")])
def test_unknown_format_or_level_is_refused(fmt: str, level: str) -> None:
    """A format or level that does not exist is a ValueError naming the choices, not a silent default."""
    with pytest.raises(ValueError, match="must be one of"):
        configure_logging(fmt, level, stream=io.StringIO())


def test_configuring_again_replaces_the_handler() -> None:
    """A second configure_logging replaces the first: each event is written once, to the new stream."""
    old = configured("json")
    new = configured("json")
    structlog.get_logger("x").info("once")
    assert old.getvalue() == ""
    assert len(lines_of(new)) == 1


def test_secret_named_keys_are_redacted_but_nonces_are_not() -> None:
    """Values under token, authorization, password, secret and api key names are masked; a nonce is kept."""
    stream = configured("json")
    structlog.get_logger("x").info(
        "call",
        token="t-1",
        Authorization="Bearer t-2",
        db_password="p",
        client_secret="s",
        API_KEY="k",
        **{"api-key": "k2", "apikey": "k3"},
        nonce="lease-nonce",
        headers={"authorization": "Bearer t-3", "accept": "json"},
    )
    (line,) = lines_of(stream)
    for key in ("token", "Authorization", "db_password", "client_secret", "API_KEY", "api-key", "apikey"):
        assert line[key] == REDACTED, key
    assert line["nonce"] == "lease-nonce"
    assert line["headers"] == {"authorization": REDACTED, "accept": "json"}


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_registered_secret_never_appears_in_structlog_or_stdlib_output(fmt: str) -> None:
    """A registered secret is cut out of events, values, nested values, %-arguments, extras and reprs."""
    stream = configured(fmt)
    log = structlog.get_logger("x")
    event = f"calling with {SECRET}"
    log.info(event, url=WEBHOOK, nested={"list": [f"a {SECRET} b"]})
    log.info("positional %s", SECRET)
    log.info("an object", obj=type("Opaque", (), {"__repr__": lambda _self: f"<Opaque {SECRET}>"})())
    logging.getLogger("httpx").info('HTTP Request: POST %s "HTTP/1.1 200 OK"', WEBHOOK)
    logging.getLogger("daemon.fly.client").warning("bad token", extra={"sent": SECRET})
    text = stream.getvalue()
    assert SECRET not in text
    assert WEBHOOK not in text
    assert "/services/T000/B000/xoxb-9d2e41" not in text
    assert text.count(REDACTED) >= 6


def test_a_webhook_logged_with_a_normalised_host_is_still_redacted() -> None:
    """The secret path of a registered webhook URL is cut out even where the URL was rewritten."""
    stream = configured("json")
    structlog.get_logger("x").info(
        "posted", url=WEBHOOK.replace("hooks.example.com", "HOOKS.example.com:443")
    )
    assert "xoxb-9d2e41" not in stream.getvalue()


def test_a_secret_escaped_by_the_json_renderer_is_still_redacted() -> None:
    """A secret with quotes or non-ASCII characters, inside an object's repr, is cut out of the JSON."""
    odd = 'pa"ss\\wörd-77'
    register_secret(odd)
    stream = configured("json")
    structlog.get_logger("x").info("obj", obj=type("Opaque", (), {"__repr__": lambda _self: odd})())
    text = stream.getvalue()
    assert json.dumps(odd)[1:-1] not in text
    assert lines_of(stream)[0]["obj"] == REDACTED


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_exception_tracebacks_are_logged_without_the_secret(fmt: str) -> None:
    """log.exception writes the traceback, with a secret from the exception's message cut out of it."""
    stream = configured(fmt)

    def fail() -> None:
        raise RuntimeError(f"401 from Fly with token {SECRET}")

    for log in (structlog.get_logger("x"), logging.getLogger("y")):
        try:
            fail()
        except RuntimeError:
            log.exception("call failed")
    text = stream.getvalue()
    assert text.count("Traceback (most recent call last)") == 2
    assert text.count(f"RuntimeError: 401 from Fly with token {REDACTED}") == 2
    assert SECRET not in text


def test_blank_secrets_are_not_registered() -> None:
    """Registering None or a blank string changes nothing (it would otherwise redact every string)."""
    register_secret(None)
    register_secret("   ")
    assert redact("plain text") == "plain text"


def test_redact_walks_nested_values_and_keeps_the_rest() -> None:
    """redact() masks secret keys and registered secrets at any depth and leaves other values alone."""
    data = {
        "api_key": "k",
        "token_set": True,
        "password": None,
        "apps": [{"url": WEBHOOK, "name": "shop", "count": 3, "pair": (SECRET, 1)}],
        SECRET: "key itself",
        7: "int key",
    }
    assert redact(data) == {
        "api_key": REDACTED,
        "token_set": True,
        "password": None,
        "apps": [{"url": REDACTED, "name": "shop", "count": 3, "pair": (REDACTED, 1)}],
        REDACTED: "key itself",
        7: "int key",
    }
    assert data["api_key"] == "k"  # a copy: the input is untouched


def test_the_default_stream_is_stderr_at_call_time(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a stream, lines go to whatever sys.stderr is when configure_logging is called."""
    configure_logging("json")
    structlog.get_logger("x").info("to stderr")
    assert json.loads(capsys.readouterr().err)["event"] == "to stderr"


def test_a_line_that_fails_to_render_leaks_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When rendering fails, the handler reports the error's type, not the raw (unredacted) record."""

    class Unprintable:
        def __repr__(self) -> str:
            raise ValueError(SECRET)

    stream = configured("json")
    root = logging.getLogger()  # only our handler: pytest's own capture handler would fail first
    monkeypatch.setattr(
        root, "handlers", [h for h in root.handlers if isinstance(h, telemetry_logging._Handler)]
    )
    event = f"about to fail with {SECRET}"
    structlog.get_logger("daemon.x").info(event, obj=Unprintable())
    written = stream.getvalue() + capsys.readouterr().err
    assert SECRET not in written
    assert "logging error: ValueError in a line from daemon.x" in written


def test_chatty_libraries_only_speak_up_for_warnings() -> None:
    """httpx's per-request and APScheduler's per-run info lines are dropped; their warnings are kept."""
    stream = configured("json")
    logging.getLogger("httpx").info("HTTP Request: GET /v1/apps")
    logging.getLogger("apscheduler.scheduler").info("Running job")
    logging.getLogger("httpx").warning("connection pool full")
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["connection pool full"]
