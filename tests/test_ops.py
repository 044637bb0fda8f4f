"""Operator commands: events, rebuild, dead-letters retry and health, against a real PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import asyncpg
import pytest
from helpers import cli_env, run_cli
from test_daemon import running_daemon

from pgprojector import EventStore, NewEvent, Projection, RecordedEvent, db, eventlog
from pgprojector.demo import OrderPlan, Stats, plan_order, produce
from pgprojector.migrations import migrate

TESTS = Path(__file__).resolve().parent


def ops_command(*args: str) -> list[str]:
    """The command line of `pgprojector ARGS`."""
    return [sys.executable, "-m", "pgprojector", *args]


def ops_env(dsn: str | None, **settings: str) -> dict[str, str]:
    env = cli_env(dsn, **settings)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))  # for test_ops:flaky
    return env


def run_ops(*args: str, dsn: str | None = None, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ops_command(*args), env=ops_env(dsn, **settings), capture_output=True, text=True,
                          timeout=timeout, check=False)


def start_ops(*args: str, dsn: str, **settings: str) -> subprocess.Popen[str]:
    return subprocess.Popen(ops_command(*args), env=ops_env(dsn, **settings), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0, interval: float = 0.05) -> None:
    with anyio.fail_after(timeout):
        while not await condition():
            await anyio.sleep(interval)


async def head_position(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")


async def checkpoints(conn: asyncpg.Connection) -> dict[str, tuple[int, str]]:
    return {row["name"]: (row["position"], row["state"])
            for row in await conn.fetch("SELECT name, position, state FROM pgprojector_projections")}


async def caught_up(conn: asyncpg.Connection, *names: str) -> bool:
    head = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
    found = await checkpoints(conn)
    return all(found[name][0] >= head and found[name][1] == "running" for name in names)


async def table_rows(conn: asyncpg.Connection, table: str) -> set[str]:
    return {json.dumps(dict(row), default=str, sort_keys=True) for row in await conn.fetch(f"SELECT * FROM {table}")}


async def from_scratch(conn: asyncpg.Connection, projection: Projection) -> dict[str, set[str]]:
    """The projection's tables as one pass over the whole log gives them, built in a scratch schema
    inside a transaction that is rolled back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("CREATE SCHEMA scratch; SET LOCAL search_path = scratch, public")
        await conn.execute(projection.schema)
        if projection.handle_range is not None:
            await projection.handle_range(conn, 0, await conn.fetchval("SELECT max(position) FROM public.events"))
        else:
            rows = await conn.fetch("SELECT * FROM public.events ORDER BY position")
            await projection.handle(conn, [RecordedEvent.from_record(row) for row in rows])
        return {table: await table_rows(conn, f"scratch.{table}") for table in projection.tables}
    finally:
        await transaction.rollback()


async def append_orders(store: EventStore, plans: Sequence[OrderPlan]) -> None:
    for plan in plans:
        await store.append(plan.aggregate_id, "order", list(plan.events), expected_version=0)


# events ------------------------------------------------------------------------------------------


async def insert_event(conn: asyncpg.Connection, aggregate_id: str, event_type: str, data: dict[str, object],
                       version: int, created_at: str) -> int:
    return await conn.fetchval(
        "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, metadata, version, created_at) "
        "VALUES ($1, 'order', $2, $3, $4, $5, $6::text::timestamptz) RETURNING position",
        aggregate_id, event_type, data, {"source": "test"}, version, created_at)


async def run_ops_together(dsn: str, *commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """`run_ops` for each command line, all at once."""
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    async def run(index: int, args: Sequence[str]) -> None:
        results[index] = await anyio.to_thread.run_sync(lambda: run_ops(*args, dsn=dsn))

    async with anyio.create_task_group() as group:
        for index, args in enumerate(commands):
            group.start_soon(run, index, args)
    return [results[index] for index in range(len(commands))]


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_events_lists_the_log_for_people_and_for_scripts(conn, dsn):
    await insert_event(conn, "order_1", "OrderCreated", {"order_id": 1, "total_amount": "12.50"}, 1,
                       "2025-03-03T10:00:00Z")
    await insert_event(conn, "order_2", "OrderCreated", {"order_id": 2}, 1, "2025-03-03T10:05:00Z")
    await insert_event(conn, "order_1", "OrderConfirmed", {"order_id": 1, "restaurant_id": 7}, 2,
                       "2025-03-03T10:10:00Z")
    filtered = {
        ("--type", "OrderConfirmed"): [3],
        ("--type", "OrderConfirmed", "--type", "OrderCreated"): [1, 2, 3],
        ("--after", "1"): [2, 3],
        ("--aggregate", "order_1"): [1, 3],
        ("--aggregate", "order_1", "--after", "1"): [3],
    }
    bad = [["--limit", "0"], ["--after", "-1"], ["--follow", "--as-of", "2025-03-03T10:00:00Z"],
           # past a bigint: once a DataError from the database, exit 1
           ["--limit", "99999999999999999999"], ["--after", "9223372036854775808"]]
    # (the largest bigint is a --limit like any other: one more row is asked for, to say more follow)
    filtered[("--limit", "9223372036854775807")] = [1, 2, 3]
    human, as_json, limited, *results = await run_ops_together(
        dsn, ["events"], ["events", "--json"], ["events", "--limit", "2"],
        *(["events", "--json", *args] for args in filtered), *(["events", *args] for args in bad))

    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["1", "2025-03-03T10:00:00.000Z", "order_1", "v1", "OrderCreated",
                                '{"order_id":1,"total_amount":"12.50"}']
    assert "order_1 v2  OrderConfirmed" in lines[2]

    events = json_lines(as_json)
    assert [(e["position"], e["aggregate_id"], e["version"]) for e in events] == [(1, "order_1", 1), (2, "order_2", 1),
                                                                                   (3, "order_1", 2)]
    first = events[0]
    assert set(first) == {"id", "aggregate_id", "aggregate_type", "event_type", "data", "metadata", "version",
                          "position", "created_at"}
    assert first["data"] == {"order_id": 1, "total_amount": "12.50"} and first["metadata"] == {"source": "test"}
    assert first["aggregate_type"] == "order" and first["created_at"] == "2025-03-03T10:00:00+00:00"

    assert limited.returncode == 0 and len(limited.stdout.splitlines()) == 2
    assert "continue with --after 2" in limited.stderr

    for (args, expected), result in zip(filtered.items(), results, strict=False):
        assert [e["position"] for e in json_lines(result)] == expected, args
    assert [result.returncode for result in results[len(filtered):]] == [2] * len(bad)


async def test_events_reads_the_log_through_a_cursor_not_into_memory(conn, dsn):
    """A large --limit is printed as it is read: the log comes through a cursor, a chunk per round
    trip, in one read-only transaction that ends when the reader stops early."""
    await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                       "SELECT 'order_' || n, 'order', 'OrderCreated', jsonb_build_object('order_id', n), 1 "
                       "FROM generate_series(1, 1200) n")
    reader = await asyncpg.connect(dsn)
    try:
        seen: list[int] = []
        async with contextlib.aclosing(eventlog.read_events(reader, eventlog.EventFilter(), 1000)) as found:
            async for event in found:
                if not seen:
                    portals = await reader.fetchval("SELECT count(*) FROM pg_cursors WHERE name <> ''")  # (not this query's)
                    assert portals == 1 and reader.is_in_transaction()
                seen.append(event.position)
                if len(seen) == 700:
                    break
        assert seen == list(range(1, 701))
        assert not reader.is_in_transaction()
        async with contextlib.aclosing(eventlog.read_events(reader, eventlog.EventFilter(after=100), 1000)) as found:
            assert [event.position async for event in found] == list(range(101, 1101))  # (the limit)
    finally:
        await reader.close()


async def test_events_as_of_gives_an_aggregate_as_it_stood_then(conn, dsn):
    for version, hour in ((1, 10), (2, 11), (3, 12)):
        await insert_event(conn, "order_9", ["OrderCreated", "OrderConfirmed", "OrderCancelled"][version - 1],
                           {"order_id": 9}, version, f"2025-03-03T{hour}:00:00Z")
    expected = {
        "2025-03-03T11:30:00+00:00": [1, 2],
        "2025-03-03T12:30:00+01:00": [1, 2],  # 11:30 UTC
        "2025-03-03T11:00:00": [1, 2],  # no zone: UTC; and "at or before"
        "2025-03-03T09:59:59Z": [],
        "2025-03-04": [1, 2, 3],
    }
    human, bad, *results = await run_ops_together(
        dsn, ["events", "--aggregate", "order_9", "--as-of", "2025-03-03T11:30:00Z"],
        ["events", "--aggregate", "order_9", "--as-of", "yesterday"],
        *(["events", "--json", "--aggregate", "order_9", "--as-of", as_of] for as_of in expected))
    for (as_of, versions), result in zip(expected.items(), results, strict=True):
        assert [e["version"] for e in json_lines(result)] == versions, as_of
    assert human.returncode == 0 and len(human.stdout.splitlines()) == 2
    assert "order_9 as of 2025-03-03T11:30:00+00:00: version 2" in human.stderr
    assert bad.returncode == 2 and "not an ISO 8601 timestamp" in bad.stderr


async def test_events_follow_prints_new_events_in_order_without_skipping_any(conn, dsn):
    with start_ops("events", "--follow", "--json", "--after", "0", dsn=dsn, poll_interval="5") as follower:
        await _follow_in_order(conn, dsn, follower)


async def _follow_in_order(conn: asyncpg.Connection, dsn: str, follower: subprocess.Popen[str]) -> None:
    try:
        store = EventStore(conn)
        await store.append("order_1", "order", [NewEvent("OrderCreated", {"order_id": 1})], expected_version=0)
        first = await anyio.to_thread.run_sync(follower.stdout.readline)  # type: ignore[union-attr]
        assert json.loads(first)["aggregate_id"] == "order_1"

        # An open transaction holds position p; a later one commits p+1 meanwhile. The follower must
        # wait for p, not print p+1 and pass p over.
        slow = await db.connect(dsn, role="tests")
        try:
            transaction = slow.transaction()
            await transaction.start()
            held = await EventStore(slow).append("order_2", "order", [NewEvent("OrderCreated", {"order_id": 2})],
                                                 expected_version=0)
            assert held == 1
            await store.append("order_3", "order", [NewEvent("OrderCreated", {"order_id": 3})], expected_version=0)
            await anyio.sleep(0.5)  # NOTIFY has fired for order_3
            await transaction.commit()
        finally:
            await slow.close()
        lines = [await anyio.to_thread.run_sync(follower.stdout.readline) for _ in range(2)]  # type: ignore[union-attr]
        printed = [json.loads(line) for line in lines]
        assert [e["aggregate_id"] for e in printed] == ["order_2", "order_3"]
        assert printed[0]["position"] < printed[1]["position"]
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=10) == 0, follower.stderr.read()  # type: ignore[union-attr]


async def test_events_follow_stops_after_limit(conn, dsn):
    store = EventStore(conn)
    for n in range(1, 4):
        await store.append(f"order_{n}", "order", [NewEvent("OrderCreated", {"order_id": n})], expected_version=0)
    result = run_ops("events", "--follow", "--after", "1", "--limit", "2", dsn=dsn, timeout=20)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["2", "3"]


async def connected(conn: asyncpg.Connection, application_name: str) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                                    application_name))


async def test_events_follow_exits_0_on_sigterm_when_idle(conn, dsn):
    with start_ops("events", "--follow", dsn=dsn) as follower:
        await wait_until(lambda: connected(conn, "pgprojector-events"))  # its signal handlers are in place
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(timeout=10) == 0, follower.stderr.read()  # type: ignore[union-attr]


# rebuild -----------------------------------------------------------------------------------------


async def test_rebuild_while_the_daemon_runs_and_producers_write(pool, conn, dsn):
    from pgprojector.projections import analytics, dashboard, orders

    rng = random.Random(7)
    store = EventStore(pool)
    await append_orders(store, [plan_order(order_id, rng) for order_id in range(1, 401)])
    async with running_daemon(dsn, poll_interval=0.1):  # every projection built once
        await wait_until(lambda: caught_up(conn, "orders", "dashboard", "analytics"))
    analytics_before = await checkpoints(conn)
    analytics_tables = {table: await table_rows(conn, table) for table in analytics.projection.tables}

    # Now a daemon without analytics: its checkpoint and tables must stay exactly as they are.
    async with running_daemon(dsn, ["orders", "dashboard"], batch_size=50, poll_interval=0.1):
        stats = Stats()
        more = [plan_order(order_id, rng) for order_id in range(401, 3401)]
        async with anyio.create_task_group() as producers:
            for number in range(4):  # two producers per order: conflicts included
                producers.start_soon(produce, store, more[number % 2::2], stats, random.Random(number))
            start = await head_position(conn)

            async def producing() -> bool:
                return await head_position(conn) > start

            await wait_until(producing)
            head_before = await head_position(conn)
            existing = await conn.fetchval("SELECT count(*) FROM events")
            rebuild = await anyio.to_thread.run_sync(
                lambda: run_ops("rebuild", "orders", dsn=dsn, batch_size="50", timeout=120))
            head_after = await head_position(conn)
            producers.cancel_scope.cancel()
        assert rebuild.returncode == 0, rebuild.stderr
        assert "projection orders rebuilt" in rebuild.stdout
        applied = int(rebuild.stdout.split(": ")[1].split()[0])
        assert applied >= existing  # the whole log, not just what came after
        caught_up_at = int(re.search(r"up to position (\d+)", rebuild.stdout)[1])  # type: ignore[index]
        assert head_before < caught_up_at < head_after  # it chased a growing log, and handed over mid-stream
        await wait_until(lambda: caught_up(conn, "orders", "dashboard"))

    after = await checkpoints(conn)
    assert after["analytics"] == analytics_before["analytics"]
    assert {table: await table_rows(conn, table) for table in analytics.projection.tables} == analytics_tables
    assert after["orders"][1] == "running"
    for projection in (orders.projection, dashboard.projection):
        expected = await from_scratch(conn, projection)
        assert {table: await table_rows(conn, table) for table in projection.tables} == expected, projection.name
    assert await conn.fetchval("SELECT count(*) FROM read_model_orders") == \
        await conn.fetchval("SELECT count(DISTINCT aggregate_id) FROM events")


async def test_interrupted_rebuild_resumes_and_shows_in_the_view(pool, conn, dsn):
    from pgprojector.projections import orders
    from pgprojector.rebuild import Rebuild, RebuildError

    rng = random.Random(3)
    await append_orders(EventStore(pool), [plan_order(order_id, rng) for order_id in range(1, 101)])

    stopping = anyio.Event()
    positions: list[int] = []

    def progress(position: int, target: int, applied: int, done: bool) -> None:
        positions.append(position)
        stopping.set()  # as a Ctrl-C after the first batch would

    interrupted = Rebuild(conn, pool, orders.projection, batch_size=40, on_error="halt", max_attempts=1,
                          on_progress=progress, stopping=stopping)
    with pytest.raises(RebuildError, match="run it again to resume"):
        await interrupted.run()
    assert (await checkpoints(conn))["orders"] == (positions[0], "rebuilding")
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_active_rebuilds") == 0  # nobody is at it now

    # Another session holding the rebuild lock: a second rebuild of the same projection is refused.
    other = await db.connect(dsn, role="tests")
    try:
        assert await other.fetchval("SELECT pgprojector_try_lock_rebuild('orders')")
        refused = run_ops("rebuild", "orders", dsn=dsn)
        assert refused.returncode == 1 and "already running" in refused.stderr
        assert await conn.fetchval("SELECT name FROM pgprojector_active_rebuilds") == "orders"
    finally:
        await other.close()

    resumed = run_ops("rebuild", "orders", dsn=dsn)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from position {positions[0]}" in resumed.stdout
    assert (await checkpoints(conn))["orders"][1] == "running"
    assert await table_rows(conn, "read_model_orders") == (await from_scratch(conn, orders.projection))[
        "read_model_orders"]

    restarted = run_ops("rebuild", "orders", "--restart", dsn=dsn)
    assert restarted.returncode == 0 and "resumed" not in restarted.stdout
    assert run_ops("rebuild", "no_such_projection", dsn=dsn).returncode == 2


async def test_status_shows_a_rebuild_as_running_or_stopped(conn, dsn):
    from pgprojector.status import gather_status

    await conn.execute("UPDATE pgprojector_projections SET state = 'rebuilding' WHERE name = 'orders'")

    async def orders_status() -> dict[str, object]:
        return next(p for p in (await gather_status(conn))["projections"] if p["name"] == "orders")

    interrupted = await orders_status()
    assert (interrupted["state"], interrupted["rebuilding"]) == ("stopped", True)  # nobody is at it
    rebuilder = await db.connect(dsn, role="tests")
    try:
        assert await rebuilder.fetchval("SELECT pgprojector_try_lock_rebuild('orders')")
        assert (await orders_status())["state"] == "running"
        shown = run_cli("status", "--json", dsn=dsn)
        assert shown.returncode == 0, shown.stderr
        states = {p["name"]: p["state"] for p in json.loads(shown.stdout)["projections"]}
        assert states == {"orders": "running", "dashboard": "stopped", "analytics": "stopped"}
    finally:
        await rebuilder.close()


# dead letters ------------------------------------------------------------------------------------


async def _flaky_handle(conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
    """Refuses the events of aggregates not yet on its allow list: an operator can fix that cause."""
    for event in events:
        if not await conn.fetchval("SELECT true FROM flaky_allowed WHERE aggregate_id = $1", event.aggregate_id):
            raise ValueError(f"{event.aggregate_id} is not allowed yet")
        await conn.execute("INSERT INTO flaky_seen (position, aggregate_id) VALUES ($1, $2)", event.position,
                           event.aggregate_id)


flaky = Projection(
    name="flaky",
    handle=_flaky_handle,
    schema="CREATE TABLE IF NOT EXISTS flaky_allowed (aggregate_id TEXT PRIMARY KEY);"
           "CREATE TABLE IF NOT EXISTS flaky_seen (position BIGINT PRIMARY KEY, aggregate_id TEXT NOT NULL);",
    tables=("flaky_seen",),
)


untabled = Projection(name="untabled", handle=_flaky_handle)


async def test_rebuild_refuses_what_it_cannot_rebuild_as_a_configuration_error(conn, dsn):
    """Exit 2, as `run` and `migrate` say of their configuration: no tables named, not set up, a
    table gone."""
    no_tables, not_set_up = await run_ops_together(dsn, ["rebuild", "test_ops:untabled"], ["rebuild", "test_ops:flaky"])
    assert no_tables.returncode == 2
    assert "projection untabled names no tables to empty (Projection.tables)" in no_tables.stderr
    assert not_set_up.returncode == 2
    assert "projection flaky is not set up: run `pgprojector migrate`" in not_set_up.stderr
    await migrate(conn, "events", [flaky])
    await conn.execute("DROP TABLE flaky_seen; CREATE VIEW flaky_seen AS SELECT 1 AS position")
    view = run_ops("rebuild", "test_ops:flaky", dsn=dsn)
    assert view.returncode == 2
    assert "projection flaky: its tables ['flaky_seen'] are no tables (missing, or a view)" in view.stderr


async def test_dead_letters_retry_applies_parked_events_once_fixed(conn, dsn):
    await migrate(conn, "events", [flaky])
    await conn.execute("INSERT INTO flaky_allowed VALUES ('a_1')")
    store = EventStore(conn)
    for aggregate in ("a_1", "b_1", "a_2", "b_2"):
        await store.append(aggregate, "thing", [NewEvent("Happened", {"n": 1})], expected_version=0)
    await conn.execute("INSERT INTO flaky_allowed VALUES ('a_2')")
    async with running_daemon(dsn, ["test_ops:flaky"], on_error="park", max_attempts=1, poll_interval=0.1):
        await wait_until(lambda: caught_up(conn, "flaky"))
    parked = await conn.fetch("SELECT id, event_position FROM pgprojector_dead_letters ORDER BY id")
    assert len(parked) == 2
    assert await conn.fetchval("SELECT count(*) FROM flaky_seen") == 2

    listed = run_ops("dead-letters", "--json", dsn=dsn, projections="test_ops:flaky")
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 2
    listed = run_ops("dead-letters", "list", "--json", dsn=dsn, projections="test_ops:flaky")
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 2

    still_broken = run_ops("dead-letters", "retry", "--all", dsn=dsn, projections="test_ops:flaky")
    assert still_broken.returncode == 1
    assert still_broken.stdout.count("FAILED") == 2 and "b_1 is not allowed yet" in still_broken.stdout
    assert await conn.fetchval("SELECT sum(attempts) FROM pgprojector_dead_letters") == 4  # 1 each, +1 each

    await conn.execute("INSERT INTO flaky_allowed VALUES ('b_1')")  # the cause of the first one, fixed
    one = run_ops("dead-letters", "retry", str(parked[0]["id"]), dsn=dsn, projections="test_ops:flaky")
    assert one.returncode == 0, one.stdout + one.stderr
    assert "1 of 1 dead letter(s) resolved (1 applied here, 0 otherwise)" in one.stdout
    assert await conn.fetchval("SELECT aggregate_id FROM flaky_seen WHERE position = $1",
                               parked[0]["event_position"]) == "b_1"

    await conn.execute("INSERT INTO flaky_allowed VALUES ('b_2')")
    rest = run_ops("dead-letters", "retry", "--all", "--projections", "test_ops:flaky", dsn=dsn)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0
    assert await conn.fetchval("SELECT count(*) FROM flaky_seen") == 4
    assert await conn.fetchval("SELECT last_error FROM pgprojector_projections WHERE name = 'flaky'") is None

    assert run_ops("dead-letters", "retry", "--all", dsn=dsn).stdout.strip() == "no dead letters"
    missing = run_ops("dead-letters", "retry", "99", dsn=dsn)
    assert missing.returncode == 1 and "no dead letter #99" in missing.stderr
    assert run_ops("dead-letters", "retry", dsn=dsn).returncode == 2
    assert run_ops("dead-letters", "retry", "1", "--all", dsn=dsn).returncode == 2


async def test_an_event_too_deep_for_python_is_a_clear_error_of_the_commands(conn, dsn):
    await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) VALUES "
                       "('deep', 'thing', 'Happened', jsonb_build_object('x', (repeat('[', 5000) || "
                       "repeat(']', 5000))::jsonb), 1)")
    shown = run_ops("events", dsn=dsn)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert "JSON nested deeper than Python decodes (the event at position 1)" in shown.stderr
    await migrate(conn, "events", [flaky])
    await conn.execute("INSERT INTO pgprojector_dead_letters (projection, event_position, event_id, error, attempts) "
                       "SELECT 'flaky', position, id, 'RecursionError', 1 FROM events")
    retried = run_ops("dead-letters", "retry", "--all", dsn=dsn, projections="test_ops:flaky")
    assert retried.returncode == 1 and "Traceback" not in retried.stderr
    assert "FAILED: cannot read its event: RecursionError" in retried.stdout


async def test_dead_letters_retry_refuses_an_event_whose_aggregate_moved_on(conn, dsn):
    """Version order holds for retries too: once a later event of its aggregate was applied, a parked
    event stays parked (a folding projection would take it for a replay, or undo the later one)."""
    await migrate(conn, "events", [flaky])
    store = EventStore(conn)
    await store.append("b_1", "thing", [NewEvent("Happened", {"n": 1})], expected_version=0)  # refused: parked
    async with running_daemon(dsn, ["test_ops:flaky"], on_error="park", max_attempts=1, poll_interval=0.1):
        await wait_until(lambda: caught_up(conn, "flaky"))
        await conn.execute("INSERT INTO flaky_allowed VALUES ('b_1')")
        await store.append("b_1", "thing", [NewEvent("Happened", {"n": 2})], expected_version=1)  # applied
        await wait_until(lambda: caught_up(conn, "flaky"))
    assert await conn.fetchval("SELECT array_agg(position) FROM flaky_seen") == [2]

    refused = run_ops("dead-letters", "retry", "--all", dsn=dsn, projections="test_ops:flaky")
    assert refused.returncode == 1
    assert ("b_1 v2 (position 2) was applied after it, and v1 cannot follow it: "
            "`pgprojector rebuild flaky` applies the log in order again") in refused.stdout
    assert await conn.fetchval("SELECT event_position FROM pgprojector_dead_letters") == 1
    assert await conn.fetchval("SELECT array_agg(position) FROM flaky_seen") == [2]

    rebuilt = run_ops("rebuild", "flaky", dsn=dsn, projections="test_ops:flaky")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert await conn.fetchval("SELECT array_agg(position ORDER BY position) FROM flaky_seen") == [1, 2]
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0


async def test_resume_tries_the_event_again_or_parks_it_with_park(conn, dsn):
    """An event that can never pass (data that is not a JSON object) halts `orders` for good: `resume`
    tries it again, `resume --park` parks it and goes on after it."""
    await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                       "VALUES ('order_1', 'order', 'OrderCreated', '[1, 2]', 1)")
    created = NewEvent("OrderCreated", {"order_id": 2, "user_id": 7, "user_name": "u", "items": [],
                                        "total_amount": "3.50", "delivery_address": "a"})
    await EventStore(conn).append("order_2", "order", [created], expected_version=0)
    assert run_ops("resume", "orders", dsn=dsn).stderr.strip() == \
        "pgprojector: projection 'orders' does not exist or is not halted"

    async def halted() -> bool:
        return (await checkpoints(conn))["orders"] == (0, "halted")

    async with running_daemon(dsn, ["orders"], on_error="halt", max_attempts=1, poll_interval=0.1):
        await wait_until(halted)
        again = run_ops("resume", "orders", dsn=dsn)
        assert again.returncode == 0 and again.stdout.strip() == "projection orders resumed"
        await wait_until(halted)  # the same event, the same halt

        parked = run_ops("resume", "orders", "--park", dsn=dsn)
        assert parked.returncode == 0, parked.stderr
        letter = await conn.fetchrow("SELECT id, event_position, error FROM pgprojector_dead_letters")
        assert parked.stdout.strip() == (f"projection orders resumed after position 1, whose event is parked as "
                                         f"dead letter #{letter['id']}")
        assert letter["event_position"] == 1
        assert "OrderCreated at position 1 (order_1 v1): data is not a JSON object" in letter["error"]
        await wait_until(lambda: caught_up(conn, "orders"))
    assert await conn.fetchval("SELECT array_agg(order_id) FROM read_model_orders") == [2]
    assert (await checkpoints(conn))["orders"] == (2, "running")


async def test_dead_letters_retry_applies_a_built_in_projections_parked_event(conn, dsn):
    """The built-ins apply ranges of positions in SQL; a parked event is retried through the same path."""
    await conn.execute(  # someone wrote order 5 into the read model by hand: its OrderCreated is refused
        "INSERT INTO read_model_orders (order_id, user_id, status, items, created_at, updated_at, current_version) "
        "VALUES (5, 1, 'created', '[]', now(), now(), 0)")
    created = NewEvent("OrderCreated", {"order_id": 5, "user_id": 7, "user_name": "u", "items": [],
                                        "total_amount": "3.50", "delivery_address": "a"})
    await EventStore(conn).append("order_5", "order", [created], expected_version=0)
    async with running_daemon(dsn, ["orders"], on_error="park", max_attempts=1, poll_interval=0.1):
        await wait_until(lambda: caught_up(conn, "orders"))
    assert "the order exists already" in await conn.fetchval("SELECT error FROM pgprojector_dead_letters")

    await conn.execute("DELETE FROM read_model_orders WHERE order_id = 5")  # the cause, fixed
    retried = run_ops("dead-letters", "retry", "--all", dsn=dsn, projections="orders")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "1 of 1 dead letter(s) resolved" in retried.stdout
    row = await conn.fetchrow("SELECT user_id, total_amount, current_version FROM read_model_orders "
                              "WHERE order_id = 5")
    assert (row["user_id"], str(row["total_amount"]), row["current_version"]) == (7, "3.50", 1)


async def test_rebuild_parks_or_halts_at_an_event_that_keeps_failing(conn, dsn):
    await migrate(conn, "events", [flaky])
    await conn.execute("INSERT INTO flaky_allowed VALUES ('a_1'), ('a_2')")
    store = EventStore(conn)
    for aggregate in ("a_1", "b_1", "a_2"):  # b_1, at position 2, is refused
        await store.append(aggregate, "thing", [NewEvent("Happened", {"n": 1})], expected_version=0)
    settings = {"projections": "test_ops:flaky", "max_attempts": "1"}

    parked = run_ops("rebuild", "flaky", dsn=dsn, on_error="park", **settings)
    assert parked.returncode == 0, parked.stderr
    assert "1 parked as dead letters" in parked.stdout
    assert await conn.fetchval("SELECT event_position FROM pgprojector_dead_letters") == 2
    assert await conn.fetchval("SELECT array_agg(position ORDER BY position) FROM flaky_seen") == [1, 3]
    assert (await checkpoints(conn))["flaky"] == (3, "running")

    halted = run_ops("rebuild", "flaky", dsn=dsn, on_error="halt", **settings)
    assert halted.returncode == 1
    assert "projection flaky halted: Happened at position 2 (b_1 v1): ValueError: b_1 is not allowed yet" in halted.stderr
    row = await conn.fetchrow("SELECT state, position, halted_at_position FROM pgprojector_projections "
                              "WHERE name = 'flaky'")
    assert tuple(row) == ("halted", 1, 2)
    assert await conn.fetchval("SELECT array_agg(position) FROM flaky_seen") == [1]
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0  # re-evaluated by the rebuild


# health ------------------------------------------------------------------------------------------


async def test_health_follows_the_daemon_heartbeat(conn, dsn):
    nobody = run_ops("health", dsn=dsn)
    assert nobody.returncode == 1 and "no daemon registered" in nobody.stdout

    daemon = subprocess.Popen([sys.executable, "-m", "pgprojector", "run"], env=cli_env(dsn, poll_interval="0.2"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while (healthy := run_ops("health", dsn=dsn)).returncode != 0:
            assert time.monotonic() < deadline, healthy.stdout + healthy.stderr
            await anyio.sleep(0.2)
        assert healthy.stdout.startswith("healthy: 1 daemon(s) alive")
        assert run_ops("health", "--this-host", dsn=dsn).returncode == 0  # the daemon runs on this host

        await conn.execute("UPDATE pgprojector_projections SET state = 'halted', halted_at_position = 1, "
                           "last_error = 'boom' WHERE name = 'dashboard'")
        halted = run_ops("health", dsn=dsn)
        assert halted.returncode == 1 and "dashboard halted at position 1: boom" in halted.stdout
        await conn.execute("UPDATE pgprojector_projections SET state = 'running' WHERE name = 'dashboard'")
        assert run_ops("health", dsn=dsn).returncode == 0
    finally:
        daemon.kill()  # SIGKILL: no unregistering, the heartbeat row stays and ages
        daemon.wait()
    await anyio.sleep(1.2)
    dead = run_ops("health", "--max-age", "1", dsn=dsn)
    assert dead.returncode == 1 and "no daemon alive" in dead.stdout, dead.stdout
    assert run_ops("health", "--max-age", "0", dsn=dsn).returncode == 2
    assert run_ops("health", "--max-age", "nan", dsn=dsn).returncode == 2  # it passed every check
    assert run_ops("health", "--max-age", "inf", dsn=dsn).returncode == 2


async def test_health_fails_when_a_projection_stops_moving(conn, dsn):
    await conn.execute("INSERT INTO pgprojector_daemons (id, hostname, pid, projections) "
                       "VALUES (gen_random_uuid(), 'elsewhere', 1, ARRAY['orders'])")
    assert run_ops("health", dsn=dsn).returncode == 0  # caught up (an empty log)
    # A container's HEALTHCHECK: another host's daemon does not make this one healthy.
    here = run_ops("health", "--this-host", dsn=dsn)
    assert here.returncode == 1
    assert here.stdout.strip() == (f"unhealthy: no daemon registered from host {socket.gethostname()}: "
                                   "is `pgprojector run` running?")
    await EventStore(conn).append("order_1", "order", [NewEvent("OrderCreated", {"order_id": 1})], expected_version=0)
    await conn.execute("UPDATE pgprojector_projections SET updated_at = now() - interval '1 minute'")
    await conn.execute("UPDATE pgprojector_daemons SET heartbeat_at = now()")
    stuck = run_ops("health", "--max-age", "30", dsn=dsn)
    assert stuck.returncode == 1
    assert re.search(r"orders is 1 events behind and has not moved for 6\ds", stuck.stdout), stuck.stdout

    await conn.execute("UPDATE pgprojector_projections SET state = 'rebuilding' WHERE name = 'orders'")
    crashed = run_ops("health", dsn=dsn)
    assert crashed.returncode == 1 and "a rebuild was interrupted" in crashed.stdout


# the recovery commands on servers with other defaults ------------------------------------------------


async def _blocked_on_a_lock(conn: asyncpg.Connection, application: str) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
                                    "AND wait_event_type = 'Lock'", application))


@pytest.mark.parametrize("command", ["dead-letters", "rebuild"])
async def test_the_recovery_commands_wait_for_a_batch_under_a_repeatable_read_default(conn, dsn, command):
    """A database whose default isolation is REPEATABLE READ: a command that waited on the checkpoint
    row for a daemon's batch failed once the batch committed ("could not serialize access due to
    concurrent update", exit 1), which a busy daemon made the usual outcome. The daemon's own batches
    are READ COMMITTED whatever the default; so are the commands now."""
    await migrate(conn, "events", [flaky])
    await conn.execute("INSERT INTO flaky_allowed VALUES ('a_1')")
    await EventStore(conn).append("b_1", "thing", [NewEvent("Happened", {"n": 1})], expected_version=0)
    await EventStore(conn).append("a_1", "thing", [NewEvent("Happened", {"n": 1})], expected_version=0)
    async with running_daemon(dsn, ["test_ops:flaky"], on_error="park", max_attempts=1, poll_interval=0.1):
        await wait_until(lambda: caught_up(conn, "flaky"))
    assert await conn.fetchval("SELECT event_position FROM pgprojector_dead_letters") == 1
    await conn.execute("INSERT INTO flaky_allowed VALUES ('b_1')")
    database = dsn.rsplit("/", 1)[1].split("?")[0]
    await conn.execute(f"ALTER DATABASE \"{database}\" SET default_transaction_isolation = 'repeatable read'")

    batch = await db.connect(dsn, role="tests")  # a daemon's batch, holding the checkpoint row
    try:
        async with batch.transaction(isolation="read_committed"):
            await batch.execute("SELECT position FROM pgprojector_projections WHERE name = 'flaky' FOR UPDATE")
            args = ["dead-letters", "retry", "--all"] if command == "dead-letters" else ["rebuild", "flaky"]
            process = start_ops(*args, dsn=dsn, projections="test_ops:flaky", on_error="park", max_attempts="1")
            await wait_until(lambda: _blocked_on_a_lock(conn, f"pgprojector-{command}"))
            await batch.execute("UPDATE pgprojector_projections SET updated_at = now() WHERE name = 'flaky'")
        out, err = await anyio.to_thread.run_sync(lambda: process.communicate(timeout=60))
    finally:
        await batch.close()
    assert process.returncode == 0, out + err
    assert "could not serialize" not in err
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0
    assert await conn.fetchval("SELECT array_agg(position ORDER BY position) FROM flaky_seen") == [1, 2]


async def _sleepy_handle(conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
    """Takes a while per batch, inside its transaction (a handler calling out to another service)."""
    await anyio.sleep(0.25)
    await conn.executemany("INSERT INTO sleepy_seen (position) VALUES ($1)", [(e.position,) for e in events])


sleepy = Projection(name="sleepy", handle=_sleepy_handle,
                    schema="CREATE TABLE IF NOT EXISTS sleepy_seen (position BIGINT PRIMARY KEY)", tables=("sleepy_seen",))


async def test_a_rebuild_keeps_its_lock_on_a_server_that_ends_idle_sessions(conn, dsn):
    """The rebuild's lock session sits idle while the batches run on the pool: an idle_session_timeout
    shorter than the rebuild ended it, and with it the lock. `status` then showed the rebuild as
    interrupted while it ran, a second rebuild could start beside it, and the rebuild that had caught up
    and handed the projection back said it was interrupted ("run it again to resume"), exit 1."""
    await migrate(conn, "events", [sleepy])
    store = EventStore(conn)
    for number in range(1, 13):
        await store.append(f"thing_{number}", "thing", [NewEvent("Happened", {"n": number})], expected_version=0)
    database = dsn.rsplit("/", 1)[1].split("?")[0]
    await conn.execute(f'ALTER DATABASE "{database}" SET idle_session_timeout = 1000')

    rebuild = start_ops("rebuild", "test_ops:sleepy", dsn=dsn, batch_size="1")
    try:
        await anyio.sleep(2.0)  # past the timeout, half-way
        assert await conn.fetchval("SELECT name FROM pgprojector_active_rebuilds") == "sleepy"
        out, err = await anyio.to_thread.run_sync(lambda: rebuild.communicate(timeout=60))
    finally:
        if rebuild.poll() is None:
            rebuild.kill()
            rebuild.wait()
    assert rebuild.returncode == 0, err
    assert "projection sleepy rebuilt: 12 events applied up to position 12" in out
    assert (await checkpoints(conn))["sleepy"] == (12, "running")


async def test_after_a_resume_a_daemon_tries_the_event_as_often_as_max_attempts_says(pool, conn, dsn):
    """Two daemons retry the same failing event; one halts at it, and the other then sees the projection
    halted with the failures it had counted still in hand. After `resume` it parked (or halted at) the
    event at its first failure, where PGPROJECTOR_MAX_ATTEMPTS promises that many tries (and so after a
    rebuild had handed the projection back: the next failing event went at once)."""
    from pgprojector.listener import Wakeup
    from pgprojector.worker import ProjectionWorker

    await migrate(conn, "events", [flaky])
    await EventStore(conn).append("b_1", "thing", [NewEvent("Happened", {"n": 1})], expected_version=0)
    other = ProjectionWorker(pool, flaky, batch_size=10, poll_interval=0.1, on_error="park", max_attempts=3,
                             stopping=anyio.Event(), wakeup=Wakeup())
    assert await other.step() is None and await other.step() is None  # two failures counted, one try left
    await conn.execute("UPDATE pgprojector_projections SET state = 'halted', halted_at_position = 1, "
                       "last_error = 'ValueError: b_1 is not allowed yet' WHERE name = 'flaky'")  # the first daemon
    inactive = await other.step()
    assert inactive is not None and inactive.inactive

    resumed = await anyio.to_thread.run_sync(lambda: run_ops("resume", "flaky", dsn=dsn))
    assert resumed.returncode == 0, resumed.stderr
    assert await other.step() is None  # the event fails again: its first try since the resume
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0
    assert await other.step() is None and await other.step() is None
    assert await conn.fetchval("SELECT attempts FROM pgprojector_dead_letters WHERE event_position = 1") == 3


async def test_dead_letters_retry_during_a_rebuild_says_when_to_retry(conn, dsn):
    """Every dead letter a projection has while it is being rebuilt was parked by that rebuild (its start
    deletes the others): the rebuild will not apply it again, where retry said it would."""
    await migrate(conn, "events", [flaky])
    await conn.execute("INSERT INTO flaky_allowed VALUES ('a_1')")
    store = EventStore(conn)
    for aggregate in ("b_1", "a_1"):
        await store.append(aggregate, "thing", [NewEvent("Happened", {"n": 1})], expected_version=0)
    settings = {"projections": "test_ops:flaky", "on_error": "park", "max_attempts": "1"}
    assert run_ops("rebuild", "flaky", dsn=dsn, **settings).returncode == 0
    # As a rebuild interrupted after it parked b_1 leaves it:
    await conn.execute("UPDATE pgprojector_projections SET state = 'rebuilding' WHERE name = 'flaky'")
    await conn.execute("INSERT INTO flaky_allowed VALUES ('b_1')")  # the cause, fixed

    refused = run_ops("dead-letters", "retry", "--all", dsn=dsn, **settings)
    assert refused.returncode == 1
    assert "the rebuild applies it again" not in refused.stdout
    assert ("projection flaky is being rebuilt, and the rebuild parked this event: retry it once the rebuild "
            "has finished") in refused.stdout
    resumed = run_ops("rebuild", "flaky", dsn=dsn, **settings)
    assert resumed.returncode == 0, resumed.stderr
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 1  # not applied again
    retried = run_ops("dead-letters", "retry", "--all", dsn=dsn, **settings)
    assert retried.returncode == 0, retried.stdout
    assert await conn.fetchval("SELECT array_agg(position ORDER BY position) FROM flaky_seen") == [1, 2]


async def test_a_rebuild_stopped_by_a_second_signal_says_so(conn, dsn):
    """The first signal stops a rebuild after the batch in hand, the second at once: that one exited 1
    without a word, where the operator needs to know it stopped half-way and that running it again
    resumes it."""
    await migrate(conn, "events", [sleepy])
    store = EventStore(conn)
    for number in range(1, 41):
        await store.append(f"thing_{number}", "thing", [NewEvent("Happened", {"n": number})], expected_version=0)
    rebuild = start_ops("rebuild", "test_ops:sleepy", dsn=dsn, batch_size="4", log_level="warning")
    try:
        await wait_until(lambda: _rebuilt_some(conn))
        rebuild.send_signal(signal.SIGINT)
        await anyio.sleep(0.05)  # the batch in hand (0.25 s) is still going
        rebuild.send_signal(signal.SIGINT)
        _out, err = await anyio.to_thread.run_sync(lambda: rebuild.communicate(timeout=30))
    finally:
        if rebuild.poll() is None:
            rebuild.kill()
            rebuild.wait()
    assert rebuild.returncode == 1
    position, state = (await checkpoints(conn))["sleepy"]
    assert state == "rebuilding" and 0 < position < 40
    assert f"pgprojector: rebuild of sleepy interrupted at position {position}: run it again to resume" in err


async def _rebuilt_some(conn: asyncpg.Connection) -> bool:
    row = await conn.fetchrow("SELECT state, position FROM pgprojector_projections WHERE name = 'sleepy'")
    return row is not None and row["state"] == "rebuilding" and row["position"] > 0
