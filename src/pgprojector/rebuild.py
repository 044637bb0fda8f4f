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

from pgprojector.errors import ConfigError, PgProjectorError
from pgprojector.listener import Wakeup
from pgprojector.migrations import require_tables
from pgprojector.projection import Projection
from pgprojector.retry import TRANSIENT_ERRORS
from pgprojector.sqlfiles import queries
from pgprojector.worker import Batch, ProjectionWorker

log = structlog.get_logger("pgprojector.rebuild")

# How often the rebuild makes sure the session that holds its lock is still there.
LOCK_CHECK_SECONDS = 1.0

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


class Rebuild:
    def __init__(
        self,
        conn: asyncpg.Connection,
        pool: asyncpg.Pool,
        projection: Projection,
        *,
        batch_size: int,
        on_error: str,
        max_attempts: int,
        restart: bool = False,
        on_progress: ProgressCallback | None = None,
        stopping: anyio.Event | None = None,
    ) -> None:
        """`conn` holds the rebuild's session lock; the batches run on `pool`, through the daemon's own
        worker code (ProjectionWorker), applying while the checkpoint says 'rebuilding'."""
        self.conn = conn
        self.projection = projection
        self.name = projection.name
        self.restart = restart
        self.on_progress = on_progress or (lambda position, target, applied, done: None)
        self.stopping = stopping or anyio.Event()
        self._log = log.bind(projection=projection.name)
        self.position = 0
        self.worker = ProjectionWorker(
            pool, projection, batch_size=batch_size, poll_interval=1.0, on_error=on_error,
            max_attempts=max_attempts, stopping=self.stopping, wakeup=Wakeup(), active_state="rebuilding",
            on_caught_up=self._hand_back,
        )

    async def run(self) -> RebuildReport:
        started = time.monotonic()
        if not self.projection.tables:
            raise ConfigError(f"projection {self.name} names no tables to empty (Projection.tables): "
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
        parked_before = await self._parked()
        lock_checked = time.monotonic()
        while True:
            if self.stopping.is_set():
                raise RebuildError(f"rebuild of {self.name} interrupted at position {self.position}: "
                                   "run it again to resume")
            if time.monotonic() - lock_checked >= LOCK_CHECK_SECONDS:
                await self.conn.execute("SELECT 1")  # the lock's session lost: stop (transient), never go on unlocked
                lock_checked = time.monotonic()
            batch = await self.worker.step()
            if batch is None:
                continue  # a failing event: retried, parked or halted by the worker
            if batch.inactive:
                await self._stopped_by(batch)
            self.position = batch.checkpoint
            target = max(target, batch.horizon)
            self.on_progress(batch.checkpoint, target, self.worker.events_applied, batch.caught_up)
            if batch.caught_up:
                break
        parked = await self._parked() - parked_before
        report = RebuildReport(self.name, self.worker.events_applied, self.position, parked,
                               time.monotonic() - started, resumed_from)
        self._log.info("rebuild_finished", events=report.applied, checkpoint=self.position, parked=parked,
                       seconds=round(report.seconds, 2))
        return report

    async def _hand_back(self, conn: asyncpg.Connection) -> None:
        """In the transaction of the batch that caught up: the daemon takes over from here, at its next
        poll (its worker of an inactive projection does not wait on notifications)."""
        await conn.execute("UPDATE pgprojector_projections SET state = 'running', updated_at = now() WHERE name = $1",
                           self.name)

    async def _parked(self) -> int:
        return await self.conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters WHERE projection = $1",
                                        self.name)

    async def _stopped_by(self, batch: Batch) -> None:
        row = await self.conn.fetchrow("SELECT state, last_error FROM pgprojector_projections WHERE name = $1",
                                       self.name)
        if row is not None and row["state"] == "halted":
            # (the error names the event: its type, position, aggregate and version)
            raise RebuildError(
                f"projection {self.name} halted: {row['last_error']}. "
                f"Fix the cause, then `pgprojector resume {self.name}` to go on from there, or rebuild again")
        raise RebuildError(f"projection {self.name} was changed by someone else during the rebuild "
                           f"(state now {batch.state or 'gone'}): rebuild stopped")

    async def _take_rebuild_lock(self) -> None:
        """Held by this session until it ends: one rebuild per projection, and `status` can see it.

        The session sits idle while the batches run on the pool: a server's idle_session_timeout
        (PostgreSQL 14+) would end it, and the lock with it, half-way (`status` then showed the rebuild
        as interrupted, a second one could start, and this one said it was interrupted after handing
        the projection back). Off for this session; and the loop checks it is still there."""
        await self.conn.execute("SELECT set_config('idle_session_timeout', '0', false) "
                                "WHERE current_setting('idle_session_timeout', true) IS NOT NULL")
        if not await self.conn.fetchval("SELECT pgprojector_try_lock_rebuild($1)", self.name):
            pid = await self.conn.fetchval("SELECT pid FROM pgprojector_active_rebuilds WHERE name = $1", self.name)
            raise RebuildError(f"a rebuild of {self.name} is already running (backend pid {pid})")

    async def _start(self) -> int | None:
        """Empty the tables and reset the checkpoint; or, after an interrupted rebuild, resume (its position)."""
        # (READ COMMITTED whatever the database's default: under REPEATABLE READ, the daemon's batch
        # this waits for moves the checkpoint, and the rebuild failed with "could not serialize access")
        async with self.conn.transaction(isolation="read_committed"):
            checkpoint = await self.conn.fetchrow(queries()["lock_checkpoint"], self.name)
            if checkpoint is None:
                raise ConfigError(f"projection {self.name} is not set up: run `pgprojector migrate` with it in "
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
        tables = await require_tables(self.conn, self.projection, "(missing, or a view): run `pgprojector migrate`")
        return list(tables.values())
