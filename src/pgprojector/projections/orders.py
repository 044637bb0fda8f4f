"""read_model_orders: one row per order, its latest state."""

from __future__ import annotations

import asyncpg

from pgprojector.projection import Projection
from pgprojector.projections.order_events import (
    FUNCTIONS_SQL,
    ORDER_EVENT_TYPES,
    apply_statement,
)
from pgprojector.sqlfiles import read_sql

_APPLY = apply_statement("orders_apply", "read_model_orders", "current_version")
_TYPES = sorted(ORDER_EVENT_TYPES)


async def apply(conn: asyncpg.Connection, after: int, upto: int) -> None:
    await conn.execute(_APPLY, after, upto, _TYPES)


projection = Projection(
    name="orders",
    handle_range=apply,
    event_types=ORDER_EVENT_TYPES,
    schema=FUNCTIONS_SQL + read_sql("projections/orders.sql"),
    tables=("read_model_orders",),
)
