"""A projection defined outside the pgprojector package, exactly as a user would write one."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from pgprojector import Projection, RecordedEvent


async def count_by_type(conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
    await conn.executemany(
        "INSERT INTO event_type_counts (event_type, seen) VALUES ($1, 1) "
        "ON CONFLICT (event_type) DO UPDATE SET seen = event_type_counts.seen + 1",
        [(event.event_type,) for event in events],
    )


projection = Projection(
    name="event_type_counts",
    handle=count_by_type,
    schema="CREATE TABLE IF NOT EXISTS event_type_counts (event_type TEXT PRIMARY KEY, seen BIGINT NOT NULL)",
    tables=("event_type_counts",),
)
