"""A test projection that records every event it is handed, in the order it is handed them.

Its primary key turns a double application into an error; applied_seq shows the order of application.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from pgprojector import Projection, RecordedEvent


async def record(conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
    await conn.executemany("INSERT INTO witness (position, aggregate_id, version) VALUES ($1, $2, $3)",
                           [(e.position, e.aggregate_id, e.version) for e in events])


projection = Projection(
    name="witness",
    handle=record,
    schema="CREATE TABLE IF NOT EXISTS witness (position BIGINT PRIMARY KEY, aggregate_id TEXT NOT NULL, "
           "version BIGINT NOT NULL, applied_seq BIGSERIAL)",
    tables=("witness",),
)


async def assert_each_event_applied_once_in_version_order(conn: asyncpg.Connection) -> int:
    """Every committed event is in the witness exactly once, and each aggregate's versions were applied ascending."""
    missing = await conn.fetchval("SELECT count(*) FROM events e LEFT JOIN witness w USING (position) "
                                  "WHERE w.position IS NULL")
    extra = await conn.fetchval("SELECT count(*) FROM witness w LEFT JOIN events e USING (position) "
                                "WHERE e.position IS NULL")
    assert (missing, extra) == (0, 0)
    out_of_order = await conn.fetchval(
        "SELECT count(*) FROM (SELECT version, lag(version) OVER (PARTITION BY aggregate_id ORDER BY applied_seq) "
        "AS previous FROM witness) s WHERE previous IS NOT NULL AND version <> previous + 1")
    assert out_of_order == 0
    return await conn.fetchval("SELECT count(*) FROM witness")
