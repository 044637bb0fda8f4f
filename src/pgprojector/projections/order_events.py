"""The order aggregate's events (CONTRACT.md): what the three built-in projections share.

Each projection applies a batch with one statement (sql/projections/queries.sql) whose common head
validates every event of the batch (sql/projections/order_events.sql) and stops the statement at
the first one that cannot be applied, naming it; the worker then retries, isolates, halts or parks
it like any handler error.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from pgprojector.projection import Projection
from pgprojector.sqlfiles import queries, read_sql

ORDER_EVENT_TYPES = frozenset({"OrderCreated", "OrderConfirmed", "DriverAssigned", "OrderPickedUp",
                               "OrderDelivered", "OrderCancelled"})

FUNCTIONS_SQL = read_sql("projections/order_events.sql")


def apply_statement(name: str, state_table: str, version_column: str) -> str:
    """The named apply statement, headed by the batch check against the projection's own state table."""
    sql = queries("projections/queries.sql")
    head = sql["checked_batch"].format(state_table=state_table, version_column=version_column)
    return sql[name].format(checked_batch=head)


def order_projection(name: str, *, event_types: frozenset[str], state_table: str, version_column: str,
                     tables: tuple[str, ...], then: Sequence[str] = ()) -> Projection:
    """A built-in projection: its apply statement (`<name>_apply`) over each batch, then the `then` queries."""
    statement = apply_statement(f"{name}_apply", state_table, version_column)
    follow_up = [queries("projections/queries.sql")[query] for query in then]
    types = sorted(event_types)

    async def apply(conn: asyncpg.Connection, after: int, upto: int) -> None:
        await conn.execute(statement, after, upto, types)
        for query in follow_up:
            await conn.execute(query)

    return Projection(name=name, handle_range=apply, event_types=event_types,
                      schema=FUNCTIONS_SQL + read_sql(f"projections/{name}.sql"), tables=tables)
