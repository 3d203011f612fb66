"""Settings from the environment (FLYWATCH_*, FLY_API_TOKEN) and an optional .env file.

The token is a SecretStr: its repr is masked, so printing or logging the settings never shows it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from daemon.config import parse_duration
from daemon.fly.client import DEFAULT_BASE_URL, INTERNAL_BASE_URL


def _duration(value: Any) -> float:
    """A duration as the policy writes one ("14d", "36h", "90m"), or a number of seconds."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return parse_duration(value)
    return parse_duration(value)


def _default_api_url() -> str:
    """Inside a Fly machine (FLY_ALLOC_ID is set) the API is reached privately at _api.internal."""
    return INTERNAL_BASE_URL if os.environ.get("FLY_ALLOC_ID") else DEFAULT_BASE_URL


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWATCH_", env_file=".env", extra="ignore")

    fly_api_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("FLY_API_TOKEN", "FLYWATCH_FLY_API_TOKEN")
    )
    machines_api_url: str = Field(default_factory=_default_api_url)
    dry_run: bool = False
    config: Path = Path("config/flywatch.yaml")  # FLYWATCH_CONFIG: the policy file
    listen: str = "[::]:9091"  # FLYWATCH_LISTEN: /metrics, /healthz, /readyz, /status, /decisions
    state_url: str = "sqlite:///data/flywatch.db"  # FLYWATCH_STATE_URL
    log_format: Literal["json", "console", "auto"] = "auto"  # FLYWATCH_LOG_FORMAT
    org: str | None = None  # the Fly organization (its managed Prometheus lives under it)
    prometheus_url: str | None = None  # default: Fly's managed Prometheus for `org`
    prometheus_token: SecretStr | None = None  # for a Prometheus of your own; Fly's takes FLY_API_TOKEN
    # several instances on one PostgreSQL state (cluster.py): at most this many seconds from an owner's end
    # to another instance acting on its apps
    takeover: float = Field(default=15.0, ge=2.0, le=600.0)  # FLYWATCH_TAKEOVER
    # FLYWATCH_CLUSTER=true: this instance is one of several, so it refuses to start on any state but
    # PostgreSQL (alone on SQLite, each machine would act on every app)
    cluster: bool = False
    instance: str | None = None  # FLYWATCH_INSTANCE: this instance's name; default the Fly machine's id
    machine_id: str | None = Field(default=None, validation_alias=AliasChoices("FLY_MACHINE_ID"))
    region: str = Field(default="local", validation_alias=AliasChoices("FLYWATCH_REGION", "FLY_REGION"))
    # FLYWATCH_DECISION_RETENTION: how long every decision stays in the state (a record per region per
    # tick: thousands of apps write thousands a second); "0" keeps them for ever
    decision_retention: Annotated[float, BeforeValidator(_duration)] = Field(
        default=14 * 86400.0, ge=0.0, allow_inf_nan=False
    )

    @property
    def effective_prometheus_url(self) -> str | None:
        """FLYWATCH_PROMETHEUS_URL, else https://api.fly.io/prometheus/ORG when FLYWATCH_ORG is set."""
        if self.prometheus_url:
            return self.prometheus_url
        return f"https://api.fly.io/prometheus/{self.org}" if self.org else None

    def prometheus_credential(self) -> str | None:
        """FLYWATCH_PROMETHEUS_TOKEN if set; else the Fly token, but only for Fly's own hosts: a Prometheus
        elsewhere is never handed the token that can change production."""
        if self.prometheus_token is not None:
            return self.prometheus_token.get_secret_value()
        host = urlsplit(self.effective_prometheus_url or "").hostname or ""
        if self.fly_api_token is not None and (host == "fly.io" or host.endswith(".fly.io")):
            return self.fly_api_token.get_secret_value()
        return None
