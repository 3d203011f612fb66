"""Fixtures for the telemetry tests: a fresh book of registered secrets, and logging put back as it was."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from daemon.telemetry import logging as telemetry_logging

SECRET = "FlyV1 fm2_0f3c9a7e51"  # a test value, registered in every test
WEBHOOK = "https://hooks.example.com/services/T000/B000/xoxb-9d2e41"


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no registered secret, and registers its own."""
    monkeypatch.setattr(telemetry_logging, "_BOOK", telemetry_logging._SecretBook())
    telemetry_logging.register_secret(SECRET)
    telemetry_logging.register_secret(WEBHOOK)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo configure_logging: the root logger's handlers and level, and structlog's configuration."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()
