"""What the witness projection (daemon_harness.witness) proves: each event applied once, in version order.

The witness records every event it is handed; its primary key turns a double application into an
error, and applied_seq keeps the order of application.
"""

from __future__ import annotations

import asyncpg


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
