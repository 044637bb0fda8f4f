"""The daemon in-process against real PostgreSQL: the read models CONTRACT.md describes, and the read path."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from fold import assert_read_models_match_fold

from pgprojector import EventStore, NewEvent, db
from pgprojector.daemon import Daemon
from pgprojector.errors import ConfigError
from pgprojector.events import RecordedEvent
from pgprojector.listener import Wakeup
from pgprojector.migrations import setup_projection
from pgprojector.projection import Projection, load_projections
from pgprojector.projections.order_events import APPLY_STATEMENTS
from pgprojector.settings import load_settings
from pgprojector.worker import ProjectionWorker

ALL = ["orders", "dashboard", "analytics"]


@asynccontextmanager
async def running_daemon(dsn: str, projections: list[str] = ALL, **settings: object) -> AsyncIterator[Daemon]:
    daemon = Daemon(load_settings(dsn=dsn, projections=",".join(projections), **settings),
                    load_projections(projections))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_stop()


async def until_logged(logs: list[dict[str, Any]], event: str, timeout: float = 30.0) -> None:
    """Until structlog's capture_logs() list holds `event`."""
    with anyio.fail_after(timeout):
        while not any(entry["event"] == event for entry in logs):
            await anyio.sleep(0.02)


async def wait_caught_up(conn: asyncpg.Connection, timeout: float = 30.0, names: list[str] | None = None) -> None:
    """Until every (named) projection's checkpoint has reached the last event."""
    with anyio.fail_after(timeout):
        while True:
            head = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
            behind = await conn.fetchval("SELECT count(*) FROM pgprojector_projections WHERE position < $1 "
                                         "AND ($2::text[] IS NULL OR name = ANY($2))", head, names)
            if behind == 0:
                return
            await anyio.sleep(0.02)


def created(order_id: int, amount: str = "20.00", user_id: int = 7) -> NewEvent:
    return NewEvent("OrderCreated", {"order_id": order_id, "user_id": user_id, "user_name": f"user {user_id}",
                                     "items": [{"sku": "pizza", "qty": 1}], "total_amount": amount,
                                     "delivery_address": "1 Main St"})


def confirmed(order_id: int, restaurant_id: int = 3, eta: str = "2026-05-01T12:30:00+02:00") -> NewEvent:
    return NewEvent("OrderConfirmed", {"order_id": order_id, "restaurant_id": restaurant_id,
                                       "restaurant_name": f"R{restaurant_id}", "estimated_delivery": eta})


def simple(event_type: str, order_id: int | str, **extra: object) -> NewEvent:
    return NewEvent(event_type, {"order_id": order_id, **extra})


async def test_orders_read_model_follows_each_event(dsn, pool, conn):
    store = EventStore(pool)
    await store.append("order_1", "order", [created(1, "12.34")], expected_version=0)
    async with running_daemon(dsn, poll_interval=0.2):
        await wait_caught_up(conn)
        row = await conn.fetchrow("SELECT * FROM read_model_orders WHERE order_id = 1")
        assert row["status"] == "created" and row["user_id"] == 7 and row["user_name"] == "user 7"
        assert row["total_amount"] == Decimal("12.34") and row["current_version"] == 1
        assert row["items"] == [{"sku": "pizza", "qty": 1}] and row["delivery_address"] == "1 Main St"
        assert row["created_at"] == row["updated_at"]
        steps = [
            (confirmed(1), "confirmed"),
            (simple("DriverAssigned", 1, driver_id=5, driver_name="Dora"), "driver_assigned"),
            (simple("OrderPickedUp", 1), "picked_up"),
            (simple("OrderDelivered", 1), "delivered"),
        ]
        for version, (event, status) in enumerate(steps, start=2):
            await store.append("order_1", "order", [event], expected_version=version - 1)
            await wait_caught_up(conn)
            row = await conn.fetchrow("SELECT * FROM read_model_orders WHERE order_id = 1")
            last = await conn.fetchrow("SELECT created_at FROM events WHERE aggregate_id='order_1' AND version=$1",
                                       version)
            assert (row["status"], row["current_version"], row["updated_at"]) == (status, version, last["created_at"])
        assert (row["restaurant_id"], row["restaurant_name"], row["driver_name"]) == (3, "R3", "Dora")
        assert row["estimated_delivery"].isoformat() == "2026-05-01T10:30:00+00:00"


async def test_dashboard_and_restaurant_daily(dsn, conn):
    # Explicit created_at, around UTC midnight, to pin the day bucketing.
    async def put(order_id: int, version: int, event: NewEvent, at: str) -> None:
        await conn.execute(
            "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version, created_at) "
            "VALUES ($1, 'order', $2, $3, $4, $5::timestamptz)",
            f"order_{order_id}", event.event_type, json.dumps(dict(event.data)), version,
            __import__("datetime").datetime.fromisoformat(at))

    await put(1, 1, created(1, "10.00"), "2026-03-01T20:00:00+00:00")
    await put(1, 2, confirmed(1, restaurant_id=9), "2026-03-01T23:30:00-02:00")  # 2026-03-02 UTC
    await put(1, 3, simple("OrderDelivered", 1), "2026-03-02T23:59:59+00:00")
    await put(2, 1, created(2, "5.50"), "2026-03-02T10:00:00+00:00")
    await put(2, 2, confirmed(2, restaurant_id=9), "2026-03-02T10:05:00+00:00")
    await put(2, 3, simple("OrderCancelled", 2, reason="late"), "2026-03-03T00:00:01+00:00")
    await put(3, 1, created(3, "7.25"), "2026-03-02T11:00:00+00:00")
    await put(3, 2, simple("OrderCancelled", 3, reason="changed mind"), "2026-03-02T11:01:00+00:00")
    await put(4, 1, created(4, "1.00"), "2026-03-02T12:00:00+00:00")
    await put(4, 2, simple("SomethingElse", 4), "2026-03-02T12:01:00+00:00")  # unknown type: passed over
    async with running_daemon(dsn, poll_interval=0.2):
        await wait_caught_up(conn)
    dashboard = {r["status"]: (r["order_count"], r["total_amount"])
                 for r in await conn.fetch("SELECT * FROM read_model_dashboard")}
    assert dashboard == {"delivered": (1, Decimal("10.00")), "cancelled": (2, Decimal("12.75")),
                         "created": (1, Decimal("1.00"))}
    daily = {(r["restaurant_id"], r["day"].isoformat()): (r["confirmed"], r["delivered"], r["cancelled"], r["revenue"])
             for r in await conn.fetch("SELECT * FROM read_model_restaurant_daily")}
    assert daily == {(9, "2026-03-02"): (2, 1, 0, Decimal("10.00")), (9, "2026-03-03"): (0, 0, 1, Decimal("0.00"))}
    assert await conn.fetchval("SELECT current_version FROM read_model_orders WHERE order_id = 4") == 1


async def test_projection_defined_outside_the_package(dsn, pool, conn):
    from pgprojector.migrations import setup_projection

    custom = load_projections(["custom_projection:projection"])[0]
    await setup_projection(conn, custom)
    store = EventStore(pool)
    await store.append("order_1", "order", [created(1), confirmed(1)], expected_version=0)
    async with running_daemon(dsn, ["orders", "custom_projection:projection"], poll_interval=0.2):
        await wait_caught_up(conn, names=["orders", "event_type_counts"])
    counts = dict(await conn.fetch("SELECT event_type, seen FROM event_type_counts"))
    assert counts == {"OrderCreated": 1, "OrderConfirmed": 1}


async def test_the_readmes_example_projection_runs(dsn, pool, conn, tmp_path, monkeypatch):
    """The README's complete custom projection, exactly as printed there, loaded by its `module:attribute`."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Writing a projection", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "projections.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))

    signups = load_projections(["myapp.projections:signups"])[0]
    assert signups.event_types == frozenset({"UserSignedUp"})
    await setup_projection(conn, signups)
    store = EventStore(pool)
    for i in range(3):
        await store.append(f"user_{i}", "user", [NewEvent("UserSignedUp", {"n": i})], expected_version=0)
    await store.append("order_1", "order", [created(1)], expected_version=0)  # not wanted: passed over
    worker = ProjectionWorker(pool, signups, batch_size=100, poll_interval=0.1, on_error="halt", max_attempts=1,
                              stopping=anyio.Event(), wakeup=Wakeup())
    while not (await worker.apply_next_batch()).caught_up:
        pass
    assert [tuple(r) for r in await conn.fetch("SELECT day, signups FROM signups_per_day")] == [
        (await conn.fetchval("SELECT (created_at AT TIME ZONE 'UTC')::date FROM events WHERE position = 1"), 3)]


def test_event_types_is_a_set_of_names():
    async def handle(conn: asyncpg.Connection, events: list[RecordedEvent]) -> None: ...

    assert Projection(name="p", handle=handle, event_types={"A", "B"}).event_types == frozenset({"A", "B"})
    with pytest.raises(ConfigError, match="a set of names, not one name"):
        Projection(name="p", handle=handle, event_types="UserSignedUp")
    with pytest.raises(ConfigError, match="lowercase identifier"):
        Projection(name="Signups", handle=handle)
    with pytest.raises(ConfigError, match="exactly one of handle and handle_range"):
        Projection(name="p")


async def test_open_transaction_on_another_table_does_not_hold_projections_back(dsn, pool, conn):
    """An event committed beside a long open unrelated transaction is projected at notification speed."""
    bystander = await db.connect(dsn)
    try:
        await bystander.execute("CREATE TABLE other (x int)")
        open_tx = bystander.transaction()
        await open_tx.start()
        await bystander.execute("INSERT INTO other VALUES (1)")
        async with running_daemon(dsn, ["orders"], poll_interval=5):
            await wait_caught_up(conn, names=["orders"])
            await anyio.sleep(0.3)  # idle: waiting on the notification now
            started = time.perf_counter()
            await EventStore(pool).append("order_1", "order", [created(1)], expected_version=0)
            await wait_caught_up(conn, timeout=4, names=["orders"])  # well under the 5 s poll interval
            assert time.perf_counter() - started < 2
        await open_tx.rollback()
    finally:
        await bystander.close()


async def test_open_appending_transaction_holds_later_events_until_it_ends(dsn, pool, conn):
    """Never skip: an event committed after an open appender's position waits for it; then both, in order."""
    store = EventStore(pool)
    slow = await db.connect(dsn)
    try:
        tx = slow.transaction()
        await tx.start()
        await EventStore(slow).append("order_1", "order", [created(1)], expected_version=0)  # position 1, open
        await store.append("order_2", "order", [created(2)], expected_version=0)  # position 2, committed
        async with running_daemon(dsn, ["orders"], poll_interval=0.2):
            await anyio.sleep(1.0)
            assert await conn.fetchval("SELECT position FROM pgprojector_projections WHERE name='orders'") == 0
            assert await conn.fetchval("SELECT count(*) FROM read_model_orders") == 0
            from pgprojector.status import gather_status

            report = await gather_status(conn)
            assert [w["pid"] for w in report["waiting_on"]] == [slow.get_server_pid()]
            await tx.commit()
            await wait_caught_up(conn, names=["orders"])
            assert await conn.fetchval("SELECT count(*) FROM read_model_orders") == 2
    finally:
        await slow.close()


async def test_rolled_back_append_leaves_a_hole_that_is_passed(dsn, pool, conn):
    store = EventStore(pool)
    async with conn.transaction():
        await EventStore(conn).append("order_1", "order", [created(1)], expected_version=0)
        await conn.execute("SELECT 1")
    rollback_conn = await db.connect(dsn)
    try:
        tx = rollback_conn.transaction()
        await tx.start()
        await EventStore(rollback_conn).append("order_9", "order", [created(9)], expected_version=0)
        await tx.rollback()
    finally:
        await rollback_conn.close()
    await store.append("order_2", "order", [created(2)], expected_version=0)
    async with running_daemon(dsn, ["orders"], poll_interval=0.2):
        await wait_caught_up(conn, names=["orders"])
    assert sorted(r["order_id"] for r in await conn.fetch("SELECT order_id FROM read_model_orders")) == [1, 2]


async def test_ids_written_as_strings_of_digits_are_ids(dsn, pool, conn):
    """A producer that writes 64-bit ids as JSON strings (as JavaScript ones do): the same read models."""
    store = EventStore(pool)
    as_strings = NewEvent("OrderCreated", {**created(1).data, "order_id": "1", "user_id": "7"})
    await store.append("order_1", "order", [as_strings, NewEvent("OrderConfirmed", {
        **confirmed(1).data, "order_id": "1", "restaurant_id": "3"}), simple("OrderDelivered", "1")], expected_version=0)
    async with running_daemon(dsn, poll_interval=0.2):
        await wait_caught_up(conn)
    row = await conn.fetchrow("SELECT order_id, user_id, restaurant_id, status FROM read_model_orders")
    assert dict(row) == {"order_id": 1, "user_id": 7, "restaurant_id": 3, "status": "delivered"}
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_projections WHERE state <> 'running'") == 0
    await assert_read_models_match_fold(conn)


async def test_built_in_apply_raises_work_mem_for_its_batch_and_never_lowers_it(conn):
    """The batch's CTEs stay in memory (a batch of 20000 positions spilled at the default 4MB), for the
    batch's transaction only; an operator's larger work_mem is kept. The statement always runs its
    generic plan (re-planned for each one-event batch, it cost an idle daemon 2 to 3 ms a batch)."""
    (orders,) = load_projections(["orders"])
    assert orders.handle_range is not None
    before = await conn.fetchval("SHOW work_mem")
    async with conn.transaction():
        assert await orders.handle_range(conn, 0, 20_000) == 0
        assert await conn.fetchval("SHOW work_mem") == "20000kB"
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    assert await conn.fetchval("SHOW work_mem") == before
    assert await conn.fetchval("SHOW plan_cache_mode") == "auto"
    await conn.execute("SET work_mem = '1GB'")
    async with conn.transaction():
        assert await orders.handle_range(conn, 0, 20_000) == 0
        assert await conn.fetchval("SHOW work_mem") == "1GB"


async def test_built_in_apply_never_plans_a_batch_again(pool, conn):
    """Each batch runs the statement's cached generic plan: left to choose, PostgreSQL re-planned the
    one-event batches of an idle daemon over a large log every time."""
    store = EventStore(pool)
    for n in range(4):
        await store.append(f"order_{n}", "order", [created(n), confirmed(n)], expected_version=0)
    projections = load_projections(ALL)
    head = await conn.fetchval("SELECT max(position) FROM events")
    for position in range(1, head + 1):
        for projection in projections:
            assert projection.handle_range is not None
            async with conn.transaction():
                await projection.handle_range(conn, position - 1, position)
    plans = await conn.fetch("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = ANY($1)",
                             list(APPLY_STATEMENTS.values()))
    assert [(p["generic_plans"], p["custom_plans"]) for p in plans] == [(head, 0)] * 3
    await assert_read_models_match_fold(conn)


async def test_replayed_event_changes_nothing(dsn, pool, conn):
    """An event whose version is not above current_version was applied already (e.g. after a rebuild of state)."""
    store = EventStore(pool)
    await store.append("order_1", "order", [created(1), confirmed(1)], expected_version=0)
    async with running_daemon(dsn, poll_interval=0.2):
        await wait_caught_up(conn)
    before = [dict(r) for r in await conn.fetch("SELECT * FROM read_model_orders")]
    dashboard_before = await conn.fetch("SELECT * FROM read_model_dashboard")
    await conn.execute("UPDATE pgprojector_projections SET position = 0")  # replay the whole log
    async with running_daemon(dsn, poll_interval=0.2):
        await wait_caught_up(conn)
    assert [dict(r) for r in await conn.fetch("SELECT * FROM read_model_orders")] == before
    assert await conn.fetch("SELECT * FROM read_model_dashboard") == dashboard_before


async def test_range_projection_defined_outside_the_package_takes_batches_of_positions(dsn, pool, conn):
    """A range handler's batch is the next batch_size positions: here 2 of 21, where its one wanted
    type is one event in three. Batches without a wanted event move the checkpoint too; the worker
    counts what a handler that does not say applied."""
    projection = load_projections(["custom_projection:range_projection"])[0]
    await setup_projection(conn, projection)
    store = EventStore(pool)
    for i in range(1, 8):
        await store.append(f"order_{i}", "order", [created(i, user_id=i % 3), confirmed(i)], expected_version=0)
        await store.append(f"user_{i}", "user", [NewEvent("UserSeen", {"n": i})], expected_version=0)
    worker = ProjectionWorker(pool, projection, batch_size=2, poll_interval=0.1, on_error="halt", max_attempts=1,
                              stopping=anyio.Event(), wakeup=Wakeup())
    batches = []
    while not batches or not batches[-1].caught_up:
        batches.append(await worker.apply_next_batch())
    assert [b.checkpoint for b in batches] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 21]
    assert [b.applied for b in batches] == [1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0] and worker.events_applied == 7
    assert dict(await conn.fetch("SELECT user_id, orders FROM created_per_user")) == {0: 2, 1: 3, 2: 2}


def _worker(pool: asyncpg.Pool, projection: Projection, *, batch_size: int = 100, on_error: str = "park",
            max_attempts: int = 1, poll_interval: float = 0.1) -> ProjectionWorker:
    """By default, parks an event at its first failure."""
    return ProjectionWorker(pool, projection, batch_size=batch_size, poll_interval=poll_interval, on_error=on_error,
                            max_attempts=max_attempts, stopping=anyio.Event(), wakeup=Wakeup())


async def _until_caught_up(worker: ProjectionWorker, steps: int = 200) -> None:
    """Steps until the worker is caught up or inactive (halted), failing after `steps`."""
    for _ in range(steps):
        batch = await worker.step()
        if batch is not None and (batch.caught_up or batch.inactive):
            return
    raise AssertionError("not caught up")


async def _alter_database(conn: asyncpg.Connection, setting: str, value: str) -> None:
    """For the connections opened from now on."""
    database = await conn.fetchval("SELECT quote_ident(current_database())")
    await conn.execute(f"ALTER DATABASE {database} SET {setting} = '{value}'")


async def test_a_repeatable_read_database_default_skips_nothing(dsn, conn):
    """The batch's transaction reads in a snapshot later than its horizon's, whatever the default
    isolation: here an append commits while the batch waits for its checkpoint's row lock."""
    await _alter_database(conn, "default_transaction_isolation", "repeatable read")
    store = EventStore(conn)
    await store.append("order_1", "order", [created(1)], expected_version=0)
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    blocker = await db.connect(dsn)
    try:
        async with pool.acquire() as probe:
            assert await probe.fetchval("SHOW default_transaction_isolation") == "repeatable read"
        worker = _worker(pool, load_projections(["orders"])[0])
        assert (await worker.apply_next_batch()).checkpoint == 1

        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("SELECT FROM pgprojector_projections WHERE name = 'orders' FOR UPDATE")
        batches: list[object] = []
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: _append_to(batches, worker.apply_next_batch()))
            with anyio.fail_after(10):  # the batch's first statement has taken its snapshot and waits
                while not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                              "AND query LIKE '%pgprojector_projections%'"):
                    await anyio.sleep(0.02)
            await store.append("order_2", "order", [created(2)], expected_version=0)
            await holding.commit()
        while not (await worker.apply_next_batch()).caught_up:
            pass
    finally:
        await blocker.close()
        await pool.close()
    assert [r["order_id"] for r in await conn.fetch("SELECT order_id FROM read_model_orders ORDER BY 1")] == [1, 2]


async def _append_to(results: list[object], awaitable: Awaitable[object]) -> None:
    results.append(await awaitable)


@pytest.mark.parametrize("at_position_1", ["a rolled-back append", "an unwanted event"])
async def test_a_failing_range_over_no_wanted_event_blames_none(dsn, pool, conn, at_position_1):
    """A `handle_range` batch of the one position left before the horizon, which holds no wanted
    event, fails: there is no event to retry, park or halt at (it once crashed the daemon, every
    projection with it, on looking that event up). It goes again as the next wanted event, here none."""
    calls = []

    async def apply(conn: asyncpg.Connection, after: int, upto: int) -> None:
        calls.append((after, upto))
        raise ValueError("this handler fails")

    projection = Projection(name="fails", handle_range=apply, event_types={"Tick"})
    await setup_projection(conn, projection)
    if at_position_1 == "a rolled-back append":
        rolled_back = conn.transaction()
        await rolled_back.start()
        await EventStore(conn).append("stream_1", "stream", [NewEvent("Tick", {})], expected_version=0)
        await rolled_back.rollback()
    else:
        await EventStore(conn).append("stream_1", "stream", [NewEvent("Tock", {})], expected_version=0)
    worker = _worker(pool, projection)
    assert await worker.step() is None and calls == [(0, 1)]
    again = await worker.step()
    assert again is not None and again.caught_up and again.checkpoint == 1 and calls == [(0, 1)]
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0
    assert await conn.fetchval("SELECT state FROM pgprojector_projections WHERE name = 'fails'") == "running"


async def test_a_lock_timeout_is_waited_out_not_blamed_on_the_event(dsn, conn):
    """A read model locked by someone else past lock_timeout (a CREATE INDEX, say) says nothing about
    the event: it is retried as the database's failure, never parked, even at max_attempts 1."""
    await _alter_database(conn, "lock_timeout", "100ms")
    await EventStore(conn).append("order_1", "order", [created(1)], expected_version=0)
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    locker = await db.connect(dsn)
    try:
        worker = _worker(pool, load_projections(["orders"])[0])
        holding = locker.transaction()
        await holding.start()
        await locker.execute("LOCK TABLE read_model_orders IN SHARE MODE")
        for _ in range(3):
            assert await worker.step() is None
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0
        assert tuple(await conn.fetchrow("SELECT state, position FROM pgprojector_projections "
                                         "WHERE name = 'orders'")) == ("running", 0)
        await holding.rollback()
        applied = await worker.step()
        assert applied is not None and applied.applied == 1
    finally:
        await locker.close()
        await pool.close()
    assert await conn.fetchval("SELECT count(*) FROM read_model_orders") == 1


async def test_a_batch_longer_than_statement_timeout_is_halved_not_retried_forever(dsn, conn):
    """A statement_timeout shorter than a whole batch once stalled every projection: the canceled
    batch was retried as it was. Halved like a failed batch, it goes through in smaller ones."""
    seen = "CREATE TABLE IF NOT EXISTS slow_seen (position BIGINT PRIMARY KEY)"

    async def apply(conn: asyncpg.Connection, after: int, upto: int) -> None:
        # 2 ms a position: past the 100 ms timeout above 50 positions
        await conn.execute("SELECT pg_sleep($1::float8 * 0.002)", upto - after)
        await conn.execute("INSERT INTO slow_seen SELECT position FROM events WHERE position > $1 AND position <= $2",
                           after, upto)

    projection = Projection(name="slow", handle_range=apply, schema=seen, tables=("slow_seen",))
    await setup_projection(conn, projection)
    await EventStore(conn).append("ticks", "clock", [NewEvent("Tick", {}) for _ in range(200)], expected_version=0)
    await _alter_database(conn, "statement_timeout", "100ms")
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        await _until_caught_up(_worker(pool, projection, batch_size=1000, on_error="halt"), steps=40)
    finally:
        await pool.close()
    assert await conn.fetchval("SELECT position FROM pgprojector_projections WHERE name = 'slow'") == 200
    assert await conn.fetchval("SELECT count(*) FROM slow_seen") == 200
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0


async def test_a_batch_whose_read_outlasts_statement_timeout_is_halved(dsn, conn, monkeypatch):
    """The same for a `handle` projection's read of its batch, canceled by the server: the halving
    needs no query in the transaction the cancel aborted (it once ran one, and the daemon exited)."""
    from pgprojector.sqlfiles import queries

    read = queries()["read_batch"]
    # 3 ms a row asked for: past the 100 ms timeout above 33 rows
    monkeypatch.setitem(queries(), "read_batch", f"SELECT * FROM ({read}) b WHERE (SELECT pg_sleep($4 * 0.003)::text = '')")
    seen: list[int] = []

    async def handle(conn: asyncpg.Connection, events: list[RecordedEvent]) -> None:
        seen.extend(event.position for event in events)

    projection = Projection(name="reads", handle=handle)
    await setup_projection(conn, projection)
    await EventStore(conn).append("ticks", "clock", [NewEvent("Tick", {}) for _ in range(100)], expected_version=0)
    await _alter_database(conn, "statement_timeout", "100ms")
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        await _until_caught_up(_worker(pool, projection, on_error="halt"), steps=40)
    finally:
        await pool.close()
    assert seen == list(range(1, 101))
    assert await conn.fetchval("SELECT position FROM pgprojector_projections WHERE name = 'reads'") == 100


async def test_an_event_whose_read_the_server_fails_is_halted_at(dsn, pool, conn, monkeypatch):
    """A `handle` projection's read can fail in the server for one event (here a division by zero
    the test puts in the read; an encoding that cannot translate it is the real-life case). Halved
    down to a batch of one, the failure names no position: the culprit is the next wanted event,
    after the unwanted one at position 1 (it once named position 1 and went round forever)."""
    from pgprojector.sqlfiles import queries

    read = queries()["read_batch"]
    monkeypatch.setitem(queries(), "read_batch",
                        # (not 1 / 0, which the planner folds: every read would fail)
                        f"SELECT * FROM ({read}) b "
                        "WHERE CASE WHEN b.position = 2 THEN b.position / (b.position - 2) = 0 ELSE true END")

    async def handle(conn: asyncpg.Connection, events: list[RecordedEvent]) -> None:
        pass

    projection = Projection(name="ticks", handle=handle, event_types={"Tick"})
    await setup_projection(conn, projection)
    await EventStore(conn).append("ticks", "clock", [NewEvent("Other", {}), NewEvent("Tick", {}), NewEvent("Tick", {})],
                                  expected_version=0)
    await _until_caught_up(_worker(pool, projection, on_error="halt"), steps=20)
    row = await conn.fetchrow("SELECT position, state, halted_at_position, last_error FROM pgprojector_projections "
                              "WHERE name = 'ticks'")
    assert (row["position"], row["state"], row["halted_at_position"]) == (0, "halted", 2)
    assert row["last_error"].startswith("Tick at position 2 (ticks v2): DivisionByZeroError")


async def test_a_deferred_constraint_failing_at_commit_is_the_batchs_failure(dsn, pool, conn):
    """Checked at COMMIT, after the handler returned: it once stopped the daemon, on every start."""
    async def handle(conn: asyncpg.Connection, events: list[RecordedEvent]) -> None:
        await conn.executemany("INSERT INTO seen_k VALUES ($1, $2)", [(e.position, e.data["k"]) for e in events])

    projection = Projection(name="unique_k", handle=handle, event_types={"Tick"}, schema=(
        "CREATE TABLE IF NOT EXISTS seen_k (position BIGINT PRIMARY KEY, k INT, UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)"))
    await setup_projection(conn, projection)
    await EventStore(conn).append("ticks", "clock", [NewEvent("Tick", {"k": k}) for k in (1, 2, 2, 4)], expected_version=0)
    await _until_caught_up(_worker(pool, projection, poll_interval=0.01))
    assert await conn.fetchval("SELECT array_agg(position ORDER BY position) FROM seen_k") == [1, 2, 4]
    letter = await conn.fetchrow("SELECT event_position, error FROM pgprojector_dead_letters")
    assert letter["event_position"] == 3 and "UniqueViolationError" in letter["error"]


async def test_an_event_that_passes_when_retried_leaves_no_count_behind(dsn, pool, conn):
    """Each of two events fails once, then passes: neither is parked at max_attempts 2 (the second
    once was, on its first failure, counted on from the first's)."""
    failed: set[int] = set()

    async def apply(conn: asyncpg.Connection, after: int, upto: int) -> int:
        if upto not in failed:
            failed.add(upto)
            raise ValueError(f"first try of {upto}")
        return 0  # (a handler may say it applied nothing)

    projection = Projection(name="flaky_once", handle_range=apply, event_types={"Tick"})
    await setup_projection(conn, projection)
    await EventStore(conn).append("ticks", "clock", [NewEvent("Tick", {}) for _ in range(2)], expected_version=0)
    await _until_caught_up(_worker(pool, projection, batch_size=1, max_attempts=2, poll_interval=0.01))
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0
    assert await conn.fetchval("SELECT position FROM pgprojector_projections WHERE name = 'flaky_once'") == 2


async def test_once_the_culprit_passes_on_a_retry_the_rest_goes_in_whole_batches(dsn, pool, conn):
    sizes: list[int] = []

    async def apply(conn: asyncpg.Connection, after: int, upto: int) -> None:
        sizes.append(upto - after)
        if after < 1 <= upto and len(sizes) <= 8:  # 64, 32, ..., 2, then 1 twice
            raise ValueError("position 1 is not ready yet")

    projection = Projection(name="slow_start", handle_range=apply, event_types={"Tick"})
    await setup_projection(conn, projection)
    await EventStore(conn).append("ticks", "clock", [NewEvent("Tick", {}) for _ in range(64)], expected_version=0)
    await _until_caught_up(_worker(pool, projection, batch_size=64, max_attempts=3, poll_interval=0.01))
    assert sizes == [64, 32, 16, 8, 4, 2, 1, 1, 1, 63]
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0


@pytest.mark.parametrize("batch_size", [1, 100])
@pytest.mark.parametrize("eta", ["2026-02-30T10:00:00Z", "2026-05-01T25:00:00+02:00", "2026-05-01T12:30:00+16:00"])
async def test_a_time_of_the_right_shape_that_postgresql_refuses_is_parked_whatever_the_batch(
        dsn, pool, conn, eta, batch_size):
    """The check passes its shape; the cast refuses it. Refused alone, and refused beside the later
    confirmation that replaces it, which is the only one the fold casts: the same outcome however
    the events fall into batches (it was once applied silently in one batch and parked alone)."""
    store = EventStore(conn)
    await store.append("order_1", "order", [created(1), confirmed(1, eta=eta), confirmed(1, restaurant_id=4)],
                       expected_version=0)
    await _until_caught_up(_worker(pool, load_projections(["orders"])[0], batch_size=batch_size), steps=40)
    letters = await conn.fetch("SELECT event_position, error FROM pgprojector_dead_letters")
    assert [letter["event_position"] for letter in letters] == [2]
    assert letters[0]["error"].startswith("OrderConfirmed at position 2 (order_1 v2): ") and eta in letters[0]["error"]
    row = await conn.fetchrow("SELECT restaurant_id, current_version FROM read_model_orders WHERE order_id = 1")
    assert tuple(row) == (4, 3)


BAD_FOR_PYTHON = {  # (data, metadata) as SQL, and the error expected
    "nested too deep": ("jsonb_build_object('deep', (repeat('[', 5000) || repeat(']', 5000))::jsonb)", "NULL",
                        "RecursionError"),
    "data an array": ("'[1, 2]'", "NULL", "Tick at position 11 (ticks v11): data is not a JSON object"),
    "metadata a string": ("'{}'", "'\"str\"'", "Tick at position 11 (ticks v11): metadata is neither a JSON object nor NULL"),
}


@pytest.mark.parametrize("bad", list(BAD_FOR_PYTHON))
@pytest.mark.parametrize("on_error", ["park", "halt"])
async def test_an_event_python_cannot_take_is_parked_or_halted_at_not_a_crash(dsn, pool, conn, on_error, bad):
    """JSON nested 5000 deep is valid jsonb, and deeper than Python's decoder goes; data that is not an
    object is not what RecordedEvent promises a handler. A `handle` projection's read of either is
    found by halving and dealt with like a handler's failure (the first once stopped the whole daemon,
    on every start)."""
    data_sql, metadata_sql, expected_error = BAD_FOR_PYTHON[bad]
    seen: list[int] = []

    async def handle(conn: asyncpg.Connection, events: list[RecordedEvent]) -> None:
        seen.extend(event.position for event in events)

    projection = Projection(name="reads_data", handle=handle, event_types={"Tick"})
    await setup_projection(conn, projection)
    await EventStore(conn).append("ticks", "clock", [NewEvent("Tick", {"n": n}) for n in range(10)], expected_version=0)
    await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, metadata, version) "
                       f"VALUES ('ticks', 'clock', 'Tick', {data_sql}, {metadata_sql}, 11)")
    await EventStore(conn).append("ticks", "clock", [NewEvent("Tick", {"n": n}) for n in range(5)], expected_version=11)
    await _until_caught_up(_worker(pool, projection, batch_size=8, on_error=on_error, max_attempts=2), steps=40)
    checkpoint = await conn.fetchrow("SELECT position, state, halted_at_position, last_error "
                                     "FROM pgprojector_projections WHERE name = 'reads_data'")
    if on_error == "park":
        assert seen == [*range(1, 11), *range(12, 17)]
        letter = await conn.fetchrow("SELECT event_position, error FROM pgprojector_dead_letters")
        assert letter["event_position"] == 11 and expected_error in letter["error"]
        assert (checkpoint["position"], checkpoint["state"]) == (16, "running")
    else:
        assert seen == list(range(1, 11))
        assert (checkpoint["position"], checkpoint["state"], checkpoint["halted_at_position"]) == (10, "halted", 11)
        assert expected_error in checkpoint["last_error"]


@pytest.mark.parametrize("by_range", [False, True], ids=["handle", "handle_range"])
async def test_failed_batch_is_halved_down_to_its_bad_event(dsn, pool, conn, by_range):
    """One bad event in a batch of 512: the good events around it commit, each once, in about
    2 * log2(512) transactions (not one per event up to it), and the bad one is parked."""
    await EventStore(pool).append("stream_1", "stream", [NewEvent("Tick", {"n": n}) for n in range(512)],
                                  expected_version=0)
    positions = [r["position"] for r in await conn.fetch("SELECT position FROM events ORDER BY position")]
    bad = positions[300]
    tried: list[tuple[int, int]] = []

    async def handle(conn: asyncpg.Connection, events: list[RecordedEvent]) -> None:
        await apply_range(conn, events[0].position - 1, events[-1].position)

    async def apply_range(conn: asyncpg.Connection, after: int, upto: int) -> None:
        tried.append((after + 1, upto))
        # (a primary key: an event applied twice would fail its batch)
        await conn.execute("INSERT INTO ticks_seen SELECT position FROM events WHERE position > $1 AND position <= $2",
                           after, upto)
        if after < bad <= upto:
            raise ValueError("this tick is bad")

    projection = Projection(name="ticks", schema="CREATE TABLE ticks_seen (position BIGINT PRIMARY KEY)",
                            tables=("ticks_seen",), **({"handle_range": apply_range} if by_range else {"handle": handle}))
    await setup_projection(conn, projection)
    worker = ProjectionWorker(pool, projection, batch_size=512, poll_interval=0.1, on_error="park", max_attempts=1,
                              stopping=anyio.Event(), wakeup=Wakeup())
    for _ in range(100):
        batch = await worker.step()
        if batch is not None and batch.caught_up:
            break
    assert [r["position"] for r in await conn.fetch("SELECT position FROM ticks_seen ORDER BY 1")] == [
        p for p in positions if p != bad]
    assert await conn.fetchval("SELECT event_position FROM pgprojector_dead_letters WHERE projection = 'ticks'") == bad
    assert len(tried) <= 2 * 10 + 2, tried
    assert tried[0] == (positions[0], positions[-1]) and tried[1] == (positions[0], positions[255])


async def test_batch_reaching_below_the_applied_versions_applies_only_what_is_new(dsn, pool, conn):
    """A rewound checkpoint: each order's events at or below the version applied change nothing, the
    ones above it apply, in the same batch (the read models equal a fold of the log)."""
    store = EventStore(pool)
    await store.append("order_1", "order", [created(1), confirmed(1, restaurant_id=3)], expected_version=0)
    await store.append("order_2", "order", [created(2, amount="5.00")], expected_version=0)
    async with running_daemon(dsn, poll_interval=0.2):
        await wait_caught_up(conn)
    await conn.execute("UPDATE pgprojector_projections SET position = 0")
    await store.append("order_1", "order", [simple("DriverAssigned", 1, driver_id=1, driver_name="Dee"),
                                            simple("OrderDelivered", 1)], expected_version=2)
    await store.append("order_2", "order", [confirmed(2, restaurant_id=4), simple("OrderCancelled", 2, reason="r")],
                       expected_version=1)
    await store.append("order_3", "order", [created(3)], expected_version=0)
    async with running_daemon(dsn, poll_interval=0.2):
        await wait_caught_up(conn)
    await assert_read_models_match_fold(conn)
    assert await conn.fetchval("SELECT sum(confirmed) FROM read_model_restaurant_daily") == 2  # not 3


@pytest.mark.parametrize("batch_size", [1, 100])
async def test_second_order_created_is_refused_whether_it_shares_the_batch_or_not(dsn, pool, conn, batch_size):
    """An order created twice: each projection parks the second OrderCreated, named as such, whether the
    batch creating the order holds it too (100) or it comes in a batch of its own (1)."""
    store = EventStore(pool)
    await store.append("order_1", "order", [created(1), created(1, amount="99.00"), confirmed(1)], expected_version=0)
    async with running_daemon(dsn, on_error="park", max_attempts=1, poll_interval=0.1, batch_size=batch_size):
        await wait_caught_up(conn)
    parked = await conn.fetch("SELECT projection, event_position, error FROM pgprojector_dead_letters ORDER BY 1")
    assert [(r["projection"], r["event_position"]) for r in parked] == [("analytics", 2), ("dashboard", 2), ("orders", 2)]
    assert all("the order exists already" in r["error"] for r in parked)
    assert await conn.fetchval("SELECT total_amount FROM read_model_dashboard WHERE status = 'confirmed'") == \
        Decimal("20.00")


async def test_rewound_batch_of_a_known_order_whose_version_1_was_parked_replays_it(dsn, pool, conn):
    """A batch takes an order whose version 1 it holds to be new, without a lookup. Here that version
    was parked (it is not an OrderCreated) and the OrderCreated after it applied: when the checkpoint is
    rewound over both, the batch must replay them, not refuse version 1 again."""
    store = EventStore(pool)
    await store.append("order_1", "order", [confirmed(1)], expected_version=0)
    async with running_daemon(dsn, ["orders"], on_error="park", max_attempts=1, poll_interval=0.1):
        await wait_caught_up(conn, names=["orders"])
        await store.append("order_1", "order", [created(1)], expected_version=1)
        await wait_caught_up(conn, names=["orders"])
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 1
    before = [dict(r) for r in await conn.fetch("SELECT * FROM read_model_orders")]
    assert [(r["order_id"], r["current_version"]) for r in before] == [(1, 2)]
    await conn.execute("UPDATE pgprojector_projections SET position = 0 WHERE name = 'orders'")
    async with running_daemon(dsn, ["orders"], on_error="halt", max_attempts=1, poll_interval=0.1):
        await wait_caught_up(conn, names=["orders"], timeout=10)  # a halt at version 1 never gets there
    assert await conn.fetchval("SELECT state FROM pgprojector_projections WHERE name = 'orders'") == "running"
    assert [dict(r) for r in await conn.fetch("SELECT * FROM read_model_orders")] == before


@pytest.mark.parametrize("batch_size", [1, 3, 100])
async def test_reconfirmed_order_counts_for_each_restaurant_in_turn(dsn, pool, conn, batch_size):
    """An order confirmed again by another restaurant: what follows counts for the latest one, whether
    the confirmations share a batch with what follows or not."""
    store = EventStore(pool)
    await store.append("order_1", "order", [
        created(1, amount="30.00"), confirmed(1, restaurant_id=3), simple("OrderCancelled", 1, reason="r"),
        confirmed(1, restaurant_id=4), confirmed(1, restaurant_id=5), simple("OrderDelivered", 1),
        confirmed(1, restaurant_id=3), simple("OrderCancelled", 1, reason="r")], expected_version=0)
    await store.append("order_2", "order", [created(2, amount="2.00"), confirmed(2, restaurant_id=4),
                                            simple("OrderDelivered", 2)], expected_version=0)
    async with running_daemon(dsn, batch_size=batch_size, poll_interval=0.2):
        await wait_caught_up(conn)
    await assert_read_models_match_fold(conn)
    counts = {r["restaurant_id"]: tuple(r)[1:] for r in await conn.fetch(
        "SELECT restaurant_id, sum(confirmed), sum(delivered), sum(cancelled), sum(revenue) "
        "FROM read_model_restaurant_daily GROUP BY restaurant_id")}
    assert counts == {3: (2, 0, 2, Decimal("0.00")), 4: (2, 1, 0, Decimal("2.00")),
                      5: (1, 1, 0, Decimal("30.00"))}


@pytest.mark.parametrize("bad", [
    NewEvent("OrderConfirmed", {"order_id": 1}),  # fields missing
    NewEvent("OrderCreated", {"order_id": 1, "user_id": 1, "user_name": "u", "items": [], "total_amount": "abc",
                              "delivery_address": "x"}),
    simple("OrderDelivered", 77),  # aggregate says order_1
])
async def test_bad_event_halts_projection_at_it(dsn, pool, conn, bad):
    store = EventStore(pool)
    await store.append("order_0", "order", [created(0)], expected_version=0)
    await store.append("order_1", "order", [bad], expected_version=0)
    await store.append("order_2", "order", [created(2)], expected_version=0)
    async with running_daemon(dsn, ["orders"], poll_interval=0.1, max_attempts=2):
        with anyio.fail_after(20):
            while await conn.fetchval("SELECT state FROM pgprojector_projections WHERE name='orders'") != "halted":
                await anyio.sleep(0.05)
    row = await conn.fetchrow("SELECT * FROM pgprojector_projections WHERE name='orders'")
    assert row["position"] == 1 and row["halted_at_position"] == 2 and row["last_error"]
    assert [r["order_id"] for r in await conn.fetch("SELECT order_id FROM read_model_orders")] == [0]


async def test_prometheus_endpoint(dsn, pool, conn):
    import urllib.request

    from pgprojector.embedded import _free_port

    port = _free_port()
    await EventStore(pool).append("order_1", "order", [created(1), confirmed(1)], expected_version=0)
    async with running_daemon(dsn, poll_interval=0.2, metrics_port=port):
        await wait_caught_up(conn)
        await anyio.sleep(5.5)  # one heartbeat refreshes the lag gauges
        body = await anyio.to_thread.run_sync(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert 'pgprojector_events_applied_total{projection="orders"} 2.0' in body
    assert 'pgprojector_events_applied_total{projection="analytics"} 2.0' in body
    assert 'pgprojector_lag_events{projection="orders"} 0.0' in body
    assert 'pgprojector_batch_duration_seconds_count{projection="dashboard"} 1.0' in body
    assert "pgprojector_reconnects_total" in body or "pgprojector_reconnects" in body

    # Started again, caught up already: the checkpoint gauge has its value before any batch (it had none).
    port, body = _free_port(), ""
    async with running_daemon(dsn, poll_interval=0.2, metrics_port=port):
        with anyio.fail_after(10):
            while 'pgprojector_checkpoint_position{projection="orders"} 2.0' not in body:
                await anyio.sleep(0.05)
                body = await anyio.to_thread.run_sync(
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert "pgprojector_events_applied_total{" not in body


async def test_a_batch_held_up_is_logged_with_what_its_backend_waits_for(dsn, pool, conn, monkeypatch):
    """A read model locked by someone else held `orders` back without a single log line."""
    from structlog.testing import capture_logs

    from pgprojector import daemon as daemon_module

    monkeypatch.setattr(daemon_module, "SLOW_BATCH_SECONDS", 0.5)
    store = EventStore(pool)
    await store.append("order_1", "order", [created(1)], expected_version=0)
    locker = await db.connect(dsn)
    try:
        with capture_logs() as logs:
            async with running_daemon(dsn, ["orders"], poll_interval=0.1):
                await wait_caught_up(conn, names=["orders"])
                await locker.execute("BEGIN; LOCK TABLE read_model_orders IN ACCESS EXCLUSIVE MODE")
                await store.append("order_1", "order", [confirmed(1)], expected_version=1)
                await until_logged(logs, "batch_slow")
                await locker.execute("ROLLBACK")
                await wait_caught_up(conn, names=["orders"])
    finally:
        await locker.close()
    slow = next(entry for entry in logs if entry["event"] == "batch_slow")
    assert slow["projection"] == "orders" and slow["after"] == 1 and slow["seconds"] >= 0.5
    assert (slow["backend"], slow["wait_event_type"]) == ("active", "Lock")
    assert slow["blocked_by"] and slow["blocked_by"][0].startswith(f"{locker.get_server_pid()} ")


async def test_every_connection_has_keepalives_on_both_ends(conn):
    """A peer gone without closing (a partition, a failover) is noticed in about half a minute, not
    hours; and asyncpg's socket is still where db.py reaches for it."""
    import socket

    assert await conn.fetchval("SHOW tcp_keepalives_idle") == str(db.KEEPALIVE_IDLE_S)
    assert await conn.fetchval("SHOW tcp_user_timeout") == str(db.USER_TIMEOUT_MS)
    sock = conn._transport.get_extra_info("socket")  # noqa: SLF001
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == db.KEEPALIVE_IDLE_S
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == db.USER_TIMEOUT_MS


async def test_a_server_that_stops_answering_is_logged_and_does_not_hold_a_stop(dsn, pool, conn, monkeypatch):
    """Every connection frozen by a proxy, sockets open: the worker waited without a log line, and a
    stop waited for as long as the freeze lasted. Now batch_slow names the batch held up (here before
    its BEGIN was answered), and the stop gives up after PGPROJECTOR_STOP_TIMEOUT."""
    from urllib.parse import urlsplit, urlunsplit

    from helpers import FreezableProxy
    from structlog.testing import capture_logs

    from pgprojector import daemon as daemon_module

    monkeypatch.setattr(daemon_module, "SLOW_BATCH_SECONDS", 1.0)
    monkeypatch.setattr(daemon_module, "CLOSE_SECONDS", 1.0)
    parts = urlsplit(dsn)
    proxy = FreezableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))
    store = EventStore(pool)
    await store.append("order_1", "order", [created(1)], expected_version=0)
    try:
        with capture_logs() as logs:
            async with running_daemon(proxied, ["orders"], poll_interval=0.1, stop_timeout=1) as daemon:
                await wait_caught_up(conn, names=["orders"])
                # Frozen while the worker is between batches (no await between the look and the
                # freeze): its next batch is then held up before its BEGIN is answered, the case a
                # watch that began only once it had a connection missed.
                with anyio.fail_after(10):
                    while daemon.workers[0].in_flight is not None:
                        await anyio.sleep(0)
                proxy.freeze()
                await store.append("order_1", "order", [confirmed(1)], expected_version=1)
                await until_logged(logs, "batch_slow")
                stop_requested = time.monotonic()
        took = time.monotonic() - stop_requested
    finally:
        proxy.thaw()
        await proxy.close()
    slow = next(entry for entry in logs if entry["event"] == "batch_slow")
    assert slow["projection"] == "orders" and slow["backend"].startswith("none yet")
    assert daemon.stop_forced and took < 10, took
    assert [entry["unfinished"] for entry in logs if entry["event"] == "stop_timeout"] == [["orders"]]
    assert await conn.fetchval("SELECT position FROM pgprojector_projections WHERE name = 'orders'") == 1


async def test_a_connection_lost_mid_use_raises_its_own_error_not_the_pools(dsn, conn):
    """A backend ended while the connection is in hand: asyncpg releases the connection to the pool
    as it notices, and db.acquire's clean-up must not replace the real cause (what the daemon logs in
    database_unavailable) with `cannot call Connection.terminate(): ... released back to the pool`."""
    pool = await db.create_pool(dsn, role="tests-lost", min_size=1, max_size=1)
    try:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - which error is what is checked
            async with db.acquire(pool) as lost:
                await conn.execute("SELECT pg_terminate_backend($1)", lost.get_server_pid())
                await anyio.sleep(0.3)  # the server's FATAL arrives; asyncpg closes and releases it
                await lost.fetchval("SELECT 1")
        assert "Connection.terminate()" not in str(caught.value), repr(caught.value)
        async with db.acquire(pool) as fresh:  # and the pool goes on with a new connection
            assert await fresh.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
