"""`pgprojector demo`: the whole system on a throwaway PostgreSQL server, with no configuration.

A private server starts and is migrated; the daemon runs in-process; producers drive orders
through their lives, appending with `EventStore.append_with_retry`. Two producers work every
order at once (think two replicas of an order service handed the same orders), each deciding the
order's next step from the history it read: the one that loses a race gets a version conflict,
re-reads and re-decides. At the end: what the read models hold, and the projections' lag.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TextIO

import anyio
import asyncpg
from pydantic import SecretStr

from pgprojector import db
from pgprojector.daemon import Daemon
from pgprojector.embedded import EmbeddedPostgres, find_bindir
from pgprojector.events import NewEvent, RecordedEvent
from pgprojector.migrations import migrate
from pgprojector.projection import Projection, load_projections
from pgprojector.settings import BUILTIN_PROJECTIONS, Settings
from pgprojector.store import EventStore

CATCH_UP_TIMEOUT = 30.0
SEED = 20250303

RESTAURANTS = [
    (1, "Casa Roma"), (2, "Golden Wok"), (3, "Little Tokyo"), (4, "Urban Grill"), (5, "Blue Bistro"),
    (6, "Taco Loco"), (7, "Curry House"), (8, "Green Bowl"), (9, "Pho Saigon"), (10, "Burger Barn"),
    (11, "Sushi Zen"), (12, "Falafel King"),
]
DISHES = [("Margherita", "9.50"), ("Pad Thai", "11.90"), ("Ramen", "12.40"), ("Burrito", "8.75"),
          ("Caesar Salad", "7.20"), ("Pho", "10.30"), ("Falafel Wrap", "6.90"), ("Sushi Set", "18.00"),
          ("Butter Chicken", "13.60"), ("Cheeseburger", "9.90")]
USERS = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Frances", "Leslie"]
DRIVERS = ["Sam", "Noor", "Ivan", "Mei", "Kofi", "Lena"]

# (share of orders, how far the order's life goes after OrderCreated)
LIVES = [
    (0.76, ("OrderConfirmed", "DriverAssigned", "OrderPickedUp", "OrderDelivered")),
    (0.08, ("OrderCancelled",)),
    (0.05, ("OrderConfirmed", "OrderCancelled")),
    (0.03, ("OrderConfirmed", "DriverAssigned", "OrderCancelled")),
    (0.03, ("OrderConfirmed",)),
    (0.03, ("OrderConfirmed", "DriverAssigned")),
    (0.02, ("OrderConfirmed", "DriverAssigned", "OrderPickedUp")),
]


@dataclass(frozen=True)
class OrderPlan:
    """One order's whole life, decided up front, so the outcome does not depend on who wins a race."""

    order_id: int
    events: tuple[NewEvent, ...]

    @property
    def aggregate_id(self) -> str:
        return f"order_{self.order_id}"

    def next_step(self, history: list[RecordedEvent]) -> list[NewEvent]:
        return [self.events[len(history)]] if len(history) < len(self.events) else []


def plan_order(order_id: int, rng: random.Random) -> OrderPlan:
    lines = [(name, rng.randint(1, 3), price) for name, price in rng.sample(DISHES, rng.randint(1, 3))]
    items = [{"name": name, "quantity": quantity, "price": price} for name, quantity, price in lines]
    total = sum((Decimal(price) * quantity for _, quantity, price in lines), Decimal("2.50"))  # + delivery
    restaurant_id, restaurant_name = rng.choice(RESTAURANTS)
    life = rng.choices([steps for _, steps in LIVES], weights=[share for share, _ in LIVES])[0]
    events = [NewEvent("OrderCreated", {
        "order_id": order_id, "user_id": 1000 + rng.randrange(len(USERS)), "user_name": rng.choice(USERS),
        "items": items, "total_amount": str(total), "delivery_address": f"{rng.randint(1, 200)} Demo Street",
    })]
    confirmed = False
    for step in life:
        data: dict[str, object] = {"order_id": order_id}
        if step == "OrderConfirmed":
            confirmed = True
            eta = datetime.now(UTC) + timedelta(minutes=rng.randint(20, 50))
            data.update(restaurant_id=restaurant_id, restaurant_name=restaurant_name,
                        estimated_delivery=eta.isoformat())
        elif step == "DriverAssigned":
            driver = rng.randrange(len(DRIVERS))
            data.update(driver_id=500 + driver, driver_name=DRIVERS[driver])
        elif step == "OrderCancelled":
            data["reason"] = rng.choice(["item_unavailable", "restaurant_closed", "no_driver_available"]
                                        if confirmed else ["customer_changed_mind", "payment_failed"])
        events.append(NewEvent(step, data))
    return OrderPlan(order_id, tuple(events))


@dataclass
class Stats:
    appended: int = 0
    conflicts: int = 0
    started: float = field(default_factory=time.monotonic)


async def produce(store: EventStore, plans: list[OrderPlan], stats: Stats, rng: random.Random) -> None:
    """Push each order to the end of its life, one step per append; a rival producer pushes it too."""
    for plan in plans:
        while True:
            decided: list[list[NewEvent]] = []

            async def decide(history: list[RecordedEvent], plan: OrderPlan = plan,
                             decided: list[list[NewEvent]] = decided) -> list[NewEvent]:
                await anyio.sleep(rng.uniform(0, 0.002))  # time to think: the rival may append meanwhile
                decided.append(plan.next_step(history))
                return decided[-1]

            await store.append_with_retry(plan.aggregate_id, "order", decide, max_attempts=50)
            stats.conflicts += len(decided) - 1  # each further decision followed a version conflict
            if not decided[-1]:
                break  # the order's life is over
            stats.appended += len(decided[-1])


async def projection_positions(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT p.name, p.position, p.state, (SELECT count(*) FROM events e WHERE e.position > p.position) AS lag "
        "FROM pgprojector_projections p ORDER BY p.name")


async def report_progress(conn: asyncpg.Connection, stats: Stats, out: TextIO) -> None:
    while True:
        await anyio.sleep(1.0)
        rows = await projection_positions(conn)
        head = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
        slowest = min(rows, key=lambda row: row["position"])
        print(f"  {time.monotonic() - stats.started:5.1f}s  {stats.appended:5d} events appended, "
              f"{stats.conflicts:4d} conflicts retried; projected up to position {slowest['position']} "
              f"of {head} (lag {max(row['lag'] for row in rows)})", file=out, flush=True)


async def wait_for_catch_up(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    with anyio.move_on_after(CATCH_UP_TIMEOUT):
        while True:
            rows = await projection_positions(conn)
            if all(row["lag"] == 0 for row in rows):
                return rows
            await anyio.sleep(0.1)
    return await projection_positions(conn)


async def print_read_models(conn: asyncpg.Connection, out: TextIO) -> bool:
    """The read models' contents; True when the dashboard agrees with read_model_orders."""
    by_status = await conn.fetch("SELECT status, count(*) AS orders, sum(total_amount) AS total "
                                 "FROM read_model_orders GROUP BY status ORDER BY status")
    print("\norders by status (read_model_orders):", file=out)
    for row in by_status:
        print(f"  {row['status']:<16} {row['orders']:>5}", file=out)
    dashboard = await conn.fetch("SELECT status, order_count, total_amount FROM read_model_dashboard ORDER BY status")
    print("\ndashboard (read_model_dashboard):", file=out)
    print(f"  {'status':<16} {'orders':>6} {'total':>11}", file=out)
    for row in dashboard:
        print(f"  {row['status']:<16} {row['order_count']:>6} {row['total_amount']:>11}", file=out)
    busiest = await conn.fetch(
        "SELECT r.restaurant_id, sum(r.confirmed) AS confirmed, sum(r.delivered) AS delivered, "
        "       sum(r.cancelled) AS cancelled, sum(r.revenue) AS revenue, "
        "       (SELECT max(o.restaurant_name) FROM read_model_orders o WHERE o.restaurant_id = r.restaurant_id) "
        "         AS name "
        "FROM read_model_restaurant_daily r GROUP BY r.restaurant_id ORDER BY revenue DESC, r.restaurant_id LIMIT 5")
    print("\nbusiest restaurants by revenue (read_model_restaurant_daily):", file=out)
    print(f"  {'restaurant':<18} {'confirmed':>9} {'delivered':>9} {'cancelled':>9} {'revenue':>10}", file=out)
    for row in busiest:
        print(f"  {row['name'] or row['restaurant_id']:<18} {row['confirmed']:>9} {row['delivered']:>9} "
              f"{row['cancelled']:>9} {row['revenue']:>10}", file=out)
    return ({(row["status"], row["orders"], row["total"]) for row in by_status}
            == {(row["status"], row["order_count"], row["total_amount"]) for row in dashboard})


async def run_demo(orders: int = 300, producers: int = 8, out: TextIO = sys.stdout) -> int:
    bindir = find_bindir()
    server = EmbeddedPostgres(bindir=bindir)
    print(f"starting a throwaway PostgreSQL server (binaries from {bindir})...", file=out, flush=True)
    await anyio.to_thread.run_sync(server.start)
    try:
        print(f"server up at {server.dsn}", file=out, flush=True)
        return await _demo(server.dsn, orders, producers, out)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)
            print("server stopped and deleted", file=out, flush=True)


async def _demo(dsn: str, orders: int, producers: int, out: TextIO) -> int:
    settings = Settings(dsn=SecretStr(dsn), projections=",".join(BUILTIN_PROJECTIONS), channel="events", batch_size=200,
                        poll_interval=0.5, on_error="halt")
    projections = load_projections(settings.projection_refs)
    conn = await db.connect(dsn, role="demo")
    try:
        await migrate(conn, settings.channel, projections)
        pool = await db.create_pool(dsn, role="demo-producer", min_size=1, max_size=producers)
        try:
            return await _drive(settings, projections, conn, pool, orders, producers, out)
        finally:
            await pool.close()
    finally:
        await conn.close()


async def _drive(settings: Settings, projections: list[Projection], conn: asyncpg.Connection, pool: asyncpg.Pool,
                 orders: int, producers: int, out: TextIO) -> int:
    rng = random.Random(SEED)
    plans = [plan_order(order_id, rng) for order_id in range(1, orders + 1)]
    # Producers p and p + teams share a team's orders, in the same sequence: they race on every step.
    teams = max(1, producers // 2)
    stats = Stats()
    daemon = Daemon(settings, projections)
    finished = False
    caught_up: list[asyncpg.Record] = []
    consistent = False
    print(f"daemon starting; {producers} producers driving {orders} orders "
          f"({sum(len(p.events) for p in plans)} events)...", file=out, flush=True)
    async with anyio.create_task_group() as group:
        group.start_soon(daemon.run)
        with anyio.CancelScope() as work:
            group.start_soon(_cancel_when_stopping, daemon, work)
            async with anyio.create_task_group() as producing:
                producing.start_soon(report_progress, conn, stats, out)
                async with anyio.create_task_group() as writers:
                    for number in range(producers):
                        writers.start_soon(produce, EventStore(pool), plans[number % teams::teams], stats,
                                           random.Random(SEED + number))
                producing.cancel_scope.cancel()  # the progress lines
            elapsed = time.monotonic() - stats.started
            print(f"producers done in {elapsed:.1f}s: {stats.appended} events appended, {stats.conflicts} "
                  "conflicts retried; waiting for the projections to catch up...", file=out, flush=True)
            caught_up = await wait_for_catch_up(conn)
            consistent = await print_read_models(conn, out)
            finished = True
        daemon.request_stop()
    if not finished:
        print("demo interrupted", file=out, flush=True)
        return 1
    print("\nprojections:", file=out)
    for row in caught_up:
        print(f"  {row['name']:<10} position {row['position']:>6}  lag {row['lag']}  {row['state']}", file=out)
    lag = max(row["lag"] for row in caught_up)
    print(f"\ndemo finished: {orders} orders, {stats.appended} events appended by {producers} producers, "
          f"{stats.conflicts} conflicts retried, lag {lag}; the dashboard "
          f"{'agrees' if consistent else 'DISAGREES'} with read_model_orders", file=out, flush=True)
    return 0 if lag == 0 and consistent else 1


async def _cancel_when_stopping(daemon: Daemon, scope: anyio.CancelScope) -> None:
    """Ctrl-C reaches the daemon's signal handler: stop producing too."""
    await daemon.stopping.wait()
    scope.cancel()
