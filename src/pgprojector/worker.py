"""One projection's loop: read a batch after the checkpoint, apply it, move the checkpoint, repeat."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import asyncpg
import structlog

from pgprojector import db
from pgprojector.errors import InvalidEventError
from pgprojector.events import RecordedEvent
from pgprojector.listener import Wakeup
from pgprojector.metrics import Metrics
from pgprojector.projection import Projection
from pgprojector.retry import backoff, is_transient
from pgprojector.sqlfiles import queries

log = structlog.get_logger("pgprojector.worker")

MAX_ERROR_TEXT = 2000


@dataclass
class Batch:
    """What one transaction did."""

    applied: int = 0
    caught_up: bool = False
    inactive: bool = False  # the checkpoint is not in the worker's active state (halted, rebuilding...)
    state: str = ""
    first: int = 0
    last: int = 0
    checkpoint: int = 0
    horizon: int = 0
    held_back: bool = False  # an open transaction that appended holds the horizon below the last position drawn


@dataclass
class InFlight:
    """The batch a worker has in hand, from taking a connection to giving it back: what the daemon's
    watch on slow batches and its stop timeout look at."""

    started: float  # anyio.current_time()
    backend_pid: int | None = None  # once it has a connection
    after: int | None = None  # the checkpoint, once locked


class EventFailed(Exception):
    """The projection's handler rejected the batch of events at positions `first`..`last`, `size`
    events (a `handle` batch) or positions (a `handle_range` batch); 1 is a single event."""

    def __init__(self, cause: BaseException, first: int, last: int, size: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.first = first
        self.last = last
        self.size = size


# A batch whose handler loses its connection (or meets other database trouble) this many times in a row
# at the same checkpoint is halved: see _on_database_failure.
SHRINK_AFTER = 2


def _too_big(exc: BaseException, size: int) -> bool:
    """A batch of more than one event canceled, by a statement_timeout most likely: retried as it is,
    it would time out forever, so it is halved like a failed batch (with the error logged)."""
    return size > 1 and isinstance(exc, asyncpg.QueryCanceledError)


class ProjectionWorker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        projection: Projection,
        *,
        batch_size: int,
        poll_interval: float,
        on_error: str,
        max_attempts: int,
        stopping: anyio.Event,
        wakeup: Wakeup,
        metrics: Metrics | None = None,
        active_state: str = "running",
        on_caught_up: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    ) -> None:
        """`active_state`: the checkpoint state in which this worker applies events (a rebuild
        applies in 'rebuilding'); `on_caught_up(conn)` runs inside the transaction of a short read."""
        self.pool = pool
        self.projection = projection
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.on_error = on_error
        self.max_attempts = max_attempts
        self.stopping = stopping
        self.wakeup = wakeup
        self.metrics = metrics or Metrics(None)
        self.active_state = active_state
        self.on_caught_up = on_caught_up
        self._types = sorted(projection.event_types) if projection.event_types is not None else None
        self._log = log.bind(projection=projection.name)
        # After a failed batch: batches of at most this many events (positions), halved at each
        # failure, until the checkpoint passes `_isolate_until` (see _on_event_failure).
        self._isolation_limit = 0
        self._isolate_until = 0
        self._attempts = 0  # consecutive failures of the event at the checkpoint
        self._db_failures = 0
        # The batch (checkpoint, last position, size) whose handler last met database trouble, and
        # how many times in a row one did at that checkpoint.
        self._interrupted: tuple[int, int, int] | None = None
        self._interruptions = (0, 0)  # (checkpoint, count)
        # The batch (checkpoint, last position, size) whose handler has been called, until its transaction
        # ends: trouble from then on (the handler's, or at the checkpoint's save or COMMIT after it) is
        # the batch's interruption.
        self._handled: tuple[int, int, int] | None = None
        self._waiting_logged_for: int | None = None
        self.events_applied = 0
        self.in_flight: InFlight | None = None
        self.abandoned: InFlight | None = None  # the batch in hand when a stop cancelled the worker
        self.caught_up_once = anyio.Event()  # set the first time there is nothing left to apply (or it is halted)

    async def run(self) -> None:
        """The main loop. Returns when a stop is requested, after the batch in hand has committed."""
        while not self.stopping.is_set():
            batch = await self.step()
            if batch is None:
                continue
            if batch.inactive or batch.caught_up:
                self.caught_up_once.set()
            if batch.inactive:
                await self._sleep(self.poll_interval)  # until an operator resumes it or a rebuild hands it back
            elif batch.caught_up:
                await self.wakeup.wait(self.poll_interval)

    async def step(self) -> Batch | None:
        """One batch; None when it failed and the failure was dealt with (retry later, parked, halted)."""
        try:
            try:
                batch = await self.apply_next_batch()
            except EventFailed as failure:
                await self._on_event_failure(failure)
                return None
            if batch.caught_up:
                await self._report_waiting(batch)
        except Exception as exc:
            if not is_transient(exc):
                raise
            await self._on_database_failure(exc)
            return None
        if self._db_failures:
            self._log.info("database_reconnected", after_failures=self._db_failures)
            self.metrics.reconnect(self.projection.name)
            self._db_failures = 0
        return batch

    async def apply_next_batch(self) -> Batch:
        """One transaction: lock the checkpoint, read after it up to the horizon, apply, move it."""
        limit = self._isolation_limit or self.batch_size
        sql = queries()
        started = time.perf_counter()
        # READ COMMITTED whatever the database's default: the read below must see every event the
        # horizon lets through, so it needs a snapshot taken after the horizon's. Under REPEATABLE
        # READ the whole transaction keeps the snapshot of its first statement, taken before the
        # horizon: an appender committing in between is past the horizon but invisible, and skipped.
        span: tuple[int, int, int] | None = None  # the batch's first and last position and size, applied
        # (from before the connection is taken until after it is back: a pool or a BEGIN that does not
        # answer holds a batch up too)
        self.in_flight = InFlight(anyio.current_time())
        self._handled = None
        try:
            async with db.acquire(self.pool) as conn, conn.transaction(isolation="read_committed"):
                self.in_flight.backend_pid = conn.get_server_pid()
                checkpoint = await conn.fetchrow(sql["lock_checkpoint"], self.projection.name)
                if checkpoint is None:
                    raise RuntimeError(f"projection {self.projection.name} is not set up: run `pgprojector migrate`")
                if checkpoint["state"] != self.active_state:
                    # Halted, or being rebuilt, by someone else: the failures counted so far are not the
                    # next try's (after a resume, or a rebuild's hand-back, an event gets its full tries).
                    self._attempts = 0
                    self._stop_isolating()
                    return Batch(inactive=True, checkpoint=checkpoint["position"], state=checkpoint["state"])
                position = self.in_flight.after = checkpoint["position"]
                horizon, drawn = await conn.fetchrow(sql["horizon"])
                applied, first, last, reached, size = await self._read_and_apply(conn, position, horizon, limit)
                span = (first, last, size) if size else None
                # Every event up to `reached` has been applied or passed over; none at or below the
                # horizon can still appear.
                new_position = max(position, reached)
                caught_up = new_position >= horizon
                if new_position != position:
                    await conn.execute(sql["save_checkpoint"], self.projection.name, new_position)
                if caught_up and self.on_caught_up is not None:
                    await self.on_caught_up(conn)
        except Exception as exc:
            if self._handled is not None and is_transient(exc):
                # (a handler that writes first and then works in Python, idle in its transaction, loses
                # its session only at the next statement: the checkpoint's save, or COMMIT)
                self._interrupted = self._handled
            # What fails after the handler returned, at COMMIT (a deferred constraint), fails the batch too.
            if span is None or isinstance(exc, EventFailed) or is_transient(exc):
                raise
            raise EventFailed(exc, *span) from exc
        except BaseException:  # cancelled (a stop that timed out): the batch rolls back
            self.abandoned = self.in_flight
            raise
        finally:
            self.in_flight = None
        batch = Batch(applied=applied, caught_up=caught_up, checkpoint=new_position, horizon=horizon,
                      held_back=drawn > horizon)
        if new_position != position:
            if self._isolating() and self._attempts:  # the culprit went through when retried: whole batches again
                self._stop_isolating()
            self._attempts = 0
            self._interruptions = (0, 0)
        if self._isolating() and new_position >= self._isolate_until:
            self._stop_isolating()
        if applied:
            batch.first, batch.last = first, last
            self.events_applied += applied
            elapsed = time.perf_counter() - started
            self.metrics.batch(self.projection.name, applied, elapsed, new_position)
            self._log.info("batch_applied", first=batch.first, last=batch.last, events=applied,
                           checkpoint=new_position, ms=round(elapsed * 1000, 1))
        if batch.caught_up and not self._isolating():
            self._log.debug("caught_up", checkpoint=new_position)
        return batch

    async def _read_and_apply(self, conn: asyncpg.Connection, after: int, horizon: int,
                              limit: int) -> tuple[int, int, int, int, int]:
        """Apply the next batch after `after`, none past `horizon`: (events applied, first and last
        position of the batch, the position up to which everything has been applied or passed over,
        and the batch's size as EventFailed counts it, 0 for no batch).

        A `handle` batch is the next `limit` wanted events, read here. A `handle_range` batch is the
        next `limit` positions, which hold at most `limit` events: the handler reads them itself, and
        no query runs here first to find where `limit` wanted events end (but a batch of one is the
        next wanted event, wherever it is)."""
        sql = queries()
        handle_range = self.projection.handle_range
        if handle_range is not None:
            if limit == 1:  # a batch of one (isolating a failure): exactly the next wanted event
                upto = await conn.fetchval(sql["next_position"], after, horizon, self._types)
                if upto is None:
                    return 0, 0, 0, horizon, 0
                first = upto
            else:
                upto = min(horizon, after + limit)
                if upto <= after:
                    return 0, 0, 0, horizon, 0
                first = after + 1
            count, last, reached, size = None, upto, upto, 1 if limit == 1 else upto - after
            apply = handle_range(conn, after, upto)
        else:
            assert self.projection.handle is not None
            try:
                events = [RecordedEvent.from_record(row) for row in await conn.fetch(
                    sql["read_batch"], after, horizon, self._types, limit)]
                for event in events:  # a handler may rely on RecordedEvent's annotations
                    if (problem := event.shape_problem()) is not None:
                        raise InvalidEventError(f"{event.event_type} at position {event.position} "
                                                f"({event.aggregate_id} v{event.version}): {problem}")
            except Exception as exc:
                if is_transient(exc) and not _too_big(exc, limit):
                    raise
                # An event Python cannot take in (JSON nested deeper than its decoder goes, or data
                # that is not an object): the batch fails as if its handler had, and is halved down
                # to that event, which is then retried, parked or halted at like any other. (A read
                # the server canceled has aborted the transaction: the halving needs no position.)
                first = None if isinstance(exc, asyncpg.PostgresError) else await conn.fetchval(
                    sql["next_position"], after, horizon, self._types)
                raise EventFailed(exc, first or after + 1, horizon, limit) from exc
            if not events:
                return 0, 0, 0, horizon, 0
            count, first, last = len(events), events[0].position, events[-1].position
            size = count
            # A short read saw everything up to the horizon.
            reached = last if count == limit else horizon
            apply = self.projection.handle(conn, events)
        self._handled = (after, last, size)
        try:
            applied = await apply
        except Exception as exc:
            if is_transient(exc) and not _too_big(exc, size):
                raise
            raise EventFailed(exc, first, last, size) from exc
        if count is None:
            count = applied if applied is not None else await conn.fetchval(
                sql["count_range"], after, upto, self._types)
        return count, first, last, reached, size

    def _isolating(self) -> bool:
        return self._isolation_limit > 0

    def _stop_isolating(self) -> None:
        self._isolation_limit = self._isolate_until = 0

    async def _on_event_failure(self, failure: EventFailed) -> None:
        error = f"{db.describe_error(failure.cause)}"[:MAX_ERROR_TEXT]
        event = None
        if failure.size == 1:
            # The culprit is the first wanted event from `first` up to `last`: `first` is only where
            # the batch began (a read the server failed names no event). There is none when a
            # `handle_range` batch of the one position left before the horizon holds no wanted event
            # (a rolled-back append's hole, say): nothing to blame, and it goes again as a batch of
            # one, the next wanted event wherever it is.
            async with db.acquire(self.pool) as conn:
                wanted = await conn.fetchval(queries()["next_position"], failure.first - 1, failure.last, self._types)
                if wanted is not None:
                    event = await conn.fetchrow(queries()["event_at"], wanted)
        if event is None:
            # A batch failed: replay it in halves to find the culprit, committing the good events
            # before it. The half that fails is halved in turn, down to one event: about log2(batch
            # size) failed transactions.
            self._isolation_limit = max(1, failure.size // 2)
            self._isolate_until = max(self._isolate_until, failure.last)
            self._log.warning("batch_failed_isolating", first=failure.first, last=failure.last, error=error,
                              next_batch=self._isolation_limit)
            if failure.size == 1:  # nothing to blame: should it fail again so, it is not at full speed
                await self._sleep(self.poll_interval)
            return
        self._attempts += 1
        context = {"position": event["position"], "event_type": event["event_type"],
                   "aggregate_id": event["aggregate_id"], "version": event["version"], "attempt": self._attempts,
                   "error": error}
        if self._attempts < self.max_attempts:
            delay = backoff(self._attempts, base=0.2, cap=30.0)
            self._log.warning("event_retry", retry_in_s=round(delay, 2), **context)
            await self._sleep(delay)
            return
        # What the dead letter and `status` keep names the event, as the built-ins' own errors do.
        if f"at position {event['position']} " not in error:
            error = (f"{event['event_type']} at position {event['position']} ({event['aggregate_id']} "
                     f"v{event['version']}): {error}")[:MAX_ERROR_TEXT]
        async with db.acquire(self.pool) as conn, conn.transaction():
            checkpoint = await conn.fetchrow(queries()["lock_checkpoint"], self.projection.name)
            if (checkpoint is None or checkpoint["state"] != self.active_state
                    or checkpoint["position"] >= event["position"]):
                self._attempts = 0  # someone else moved it meanwhile: this event is not ours to count
                self._stop_isolating()
                return
            if self.on_error == "park":
                await conn.execute(queries()["park_event"], self.projection.name, event["position"], event["id"],
                                   error, self._attempts)
                await conn.execute(queries()["save_checkpoint"], self.projection.name, event["position"])
                await conn.execute(queries()["record_error"], self.projection.name, error)
            else:
                await conn.execute(queries()["halt_projection"], self.projection.name, event["position"], error)
        self._attempts = 0
        self._log.error("event_parked" if self.on_error == "park" else "projection_halted", **context)
        # The rest of the failed batch goes as whole batches again (another bad event in it is
        # isolated in its turn).
        self._stop_isolating()

    async def _on_database_failure(self, exc: BaseException) -> None:
        self._db_failures += 1
        delay = backoff(self._db_failures, base=0.2, cap=10.0)
        self._log.warning("database_unavailable", error=db.describe_error(exc), attempt=self._db_failures,
                          retry_in_s=round(delay, 2))
        self._shrink_if_interrupted_again()
        await self._sleep(delay)

    def _shrink_if_interrupted_again(self) -> None:
        """A batch whose handler keeps meeting database trouble at the same checkpoint is halved (the
        trouble is never counted against an event). Most likely the server ends the session while the
        handler works, an idle_in_transaction_session_timeout shorter than the batch's handler takes
        (asyncpg reports only "connection is closed"), and retried as it is, the batch would fail for
        ever. Halved, a smaller batch goes through; after the failed batch's last position, whole
        batches again."""
        interrupted, self._interrupted = self._interrupted, None
        if interrupted is None:
            return
        checkpoint, last, size = interrupted
        at, count = self._interruptions
        count = count + 1 if at == checkpoint else 1
        self._interruptions = (checkpoint, count)
        if count < SHRINK_AFTER or size <= 1:
            return
        self._interruptions = (checkpoint, 0)
        self._isolation_limit = max(1, size // 2)
        self._isolate_until = max(self._isolate_until, last)
        self._log.warning("batch_shrunk", checkpoint=checkpoint, failures=count, next_batch=self._isolation_limit,
                          hint="the handler met database trouble (its connection lost, most likely) in each of "
                               "these batches: if it goes on, look for a server setting that ends sessions "
                               "mid-batch, such as an idle_in_transaction_session_timeout shorter than a batch's "
                               "handler takes")

    async def _report_waiting(self, batch: Batch) -> None:
        """Log, once per horizon, the open transactions holding it back (if any)."""
        if not batch.held_back or self._waiting_logged_for == batch.horizon:
            return
        async with db.acquire(self.pool) as conn:
            blockers = await conn.fetch(queries()["waiting_on"], batch.horizon + 1)
        if blockers:
            first = blockers[0]
            self._log.info("waiting_on_transaction", horizon=batch.horizon, pid=first["pid"],
                           since=first["xact_start"].isoformat() if first["xact_start"] else None,
                           application=first["application_name"], open_appenders=len(blockers))
            self._waiting_logged_for = batch.horizon

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on a stop request."""
        with anyio.move_on_after(seconds):
            await self.stopping.wait()
