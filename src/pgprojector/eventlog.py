"""`pgprojector events`: the log as lines for people or JSON for scripts, read once or followed."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
import structlog

from pgprojector import db
from pgprojector.events import RecordedEvent
from pgprojector.listener import Wakeup
from pgprojector.retry import backoff, is_transient
from pgprojector.store import EventStore

log = structlog.get_logger("pgprojector.events")

FOLLOW_BATCH = 500
READ_CHUNK = 500  # rows per round trip when reading the log once
MAX_DATA_TEXT = 300  # of the compact JSON in a human-readable line; --json prints it all

_READ = """
SELECT id, aggregate_id, aggregate_type, event_type, data::text AS data, metadata::text AS metadata, version, position,
       created_at
FROM events
WHERE position > $1 AND ($2::bigint IS NULL OR position <= $2)
  AND ($3::text IS NULL OR aggregate_id = $3)
  AND ($4::text[] IS NULL OR event_type = ANY($4::text[]))
  AND ($5::timestamptz IS NULL OR created_at <= $5)
ORDER BY position
LIMIT $6
"""
_HORIZON = "SELECT horizon FROM pgprojector_horizon()"


@dataclass(frozen=True)
class EventFilter:
    aggregate_id: str | None = None
    event_types: Sequence[str] | None = None
    after: int = 0
    as_of: datetime | None = None  # timezone-aware

    def matches(self, event: RecordedEvent) -> bool:
        return event.position > self.after and (not self.event_types or event.event_type in self.event_types)


def to_json(event: RecordedEvent) -> dict[str, Any]:
    return {
        "id": str(event.id), "aggregate_id": event.aggregate_id, "aggregate_type": event.aggregate_type,
        "event_type": event.event_type, "data": event.data, "metadata": event.metadata, "version": event.version,
        "position": event.position, "created_at": event.created_at.isoformat(),
    }


def json_line(event: RecordedEvent) -> str:
    return json.dumps(to_json(event), ensure_ascii=False)


def human_line(event: RecordedEvent) -> str:
    """`position  created_at  aggregate vVERSION  event_type  {compact data}`."""
    created = event.created_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    data = json.dumps(event.data, ensure_ascii=False, separators=(",", ":"))
    if len(data) > MAX_DATA_TEXT:
        data = data[: MAX_DATA_TEXT - 3] + "..."
    return f"{event.position:>10}  {created}  {event.aggregate_id} v{event.version}  {event.event_type}  {data}"


async def read_events(conn: asyncpg.Connection, where: EventFilter, limit: int) -> AsyncGenerator[RecordedEvent, None]:
    """Up to `limit` committed events: an aggregate's in version order, otherwise in log order.

    The log is read through a cursor, READ_CHUNK rows at a time, in one read-only transaction (one
    snapshot): a large `limit` is printed as it is read, never held in memory. (An aggregate's
    history is read whole, as `EventStore.read_stream` gives it.) Close the iterator when done
    with it early (`contextlib.aclosing`): that ends the transaction.
    """
    if where.aggregate_id is not None:
        history = await EventStore(conn).read_stream(where.aggregate_id, as_of=where.as_of)
        for event in [event for event in history if where.matches(event)][:limit]:
            yield event
        return
    async with conn.transaction(readonly=True):
        async for row in conn.cursor(_READ, where.after, None, None,
                                     list(where.event_types) if where.event_types else None, where.as_of, limit,
                                     prefetch=READ_CHUNK):
            yield RecordedEvent.from_text_record(row)


class Follower:
    """Prints events as they land, in log order, never skipping one.

    Reads only up to the read horizon (taken in an earlier statement than the read): an event
    below it that is still being appended by an open transaction is waited for, not passed over.
    Woken by LISTEN on the channel, with a poll as the fallback; reconnects when the connection
    drops, carrying on after the last event printed.
    """

    def __init__(self, dsn: str, channel: str, poll_interval: float, where: EventFilter, *,
                 from_position: int | None, emit: Callable[[RecordedEvent], None], limit: int | None) -> None:
        self._dsn = dsn
        self._channel = channel
        self._poll_interval = poll_interval
        self._where = where
        self.position = from_position  # None: start at the end of the log
        self._emit = emit
        self._remaining = limit

    async def run(self, conn: asyncpg.Connection) -> None:
        """Until cancelled, or until `limit` events were printed. `conn` is used first, then replaced."""
        current: asyncpg.Connection | None = conn
        failures = 0
        try:
            while True:
                try:
                    if current is None:
                        current = await db.connect(self._dsn, role="events", timeout=10)
                    await self._follow(current)
                    return
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    failures += 1
                    delay = backoff(failures, base=0.2, cap=10.0)
                    log.warning("events_reconnect", error=db.describe_error(exc), position=self.position,
                                retry_in_s=round(delay, 2))
                    if current is not None:
                        current.terminate()
                        current = None
                    await anyio.sleep(delay)
        finally:
            if current is not None:
                current.terminate()

    async def _follow(self, conn: asyncpg.Connection) -> None:
        wakeup = Wakeup()
        await conn.add_listener(self._channel, lambda *_args: wakeup.set())
        if self.position is None:
            self.position = await conn.fetchval(_HORIZON)
        types = list(self._where.event_types) if self._where.event_types else None
        while True:
            horizon = await conn.fetchval(_HORIZON)
            # A later statement, so a later snapshot: every event up to the horizon is visible.
            rows = await conn.fetch(_READ, self.position, horizon, self._where.aggregate_id, types, None,
                                    FOLLOW_BATCH)
            for row in rows:
                self._emit(RecordedEvent.from_text_record(row))
                self.position = row["position"]
                if self._remaining is not None:
                    self._remaining -= 1
                    if self._remaining <= 0:
                        return
            if len(rows) < FOLLOW_BATCH:
                # Everything up to the horizon has been seen, filtered out or not.
                self.position = max(self.position, horizon)
                await wakeup.wait(self._poll_interval)
