"""Settings: defaults, validation, and one clear line for a bad value (never a traceback, never a password)."""

from __future__ import annotations

import pytest
from helpers import run_cli

from pgprojector.errors import ConfigError
from pgprojector.migrations import latest_version
from pgprojector.settings import Settings, load_settings


def test_defaults(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("PGPROJECTOR_"):
            monkeypatch.delenv(key)
    settings = load_settings()
    assert settings.channel == "events"
    assert settings.projection_refs == ["orders", "dashboard", "analytics"]
    assert settings.on_error == "halt" and settings.log_level == "info"
    assert 0 < settings.poll_interval <= 5 and settings.batch_size > 0 and settings.max_attempts > 0
    with pytest.raises(ConfigError, match="PGPROJECTOR_DSN"):
        settings.require_dsn()


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("PGPROJECTOR_BATCH_SIZE", "10")
    assert load_settings().batch_size == 10
    assert load_settings(batch_size=20).batch_size == 20


@pytest.mark.parametrize(("variable", "value"), [
    ("CHANNEL", "events; DROP TABLE events"),
    ("CHANNEL", "1abc"),
    ("BATCH_SIZE", "0"),
    ("BATCH_SIZE", "lots"),
    ("POLL_INTERVAL", "10"),
    ("ON_ERROR", "ignore"),
    ("MAX_ATTEMPTS", "0"),
    ("LOG_FORMAT", "xml"),
    ("LOG_LEVEL", "loud"),
    ("PROJECTIONS", "orders,not a path"),
])
def test_bad_value_is_one_clear_line_naming_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(f"PGPROJECTOR_{variable}", value)
    with pytest.raises(ConfigError, match=f"PGPROJECTOR_{variable}"):
        load_settings()
    result = run_cli("status", dsn="postgresql://u@127.0.0.1:1/db", **{variable.lower(): value})
    assert result.returncode == 2
    assert f"PGPROJECTOR_{variable}" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_dsn_names_the_variable():
    for command in ("migrate", "status", "run", "dead-letters"):
        result = run_cli(command)
        assert result.returncode == 2, (command, result.stderr)
        assert "PGPROJECTOR_DSN" in result.stderr and "Traceback" not in result.stderr


def test_dead_database_is_a_clear_error_without_the_password():
    result = run_cli("status", dsn="postgresql://admin:s3cretpw@127.0.0.1:1/nowhere", timeout=60)
    assert result.returncode == 1
    assert "cannot connect" in result.stderr and "127.0.0.1:1" in result.stderr
    assert "s3cretpw" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_unknown_projection_is_a_clear_error(dsn):
    result = run_cli("migrate", dsn=dsn, projections="orders,nosuch")
    assert result.returncode == 2 and "nosuch" in result.stderr


def test_run_on_an_unmigrated_database_is_a_configuration_error(empty_dsn):
    # Found inside the daemon's task group, where it once left wrapped in an ExceptionGroup: exit 1,
    # which systemd restarts every few seconds, and a traceback.
    result = run_cli("run", dsn=empty_dsn, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "pgprojector: the database schema is at version 0, this pgprojector needs "
        f"{latest_version()}: run `pgprojector migrate` first")


def test_help_names_the_environment_variables():
    result = run_cli("run", "--help")
    assert result.returncode == 0
    for variable in ("PGPROJECTOR_DSN", "PGPROJECTOR_BATCH_SIZE", "PGPROJECTOR_ON_ERROR", "PGPROJECTOR_PROJECTIONS"):
        assert variable in result.stdout
    # The defaults it states are the settings' own (it once said 5000 after the default changed).
    text = " ".join(result.stdout.split())
    for name in ("batch_size", "poll_interval", "max_attempts", "channel", "on_error", "log_level"):
        default = Settings.model_fields[name].default
        assert f"PGPROJECTOR_{name.upper()}, default {default}" in text, name
    assert run_cli("--help").returncode == 0
    assert run_cli("no-such-command").returncode == 2
