"""The order aggregate's events (CONTRACT.md): what the three built-in projections share.

Each projection applies a batch with one statement (sql/projections/queries.sql) whose common head
validates every event of the batch (sql/projections/order_events.sql) and stops the statement at
the first one that cannot be applied, naming it; the worker then retries, isolates, halts or parks
it like any handler error.
"""

from __future__ import annotations

from pgprojector.sqlfiles import queries, read_sql

ORDER_EVENT_TYPES = frozenset({"OrderCreated", "OrderConfirmed", "DriverAssigned", "OrderPickedUp",
                               "OrderDelivered", "OrderCancelled"})

FUNCTIONS_SQL = read_sql("projections/order_events.sql")


def apply_statement(name: str, state_table: str, version_column: str) -> str:
    """The named apply statement, headed by the batch check against the projection's own state table."""
    sql = queries("projections/queries.sql")
    head = sql["checked_batch"].format(state_table=state_table, version_column=version_column)
    return sql[name].format(checked_batch=head)
