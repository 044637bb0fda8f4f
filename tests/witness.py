"""What the witness projection (daemon_harness.witness) proves: each event applied once, in version order.

The witness records every event it is handed; its primary key turns a double application into an
error, and applied_seq keeps the order of application. Used by the tests and by bench/soak.py.
"""

from __future__ import annotations

import asyncpg


async def witness_problems(conn: asyncpg.Connection, upto: int | None = None) -> list[str]:
    """What is wrong with the witness ([] when nothing): it must hold every committed event up to
    `upto` (default: the head of the log) exactly once, nothing else, and each aggregate's versions
    in the order they were applied."""
    if upto is None:
        upto = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
    problems = []
    missing = await conn.fetch(
        "SELECT e.position FROM events e WHERE e.position <= $1 "
        "AND NOT EXISTS (SELECT 1 FROM witness w WHERE w.position = e.position) ORDER BY e.position LIMIT 5", upto)
    if missing:
        count = await conn.fetchval(
            "SELECT count(*) FROM events e WHERE e.position <= $1 "
            "AND NOT EXISTS (SELECT 1 FROM witness w WHERE w.position = e.position)", upto)
        problems.append(f"{count} committed events (position <= {upto}) never reached the witness, "
                        f"e.g. positions {[r['position'] for r in missing]}")
    foreign = await conn.fetch(
        "SELECT w.position FROM witness w LEFT JOIN events e ON e.position = w.position "
        "WHERE e.position IS NULL OR w.position > $1 OR e.aggregate_id <> w.aggregate_id OR e.version <> w.version "
        "LIMIT 5", upto)
    if foreign:
        problems.append(f"witness rows that are not the committed events up to {upto}: "
                        f"{[r['position'] for r in foreign]}")
    disorder = await conn.fetch(
        "SELECT aggregate_id, version, prev FROM ("
        "  SELECT aggregate_id, version, lag(version) OVER (PARTITION BY aggregate_id ORDER BY applied_seq) AS prev"
        "  FROM witness) t WHERE prev IS NOT NULL AND version <> prev + 1 LIMIT 5")
    if disorder:
        problems.append(f"versions of an aggregate not applied in ascending order: {[dict(r) for r in disorder]}")
    return problems


async def assert_each_event_applied_once_in_version_order(conn: asyncpg.Connection, upto: int | None = None) -> int:
    """Asserts witness_problems() finds nothing; returns the witness's row count."""
    problems = await witness_problems(conn, upto)
    assert not problems, "\n".join(problems)
    return await conn.fetchval("SELECT count(*) FROM witness")
