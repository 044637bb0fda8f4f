"""The order aggregate's events (CONTRACT.md): what the three built-in projections share.

Validation is SQL (sql/projections/order_events.sql), run over a whole batch in one query before
a projection applies it; the first event that cannot be applied becomes a ProjectionError that
names it, and the worker retries, isolates, halts or parks it like any handler error.
"""

from __future__ import annotations

import asyncpg

from pgprojector.errors import ProjectionError
from pgprojector.sqlfiles import read_sql

ORDER_EVENT_TYPES = frozenset({"OrderCreated", "OrderConfirmed", "DriverAssigned", "OrderPickedUp",
                               "OrderDelivered", "OrderCancelled"})

FUNCTIONS_SQL = read_sql("projections/order_events.sql")


async def reject_bad_event(conn: asyncpg.Connection, after: int, upto: int, types: list[str], state_table: str,
                           version_column: str) -> None:
    """Raise ProjectionError for the first event in (after, upto] this projection cannot apply."""
    bad = await conn.fetchrow("SELECT * FROM pgprojector_first_bad_order_event($1, $2, $3, $4, $5)",
                              after, upto, types, state_table, version_column)
    if bad is not None:
        raise ProjectionError(
            f"{bad['event_type_name']} at position {bad['event_position']} ({bad['event_aggregate_id']} "
            f"v{bad['event_version']}): {bad['problem']}",
            position=bad["event_position"], event_type=bad["event_type_name"],
        )
