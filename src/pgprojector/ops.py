"""Operator commands: `events`, `rebuild`, `dead-letters` (list, retry), `health` and `demo`.

`register()` adds them to the `pgprojector` parser; `HANDLERS` maps each to its async handler.
cli.py imports this module, so this one imports cli's helpers inside the handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

import anyio
import asyncpg
import structlog

from pgprojector import db
from pgprojector.daemon import HEARTBEAT_SECONDS
from pgprojector.errors import ConfigError
from pgprojector.migrations import require_current_schema
from pgprojector.projection import Projection, load_projection, load_projections
from pgprojector.retry import is_transient
from pgprojector.settings import Settings
from pgprojector.sqlfiles import queries

if TYPE_CHECKING:
    from pgprojector.events import RecordedEvent

log = structlog.get_logger("pgprojector.ops")

EXIT_OK, EXIT_FAILURE = 0, 1
DEFAULT_EVENTS_LIMIT = 100
DEFAULT_HEALTH_MAX_AGE = 3 * HEARTBEAT_SECONDS
MAX_ERROR_TEXT = 2000


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], settings_parent: argparse.ArgumentParser) -> None:
    """Add the operator commands to `commands`; each takes the setting flags of `settings_parent` (`demo`
    only the log's)."""
    from pgprojector.cli import _settings_parent

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[settings_parent], help=summary, description=description)

    events = command("events", "print events from the log",
                     "Print events in log order, one line each (position, created_at, aggregate and version, "
                     "type, data), or as JSON lines. With --aggregate: that aggregate's history, in version "
                     "order.")
    events.add_argument("--aggregate", metavar="ID", help="only this aggregate's events, in version order")
    events.add_argument("--type", metavar="T", action="append", dest="event_types",
                        help="only events of this type (repeat for several)")
    events.add_argument("--after", metavar="POS", type=_non_negative_int, help="only events after this position")
    events.add_argument("--limit", metavar="N", type=_positive_int,
                        help=f"print at most N events (default {DEFAULT_EVENTS_LIMIT}; with --follow: no limit, "
                             "exit 0 after N)")
    events.add_argument("--json", action="store_true",
                        help="one JSON object per line: id, aggregate_id, aggregate_type, event_type, data, "
                             "metadata, version, position, created_at")
    mode = events.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true",
                      help="keep printing events as they are appended, until SIGINT/SIGTERM (exit 0); starts "
                           "at the end of the log unless --after is given")
    mode.add_argument("--as-of", metavar="TIMESTAMP", type=_timestamp,
                      help="only events created at or before TIMESTAMP, ISO 8601 (2025-03-03T12:00:00+01:00; "
                           "without a zone it is taken as UTC): with --aggregate, the aggregate as it stood then")

    rebuild = command("rebuild", "rebuild one projection from the start of the log",
                      "Empty the projection's tables and replay the whole log into them, while a daemon may "
                      "keep running: the daemon leaves the projection alone until the rebuild has caught up, "
                      "then carries on; the other projections are not touched. An interrupted rebuild resumes "
                      "where it stopped when run again.")
    rebuild.add_argument("name", help="projection name (as in PGPROJECTOR_PROJECTIONS, or a built-in)")
    rebuild.add_argument("--restart", action="store_true",
                         help="after an interrupted rebuild: start over from the beginning instead of resuming")

    dead = command("dead-letters", "list parked events, or retry them",
                   "List the events parked by projections running with PGPROJECTOR_ON_ERROR=park (listing is "
                   "the default action), or retry them once their cause is fixed.")
    dead.add_argument("--json", action="store_true", help="list: print a JSON array")
    actions = dead.add_subparsers(dest="dead_letters_action", metavar="ACTION")
    quiet_settings = _settings_parent(default=argparse.SUPPRESS)
    listing = actions.add_parser("list", parents=[quiet_settings], help="list parked events (the default)",
                                 description="List parked events with their errors.")
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print a JSON array")
    retry = actions.add_parser(
        "retry", parents=[quiet_settings], help="apply parked events again",
        description="Apply each parked event through its projection's handler again; the dead letter is "
                    "deleted in the same transaction when that succeeds. Exit 1 if any still fails.")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=_positive_int, help="the dead letter's id (see `dead-letters`)")
    which.add_argument("--all", action="store_true", help="every dead letter, in log order")

    health = command("health", "exit 0 if a daemon is alive and its projections keep up",
                     "Exit 0 when a daemon's heartbeat is younger than --max-age and each of its projections "
                     "is caught up or has moved within --max-age (none halted); otherwise exit 1. Prints a "
                     "one-line reason either way.")
    health.add_argument("--max-age", metavar="SECONDS", type=_positive_float, default=DEFAULT_HEALTH_MAX_AGE,
                        help=f"heartbeat and checkpoint age limit (default {DEFAULT_HEALTH_MAX_AGE:g}: three "
                             "heartbeat intervals)")
    health.add_argument("--this-host", action="store_true",
                        help="count only daemons registered from this host name: a container's HEALTHCHECK, "
                             "which must not pass on another container's daemon")

    # (Its own server, daemon and settings: of the settings, only the log's flags.)
    demo = commands.add_parser(
        "demo", parents=[_settings_parent(only=("--log-format", "--log-level"))],
        help="a self-contained demo on a throwaway PostgreSQL",
        description="Start a private PostgreSQL server (from the demo extra or the system's binaries), run the "
                    "daemon with the three built-in projections, drive orders through their lives with concurrent "
                    "producers, show the read models, then clean up. Needs no configuration: of the PGPROJECTOR_* "
                    "settings it takes only the log level and format.")
    demo.add_argument("--orders", type=_positive_int, default=300, help="orders to create (default 300)")
    demo.add_argument("--producers", type=_positive_int, default=8,
                      help="concurrent producers (default 8; two work each order, so they collide)")


BIGINT_MAX = 2**63 - 1


def _number(text: str, kind: type[int] | type[float], lowest: float, inclusive: bool = True) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < lowest or (value == lowest and not inclusive):
        raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'more than'} {lowest}: {text}")
    # (positions and ids are bigints, where a larger number failed in the database, exit 1; and a
    # nan or inf --max-age passed every check)
    if not math.isfinite(value) or value > BIGINT_MAX:
        raise argparse.ArgumentTypeError(f"must be a finite number at most {BIGINT_MAX}: {text}")
    return value


def _positive_int(text: str) -> int:
    return int(_number(text, int, 1))


def _non_negative_int(text: str) -> int:
    return int(_number(text, int, 0))


def _positive_float(text: str) -> float:
    return float(_number(text, float, 0, inclusive=False))


def _timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _projection_named(settings: Settings, name: str) -> Projection:
    """A configured projection of that name, else a built-in, an entry point or `module:attribute`."""
    for projection in load_projections(settings.projection_refs):
        if projection.name == name:
            return projection
    return load_projection(name)


async def _until_signalled(body: Callable[[anyio.Event], Awaitable[int]], *, cancel_at_first: bool,
                          exit_if_cancelled: int) -> int:
    """`body(stopping)`, with SIGINT/SIGTERM setting `stopping`; a second signal (or the first, with
    `cancel_at_first`) cancels the body, and `exit_if_cancelled` is returned.

    Exceptions leave as they are, not wrapped in an ExceptionGroup, so cli.main reports them.
    """
    stopping = anyio.Event()
    outcome: list[int] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as group:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def watch() -> None:
                async for _signum in signals:
                    if cancel_at_first or stopping.is_set():
                        group.cancel_scope.cancel()
                    stopping.set()

            group.start_soon(watch)
            try:
                outcome.append(await body(stopping))
            except Exception as exc:
                failure.append(exc)
            group.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return outcome[0] if outcome else exit_if_cancelled


def _quiet_broken_pipe() -> None:
    """`pgprojector events | head`: the reader left; stop writing without a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


# events ------------------------------------------------------------------------------------------


async def cmd_events(settings: Settings, args: argparse.Namespace) -> int:
    from pgprojector import eventlog
    from pgprojector.cli import CommandError, _connect, _with_connection

    where = eventlog.EventFilter(aggregate_id=args.aggregate, event_types=args.event_types, after=args.after or 0,
                                 as_of=args.as_of)
    render = eventlog.json_line if args.json else eventlog.human_line

    def emit(event: RecordedEvent) -> None:
        print(render(event), flush=args.follow)

    try:
        if args.follow:
            follower = eventlog.Follower(settings.require_dsn(), settings.channel, settings.poll_interval, where,
                                         from_position=args.after, emit=emit, limit=args.limit)

            async def follow(_stopping: anyio.Event) -> int:
                conn = await _connect(settings, "events")
                try:  # as every other command: exit 2, where it failed on a missing function with exit 1
                    await require_current_schema(conn)
                except BaseException:
                    conn.terminate()
                    raise
                await follower.run(conn)
                return EXIT_OK

            try:
                return await _until_signalled(follow, cancel_at_first=True, exit_if_cancelled=EXIT_OK)
            except asyncpg.PostgresError as exc:
                raise CommandError(db.describe_error(exc)) from None

        limit = min(args.limit or DEFAULT_EVENTS_LIMIT, BIGINT_MAX - 1)  # (one more is read, to say so)

        async def body(conn: asyncpg.Connection) -> int:
            shown, last, more = 0, None, False
            async with contextlib.aclosing(eventlog.read_events(conn, where, limit + 1)) as found:
                async for event in found:
                    if shown == limit:
                        more = True
                        break
                    emit(event)
                    shown, last = shown + 1, event
            if more:
                assert last is not None
                more_hint = ("use a larger --limit" if args.aggregate is not None
                             else f"continue with --after {last.position}")
                print(f"({limit} events shown, more follow: {more_hint})", file=sys.stderr)
            elif args.aggregate is not None and args.as_of is not None and not args.event_types:
                version = last.version if last is not None else 0
                print(f"({args.aggregate} as of {args.as_of.isoformat()}: version {version})", file=sys.stderr)
            return EXIT_OK

        return await _with_connection(settings, "events", body)
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_OK
    except RecursionError as exc:
        raise CommandError(f"an event's data or metadata is JSON nested deeper than Python decodes ({exc}): "
                           "the events before it were printed, those after it print with --after and its "
                           "position") from None


# rebuild -----------------------------------------------------------------------------------------


class _ProgressBar:
    """On a terminal: one line on stderr, redrawn at most ten times a second."""

    WIDTH = 30

    def __init__(self, name: str, stream: TextIO) -> None:
        self.name = name
        self.stream = stream
        self.started = time.monotonic()
        self.drawn_at = 0.0

    def __call__(self, position: int, target: int, applied: int, done: bool) -> None:
        now = time.monotonic()
        if now - self.drawn_at < 0.1 and not done:
            return
        self.drawn_at = now
        fraction = min(1.0, position / target) if target else 1.0
        filled = int(fraction * self.WIDTH)
        rate = applied / max(now - self.started, 1e-6)
        self.stream.write(f"\rrebuild {self.name} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction:4.0%} "
                          f"position {position}/{target}, {applied} events, {rate:,.0f}/s ")
        if done:
            self.stream.write("\n")
            self.drawn_at = 0.0
        self.stream.flush()

    def close(self) -> None:
        """Ends the bar's line if the rebuild stopped half-way."""
        if self.drawn_at:
            self.stream.write("\n")
            self.stream.flush()


class _ProgressLog:
    """Elsewhere: a log line at most once a second."""

    def __init__(self, name: str) -> None:
        self.log = log.bind(projection=name)
        self.logged_at = time.monotonic()

    def __call__(self, position: int, target: int, applied: int, done: bool) -> None:
        now = time.monotonic()
        if now - self.logged_at >= 1.0 and not done:  # rebuild_finished says the rest
            self.logged_at = now
            self.log.info("rebuild_progress", checkpoint=position, target=target, events=applied)

    def close(self) -> None:
        pass


async def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    from pgprojector.cli import CommandError, _with_connection
    from pgprojector.rebuild import Rebuild, RebuildError

    projection = _projection_named(settings, args.name)
    progress = _ProgressBar(projection.name, sys.stderr) if sys.stderr.isatty() else _ProgressLog(projection.name)

    async def rebuild_until_signalled(conn: asyncpg.Connection, stopping: anyio.Event) -> int:
        await require_current_schema(conn)  # as the daemon's worker needs it
        pool = await db.create_pool(settings.require_dsn(), role="rebuild", min_size=1, max_size=2)
        rebuild = Rebuild(conn, pool, projection, batch_size=settings.batch_size, on_error=settings.on_error,
                          max_attempts=settings.max_attempts, restart=args.restart,
                          on_progress=progress, stopping=stopping)
        try:
            report = await rebuild.run()
        except anyio.get_cancelled_exc_class():
            # A second signal: the batch in hand rolled back. Said, as a first signal's stop is.
            progress.close()
            print(f"pgprojector: rebuild of {projection.name} interrupted at position {rebuild.position}: "
                  "run it again to resume", file=sys.stderr)
            raise
        except RebuildError as exc:
            raise CommandError(str(exc)) from None
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise CommandError(f"rebuild of {projection.name} interrupted at position {rebuild.position} "
                               f"({db.describe_error(exc)}): run it again to resume") from None
        finally:
            progress.close()
            await pool.close()
        resumed = f" (resumed from position {report.resumed_from})" if report.resumed_from is not None else ""
        parked = f", {report.parked} parked as dead letters" if report.parked else ""
        print(f"projection {report.projection} rebuilt{resumed}: {report.applied} events applied up to position "
              f"{report.position} in {report.seconds:.1f}s{parked}; it is running again")
        return EXIT_OK

    async def body(conn: asyncpg.Connection) -> int:
        return await _until_signalled(lambda stopping: rebuild_until_signalled(conn, stopping), cancel_at_first=False,
                                      exit_if_cancelled=EXIT_FAILURE)

    return await _with_connection(settings, "rebuild", body)


# dead-letters ------------------------------------------------------------------------------------


async def cmd_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    if args.dead_letters_action == "retry":
        return await _retry_dead_letters(settings, args)
    return await _list_dead_letters(settings, args)


async def _list_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from pgprojector.cli import _with_connection
    from pgprojector.status import dead_letters

    async def body(conn: asyncpg.Connection) -> int:
        letters = await dead_letters(conn)
        if args.json:
            print(json.dumps(letters))
        elif not letters:
            print("no dead letters")
        else:
            for letter in letters:
                print(f"#{letter['id']} {letter['projection']} position {letter['position']} "
                      f"{letter['event_type']} {letter['aggregate_id']} v{letter['version']} "
                      f"attempts={letter['attempts']} parked {letter['parked_at']}\n    {letter['error']}")
        return EXIT_OK

    return await _with_connection(settings, "dead-letters", body)


@dataclass(frozen=True)
class RetryOutcome:
    letter_id: int
    projection: str
    position: int
    applied: bool
    detail: str


_PARKED = """
SELECT d.id, d.projection, d.event_position AS position
FROM pgprojector_dead_letters d
WHERE $1::bigint[] IS NULL OR d.id = ANY($1::bigint[])
ORDER BY d.event_position, d.id
"""
# The first event of the same aggregate that the projection applied after the parked one (its
# checkpoint passed it, and it is not parked itself).
_APPLIED_AFTER = """
SELECT e.position, e.version FROM events e
WHERE e.aggregate_id = $1 AND e.position > $2 AND e.position <= $3
  AND ($4::text[] IS NULL OR e.event_type = ANY($4::text[]))
  AND NOT EXISTS (SELECT 1 FROM pgprojector_dead_letters d WHERE d.projection = $5 AND d.event_position = e.position)
ORDER BY e.position
LIMIT 1
"""


async def retry_dead_letters(conn: asyncpg.Connection, ids: list[int] | None,
                             find_projection: Callable[[str], Projection]) -> list[RetryOutcome]:
    """Apply each parked event again, in log order; each in its own transaction, which deletes the letter."""
    from pgprojector.events import RecordedEvent

    outcomes = []
    for row in await conn.fetch(_PARKED, ids):
        def outcome(applied: bool, detail: str, row: asyncpg.Record = row) -> RetryOutcome:
            return RetryOutcome(row["id"], row["projection"], row["position"], applied, detail)

        try:
            # the worker's read of a batch, here of the one position
            found = await conn.fetchrow(queries()["read_batch"], row["position"] - 1, row["position"], None, 1)
        except Exception as exc:  # data Python cannot decode (JSON nested too deep): this letter only
            if is_transient(exc) or isinstance(exc, asyncpg.PostgresError):
                raise
            outcomes.append(outcome(False, f"cannot read its event: {db.describe_error(exc)}"))
            continue
        if found is None:
            outcomes.append(outcome(False, "its event is missing from the log"))
            continue
        try:
            projection = find_projection(row["projection"])
        except ConfigError as exc:
            outcomes.append(outcome(False, f"cannot load projection {row['projection']}: {exc}"))
            continue
        event = RecordedEvent.from_record(found)
        if projection.handle is not None and (problem := event.shape_problem()) is not None:
            outcomes.append(outcome(False, problem))  # as the daemon's worker refuses it
            continue
        # READ COMMITTED whatever the database's default, as the daemon's batches: under REPEATABLE
        # READ, waiting here for a batch that then moves the checkpoint fails the retry ("could not
        # serialize access").
        async with conn.transaction(isolation="read_committed"):
            # The daemon's order: checkpoint row first, then the dead letter.
            checkpoint = await conn.fetchrow(queries()["lock_checkpoint"], projection.name)
            if not await conn.fetchval("SELECT true FROM pgprojector_dead_letters WHERE id = $1 FOR UPDATE",
                                       row["id"]):
                outcomes.append(outcome(True, "gone already (retried or rebuilt meanwhile)"))
                continue
            if checkpoint is None:
                outcomes.append(outcome(False, f"projection {projection.name} is not set up"))
                continue
            if checkpoint["state"] == "rebuilding":
                # (the rebuild's start deleted every dead letter: this one the rebuild parked, failing
                # again, and it will not apply it again)
                outcomes.append(outcome(False, f"projection {projection.name} is being rebuilt, and the rebuild "
                                               "parked this event: retry it once the rebuild has finished"))
                continue
            if checkpoint["position"] < event.position:
                # Its projection has not reached it (yet again): it will be applied in order.
                await conn.execute("DELETE FROM pgprojector_dead_letters WHERE id = $1", row["id"])
                outcomes.append(outcome(True, f"left to the projection, whose checkpoint "
                                              f"({checkpoint['position']}) is before it"))
                continue
            later = await conn.fetchrow(
                _APPLIED_AFTER, event.aggregate_id, event.position, checkpoint["position"],
                sorted(projection.event_types) if projection.event_types is not None else None, projection.name)
            if later is not None:
                # Applied now, it would come after a later version of its aggregate: a projection that
                # folds (last one wins) would take it for a replay, or undo the later event's effect.
                outcomes.append(outcome(False, (
                    f"{event.aggregate_id} v{later['version']} (position {later['position']}) was applied after it, "
                    f"and v{event.version} cannot follow it: `pgprojector rebuild {projection.name}` applies the "
                    "log in order again")))
                continue
            try:
                async with conn.transaction():
                    await projection.apply_one(conn, event)
            except Exception as exc:
                if is_transient(exc):
                    raise
                error = db.describe_error(exc)[:MAX_ERROR_TEXT]
                await conn.execute("UPDATE pgprojector_dead_letters SET error = $2, attempts = attempts + 1 "
                                   "WHERE id = $1", row["id"], error)
                outcomes.append(outcome(False, error))
                continue
            await conn.execute("DELETE FROM pgprojector_dead_letters WHERE id = $1", row["id"])
            # Its last parked event applied: the error status shows is history now.
            await conn.execute(
                "UPDATE pgprojector_projections SET last_error = NULL WHERE name = $1 AND state = 'running' "
                "AND NOT EXISTS (SELECT 1 FROM pgprojector_dead_letters WHERE projection = $1)", projection.name)
            outcomes.append(outcome(True, "applied"))
    return outcomes


async def _retry_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from pgprojector.cli import CommandError, _with_connection

    async def body(conn: asyncpg.Connection) -> int:
        ids = None if args.all else [args.id]
        outcomes = await retry_dead_letters(conn, ids, lambda name: _projection_named(settings, name))
        if not outcomes:
            if args.all:
                print("no dead letters")
                return EXIT_OK
            raise CommandError(f"no dead letter #{args.id} (see `pgprojector dead-letters`)")
        for item in outcomes:
            verdict = "ok" if item.applied else "FAILED"
            print(f"#{item.letter_id} {item.projection} position {item.position}: {verdict}: {item.detail}")
        failed = sum(not item.applied for item in outcomes)
        # (another operator's retry, or a rebuild, may have dealt with some meanwhile: not applied here)
        applied = sum(item.detail == "applied" for item in outcomes)
        print(f"{len(outcomes) - failed} of {len(outcomes)} dead letter(s) resolved ({applied} applied here, "
              f"{len(outcomes) - failed - applied} otherwise), {failed} still failing")
        return EXIT_FAILURE if failed else EXIT_OK

    return await _with_connection(settings, "dead-letters", body)


# health ------------------------------------------------------------------------------------------

_DAEMONS = """
SELECT hostname, pid, projections, extract(epoch FROM now() - heartbeat_at)::float8 AS age
FROM pgprojector_daemons WHERE $1::text IS NULL OR hostname = $1 ORDER BY heartbeat_at DESC
"""
_PROJECTIONS = """
SELECT p.name, p.state, p.position, p.halted_at_position, p.last_error,
       extract(epoch FROM now() - p.updated_at)::float8 AS idle,
       (SELECT count(*) FROM events e WHERE e.position > p.position) AS lag,
       EXISTS (SELECT 1 FROM pgprojector_active_rebuilds r WHERE r.name = p.name) AS rebuild_active
FROM pgprojector_projections p WHERE p.name = ANY($1::text[]) ORDER BY p.name
"""


async def check_health(conn: asyncpg.Connection, max_age: float, hostname: str | None = None) -> tuple[bool, str]:
    """(healthy, a one-line reason); with `hostname`, only the daemons registered from that host count."""
    daemons = await conn.fetch(_DAEMONS, hostname)
    live = [d for d in daemons if d["age"] <= max_age]
    if not live:
        if not daemons:
            where = f" from host {hostname}" if hostname is not None else ""
            return False, f"no daemon registered{where}: is `pgprojector run` running?"
        last = daemons[0]
        return False, (f"no daemon alive: the last heartbeat ({last['hostname']} pid {last['pid']}) is "
                       f"{last['age']:.1f}s old, more than {max_age:g}s")
    served = sorted({name for daemon in live for name in daemon["projections"]})
    rows = {row["name"]: row for row in await conn.fetch(_PROJECTIONS, served)}
    horizon = await conn.fetchval("SELECT horizon FROM pgprojector_horizon()")
    problems = []
    for name in served:
        row = rows.get(name)
        if row is None:
            problems.append(f"{name} is not set up")
        elif row["state"] == "halted":
            problems.append(f"{name} halted at position {row['halted_at_position']}: {row['last_error']}")
        elif row["state"] == "rebuilding" and not row["rebuild_active"]:
            problems.append(f"{name}: a rebuild was interrupted at position {row['position']} "
                            f"(run `pgprojector rebuild {name}` again)")
        elif row["state"] not in ("running", "rebuilding"):
            problems.append(f"{name} is {row['state']}")
        elif row["lag"] > 0 and row["idle"] > max_age:
            blocked = " (held back by an open transaction that appended)" if row["position"] >= horizon else ""
            problems.append(f"{name} is {row['lag']} events behind and has not moved for {row['idle']:.0f}s{blocked}")
    if problems:
        return False, "; ".join(problems)
    newest = live[0]
    lags = ", ".join(f"{name} lag {rows[name]['lag']}" + (" (rebuilding)" if rows[name]["state"] == "rebuilding"
                                                           else "")
                     for name in served)
    return True, (f"{len(live)} daemon(s) alive, newest heartbeat {newest['age']:.1f}s ago "
                  f"({newest['hostname']} pid {newest['pid']}); {lags or 'no projections'}")


async def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    from pgprojector.cli import _with_connection

    async def body(conn: asyncpg.Connection) -> int:
        healthy, reason = await check_health(conn, args.max_age, socket.gethostname() if args.this_host else None)
        print(f"{'healthy' if healthy else 'unhealthy'}: {reason}")
        return EXIT_OK if healthy else EXIT_FAILURE

    return await _with_connection(settings, "health", body)


# demo --------------------------------------------------------------------------------------------


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from pgprojector.cli import CommandError
    from pgprojector.demo import run_demo
    from pgprojector.embedded import EmbeddedPostgresError
    from pgprojector.logging import configure_logging

    if args.log_level is None and "PGPROJECTOR_LOG_LEVEL" not in os.environ:
        # The daemon's per-batch lines would drown the demo's own output.
        configure_logging("warning", settings.log_format)
    try:
        return await run_demo(orders=args.orders, producers=args.producers)
    except EmbeddedPostgresError as exc:
        raise CommandError(str(exc)) from None


HANDLERS: dict[str, Callable[[Settings, argparse.Namespace], Awaitable[int]]] = {
    "events": cmd_events,
    "rebuild": cmd_rebuild,
    "dead-letters": cmd_dead_letters,
    "health": cmd_health,
    "demo": cmd_demo,
}

__all__ = ["HANDLERS", "RetryOutcome", "check_health", "register", "retry_dead_letters"]


