"""sql/roles.sql: a producer can append and read but change nothing else; a projector can project.

Each test logs in as throwaway LOGIN roles that are members of the group roles. Roles are
cluster-wide, so roles.sql is applied idempotently and may already have been applied by another test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from pgprojector import EventStore, NewEvent, db
from pgprojector.daemon import Daemon
from pgprojector.listener import Wakeup
from pgprojector.migrations import apply_roles
from pgprojector.projection import load_projections
from pgprojector.settings import load_settings
from pgprojector.sqlfiles import queries
from pgprojector.status import dead_letters, gather_status
from pgprojector.worker import ProjectionWorker

INSUFFICIENT_PRIVILEGE = "42501"
READ_MODELS = ("read_model_orders", "read_model_dashboard", "read_model_restaurant_daily",
               "projection_dashboard_orders", "projection_analytics_orders")

Login = Callable[[str], Awaitable[str]]


def _as_user(dsn: str, user: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user)}:{quote(password)}@{host}"))


@pytest.fixture
async def owner(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await db.connect(dsn, role="tests")
    await apply_roles(conn)
    yield conn
    await conn.close()


@pytest.fixture
async def login(dsn: str, owner: asyncpg.Connection) -> AsyncIterator[Login]:
    """login(group) -> a DSN for a new LOGIN role that is a member of `group`; dropped afterwards."""
    created: list[str] = []

    async def make(group: str) -> str:
        name = f"test_{group.removeprefix('pgprojector_')}_{uuid.uuid4().hex[:10]}"
        password = uuid.uuid4().hex  # trust auth ignores it; a password-checking test server needs it
        await owner.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE {group}")
        created.append(name)
        return _as_user(dsn, name, password)

    yield make
    for name in created:
        await owner.execute(f"DROP ROLE IF EXISTS {name}")


async def _refused(conn: asyncpg.Connection, sql: str, *args: object) -> None:
    with pytest.raises(asyncpg.PostgresError) as refused:
        await conn.execute(sql, *args)
    assert refused.value.sqlstate == INSUFFICIENT_PRIVILEGE, f"{sql}: {refused.value!r}"


def _order_events(order_id: int) -> list[NewEvent]:
    return [
        NewEvent("OrderCreated", {"order_id": order_id, "user_id": 7, "user_name": "Ada", "items": [{"sku": "x"}],
                                  "total_amount": "12.50", "delivery_address": "1 Main St"}),
        NewEvent("OrderConfirmed", {"order_id": order_id, "restaurant_id": 3, "restaurant_name": "Bistro",
                                    "estimated_delivery": "2030-01-01T12:00:00+00:00"}),
    ]


async def test_roles_sql_is_idempotent(owner: asyncpg.Connection) -> None:
    await apply_roles(owner)
    await apply_roles(owner)
    roles = await owner.fetch("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'pgprojector\\_%'")
    assert {(r["rolname"], r["rolcanlogin"]) for r in roles} >= {
        ("pgprojector_producer", False), ("pgprojector_projector", False)}


async def test_the_projector_may_read_every_pgprojector_relation(owner: asyncpg.Connection) -> None:
    """A migration that adds a pgprojector_* table, view or sequence must add its grant to roles.sql."""
    missing = await owner.fetch(
        """SELECT c.relname FROM pg_class c
           WHERE c.relnamespace = current_schema()::regnamespace AND c.relname LIKE 'pgprojector\\_%'
             AND c.relkind IN ('r', 'v', 'm', 'S', 'p')
             AND NOT CASE WHEN c.relkind = 'S' THEN has_sequence_privilege('pgprojector_projector', c.oid, 'SELECT')
                          ELSE has_table_privilege('pgprojector_projector', c.oid, 'SELECT') END
           ORDER BY 1""")
    assert [row["relname"] for row in missing] == []


async def test_producer_appends_and_reads_but_changes_nothing_else(login: Login) -> None:
    producer = await db.connect(await login("pgprojector_producer"), role="tests-producer")
    try:
        await producer.execute(
            "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, metadata, version) VALUES "
            "('sensor_1', 'sensor', 'Measured', '{\"v\": 1}', NULL, 1), "
            "('sensor_1', 'sensor', 'Measured', '{\"v\": 2}', '{\"by\": \"sql\"}', 2)")
        store = EventStore(producer)
        assert await store.append("order_1", "order", _order_events(1), expected_version=0) == 2
        history = await store.read_stream("order_1")
        assert [e.event_type for e in history] == ["OrderCreated", "OrderConfirmed"]
        assert await producer.fetchval("SELECT count(*) FROM events") == 4

        await _refused(producer, "UPDATE events SET data = '{}'")
        await _refused(producer, "DELETE FROM events")
        await _refused(producer, "TRUNCATE events")
        for table in READ_MODELS:
            await _refused(producer, f"SELECT * FROM {table}")
            await _refused(producer, f"DELETE FROM {table}")
            await _refused(producer, f"TRUNCATE {table}")
        await _refused(producer, "SELECT * FROM pgprojector_projections")
        await _refused(producer, "UPDATE pgprojector_projections SET position = 0")
        await _refused(producer, "INSERT INTO pgprojector_dead_letters (projection, event_position, event_id, error, "
                                 "attempts) VALUES ('orders', 1, gen_random_uuid(), 'x', 1)")
        await _refused(producer, "DELETE FROM pgprojector_daemons")
    finally:
        await producer.close()


async def test_projector_projects_what_the_producer_wrote(dsn: str, owner: asyncpg.Connection, login: Login) -> None:
    producer = await db.connect(await login("pgprojector_producer"), role="tests-producer")
    projector = await db.create_pool(await login("pgprojector_projector"), role="tests-projector",
                                     min_size=1, max_size=4)
    try:
        store = EventStore(producer)
        for order_id in (1, 2):
            await store.append(f"order_{order_id}", "order", _order_events(order_id), expected_version=0)

        for projection in load_projections(["orders", "dashboard", "analytics"]):
            worker = ProjectionWorker(projector, projection, batch_size=100, poll_interval=0.1, on_error="halt",
                                      max_attempts=3, stopping=anyio.Event(), wakeup=Wakeup())
            batch = await worker.apply_next_batch()
            assert batch.applied > 0 and batch.caught_up, projection.name
        async with projector.acquire() as conn:
            orders = await conn.fetch("SELECT order_id, status FROM read_model_orders ORDER BY order_id")
            assert [(r["order_id"], r["status"]) for r in orders] == [(1, "confirmed"), (2, "confirmed")]
            assert await conn.fetchval("SELECT order_count FROM read_model_dashboard WHERE status = 'confirmed'") == 2
            assert await conn.fetchval("SELECT confirmed FROM read_model_restaurant_daily") == 2
            await _refused(conn, "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                                 "VALUES ('order_9', 'order', 'OrderPickedUp', '{\"order_id\": 9}', 1)")
            await _refused(conn, "UPDATE events SET data = '{}'")
            await _refused(conn, "DELETE FROM events")
            await _refused(conn, "TRUNCATE events")
        checkpoints = await owner.fetch("SELECT name, position FROM pgprojector_projections")
        head = await owner.fetchval("SELECT max(position) FROM events")
        expected = dict.fromkeys(["orders", "dashboard", "analytics"], head)
        assert {r["name"]: r["position"] for r in checkpoints} == expected
    finally:
        await projector.close()
        await producer.close()


async def test_projector_runs_the_other_daemon_and_cli_queries(owner: asyncpg.Connection, login: Login) -> None:
    """Dead letters, halts, heartbeats, status and rebuild's TRUNCATE, as the projector."""
    producer = await db.connect(await login("pgprojector_producer"), role="tests-producer")
    projector = await db.connect(await login("pgprojector_projector"), role="tests-projector")
    try:
        await EventStore(producer).append("order_1", "order", _order_events(1), expected_version=0)
        event_id = await owner.fetchval("SELECT id FROM events WHERE version = 1")
        sql = queries()
        daemon_id = uuid.uuid4()
        await projector.execute(sql["register_daemon"], daemon_id, "host", 1, ["orders"])
        await projector.execute(sql["heartbeat"], daemon_id)
        async with projector.transaction():
            await projector.fetchrow(sql["lock_checkpoint"], "analytics")
            await projector.execute(sql["park_event"], "analytics", 1, event_id, "boom", 3)
            await projector.execute(sql["save_checkpoint"], "analytics", 1)
            await projector.execute(sql["record_error"], "analytics", "boom")
        await projector.execute(sql["halt_projection"], "orders", 1, "bad event")

        report = await gather_status(projector)
        states = {p["name"]: p["state"] for p in report["projections"]}
        assert states == {"orders": "halted", "dashboard": "stopped", "analytics": "stopped"}
        assert [letter["error"] for letter in await dead_letters(projector)] == ["boom"]

        for table in READ_MODELS:
            await projector.execute(f"TRUNCATE {table}")
        await projector.execute("DELETE FROM pgprojector_dead_letters WHERE projection = 'analytics'")
        await projector.execute(sql["unregister_daemon"], daemon_id)
    finally:
        await projector.close()
        await producer.close()


async def test_the_daemon_runs_as_the_projector(owner: asyncpg.Connection, login: Login) -> None:
    projector_dsn = await login("pgprojector_projector")
    producer = await db.connect(await login("pgprojector_producer"), role="tests-producer")
    try:
        daemon = Daemon(load_settings(dsn=projector_dsn, poll_interval=0.1),
                        load_projections(["orders", "dashboard", "analytics"]))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(daemon.run)
            await EventStore(producer).append("order_5", "order", _order_events(5), expected_version=0)
            with anyio.fail_after(20):
                while await owner.fetchval("SELECT count(*) FROM pgprojector_projections WHERE position < "
                                           "(SELECT max(position) FROM events)"):
                    await anyio.sleep(0.05)
            assert await owner.fetchval("SELECT count(*) FROM pgprojector_daemons") == 1
            daemon.request_stop()
        assert await owner.fetchval("SELECT status FROM read_model_orders WHERE order_id = 5") == "confirmed"
        assert await owner.fetchval("SELECT count(*) FROM pgprojector_daemons") == 0  # unregistered itself
    finally:
        await producer.close()


async def test_cli_migrate_roles_creates_both_group_roles(dsn: str) -> None:
    from helpers import run_cli

    result = run_cli("migrate", "--roles", dsn=dsn)
    assert result.returncode == 0, result.stderr
    conn = await db.connect(dsn)
    try:
        roles = {r["rolname"] for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname IN ('pgprojector_producer', 'pgprojector_projector')")}
        assert roles == {"pgprojector_producer", "pgprojector_projector"}
        assert await conn.fetchval("SELECT has_table_privilege('pgprojector_producer', 'events', 'INSERT')")
        assert not await conn.fetchval(
            "SELECT has_table_privilege('pgprojector_producer', 'read_model_orders', 'SELECT')")
        assert await conn.fetchval(
            "SELECT has_table_privilege('pgprojector_projector', 'read_model_orders', 'INSERT')")
    finally:
        await conn.close()



async def test_a_daemon_whose_role_has_no_grants_is_a_configuration_error(login: Login) -> None:
    """permission denied for pgprojector's own tables at start: exit 2, saying what to grant (a retry
    can never succeed, and systemd would restart exit 1 every 5 s)."""
    from helpers import run_cli

    stranger = await login("pg_read_all_settings")  # a role with no grant on any pgprojector table
    result = run_cli("run", dsn=stranger, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "InsufficientPrivilegeError" in result.stderr and "pgprojector_projector" in result.stderr
