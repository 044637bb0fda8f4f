"""read_model_restaurant_daily: per restaurant and UTC day, confirmations, deliveries, cancellations, revenue."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from decimal import Decimal

import asyncpg

from pgprojector.events import RecordedEvent
from pgprojector.projection import Projection
from pgprojector.projections import order_events as ev
from pgprojector.sqlfiles import queries, read_sql

# DriverAssigned and OrderPickedUp change nothing here.
_WANTED = frozenset({"OrderCreated", "OrderConfirmed", "OrderDelivered", "OrderCancelled"})


class _Day:
    __slots__ = ("confirmed", "delivered", "cancelled", "revenue")

    def __init__(self) -> None:
        self.confirmed = self.delivered = self.cancelled = 0
        self.revenue = Decimal(0)


async def handle(conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
    parsed = ev.parse_batch(events)
    if not parsed:
        return
    sql = queries("projections/queries.sql")
    ids = list({payload.order_id for _, payload in parsed})
    # order_id -> [total_amount, restaurant_id, version]
    orders = {row["order_id"]: [row["total_amount"], row["restaurant_id"], row["version"]]
              for row in await conn.fetch(sql["analytics_load"], ids)}
    days: dict[tuple[int, date], _Day] = {}
    changed: set[int] = set()
    for event, payload in parsed:
        order = orders.get(payload.order_id)
        if order is not None and event.version <= order[2]:
            continue  # applied already
        if isinstance(payload, ev.OrderCreated):
            if order is not None:
                continue  # a second OrderCreated changes nothing here; the orders projection reports it
            orders[payload.order_id] = [payload.total_amount, None, event.version]
            changed.add(payload.order_id)
            continue
        if order is None:
            raise ev.not_created(event)
        order[2] = event.version
        changed.add(payload.order_id)
        if isinstance(payload, ev.OrderConfirmed):
            order[1] = payload.restaurant_id
        elif order[1] is None:
            continue  # delivered or cancelled before any confirmation: no restaurant to count it for
        day = days.setdefault((order[1], ev.utc_day(event.created_at)), _Day())
        if isinstance(payload, ev.OrderConfirmed):
            day.confirmed += 1
        elif isinstance(payload, ev.OrderDelivered):
            day.delivered += 1
            day.revenue += order[0]
        else:
            day.cancelled += 1
    if days:
        keys = list(days)
        await conn.execute(sql["analytics_add"], [k[0] for k in keys], [k[1] for k in keys],
                           [days[k].confirmed for k in keys], [days[k].delivered for k in keys],
                           [days[k].cancelled for k in keys], [days[k].revenue for k in keys])
    if changed:
        await conn.execute(sql["analytics_upsert_orders"], list(changed), [orders[i][0] for i in changed],
                           [orders[i][1] for i in changed], [orders[i][2] for i in changed])


projection = Projection(
    name="analytics",
    handle=handle,
    event_types=_WANTED,
    schema=read_sql("projections/analytics.sql"),
    tables=("read_model_restaurant_daily", "projection_analytics_orders"),
)
