"""Settings: defaults, validation, and one clear line for a bad value (never a traceback, never a password)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import cli_env, run_cli

from pgprojector import db
from pgprojector.cli import build_parser
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


def test_an_env_file_line_with_no_metrics_port_is_off_and_choices_take_any_case(monkeypatch):
    monkeypatch.setenv("PGPROJECTOR_METRICS_PORT", "")  # `PGPROJECTOR_METRICS_PORT=` in an env file
    assert load_settings().metrics_port is None
    monkeypatch.setenv("PGPROJECTOR_ON_ERROR", "PARK")
    assert load_settings().on_error == "park"
    args = build_parser().parse_args(["run", "--on-error", "PARK", "--log-level", "Debug"])
    assert (args.on_error, args.log_level) == ("park", "debug")


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


def test_a_misspelt_variable_is_named_not_silently_ignored():
    result = run_cli("status", dsn="postgresql://u@127.0.0.1:1/db", batchsize="10", log_format="json", timeout=60)
    warnings = [json.loads(line) for line in result.stderr.splitlines() if '"unknown_setting"' in line]
    assert [w["variable"] for w in warnings] == ["PGPROJECTOR_BATCHSIZE"]
    assert "unknown_setting" not in run_cli("status", dsn="postgresql://u@127.0.0.1:1/db", batch_size="10").stderr


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


@pytest.mark.parametrize(("given", "says"), [
    ("host=127.0.0.1 user=postgres password=Sekr1tPW dbname=x", "must be a URL"),  # libpq's keyword form
    ("mysql://admin:Sekr1tPW@127.0.0.1/x", "must be a URL"),
    ("postgresql://admin:Sekr1tPW@127.0.0.1:abc/x", "port"),
    ("postgresql://admin:Sekr1tPW@127.0.0.1:99999/x", "port"),
    ("postgresql://admin:Sekr1tPW/x", "port"),  # @host forgotten: the password reads as the port
    ("postgresql://admin:Sekr1tPW#more@127.0.0.1/x", "port"),  # an unencoded # ends the address there
    ("postgresql://admin:12/Sekr1tPW@127.0.0.1:5432/x", "percent-encode"),  # 12 read as the port: printed whole
    ("postgresql://admin:12#Se/kr1tPW@127.0.0.1:5432/x", "percent-encode"),
    ("postgresql://admin@127.0.0.1/x?sslmode=bogus&password=Sekr1tPW", "sslmode"),  # refused by asyncpg
    ("  ", "empty"),
])
@pytest.mark.parametrize("command", ["status", "run"])
def test_a_malformed_dsn_is_a_usage_error_that_never_shows_the_password(command, given, says):
    """Once a traceback and exit 1 (a ValueError or OverflowError from asyncpg's parser, with the
    password in it), the keyword form's password in the message, or, for `run`, a retry for ever."""
    result = run_cli(command, dsn=given, timeout=60)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "PGPROJECTOR_DSN" in result.stderr
    assert "Sekr1tPW" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("given", ["POSTGRESQL://admin@127.0.0.1:1/x", " postgresql://admin@127.0.0.1:1/x",
                                   "postgresql://admin@[::1]:1,127.0.0.1:1/x", "postgres:///x?host=/nonexistent",
                                   "postgresql://admin@127.0.0.1:1/x?application_name=a@b",
                                   "postgresql://127.0.0.1:1/team@corp"])  # a database name with an @
def test_every_url_asyncpg_takes_is_taken(given):
    result = run_cli("status", dsn=given, timeout=60)
    assert result.returncode == 1 and "cannot connect" in result.stderr, result.stderr


def test_redaction_knows_every_form_of_password():
    for dsn, password in [("postgresql://u:Sekr1tPW@h/db", "Sekr1tPW"),
                          ("postgresql://u:ab@Sekr1tPW@h/db", "ab@Sekr1tPW"),  # an @ not percent-encoded
                          ("postgresql://u@h/db?sslmode=disable&password=Sekr1tPW", "Sekr1tPW"),
                          ("host=h password=Sekr1tPW dbname=db", "Sekr1tPW"),
                          ("host=h password='Sekr1t PW' dbname=db", "Sekr1t PW"),
                          ("postgresql://admin:12?Sekr1tPW=1@127.0.0.1:1/x", "12?Sekr1tPW=1")]:  # an unencoded ?
        assert "Sekr1t" not in db.redact_dsn(dsn)
        assert "Sekr1t" not in db.redact(f"failed: {password} (in {dsn})", dsn)


@pytest.mark.parametrize(("source", "says"), [
    ("x = 1 / 0\n", r"importing failing_module_\w+ raised ZeroDivisionError: division by zero \(.*failing_module_\w+\.py, line 1\)"),
    ("def broken(:\n", r"importing failing_module_\w+ raised SyntaxError: .*line 1"),
])
def test_a_projection_module_that_fails_to_import_is_one_clear_line(tmp_path, monkeypatch, source, says):
    """A user's module that raises as it is imported: once a traceback and exit 1."""
    from pgprojector.errors import ConfigError
    from pgprojector.projection import load_projections

    name = f"failing_module_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"PGPROJECTOR_PROJECTIONS: cannot load '{name}:projection': {says}"):
        load_projections([f"{name}:projection"])
    env = {**cli_env("postgresql://u@127.0.0.1:1/db", projections=f"{name}:projection"), "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "pgprojector", "migrate"], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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


@pytest.mark.parametrize("command", [["status"], ["events"], ["events", "--follow"], ["dead-letters"], ["health"],
                                     ["resume", "orders"]])
def test_every_command_on_an_unmigrated_database_is_the_same_configuration_error(empty_dsn, command):
    """`run` and `rebuild` said so with exit 2; the others said `relation ... does not exist` and exit 1."""
    result = run_cli(*command, dsn=empty_dsn, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "run `pgprojector migrate` first" in result.stderr


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
    # demo runs its own server and daemon: it offers (and takes) only the log's flags
    demo = run_cli("demo", "--help")
    assert "--log-level" in demo.stdout and "--batch-size" not in demo.stdout
    refused = run_cli("demo", "--batch-size", "5")
    assert refused.returncode == 2 and "unrecognized arguments: --batch-size 5" in refused.stderr


def test_libraries_log_records_are_json_lines_too():
    """asyncpg logs through the standard library ("Failed to restore the pool connection floor",
    a traceback): plain text lines among the JSON ones, 218 of them in a one-minute outage."""
    script = ("import logging\nfrom pgprojector.logging import configure_logging\n"
              "configure_logging('info', 'json')\n"
              "try:\n    1 / 0\nexcept ZeroDivisionError:\n"
              "    logging.getLogger('asyncpg.pool').warning('Failed to restore the pool connection floor', exc_info=True)\n"
              "logging.getLogger('asyncpg').info('not shown: below warning')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    [line] = result.stderr.splitlines()
    record = json.loads(line)
    assert record["event"] == "Failed to restore the pool connection floor" and record["level"] == "warning"
    assert "ZeroDivisionError" in record["exception"]
