"""read_model_restaurant_daily: per restaurant and UTC day, confirmations, deliveries, cancellations, revenue.

It remembers each order's amount (from OrderCreated) and confirming restaurant in its own
projection_analytics_orders. DriverAssigned and OrderPickedUp change nothing here.
"""

from __future__ import annotations

import asyncpg

from pgprojector.projection import Projection
from pgprojector.projections.order_events import FUNCTIONS_SQL, apply_statement
from pgprojector.sqlfiles import read_sql

_WANTED = frozenset({"OrderCreated", "OrderConfirmed", "OrderDelivered", "OrderCancelled"})
_APPLY = apply_statement("analytics_apply", "projection_analytics_orders", "version")
_TYPES = sorted(_WANTED)


async def apply(conn: asyncpg.Connection, after: int, upto: int) -> None:
    await conn.execute(_APPLY, after, upto, _TYPES)


projection = Projection(
    name="analytics",
    handle_range=apply,
    event_types=_WANTED,
    schema=FUNCTIONS_SQL + read_sql("projections/analytics.sql"),
    tables=("read_model_restaurant_daily", "projection_analytics_orders"),
)
