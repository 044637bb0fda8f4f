"""`pgprojector run`: the projections side by side, a listener beside them, and a clean stop.

Where events come from: `events`, after each projection's checkpoint, up to the read horizon
(worker.py). Where they go: each projection's handler, in the same transaction that moves its
checkpoint. When the checkpoint moves: only at that commit.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence

import anyio
import asyncpg
import structlog

from pgprojector import db, systemd
from pgprojector.errors import ConfigError, SchemaBehindError
from pgprojector.listener import Listener, Wakeup
from pgprojector.metrics import Metrics
from pgprojector.migrations import (
    notify_channel,
    position_cache,
    position_sequence_behind,
    require_current_schema,
    setup_projection,
)
from pgprojector.projection import Projection
from pgprojector.retry import backoff, is_transient
from pgprojector.settings import Settings
from pgprojector.sqlfiles import queries
from pgprojector.worker import ProjectionWorker

log = structlog.get_logger("pgprojector.daemon")

HEARTBEAT_SECONDS = 5.0
# During the first catch-up, systemd's start timeout is extended every interval this long (by twice
# as much) for as long as the catch-up applied events within the last START_STALL_SECONDS: see
# _report_ready.
START_PROGRESS_SECONDS = 30.0
START_STALL_SECONDS = 300.0
# How often a daemon whose schema is behind (see _open_pool) looks again.
SCHEMA_WAIT_SECONDS = 5.0
# A batch open this long is logged (batch_slow), with what its backend is doing, and again every as long.
SLOW_BATCH_SECONDS = 30.0
SLOW_CHECK_SECONDS = 1.0
# The most the pool's connections get to close on the way out, before they are cut.
CLOSE_SECONDS = 5.0


class Daemon:
    def __init__(self, settings: Settings, projections: Sequence[Projection]) -> None:
        self.settings = settings
        self.projections = list(projections)
        self.dsn = settings.require_dsn()
        self.id = uuid.uuid4()
        self.stopping = anyio.Event()
        self.wakeups = {projection.name: Wakeup() for projection in self.projections}
        self.workers: list[ProjectionWorker] = []
        # Set when a stop did not let every batch in hand commit (stop timeout, second signal): the
        # daemon then exits 1.
        self.stop_forced = False
        # The start-up (waiting for the database, setting up projections) while it runs: a stop cancels
        # it, as nothing is in hand yet (it may be waiting on a lock a `migrate` holds for minutes).
        self._starting: anyio.CancelScope | None = None
        self.metrics = Metrics(None)
        self.listener = Listener(self.dsn, settings.channel, self._wake_all,
                                 on_reconnect=lambda: self.metrics.reconnect("listener"))

    async def run(self) -> None:
        """Until a stop is requested; raises if the daemon cannot go on (the service manager restarts it)."""
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._watch_signals, outer.cancel_scope)
            watchdog = systemd.watchdog_interval()
            if watchdog is not None:
                outer.start_soon(systemd.run_watchdog, watchdog)
            pool = None
            with anyio.CancelScope() as self._starting:
                if not self.stopping.is_set():
                    pool = await self._open_pool()
            self._starting = None
            if pool is None:  # stop requested before the database came up
                log.info("daemon_stopped", events_applied=0, clean=True)
                outer.cancel_scope.cancel()
                return
            try:
                self.metrics = Metrics(self.settings.metrics_port)
                await self._serve(pool)
            finally:
                with anyio.CancelScope(shield=True):
                    self.metrics.close()
                    await self._unregister(pool)
                    # (a connection whose server stopped answering would hold pool.close() for ever)
                    with anyio.move_on_after(CLOSE_SECONDS) as closing:
                        await pool.close()
                    if closing.cancelled_caught:
                        pool.terminate()
                        log.warning("connections_cut", after_s=CLOSE_SECONDS)
                    log.info("daemon_stopped", events_applied=sum(w.events_applied for w in self.workers),
                             clean=not self.stop_forced)
            outer.cancel_scope.cancel()

    async def _serve(self, pool: asyncpg.Pool) -> None:
        self.workers = [
            ProjectionWorker(pool, projection, batch_size=self.settings.batch_size,
                             poll_interval=self.settings.poll_interval, on_error=self.settings.on_error,
                             max_attempts=self.settings.max_attempts, stopping=self.stopping,
                             wakeup=self.wakeups[projection.name], metrics=self.metrics)
            for projection in self.projections
        ]
        async with anyio.create_task_group() as side:
            side.start_soon(self._side_task, "listener", self.listener.run)
            side.start_soon(self._side_task, "heartbeat", lambda: self._heartbeat(pool))
            side.start_soon(self._report_ready)
            side.start_soon(self._side_task, "slow-batch watch", lambda: self._watch_slow_batches(pool))
            async with anyio.create_task_group() as workers:
                for worker in self.workers:
                    workers.start_soon(worker.run)
                # A stop lets each worker finish the batch in hand, for at most stop_timeout: a batch
                # that cannot finish (its read model locked, its server not answering) is then
                # cancelled, and rolls back or dies with its connection, the checkpoint unmoved.
                await self.stopping.wait()
                workers.cancel_scope.deadline = anyio.current_time() + self.settings.stop_timeout
            if workers.cancel_scope.cancelled_caught:
                self.stop_forced = True
                log.error("stop_timeout", after_s=self.settings.stop_timeout,
                          unfinished=[w.projection.name for w in self.workers if w.abandoned is not None])
            side.cancel_scope.cancel()  # every worker has finished its batch and returned

    async def _side_task(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """A side task may only end by cancellation; anything else stops the daemon."""
        try:
            await body()
        except Exception as exc:
            log.error("side_task_failed", task=name, error=db.describe_error(exc))
            raise
        raise RuntimeError(f"side task {name} ended unexpectedly")

    async def _report_ready(self) -> None:
        """READY=1 for systemd once every projection has caught up (or halted) the first time.

        A first catch-up over a long log can outlast the unit's TimeoutStartSec: while it moves, the
        start timeout is extended (EXTEND_TIMEOUT_USEC), each extension reaching past the next one,
        so only a catch-up that applies nothing for START_STALL_SECONDS fails the start. (A single
        batch may take longer than an interval: the extensions go on through it.)
        """
        applied, moved_at = 0, anyio.current_time()
        # at once too: the unit's TimeoutStartSec may be nearly spent already (waiting for the database)
        systemd.notify_extend_start(2 * START_PROGRESS_SECONDS, "catching up: 0 events applied")
        while True:
            with anyio.move_on_after(START_PROGRESS_SECONDS) as waiting:
                for worker in self.workers:
                    await worker.caught_up_once.wait()
            if not waiting.cancelled_caught:
                break
            now_applied = sum(worker.events_applied for worker in self.workers)
            if now_applied > applied:
                applied, moved_at = now_applied, anyio.current_time()
            if anyio.current_time() - moved_at < START_STALL_SECONDS:
                systemd.notify_extend_start(2 * START_PROGRESS_SECONDS, f"catching up: {applied} events applied")
        log.info("daemon_ready", projections=[p.name for p in self.projections])
        systemd.notify_ready(f"running {', '.join(p.name for p in self.projections)}")

    async def _open_pool(self) -> asyncpg.Pool | None:
        failures = 0
        while not self.stopping.is_set():
            pool = None
            backend: int | None = None
            try:
                pool = await db.create_pool(self.dsn, role="daemon", min_size=1,
                                            max_size=len(self.projections) + 3, timeout=10)
                async with db.acquire(pool) as conn:
                    backend = conn.get_server_pid()
                    await self._check_schema(conn)
                    server_version = await conn.fetchval("SHOW server_version")
                    timeouts = {row["name"]: row["setting"] + (row["unit"] or "")
                                for row in await conn.fetch(queries()["session_timeouts"])}
                    notified = await notify_channel(conn)
                    await conn.execute(queries()["register_daemon"], self.id, socket.gethostname(), os.getpid(),
                                       [p.name for p in self.projections])
            except anyio.get_cancelled_exc_class():  # a stop during start-up
                if pool is not None:
                    pool.terminate()
                if backend is not None:
                    await self._end_start_up_session(backend)
                raise
            except Exception as exc:
                if pool is not None:
                    pool.terminate()
                if isinstance(exc, (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError)):
                    # A wrong password or user, a database that does not exist: restarting will not
                    # fix them, so one plain line and the configuration error's exit code, not a loop.
                    raise ConfigError(f"{db.describe_error(exc)}: check PGPROJECTOR_DSN") from None
                if isinstance(exc, asyncpg.InsufficientPrivilegeError):
                    # Its role may not read pgprojector's own tables: waiting will not grant it.
                    raise ConfigError(f"{db.describe_error(exc)}: the daemon's role needs CONNECT on the database "
                                      "and the grants of pgprojector_projector (`pgprojector migrate --roles`, "
                                      "then GRANT pgprojector_projector TO the role)") from None
                if isinstance(exc, SchemaBehindError):
                    # A rolling deploy that starts the new daemons before `migrate`: the old ones go
                    # on meanwhile (a newer schema serves them), this one waits for it.
                    delay = SCHEMA_WAIT_SECONDS
                    log.warning("schema_behind", error=str(exc), retry_in_s=delay)
                    systemd.notify_status(f"waiting for `pgprojector migrate`: {exc}")
                elif is_transient(exc):
                    failures += 1
                    delay = backoff(failures, base=0.5, cap=30.0)
                    log.warning("database_unavailable", error=db.describe_error(exc), attempt=failures,
                                retry_in_s=round(delay, 2))
                    systemd.notify_status(f"waiting for the database: {db.describe_error(exc)}")
                else:
                    raise
                with anyio.move_on_after(delay):
                    await self.stopping.wait()
                continue
            if notified != self.settings.channel:
                # Not an error (a channel being moved by `migrate --channel` goes through this), but
                # until it matches the daemon learns of new events only by polling.
                log.warning("channel_mismatch", listening=self.settings.channel, notified=notified,
                            hint="new events are seen only every poll interval: give the daemon the channel "
                                 "`pgprojector migrate --channel` was given, or migrate with this one")
            log.info("daemon_started", projections=[p.name for p in self.projections],
                     batch_size=self.settings.batch_size, poll_interval=self.settings.poll_interval,
                     on_error=self.settings.on_error, max_attempts=self.settings.max_attempts,
                     channel=self.settings.channel, server_version=server_version, server_timeouts=timeouts,
                     database=db.redact_dsn(self.dsn), daemon_id=str(self.id), pid=os.getpid())
            return pool
        return None

    async def _end_start_up_session(self, backend: int) -> None:
        """A backend cut while it waits on a lock (the migration lock, say) waits on in the lock's
        queue, the session of a daemon gone, until the lock is granted: ended here."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SECONDS):
            try:
                ender = await db.connect(self.dsn, role="daemon")
                try:
                    await ender.execute(queries()["end_start_up_session"], backend)
                finally:
                    ender.terminate()
            except Exception as exc:
                log.warning("start_up_session_not_ended", backend_pid=backend, error=db.describe_error(exc))

    async def _check_schema(self, conn: asyncpg.Connection) -> None:
        await require_current_schema(conn)
        cache = await position_cache(conn)
        if cache != 1:
            raise ConfigError(f"events_position_seq has CACHE {cache}, and the read horizon needs CACHE 1 to never "
                              "skip an event: run `pgprojector migrate`, which sets it back")
        behind = await position_sequence_behind(conn)
        if behind is not None:
            raise ConfigError(f"events_position_seq is at {behind[0]}, behind the log's largest position {behind[1]} "
                              "(moved back with setval, or restored without its value): new events would land "
                              "below the projections' checkpoints and never be read; run `pgprojector migrate`, "
                              "which sets it forward")
        registered = {row["name"] for row in await conn.fetch("SELECT name FROM pgprojector_projections")}
        for projection in self.projections:
            if projection.name not in registered:
                try:
                    await setup_projection(conn, projection)
                except asyncpg.InsufficientPrivilegeError:
                    raise ConfigError(
                        f"projection {projection.name} is not set up and this role may not create its tables: "
                        "run `pgprojector migrate` as the schema owner with the same PGPROJECTOR_PROJECTIONS"
                    ) from None
                log.info("projection_registered", projection=projection.name)

    async def _heartbeat(self, pool: asyncpg.Pool) -> None:
        # (at once too: the gauges have values from the start, where a daemon that started caught up
        # had no checkpoint position to show until its first batch)
        while True:
            try:
                async with db.acquire(pool) as conn:
                    updated = await conn.execute(queries()["heartbeat"], self.id)
                    if updated == "UPDATE 0":  # a restored database, or someone cleaned the table
                        await conn.execute(queries()["register_daemon"], self.id, socket.gethostname(),
                                           os.getpid(), [p.name for p in self.projections])
                    if self.metrics.enabled:
                        for row in await conn.fetch(queries()["status"], 0):
                            self.metrics.projection_state(row["name"], row["position"], row["lag"],
                                                          row["dead_letters"], row["state"] == "halted")
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("heartbeat_failed", error=db.describe_error(exc))
            await anyio.sleep(HEARTBEAT_SECONDS)

    async def _watch_slow_batches(self, pool: asyncpg.Pool) -> None:
        """Logs each batch open for SLOW_BATCH_SECONDS (and again every as long) with what its backend
        is doing: waiting on a lock, and whose (a read model locked by a migration, another daemon's
        batch); idle in transaction (a handler's own work, or a connection lost on the way); or gone.
        Where it once sat silent for as long as the batch did."""
        reported: dict[str, float] = {}
        while True:
            await anyio.sleep(SLOW_CHECK_SECONDS)
            now = anyio.current_time()
            for worker in self.workers:
                flight, name = worker.in_flight, worker.projection.name
                if flight is None or now - max(flight.started, reported.get(name, 0.0)) < SLOW_BATCH_SECONDS:
                    continue
                reported[name] = now
                log.warning("batch_slow", projection=name, seconds=round(now - flight.started),
                            after=flight.after, backend_pid=flight.backend_pid,
                            **await self._backend_activity(pool, flight.backend_pid))

    async def _backend_activity(self, pool: asyncpg.Pool, pid: int | None) -> dict[str, object]:
        if pid is None:
            return {"backend": "none yet (waiting for a connection, or for BEGIN)"}
        with anyio.move_on_after(5):
            try:
                async with db.acquire(pool) as conn:
                    row = await conn.fetchrow(queries()["backend_activity"], pid)
                return {"backend": "gone"} if row is None else dict(row)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                return {"backend": f"unknown: {db.describe_error(exc)}"}
        return {"backend": "not answering"}

    async def _unregister(self, pool: asyncpg.Pool) -> None:
        try:
            with anyio.fail_after(5):
                async with db.acquire(pool) as conn:
                    await conn.execute(queries()["unregister_daemon"], self.id)
        except Exception as exc:  # the heartbeat will simply age out
            log.warning("unregister_failed", error=db.describe_error(exc))

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    # (its default action killed the daemon without a word, and systemd's
                    # Restart=on-failure takes death by SIGHUP for a clean exit: it stayed down)
                    log.warning("signal_ignored", signal="SIGHUP",
                                hint="pgprojector reloads nothing: restart it to apply new settings")
                elif not self.stopping.is_set():
                    log.info("stop_requested", signal=signal.Signals(signum).name)
                    self.request_stop()
                else:
                    log.warning("stop_forced", signal=signal.Signals(signum).name)
                    self.stop_forced = True
                    scope.cancel()

    def request_stop(self) -> None:
        systemd.notify_stopping("finishing the batch in hand")
        self.stopping.set()
        if self._starting is not None:
            self._starting.cancel()
        self._wake_all()

    def _wake_all(self) -> None:
        for wakeup in self.wakeups.values():
            wakeup.set()
