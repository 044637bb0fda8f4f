"""read_model_orders: one row per order, its latest state."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from pgprojector.errors import ProjectionError
from pgprojector.events import RecordedEvent
from pgprojector.projection import Projection
from pgprojector.projections import order_events as ev
from pgprojector.sqlfiles import queries, read_sql

_COLUMNS = ("order_id", "user_id", "restaurant_id", "status", "items", "total_amount", "delivery_address",
            "created_at", "updated_at", "current_version", "user_name", "restaurant_name", "driver_name",
            "estimated_delivery")


async def handle(conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
    parsed = ev.parse_batch(events)
    if not parsed:
        return
    sql = queries("projections/queries.sql")
    ids = list({payload.order_id for _, payload in parsed})
    rows: dict[int, dict[str, Any]] = {row["order_id"]: dict(row) for row in await conn.fetch(sql["orders_load"], ids)}
    changed: set[int] = set()
    for event, payload in parsed:
        row = rows.get(payload.order_id)
        if row is not None and event.version <= row["current_version"]:
            continue  # applied already
        if isinstance(payload, ev.OrderCreated):
            if row is not None:
                raise ProjectionError(
                    f"OrderCreated at position {event.position}: order {payload.order_id} exists already",
                    position=event.position, event_type=event.event_type,
                )
            row = rows[payload.order_id] = dict.fromkeys(_COLUMNS)
            row.update(order_id=payload.order_id, user_id=payload.user_id, user_name=payload.user_name,
                       items=payload.items, total_amount=payload.total_amount,
                       delivery_address=payload.delivery_address, created_at=event.created_at)
        elif row is None:
            raise ev.not_created(event)
        elif isinstance(payload, ev.OrderConfirmed):
            row.update(restaurant_id=payload.restaurant_id, restaurant_name=payload.restaurant_name,
                       estimated_delivery=payload.estimated_delivery)
        elif isinstance(payload, ev.DriverAssigned):
            row["driver_name"] = payload.driver_name
        row.update(status=ev.STATUS_AFTER[event.event_type], updated_at=event.created_at,
                   current_version=event.version)
        changed.add(payload.order_id)
    if changed:
        columns = [[rows[order_id][name] for order_id in changed] for name in _COLUMNS]
        # As JSON text: a list inside the jsonb[] parameter would read as another array dimension.
        columns[_COLUMNS.index("items")] = [json.dumps(items) for items in columns[_COLUMNS.index("items")]]
        await conn.execute(sql["orders_upsert"], *columns)


projection = Projection(
    name="orders",
    handle=handle,
    event_types=frozenset(ev.MODELS),
    schema=read_sql("projections/orders.sql"),
    tables=("read_model_orders",),
)
