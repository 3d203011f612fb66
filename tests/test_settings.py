"""Settings from the environment."""

from __future__ import annotations

import pytest

from daemon.settings import Settings


def test_defaults_outside_fly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside Fly the public API URL is the default, dry run is off, and no token is set."""
    monkeypatch.delenv("FLY_ALLOC_ID", raising=False)
    monkeypatch.delenv("FLY_API_TOKEN", raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.machines_api_url == "https://api.machines.dev"
    assert settings.dry_run is False
    assert settings.fly_api_token is None


def test_inside_fly_the_internal_api_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Fly machine (FLY_ALLOC_ID set) the default is http://_api.internal:4280."""
    monkeypatch.setenv("FLY_ALLOC_ID", "abc")
    assert Settings(_env_file=None).machines_api_url == "http://_api.internal:4280"  # type: ignore[call-arg]


def test_environment_overrides_and_the_token_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLY_API_TOKEN, FLYWATCH_MACHINES_API_URL and FLYWATCH_DRY_RUN are read; the token never prints."""
    monkeypatch.setenv("FLY_API_TOKEN", "FlyV1 supersecret")
    monkeypatch.setenv("FLYWATCH_MACHINES_API_URL", "http://127.0.0.1:4280")
    monkeypatch.setenv("FLYWATCH_DRY_RUN", "true")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.fly_api_token is not None
    assert settings.fly_api_token.get_secret_value() == "FlyV1 supersecret"
    assert settings.machines_api_url == "http://127.0.0.1:4280"
    assert settings.dry_run is True
    assert "supersecret" not in repr(settings)
    assert "supersecret" not in str(settings.model_dump())


def test_prometheus_url_defaults_to_fly_managed_prometheus(monkeypatch: pytest.MonkeyPatch) -> None:
    """With FLYWATCH_ORG, PromQL goes to Fly's managed Prometheus; FLYWATCH_PROMETHEUS_URL overrides it."""
    monkeypatch.delenv("FLYWATCH_PROMETHEUS_URL", raising=False)
    monkeypatch.delenv("FLYWATCH_ORG", raising=False)
    assert Settings(_env_file=None).effective_prometheus_url is None  # type: ignore[call-arg]
    monkeypatch.setenv("FLYWATCH_ORG", "acme")
    assert Settings(_env_file=None).effective_prometheus_url == "https://api.fly.io/prometheus/acme"  # type: ignore[call-arg]
    monkeypatch.setenv("FLYWATCH_PROMETHEUS_URL", "http://prom:9090")
    assert Settings(_env_file=None).effective_prometheus_url == "http://prom:9090"  # type: ignore[call-arg]


def test_the_fly_token_goes_only_to_fly_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fly's managed Prometheus gets FLY_API_TOKEN; any other Prometheus only FLYWATCH_PROMETHEUS_TOKEN."""
    monkeypatch.setenv("FLY_API_TOKEN", "fly-secret")
    monkeypatch.setenv("FLYWATCH_ORG", "acme")
    monkeypatch.delenv("FLYWATCH_PROMETHEUS_URL", raising=False)
    monkeypatch.delenv("FLYWATCH_PROMETHEUS_TOKEN", raising=False)
    assert Settings(_env_file=None).prometheus_credential() == "fly-secret"  # type: ignore[call-arg]
    monkeypatch.setenv("FLYWATCH_PROMETHEUS_URL", "https://prom.example.com")
    assert Settings(_env_file=None).prometheus_credential() is None  # type: ignore[call-arg]
    monkeypatch.setenv("FLYWATCH_PROMETHEUS_TOKEN", "own")
    assert Settings(_env_file=None).prometheus_credential() == "own"  # type: ignore[call-arg]
