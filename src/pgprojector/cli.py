"""The `pgprojector` command line. Every setting is a flag and a PGPROJECTOR_* variable."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any

import anyio
import asyncpg
import structlog

from pgprojector import __doc__ as package_doc
from pgprojector import db, ops
from pgprojector.errors import ConfigError
from pgprojector.logging import configure_logging
from pgprojector.settings import Settings, load_settings, unknown_variables
from pgprojector.sqlfiles import queries

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _default(name: str) -> Any:
    """A setting's default, from Settings itself, so that --help cannot drift from it."""
    return Settings.model_fields[name].default


_SETTING_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--dsn", {"help": "PostgreSQL URL [PGPROJECTOR_DSN]"}),
    ("--channel", {"help": f"NOTIFY channel, a plain identifier [PGPROJECTOR_CHANNEL, default {_default('channel')}]"}),
    ("--batch-size", {"type": int, "help": "most events applied in one transaction "
                                           f"[PGPROJECTOR_BATCH_SIZE, default {_default('batch_size')}]"}),
    ("--poll-interval", {"type": float, "help": "seconds between catch-up reads without a notification "
                                                 f"[PGPROJECTOR_POLL_INTERVAL, default {_default('poll_interval')}]"}),
    ("--projections", {"help": "comma-separated built-in names (orders, dashboard, analytics) and/or "
                               "module:attribute paths [PGPROJECTOR_PROJECTIONS, default all three built-ins]"}),
    ("--on-error", {"type": str.lower, "choices": ["halt", "park"], "help": "after max attempts: halt the projection or park the event "
                                                           f"as a dead letter [PGPROJECTOR_ON_ERROR, default "
                                                           f"{_default('on_error')}]"}),
    ("--max-attempts", {"type": int, "help": "tries of a failing event before halt/park "
                                             f"[PGPROJECTOR_MAX_ATTEMPTS, default {_default('max_attempts')}]"}),
    ("--log-format", {"type": str.lower, "choices": ["json", "console"], "help": "log format [PGPROJECTOR_LOG_FORMAT, default json, "
                                                                "console on a terminal]"}),
    ("--log-level", {"type": str.lower, "choices": ["debug", "info", "warning", "error"],
                     "help": f"[PGPROJECTOR_LOG_LEVEL, default {_default('log_level')}]"}),
    ("--stop-timeout", {"type": float, "help": "seconds the batch in hand gets to commit after SIGTERM/SIGINT; then "
                                               "it is rolled back and the daemon exits 1 [PGPROJECTOR_STOP_TIMEOUT, "
                                               f"default {_default('stop_timeout')}]"}),
    ("--metrics-port", {"type": int, "help": "serve Prometheus metrics on this port [PGPROJECTOR_METRICS_PORT, off]"}),
]


class CommandError(Exception):
    """A failure to report on one line and exit 1."""


def _settings_parent(default: object = None, only: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The setting flags (`only` those named), for a command's parser. `default` for a flag not given:
    None, or argparse.SUPPRESS in a nested sub-command, so as not to overwrite one given before it."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (flags override the environment)")
    for flag, options in _SETTING_FLAGS:
        if only is None or flag in only:
            group.add_argument(flag, default=default, **options)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgprojector",
        description=f"{package_doc.strip()} Configure with PGPROJECTOR_* variables or the flags of each command.",
        epilog="Exit codes: 0 success, 1 failure, 2 usage or configuration error.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parent = _settings_parent()

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[parent], help=summary, description=description)

    migrate = command("migrate", "create or upgrade the schema (idempotent)",
                      "Create or upgrade the events table, its rules and triggers, pgprojector's own tables and "
                      "the configured projections' tables. Safe to run again, and from several processes at once.")
    migrate.add_argument("--roles", action="store_true",
                         help="also create/refresh the pgprojector_producer and pgprojector_projector group roles "
                              "and their grants (needs CREATEROLE); see sql/roles.sql")
    command("run", "run the projection daemon",
            "Keep the configured projections up to date with the events table until SIGTERM/SIGINT, which "
            "finish the batch in hand, commit and exit 0.")
    status = command("status", "show each projection's position, lag, state and errors",
                     "Per projection: checkpoint position, lag (events after it), state (running, halted, "
                     "stopped), dead letters and the last error; and any open transaction holding reads back.")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    resume = command("resume", "resume a halted projection",
                     "Set a halted projection running again from its checkpoint (fix the cause first: the "
                     "event it halted at is tried again). With --park, the event it halted at is parked as a "
                     "dead letter instead and the projection goes on after it: for an event whose data can "
                     "never pass.")
    resume.add_argument("name", help="projection name")
    resume.add_argument("--park", action="store_true",
                        help="park the event it halted at (see `dead-letters`) and go on after it")
    ops.register(commands, parent)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # (None for a flag not given, or one the command does not take)
    overrides = {flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_"), None)
                 for flag, _ in _SETTING_FLAGS}
    try:
        settings = load_settings(**overrides)
        configure_logging(settings.log_level, settings.log_format)
        for variable in unknown_variables():
            structlog.get_logger("pgprojector.settings").warning(
                "unknown_setting", variable=variable, hint="not a pgprojector setting (misspelt?): ignored")
        handler = _HANDLERS[args.command]
        return anyio.run(handler, settings, args)
    except ConfigError as exc:
        print(f"pgprojector: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"pgprojector: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


async def _connect(settings: Settings, role: str) -> asyncpg.Connection:
    dsn = settings.require_dsn()
    try:
        return await db.connect(dsn, role=role, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CommandError(
            f"cannot connect to {db.redact_dsn(dsn)}: {db.redact(db.describe_error(exc), dsn)}"
        ) from None


async def _with_connection(settings: Settings, role: str, body: Callable[[asyncpg.Connection], Awaitable[int]]) -> int:
    conn = await _connect(settings, role)
    try:
        return await body(conn)
    except asyncpg.UndefinedTableError as exc:
        # A database `migrate` never ran on (or an older one) is a configuration error, as for `run`.
        from pgprojector.migrations import require_current_schema

        await require_current_schema(conn)
        raise CommandError(f"{exc}: has `pgprojector migrate` been run on this database?") from None
    except asyncpg.PostgresError as exc:
        raise CommandError(db.describe_error(exc)) from None
    finally:
        await conn.close()


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from pgprojector.migrations import apply_roles, migrate
    from pgprojector.projection import load_projections

    projections = load_projections(settings.projection_refs)

    async def body(conn: asyncpg.Connection) -> int:
        applied = await migrate(conn, settings.channel, projections)
        if args.roles:
            await apply_roles(conn, projections)
            print("roles pgprojector_producer and pgprojector_projector are up to date")
        print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ", schema up to date")
              + f"; projections set up: {', '.join(p.name for p in projections)}")
        return EXIT_OK

    return await _with_connection(settings, "migrate", body)


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from pgprojector.daemon import Daemon
    from pgprojector.projection import load_projections

    daemon = Daemon(settings, load_projections(settings.projection_refs))
    try:
        await daemon.run()
    except Exception as exc:
        # The daemon finds some configuration errors inside its task group (the schema not migrated,
        # metrics without prometheus-client): unwrapped, they exit with the usage code, which the
        # service manager does not restart.
        causes = list(_leaves(exc))
        config_error = next((cause for cause in causes if isinstance(cause, ConfigError)), None)
        if config_error is not None:
            raise config_error from None
        dsn = settings.require_dsn()
        # (what failed, not the task group that carried it; the traceback redacted like the message)
        structlog.get_logger("pgprojector.daemon").error(
            "daemon_failed", error=db.redact(db.describe_error(causes[0]), dsn),
            exception=db.redact("".join(traceback.format_exception(exc)), dsn))
        return EXIT_FAILURE
    return EXIT_FAILURE if daemon.stop_forced else EXIT_OK


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, or the exceptions inside it if it is an ExceptionGroup (depth first)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from pgprojector.status import gather_status

    async def body(conn: asyncpg.Connection) -> int:
        report = await gather_status(conn)
        if args.json:
            print(json.dumps(report))
            return EXIT_OK
        print(f"head position: {report['head_position'] if report['head_position'] is not None else '(empty log)'}")
        print(f"{'projection':<20} {'state':<16} {'position':>10} {'lag':>8} {'dead':>5}  last error")
        for p in report["projections"]:
            state = f"{p['state']} (rebuild)" if p["rebuilding"] else p["state"]
            print(f"{p['name']:<20} {state:<16} {p['position']:>10} {p['lag']:>8} {p['dead_letters']:>5}  "
                  f"{p['last_error'] or '-'}")
        for blocker in report["waiting_on"]:
            print(f"waiting on: backend pid {blocker['pid']} ({blocker['application_name'] or '?'}), an open "
                  f"transaction that appended from position {blocker['from_position']}, "
                  f"started {blocker['transaction_started']}")
        return EXIT_OK

    return await _with_connection(settings, "status", body)


async def cmd_resume(settings: Settings, args: argparse.Namespace) -> int:
    async def body(conn: asyncpg.Connection) -> int:
        sql = queries()
        async with conn.transaction(isolation="read_committed"):  # as the daemon's batches, whatever the default
            # The daemon's batches lock this row too: none is half-way while it changes.
            halted = await conn.fetchrow(sql["lock_halted"], args.name)
            if halted is None:
                raise CommandError(f"projection {args.name!r} does not exist or is not halted")
            if args.park:
                letter = await conn.fetchval(sql["park_halted_event"], args.name)
                if letter is None:
                    raise CommandError(f"the event projection {args.name} halted at (position "
                                       f"{halted['halted_at_position']}) is not in the log")
                await conn.execute(sql["save_checkpoint"], args.name, halted["halted_at_position"])
            await conn.execute(sql["resume_projection"], args.name, halted["last_error"] if args.park else None)
        if args.park:
            print(f"projection {args.name} resumed after position {halted['halted_at_position']}, whose event is "
                  f"parked as dead letter #{letter}")
        else:
            print(f"projection {args.name} resumed")
        return EXIT_OK

    return await _with_connection(settings, "resume", body)


_HANDLERS: dict[str, Callable[[Settings, argparse.Namespace], Awaitable[int]]] = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "status": cmd_status,
    "resume": cmd_resume,
    **ops.HANDLERS,
}


if __name__ == "__main__":
    sys.exit(main())
