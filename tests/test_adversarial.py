"""The worst producers at once, against a running daemon; then every read model is checked
against an independent fold of the whole log, and a witness projection proves that every
committed event was applied exactly once and each aggregate's events in version order.
"""

from __future__ import annotations

import json
import random

import anyio
from fold import assert_read_models_match_fold
from test_daemon import running_daemon, wait_caught_up
from witness import assert_each_event_applied_once_in_version_order

from pgprojector import EventStore, NewEvent, RecordedEvent, db
from pgprojector.migrations import setup_projection
from pgprojector.projection import load_projections

PROJECTIONS = ["orders", "dashboard", "analytics", "daemon_harness:witness"]
DURATION = 6.0


def next_step(order_id: int, history: list[RecordedEvent], rng: random.Random) -> list[NewEvent]:
    """The next event of an order's life, decided from its history (as a command handler would)."""
    last = history[-1].event_type if history else None
    if last is None:
        return [NewEvent("OrderCreated", {
            "order_id": order_id, "user_id": rng.randint(1, 50), "user_name": "u", "items": [{"sku": "x"}],
            "total_amount": f"{rng.randint(100, 9999) / 100:.2f}", "delivery_address": "addr"})]
    if last in ("OrderDelivered", "OrderCancelled"):
        return []
    if rng.random() < 0.1:
        return [NewEvent("OrderCancelled", {"order_id": order_id, "reason": "r"})]
    follow = {
        "OrderCreated": NewEvent("OrderConfirmed", {"order_id": order_id, "restaurant_id": rng.randint(1, 5),
                                                    "restaurant_name": "R",
                                                    "estimated_delivery": "2026-01-01T12:00:00+00:00"}),
        "OrderConfirmed": NewEvent("DriverAssigned", {"order_id": order_id, "driver_id": 1, "driver_name": "D"}),
        "DriverAssigned": NewEvent("OrderPickedUp", {"order_id": order_id}),
        "OrderPickedUp": NewEvent("OrderDelivered", {"order_id": order_id}),
    }
    return [follow[last]]


def whole_life(order_id: int, rng: random.Random) -> list[NewEvent]:
    history: list[NewEvent] = []
    while True:
        fake = [RecordedEvent(None, "", "", e.event_type, {}, None, i + 1, 0, None)  # type: ignore[arg-type]
                for i, e in enumerate(history)]
        step = next_step(order_id, fake, rng)
        if not step:
            return history
        history += step


async def test_adversarial_producers_against_independent_fold(dsn, pool, conn):
    await setup_projection(conn, load_projections(["daemon_harness:witness"])[0])
    await conn.execute("CREATE TABLE side_table (x int)")
    store = EventStore(pool)
    deadline = anyio.current_time() + DURATION
    counters = {"racing": 0, "rolled_back": 0, "held_open": 0, "other_table_first": 0, "bulk": 0}

    async def racers(worker: int) -> None:
        """Several writers race on the same few orders with append_with_retry; new orders every half second."""
        rng = random.Random(worker)
        while anyio.current_time() < deadline:
            order_id = rng.randint(1, 10) + 10 * int((deadline - anyio.current_time()) * 2)
            await store.append_with_retry(f"order_{order_id}", "order",
                                          lambda history: next_step(order_id, history, rng), max_attempts=100)
            counters["racing"] += 1

    async def in_own_transaction(kind: str, order_id: int, rng: random.Random) -> None:
        async with pool.acquire() as own:
            tx = own.transaction()
            await tx.start()
            try:
                if kind == "other_table_first":
                    await own.execute("INSERT INTO side_table VALUES (1)")
                    await anyio.sleep(rng.uniform(0.1, 0.6))
                await EventStore(own).append(f"order_{order_id}", "order", whole_life(order_id, rng)[:3],
                                             expected_version=0)
                if kind in ("held_open", "other_table_first"):
                    await anyio.sleep(rng.uniform(0.2, 1.5))
                if kind == "rolled_back":
                    await tx.rollback()
                else:
                    await tx.commit()
            except BaseException:
                await tx.rollback()
                raise
        counters[kind] += 1

    async def odd_transactions(worker: int) -> None:
        rng = random.Random(100 + worker)
        order_id = 100_000 * (worker + 1)
        while anyio.current_time() < deadline:
            order_id += 1
            await in_own_transaction(rng.choice(["rolled_back", "held_open", "other_table_first"]), order_id, rng)

    async def bulk_inserts() -> None:
        """Plain SQL producer: whole order lives for many orders in one multi-row INSERT."""
        rng = random.Random(7)
        order_id = 900_000
        async with pool.acquire() as own:
            while anyio.current_time() < deadline:
                rows = []
                for _ in range(40):
                    order_id += 1
                    rows += [(f"order_{order_id}", e.event_type, json.dumps(dict(e.data)), version)
                             for version, e in enumerate(whole_life(order_id, rng), start=1)]
                await own.execute(
                    "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                    "SELECT a, 'order', t, d::jsonb, v FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) "
                    "AS r(a, t, d, v)", [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                    [r[3] for r in rows])
                counters["bulk"] += 1
                await anyio.sleep(0.2)

    bystander = await db.connect(dsn)
    bystander_tx = bystander.transaction()
    await bystander_tx.start()
    await bystander.execute("INSERT INTO side_table VALUES (0)")  # open on another table the whole time
    try:
        async with running_daemon(dsn, PROJECTIONS, batch_size=7, poll_interval=0.3):
            async with anyio.create_task_group() as producers:
                for worker in range(6):
                    producers.start_soon(racers, worker)
                for worker in range(6):
                    producers.start_soon(odd_transactions, worker)
                producers.start_soon(bulk_inserts)
            await wait_caught_up(conn, timeout=60)
    finally:
        await bystander_tx.rollback()
        await bystander.close()

    assert all(counters.values()), counters  # every kind of producer really ran
    applied = await assert_each_event_applied_once_in_version_order(conn)
    assert applied == await conn.fetchval("SELECT count(*) FROM events") > 500
    await assert_read_models_match_fold(conn)
    positions = await conn.fetch("SELECT name, position FROM pgprojector_projections")
    assert len({row["position"] for row in positions}) == 1


async def test_fold_comparison_can_fail(dsn, pool, conn):
    """The check above is not vacuous: a read model that misses an update is caught."""
    import pytest

    store = EventStore(pool)
    rng = random.Random(1)
    for order_id in range(1, 6):
        await store.append(f"order_{order_id}", "order", whole_life(order_id, rng), expected_version=0)
    async with running_daemon(dsn, ["orders", "dashboard", "analytics"], poll_interval=0.2):
        await wait_caught_up(conn)
    await assert_read_models_match_fold(conn)
    await conn.execute("UPDATE read_model_dashboard SET order_count = order_count + 1 "
                       "WHERE status = (SELECT min(status) FROM read_model_dashboard)")
    with pytest.raises(AssertionError, match="read_model_dashboard"):
        await assert_read_models_match_fold(conn)
    await conn.execute("UPDATE read_model_dashboard SET order_count = order_count - 1 "
                       "WHERE status = (SELECT min(status) FROM read_model_dashboard)")
    await conn.execute("UPDATE read_model_orders SET current_version = current_version - 1 WHERE order_id = 1")
    with pytest.raises(AssertionError, match="read_model_orders"):
        await assert_read_models_match_fold(conn)
