"""The order aggregate's events (CONTRACT.md): what the three built-in projections share.

Each projection applies a batch with one statement (sql/projections/queries.sql) whose common head
checks every event of the batch (sql/projections/order_events.sql). The full check stops the
statement at the first event that cannot be applied, naming it; the worker then retries, isolates,
halts or parks it like any handler error. A cheaper optimistic check runs first (order_projection).
Each projection takes the order from aggregate_id (order_<number>) and checks the data fields it
reads (`reads`), and no others: a field it never reads cannot stop it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import asyncpg

from pgprojector.projection import Projection
from pgprojector.sqlfiles import queries, read_sql

ORDER_EVENT_TYPES = frozenset({"OrderCreated", "OrderConfirmed", "DriverAssigned", "OrderPickedUp",
                               "OrderDelivered", "OrderCancelled"})

# The data fields of CONTRACT.md's order events.
ORDER_FIELDS = ("order_id", "user_id", "user_name", "items", "total_amount", "delivery_address", "restaurant_id",
                "restaurant_name", "estimated_delivery", "driver_id", "driver_name", "reason")

FUNCTIONS_SQL = read_sql("projections/order_events.sql")

# Before each apply statement (sql/projections/queries.sql, apply_settings): the planner settings its
# plans need (and always the generic plan), and work_mem for a batch of so many positions (an event of
# the seed's workload takes about 230 bytes in the batch's CTE; the rest is room for the hash tables
# built on it).
APPLY_SETTINGS = queries("projections/queries.sql")["apply_settings"]
BATCH_BYTES_PER_POSITION = 1024
# Before a follow-up query: each planner setting apply_settings sets back to its default (work_mem,
# which it only raises, stays), derived from it so that the two cannot drift apart.
PLANNER_DEFAULTS = "; ".join(f"SET LOCAL {setting} = DEFAULT"
                             for setting in re.findall(r"^SET LOCAL (\w+) =", APPLY_SETTINGS, re.MULTILINE))
# Where a batch falls back to when the optimistic statement is not sure. It is never released: the
# batch's COMMIT ends it. Every round trip counts in an idle daemon's latency: three projections'
# round trips go through one event loop.
SAVEPOINT = "pgprojector_optimistic"

# Each built-in projection's apply statement, by projection name: for EXPLAIN and for
# bench/instructions.py, which count what they cost.
APPLY_STATEMENTS: dict[str, str] = {}


def apply_statement(name: str, state_table: str, version_column: str, reads: Sequence[str], *,
                    optimistic: bool = False) -> str:
    """Projection `name`'s apply statement (`<name>_apply`), headed by the batch check against its
    own state table, checking the data fields in `reads`: the full check, or the optimistic one
    (see order_projection)."""
    unknown = set(reads) - set(ORDER_FIELDS)
    if unknown:
        raise ValueError(f"not fields of an order event: {sorted(unknown)}")
    sql = queries("projections/queries.sql")
    fields = "ARRAY[{}]::text[]".format(", ".join(f"'{field}'" for field in reads))
    check = {part: sql.get(f"{'optimistic' if optimistic else 'full'}_check_{part}", "").format(fields=fields)
             for part in ("also_ok", "creations", "looked_up", "verdict")}
    head = sql["checked_batch"].format(
        state_table=state_table, version_column=version_column, fields=fields,
        summary=sql.get(f"{name}_summary", ""), known=sql.get(f"{name}_known", ""), **check)
    return sql[f"{name}_apply"].format(checked_batch=head)


def order_projection(name: str, *, event_types: frozenset[str], state_table: str, version_column: str,
                     reads: Sequence[str], tables: tuple[str, ...], then: Sequence[str] = ()) -> Projection:
    """A built-in projection: its apply statement over each batch, then the `then` queries.

    A batch first runs with the optimistic check (sql/projections/queries.sql), which fits the usual
    batch and costs less: most orders a batch touches are born in it (their version 1 is in it), so it
    takes those to be new without looking up a row (the primary key of the row it inserts refuses an
    order that has one, as after a checkpoint rewound over applied events), and it counts no
    OrderCreated events per order. When it is not sure, or that primary key refuses, or on any error
    about the data, the batch rolls back to a savepoint and runs with the full check, which looks up
    every order: it skips the replays, or names the event at fault.
    """
    optimistic = APPLY_STATEMENTS[name] = apply_statement(name, state_table, version_column, reads, optimistic=True)
    fully_checked = apply_statement(name, state_table, version_column, reads)
    follow_up = [queries("projections/queries.sql")[query] for query in then]
    types = sorted(event_types)

    async def apply(conn: asyncpg.Connection, after: int, upto: int) -> int:
        # One round trip (a simple query: several statements, no parameters) for the settings and the
        # savepoint.
        settings = APPLY_SETTINGS.format(batch_bytes=(upto - after) * BATCH_BYTES_PER_POSITION)
        await conn.execute(f"{settings}; SAVEPOINT {SAVEPOINT}")
        try:
            events: int = await conn.fetchval(optimistic, after, upto, types)
        except (asyncpg.UniqueViolationError, asyncpg.DataError):
            await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
            events = await conn.fetchval(fully_checked, after, upto, types)
        if follow_up:
            await conn.execute(";\n".join([PLANNER_DEFAULTS, *follow_up]))
        return events

    return Projection(name=name, handle_range=apply, event_types=event_types,
                      schema=FUNCTIONS_SQL + read_sql(f"projections/{name}.sql"), tables=tables)
