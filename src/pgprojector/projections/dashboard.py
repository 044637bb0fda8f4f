"""read_model_dashboard: how many orders are in each status right now, and their total.

It remembers each order's status and amount in its own projection_dashboard_orders: moving an
order between statuses needs both, and no projection reads another's tables.
"""

from __future__ import annotations

import asyncpg

from pgprojector.projection import Projection
from pgprojector.projections.order_events import (
    FUNCTIONS_SQL,
    ORDER_EVENT_TYPES,
    apply_statement,
)
from pgprojector.sqlfiles import queries, read_sql

_APPLY = apply_statement("dashboard_apply", "projection_dashboard_orders", "version")
_TYPES = sorted(ORDER_EVENT_TYPES)


async def apply(conn: asyncpg.Connection, after: int, upto: int) -> None:
    sql = queries("projections/queries.sql")
    await conn.execute(_APPLY, after, upto, _TYPES)
    await conn.execute(sql["dashboard_drop_empty"])


projection = Projection(
    name="dashboard",
    handle_range=apply,
    event_types=ORDER_EVENT_TYPES,
    schema=FUNCTIONS_SQL + read_sql("projections/dashboard.sql"),
    tables=("read_model_dashboard", "projection_dashboard_orders"),
)
