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


async def count_created_per_user(conn: asyncpg.Connection, after: int, upto: int) -> None:
    """A range handler: the batch's OrderCreated events, counted in SQL; it does not say how many."""
    await conn.execute(
        "INSERT INTO created_per_user (user_id, orders) "
        "SELECT (data ->> 'user_id')::bigint, count(*) FROM events "
        "WHERE position > $1 AND position <= $2 AND event_type = 'OrderCreated' GROUP BY 1 "
        "ON CONFLICT (user_id) DO UPDATE SET orders = created_per_user.orders + EXCLUDED.orders",
        after, upto)


range_projection = Projection(
    name="created_per_user",
    handle_range=count_created_per_user,
    event_types=frozenset({"OrderCreated"}),
    schema="CREATE TABLE IF NOT EXISTS created_per_user (user_id BIGINT PRIMARY KEY, orders BIGINT NOT NULL)",
    tables=("created_per_user",),
)
