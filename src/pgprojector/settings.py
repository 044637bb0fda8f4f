"""Configuration: one pydantic-settings class, read from PGPROJECTOR_* variables and CLI flags."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pgprojector.db import dsn_problem
from pgprojector.errors import ConfigError

BUILTIN_PROJECTIONS = ("orders", "dashboard", "analytics")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PROJECTION_REF = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$")


def _default_log_format() -> Literal["json", "console"]:
    return "console" if sys.stderr.isatty() else "json"


class Settings(BaseSettings):
    """Every setting is PGPROJECTOR_<NAME> in the environment and --<name> on the command line."""

    model_config = SettingsConfigDict(env_prefix="PGPROJECTOR_", extra="ignore", frozen=True)

    dsn: SecretStr | None = Field(default=None, description="PostgreSQL URL, postgresql://user@host:port/db")
    channel: str = Field(default="events", description="NOTIFY channel (a plain identifier)")
    batch_size: int = Field(default=20_000, ge=1, le=100_000, description="most events applied in one transaction")
    poll_interval: float = Field(
        default=1.0, gt=0, le=5, description="seconds between catch-up reads when no notification comes"
    )
    projections: str = Field(
        default=",".join(BUILTIN_PROJECTIONS),
        description="comma-separated built-in names and/or module:attribute paths",
    )
    on_error: Literal["halt", "park"] = Field(default="halt", description="what to do with an event that keeps failing")
    max_attempts: int = Field(default=5, ge=1, le=100, description="tries of a failing event before halt/park")
    log_format: Literal["json", "console"] = Field(default_factory=_default_log_format, description="log output")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="log level")
    stop_timeout: float = Field(default=20.0, gt=0, le=3600,
                                description="seconds the batch in hand gets to commit after SIGTERM/SIGINT")
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="Prometheus endpoint port (off if unset)")

    @field_validator("dsn")
    @classmethod
    def _dsn_is_url(cls, value: SecretStr | None) -> SecretStr | None:
        problem = None if value is None else dsn_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("channel")
    @classmethod
    def _channel_is_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("must be a plain identifier (letters, digits, underscore; not starting with a digit)")
        return value

    @field_validator("projections")
    @classmethod
    def _projections_are_references(cls, value: str) -> str:
        names = [part.strip() for part in value.split(",") if part.strip()]
        if not names:
            raise ValueError("names no projection")
        for name in names:
            if not _PROJECTION_REF.match(name):
                raise ValueError(f"{name!r} is neither a built-in name nor a module:attribute path")
        return ",".join(names)

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_port_is_off(cls, value: object) -> object:
        # `PGPROJECTOR_METRICS_PORT=` in an env file (systemd's EnvironmentFile, docker's --env-file): off.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_format", "log_level", "on_error", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def projection_refs(self) -> list[str]:
        return self.projections.split(",")

    def require_dsn(self) -> str:
        if self.dsn is None or not self.dsn.get_secret_value():
            raise ConfigError("PGPROJECTOR_DSN is not set: give the PostgreSQL URL, e.g. postgresql://user@host:5432/db")
        return self.dsn.get_secret_value()


# PGPROJECTOR_* variables that are not settings of the CLI: the embedded server's binaries, and the
# test suite's and the benchmark's own.
OTHER_VARIABLES = frozenset({"PGPROJECTOR_PG_BINDIR", "PGPROJECTOR_TEST_DSN", "PGPROJECTOR_TEST_SEED",
                             "PGPROJECTOR_BENCH_DSN"})


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """PGPROJECTOR_* variables that nothing reads: a misspelt setting (PGPROJECTOR_BATCHSIZE) is
    otherwise silently ignored, and its default used."""
    known = {f"PGPROJECTOR_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    return sorted(name for name in environ if name.upper().startswith("PGPROJECTOR_") and name.upper() not in known)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with CLI flags (non-None overrides) on top; errors become ConfigError."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            value = "<hidden>" if field == "dsn" else repr(error.get("input"))
            problems.append(f"PGPROJECTOR_{field.upper()}={value}: {error['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid setting: " + "; ".join(problems)) from None
