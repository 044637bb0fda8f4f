"""`pgprojector rebuild NAME`: replay one projection from the start of the log, beside a running daemon.

The checkpoint row is the hand-over point. One transaction locks it (so it waits for the daemon's
batch in hand), empties the projection's tables, and sets position 0 and state 'rebuilding'. The
daemon applies nothing to a projection that is not 'running', so from then on only the rebuild
moves that checkpoint: batch after batch, each in one transaction that locks the row, reads after
the checkpoint up to the read horizon, applies and moves it, exactly like the daemon's worker. The
transaction whose read comes up short (caught up) sets the state back to 'running', and the daemon
carries on from there. The other projections are not touched.

A crash or Ctrl-C leaves 'rebuilding' with a checkpoint that matches the tables: running the
rebuild again resumes from it (`restart=True` starts over).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import asyncpg
import structlog

from pgprojector import db
from pgprojector.errors import PgProjectorError
from pgprojector.events import RecordedEvent
from pgprojector.projection import Projection
from pgprojector.retry import TRANSIENT_ERRORS, backoff, is_transient
from pgprojector.sqlfiles import queries

log = structlog.get_logger("pgprojector.rebuild")

MAX_ERROR_TEXT = 2000

# (checkpoint position, target position, events applied, caught up)
ProgressCallback = Callable[[int, int, int, bool], None]


class RebuildError(PgProjectorError):
    """The rebuild cannot go on; the message says what to do."""


@dataclass(frozen=True)
class RebuildReport:
    projection: str
    applied: int
    position: int
    parked: int
    seconds: float
    resumed_from: int | None  # None: started from the beginning of the log


class _EventFailed(Exception):
    def __init__(self, cause: BaseException, first: int, last: int, event: RecordedEvent) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.first = first
        self.last = last
        self.event = event


@dataclass
class _Batch:
    applied: int
    position: int
    horizon: int
    caught_up: bool


class Rebuild:
    def __init__(
        self,
        conn: asyncpg.Connection,
        projection: Projection,
        *,
        batch_size: int,
        on_error: str,
        max_attempts: int,
        channel: str,
        restart: bool = False,
        on_progress: ProgressCallback | None = None,
        stopping: anyio.Event | None = None,
    ) -> None:
        self.conn = conn
        self.projection = projection
        self.name = projection.name
        self.batch_size = batch_size
        self.on_error = on_error
        self.max_attempts = max_attempts
        self.channel = channel
        self.restart = restart
        self.on_progress = on_progress or (lambda position, target, applied, done: None)
        self.stopping = stopping or anyio.Event()
        self._types = sorted(projection.event_types) if projection.event_types is not None else None
        self._log = log.bind(projection=projection.name)
        self.position = 0

    async def run(self) -> RebuildReport:
        started = time.monotonic()
        if not self.projection.tables:
            raise RebuildError(f"projection {self.name} names no tables to empty (Projection.tables): "
                               "it cannot be rebuilt")
        await self._take_rebuild_lock()
        try:
            return await self._run(started)
        finally:
            # Ends with the session anyway: a connection too broken to say so loses nothing.
            with anyio.CancelScope(shield=True), contextlib.suppress(*TRANSIENT_ERRORS, asyncpg.PostgresError):
                await self.conn.execute("SELECT pgprojector_unlock_rebuild($1)", self.name)

    async def _run(self, started: float) -> RebuildReport:
        resumed_from = await self._start()
        target = await self.conn.fetchval("SELECT horizon FROM pgprojector_horizon()")
        self._log.info("rebuild_started", from_position=self.position, target=target,
                       resumed=resumed_from is not None)
        applied = parked = 0
        attempts = 0
        isolate_until = 0  # after a failed batch: one event per transaction up to there
        while True:
            if self.stopping.is_set():
                raise RebuildError(f"rebuild of {self.name} interrupted at position {self.position}: "
                                   "run it again to resume")
            try:
                batch = await self._apply_batch(1 if isolate_until else self.batch_size)
            except _EventFailed as failure:
                if failure.first != failure.last and not isolate_until:
                    isolate_until = failure.last
                    continue
                attempts += 1
                if attempts < self.max_attempts:
                    with anyio.move_on_after(backoff(attempts, base=0.2, cap=10.0)):
                        await self.stopping.wait()
                    continue
                await self._give_up(failure)
                parked += 1
                attempts = 0
                if isolate_until <= failure.event.position:
                    isolate_until = 0
                continue
            attempts = 0
            applied += batch.applied
            if isolate_until and batch.position >= isolate_until:
                isolate_until = 0
            target = max(target, batch.horizon)
            self.on_progress(batch.position, target, applied, batch.caught_up)
            if batch.caught_up:
                break
        report = RebuildReport(self.name, applied, self.position, parked, time.monotonic() - started, resumed_from)
        self._log.info("rebuild_finished", events=applied, checkpoint=self.position, parked=parked,
                       seconds=round(report.seconds, 2))
        return report

    async def _take_rebuild_lock(self) -> None:
        """Held by this session until it ends: one rebuild per projection, and `status` can see it."""
        if not await self.conn.fetchval("SELECT pgprojector_try_lock_rebuild($1)", self.name):
            pid = await self.conn.fetchval("SELECT pid FROM pgprojector_active_rebuilds WHERE name = $1", self.name)
            raise RebuildError(f"a rebuild of {self.name} is already running (backend pid {pid})")

    async def _start(self) -> int | None:
        """Empty the tables and reset the checkpoint; or, after an interrupted rebuild, resume (its position)."""
        async with self.conn.transaction():
            checkpoint = await self.conn.fetchrow(queries()["lock_checkpoint"], self.name)
            if checkpoint is None:
                raise RebuildError(f"projection {self.name} is not set up: run `pgprojector migrate` with it in "
                                   "PGPROJECTOR_PROJECTIONS")
            if checkpoint["state"] == "rebuilding" and not self.restart:
                self.position = checkpoint["position"]
                return self.position
            tables = await self._resolve_tables()
            await self.conn.execute(f"TRUNCATE {', '.join(tables)}")
            # Every event is applied again, the parked ones included.
            await self.conn.execute("DELETE FROM pgprojector_dead_letters WHERE projection = $1", self.name)
            await self.conn.execute(
                "UPDATE pgprojector_projections SET state = 'rebuilding', position = 0, halted_at_position = NULL, "
                "last_error = NULL, updated_at = now() WHERE name = $1", self.name)
        self.position = 0
        return None

    async def _resolve_tables(self) -> list[str]:
        """The tables as PostgreSQL reads their names (search path, case folding), quoted for SQL."""
        rows = await self.conn.fetch("SELECT t, to_regclass(t)::text AS quoted FROM unnest($1::text[]) AS t",
                                     list(self.projection.tables))
        missing = [row["t"] for row in rows if row["quoted"] is None]
        if missing:
            raise RebuildError(f"projection {self.name}: table(s) {', '.join(missing)} do not exist: "
                               "run `pgprojector migrate`")
        return [row["quoted"] for row in rows]

    async def _apply_batch(self, limit: int) -> _Batch:
        sql = queries()
        async with self.conn.transaction():
            checkpoint = await self._lock_rebuilding()
            position = checkpoint["position"]
            horizon, _drawn = await self.conn.fetchrow(sql["horizon"])
            rows = await self.conn.fetch(sql["read_batch"], position, horizon, self._types, limit)
            events = [RecordedEvent.from_record(row) for row in rows]
            if events:
                try:
                    await self.projection.handle(self.conn, events)
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    raise _EventFailed(exc, events[0].position, events[-1].position, events[0]) from exc
            caught_up = len(events) < limit
            # A short read saw everything up to the horizon: no event at or below it can still appear.
            new_position = max(position, horizon) if caught_up else events[-1].position
            if new_position != position:
                await self.conn.execute(sql["save_checkpoint"], self.name, new_position)
            if caught_up:
                await self.conn.execute(
                    "UPDATE pgprojector_projections SET state = 'running', updated_at = now() WHERE name = $1",
                    self.name)
                # Wake the daemons now rather than at their next poll.
                await self.conn.execute("SELECT pg_notify($1, '')", self.channel)
        self.position = new_position
        return _Batch(len(events), new_position, horizon, caught_up)

    async def _lock_rebuilding(self) -> asyncpg.Record:
        checkpoint = await self.conn.fetchrow(queries()["lock_checkpoint"], self.name)
        if checkpoint is None or checkpoint["state"] != "rebuilding":
            state = checkpoint["state"] if checkpoint is not None else "gone"
            raise RebuildError(f"projection {self.name} was changed by someone else during the rebuild "
                               f"(state now {state}): rebuild stopped")
        return checkpoint

    async def _give_up(self, failure: _EventFailed) -> None:
        """After max attempts: park the event and go on, or halt the projection there and stop."""
        sql = queries()
        event = failure.event
        error = db.describe_error(failure.cause)[:MAX_ERROR_TEXT]
        context = {"position": event.position, "event_type": event.event_type, "aggregate_id": event.aggregate_id,
                   "version": event.version, "attempts": self.max_attempts, "error": error}
        async with self.conn.transaction():
            await self._lock_rebuilding()
            if self.on_error == "park":
                await self.conn.execute(sql["park_event"], self.name, event.position, event.id, error,
                                        self.max_attempts)
                await self.conn.execute(sql["save_checkpoint"], self.name, event.position)
                await self.conn.execute(sql["record_error"], self.name, error)
            else:
                await self.conn.execute(sql["halt_projection"], self.name, event.position, error)
        if self.on_error == "park":
            self.position = event.position
            self._log.error("event_parked", **context)
            return
        self._log.error("projection_halted", **context)
        raise RebuildError(
            f"projection {self.name} halted at position {event.position} ({event.event_type} {event.aggregate_id} "
            f"v{event.version}): {error}. Fix the cause, then `pgprojector resume {self.name}` to go on from "
            f"there, or rebuild again")
