"""The daemon's housekeeping: decisions older than FLYWATCH_DECISION_RETENTION leave the state store (a record
per region per tick would otherwise grow without end), on the real SQLite store and an injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.app import Daemon
from daemon.clock import ManualClock
from daemon.config import load_policy
from daemon.reconciler import DECISIONS
from daemon.settings import Settings
from daemon.store import open_store

DAY = 86400.0
POLICY = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"


def daemon_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, retention: str) -> Daemon:
    monkeypatch.setenv("FLYWATCH_STATE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    monkeypatch.setenv("FLYWATCH_DECISION_RETENTION", retention)
    daemon = Daemon(Settings(), clock=ManualClock())
    daemon.store = open_store(daemon.settings.state_url)
    return daemon


async def test_decisions_older_than_the_retention_are_removed_and_the_rest_stay(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    daemon = daemon_with(monkeypatch, tmp_path, "2d")
    assert daemon.store is not None
    now = daemon.clock.now()
    for age_days in (5, 3, 2.5, 1.5, 0.1):
        await daemon.store.append(DECISIONS, {"age": age_days}, at=now - age_days * DAY, key="shop")
    await daemon.store.append("release_history", {"old": True}, at=now - 30 * DAY, key="shop")
    assert await daemon.housekeep() == 3
    assert [e.record["age"] for e in await daemon.store.read(DECISIONS)] == [0.1, 1.5]
    assert len(await daemon.store.read("release_history")) == 1  # only decisions expire
    assert await daemon.housekeep() == 0
    await daemon.store.close()


async def test_a_retention_of_zero_keeps_every_decision_and_schedules_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    daemon = daemon_with(monkeypatch, tmp_path, "0")
    assert daemon.store is not None
    await daemon.store.append(DECISIONS, {"age": 400}, at=daemon.clock.now() - 400 * DAY, key="shop")
    assert await daemon.housekeep() == 0
    assert len(await daemon.store.read(DECISIONS)) == 1
    daemon.loaded = load_policy(POLICY)
    daemon._schedule()
    assert "housekeeping" not in daemon._scheduler.job_ids()
    monkeypatch.setattr(daemon.settings, "decision_retention", DAY)
    daemon._schedule()
    assert "housekeeping" in daemon._scheduler.job_ids()
    await daemon.store.close()


async def test_a_store_that_fails_is_a_warning_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = daemon_with(monkeypatch, tmp_path, "1d")
    assert daemon.store is not None
    await daemon.store.close()  # every call now raises StoreError
    assert await daemon.housekeep() == 0
    assert "could not remove the old decisions" in caplog.text


@pytest.mark.parametrize(("value", "seconds"), [("14d", 14 * DAY), ("36h", 36 * 3600.0), ("600", 600.0)])
def test_the_retention_is_a_duration_or_seconds(
    monkeypatch: pytest.MonkeyPatch, value: str, seconds: float
) -> None:
    monkeypatch.setenv("FLYWATCH_DECISION_RETENTION", value)
    assert Settings().decision_retention == seconds


@pytest.mark.parametrize("value", ["-1", "two weeks", "inf", "nan"])
def test_a_bad_retention_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FLYWATCH_DECISION_RETENTION", value)
    with pytest.raises(ValueError, match="decision_retention"):
        Settings()
