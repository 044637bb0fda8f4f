"""read_model_dashboard: how many orders are in each status right now, and their total."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal

import asyncpg

from pgprojector.events import RecordedEvent
from pgprojector.projection import Projection
from pgprojector.projections import order_events as ev
from pgprojector.sqlfiles import queries, read_sql


async def handle(conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
    parsed = ev.parse_batch(events)
    if not parsed:
        return
    sql = queries("projections/queries.sql")
    ids = list({payload.order_id for _, payload in parsed})
    # order_id -> [status, total_amount, version]
    orders = {row["order_id"]: [row["status"], row["total_amount"], row["version"]]
              for row in await conn.fetch(sql["dashboard_load"], ids)}
    counts: defaultdict[str, int] = defaultdict(int)
    amounts: defaultdict[str, Decimal] = defaultdict(Decimal)
    changed: set[int] = set()
    for event, payload in parsed:
        order = orders.get(payload.order_id)
        if order is not None and event.version <= order[2]:
            continue  # applied already
        status = ev.STATUS_AFTER[event.event_type]
        if isinstance(payload, ev.OrderCreated):
            if order is not None:
                continue  # a second OrderCreated changes nothing here; the orders projection reports it
            order = orders[payload.order_id] = [status, payload.total_amount, event.version]
        elif order is None:
            raise ev.not_created(event)
        else:
            counts[order[0]] -= 1
            amounts[order[0]] -= order[1]
            order[0], order[2] = status, event.version
        counts[status] += 1
        amounts[status] += order[1]
        changed.add(payload.order_id)
    if not changed:
        return
    statuses = [status for status in counts if counts[status] or amounts[status]]
    if statuses:
        await conn.execute(sql["dashboard_add"], statuses, [counts[s] for s in statuses],
                           [amounts[s] for s in statuses])
        await conn.execute(sql["dashboard_drop_empty"])
    await conn.execute(sql["dashboard_upsert_orders"], list(changed), [orders[i][0] for i in changed],
                       [orders[i][1] for i in changed], [orders[i][2] for i in changed])


projection = Projection(
    name="dashboard",
    handle=handle,
    event_types=frozenset(ev.MODELS),
    schema=read_sql("projections/dashboard.sql"),
    tables=("read_model_dashboard", "projection_dashboard_orders"),
)
