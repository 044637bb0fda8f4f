"""read_model_orders: one row per order, its latest state."""

from __future__ import annotations

import asyncpg

from pgprojector.projection import Projection
from pgprojector.projections.order_events import FUNCTIONS_SQL, ORDER_EVENT_TYPES, reject_bad_event
from pgprojector.sqlfiles import queries, read_sql

_TYPES = sorted(ORDER_EVENT_TYPES)


async def apply(conn: asyncpg.Connection, after: int, upto: int) -> None:
    await reject_bad_event(conn, after, upto, _TYPES, "read_model_orders", "current_version")
    await conn.execute(queries("projections/queries.sql")["orders_apply"], after, upto, _TYPES)


projection = Projection(
    name="orders",
    handle_range=apply,
    event_types=ORDER_EVENT_TYPES,
    schema=FUNCTIONS_SQL + read_sql("projections/orders.sql"),
    tables=("read_model_orders",),
)
