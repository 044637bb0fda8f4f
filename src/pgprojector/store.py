"""The command side: append with optimistic concurrency, and read an aggregate's stream."""

from __future__ import annotations

import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

import anyio
import asyncpg
import structlog

from pgprojector.errors import ConcurrencyError, InvalidEventError, RetriesExhaustedError
from pgprojector.events import NewEvent, RecordedEvent, validate_stream
from pgprojector.sqlfiles import queries

log = structlog.get_logger("pgprojector.store")

Decider = Callable[[list[RecordedEvent]], Sequence[NewEvent] | Awaitable[Sequence[NewEvent]]]

_VERSION_CONSTRAINT = "events_aggregate_id_version_key"
_MAX_VERSION = 2**63 - 1  # events.version is a BIGINT


class EventStore:
    """Appends to and reads from `events`, through any asyncpg pool (or a single connection),
    whatever type codecs it has: the JSON goes to and from the server as text."""

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection) -> None:
        self._db = db

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if isinstance(self._db, asyncpg.Pool):
            async with self._db.acquire() as conn:
                yield conn
        else:
            yield self._db

    async def append(
        self, aggregate_id: str, aggregate_type: str, events: Sequence[NewEvent], expected_version: int
    ) -> int:
        """Append `events` as versions expected_version+1...; returns the new version.

        All or nothing, in one statement. Raises ConcurrencyError when the aggregate is not at
        `expected_version` (another writer got there first), InvalidEventError for bad input (an
        aggregate_type other than the aggregate's is refused by the database).
        """
        validate_stream(aggregate_id, aggregate_type)
        if isinstance(expected_version, bool) or not isinstance(expected_version, int) or expected_version < 0:
            raise InvalidEventError(f"expected_version must be an integer >= 0, got {expected_version!r}")
        if not isinstance(events, Sequence) or isinstance(events, (str, bytes)):
            raise InvalidEventError("events must be a list of NewEvent")
        if expected_version + len(events) > _MAX_VERSION:
            raise InvalidEventError(f"expected_version {expected_version} leaves no room for {len(events)} event(s) "
                                    f"below the largest version, {_MAX_VERSION} (BIGINT)")
        if not events:
            # Nothing to write, but the version returned is the aggregate's, as after any append.
            async with self._connection() as conn:
                actual = await conn.fetchval(queries()["current_version"], aggregate_id)
            if actual != expected_version:
                raise ConcurrencyError(aggregate_id, expected_version, actual)
            return expected_version
        encoded = []
        for event in events:
            if not isinstance(event, NewEvent):
                raise InvalidEventError(f"events must be NewEvent instances, got {type(event).__name__}")
            encoded.append(event.encode())
        types, datas, metadatas = (list(column) for column in zip(*encoded, strict=True))
        async with self._connection() as conn:
            try:
                # A savepoint when the caller's connection is already in a transaction, so that a
                # conflict leaves that transaction usable.
                async with conn.transaction():
                    await conn.execute(
                        queries()["append_events"], aggregate_id, aggregate_type, types, datas, metadatas,
                        expected_version,
                    )
            except asyncpg.UniqueViolationError as exc:
                # (events' own index: a trigger may write another table with such an index, an outbox)
                if exc.table_name != "events" or (exc.constraint_name != _VERSION_CONSTRAINT and not await conn.fetchval(
                        queries()["is_version_key"], exc.schema_name, exc.constraint_name)):
                    raise
                actual = await conn.fetchval(queries()["current_version"], aggregate_id)
                if actual <= expected_version:
                    # Committed, since it conflicts, yet not visible: the caller's transaction reads
                    # an older snapshot. Versions are contiguous, so expected_version + 1 exists.
                    raise ConcurrencyError(aggregate_id, expected_version, expected_version + 1,
                                           stale_snapshot=True) from None
                raise ConcurrencyError(aggregate_id, expected_version, actual) from None
            except asyncpg.CheckViolationError as exc:
                # Raised by the insert trigger: expected_version is ahead of the stream, or, with the
                # stream where it was expected, the aggregate has another aggregate_type.
                actual = await conn.fetchval(queries()["current_version"], aggregate_id)
                if actual == expected_version:
                    raise InvalidEventError(str(exc)) from None
                raise ConcurrencyError(aggregate_id, expected_version, actual) from None
        return expected_version + len(events)

    async def append_with_retry(
        self,
        aggregate_id: str,
        aggregate_type: str,
        decide: Decider,
        max_attempts: int = 10,
        *,
        base_delay: float = 0.005,
        max_delay: float = 0.25,
    ) -> int:
        """Read the stream, ask `decide` what to append, append; on a version conflict, do it all again.

        Only a version conflict is retried: then nothing was written, so re-deciding is safe.
        Any other error (a lost connection during COMMIT included) propagates, because the
        append may have happened. A conflict the caller's REPEATABLE READ or SERIALIZABLE
        transaction cannot see (ConcurrencyError.stale_snapshot) is raised at once: re-reading inside
        it would return the same history. Returns the aggregate's version afterwards.
        """
        if max_attempts < 1:
            raise InvalidEventError("max_attempts must be at least 1")
        last_conflict: ConcurrencyError | None = None
        for attempt in range(1, max_attempts + 1):
            history = await self.read_stream(aggregate_id)
            version = history[-1].version if history else 0
            decided = decide(history)
            new_events = await decided if inspect.isawaitable(decided) else decided
            if isinstance(new_events, (NewEvent, str, bytes, Mapping)) or not isinstance(new_events, Iterable):
                raise InvalidEventError(f"decide must return a list of NewEvent (or []), got {type(new_events).__name__}")
            try:
                return await self.append(aggregate_id, aggregate_type, list(new_events), expected_version=version)
            except ConcurrencyError as conflict:
                if conflict.stale_snapshot:
                    raise  # every re-read in this transaction would see the same history
                last_conflict = conflict
                log.debug("append_conflict", aggregate_id=aggregate_id, attempt=attempt, expected=version,
                          actual=conflict.actual_version)
                if attempt < max_attempts:
                    # Full jitter: racing writers spread out instead of colliding again in lockstep.
                    await anyio.sleep(random.uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1))))
        assert last_conflict is not None
        raise RetriesExhaustedError(aggregate_id, max_attempts, last_conflict)

    async def read_stream(self, aggregate_id: str, as_of: datetime | None = None) -> list[RecordedEvent]:
        """The aggregate's events in version order; with `as_of`, the longest prefix of them created at
        or before it (a version is never returned without the versions below it)."""
        async with self._connection() as conn:
            if as_of is None:
                rows = await conn.fetch(queries()["read_stream"], aggregate_id)
            else:
                if not isinstance(as_of, datetime) or as_of.tzinfo is None:
                    raise InvalidEventError(f"as_of must be a timezone-aware datetime, not {as_of!r}")
                rows = await conn.fetch(queries()["read_stream_as_of"], aggregate_id, as_of)
        # (data and metadata come as JSON text: see sql/queries.sql)
        return [RecordedEvent.from_text_record(row) for row in rows]
