"""`pgprojector migrate`: creates everything, is a no-op the second time, and is safe in parallel."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import anyio
import asyncpg
from helpers import cli_env, run_cli

from pgprojector import db
from pgprojector.migrations import latest_version, migrate, position_cache, schema_version
from pgprojector.projection import load_projections

TABLES = {"events", "pgprojector_projections", "pgprojector_dead_letters", "pgprojector_daemons",
          "pgprojector_migrations", "read_model_orders", "read_model_dashboard", "read_model_restaurant_daily"}


async def _tables(dsn: str) -> set[str]:
    conn = await db.connect(dsn)
    try:
        return {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    finally:
        await conn.close()


async def test_cli_migrate_creates_schema_then_is_a_no_op(empty_dsn):
    first = run_cli("migrate", dsn=empty_dsn)
    assert first.returncode == 0, first.stderr
    assert "001_event_store.sql" in first.stdout
    assert TABLES <= await _tables(empty_dsn)
    second = run_cli("migrate", dsn=empty_dsn)
    assert second.returncode == 0, second.stderr
    assert "applied 0 migration(s)" in second.stdout
    conn = await db.connect(empty_dsn)
    try:
        assert await schema_version(conn) == latest_version()
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_migrations") == latest_version()
        assert await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events'::regclass "
                                   "AND NOT tgisinternal") == 5
    finally:
        await conn.close()


async def test_concurrent_migrations_from_several_processes(empty_dsn):
    processes = [subprocess.Popen([sys.executable, "-m", "pgprojector", "migrate"], env=cli_env(empty_dsn),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0, 0], outputs
    assert sum("001_event_store.sql" in out for out, _ in outputs) == 1  # exactly one applied it
    assert TABLES <= await _tables(empty_dsn)


async def test_concurrent_migrations_in_one_process(empty_dsn):
    connections = [await db.connect(empty_dsn) for _ in range(5)]
    try:
        results = await asyncio.gather(*(migrate(c, "events", load_projections(["orders"])) for c in connections))
        assert sorted(len(applied) for applied in results) == [0, 0, 0, 0, latest_version()]
    finally:
        for connection in connections:
            await connection.close()


async def test_channel_setting_moves_the_notify_trigger(empty_dsn):
    assert run_cli("migrate", dsn=empty_dsn, channel="orders_feed").returncode == 0
    listener = await db.connect(empty_dsn)
    received: list[str] = []
    try:
        await listener.add_listener("orders_feed", lambda *args: received.append(args[2]))
        await listener.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                               "VALUES ('a', 't', 'E', '{}', 1)")
        await asyncio.sleep(0.3)
    finally:
        await listener.close()
    assert received == ["orders_feed"]


async def test_a_schema_of_its_own_serves_producers_with_any_search_path(empty_dsn):
    """Migrated into "Event Store", the triggers find their sequence and table by schema, so a
    producer whose search_path does not name it appends all the same."""
    owner = await asyncpg.connect(empty_dsn, server_settings={"search_path": '"Event Store"'})
    try:
        await owner.execute('CREATE SCHEMA "Event Store"')
        await db.init_connection(owner)
        await migrate(owner, "events", load_projections(["orders"]))
    finally:
        await owner.close()
    producer = await db.connect(empty_dsn)
    try:
        assert await producer.fetchval("SHOW search_path") == '"$user", public'
        await producer.execute('INSERT INTO "Event Store".events (aggregate_id, aggregate_type, event_type, data, '
                               "version) VALUES ('order_1', 'order', 'E', '{}', 1), ('order_1', 'order', 'E', '{}', 2)")
        assert await producer.fetchval('SELECT max(position) FROM "Event Store".events') == 2
        assert tuple(await producer.fetchrow('SELECT horizon, drawn FROM "Event Store".pgprojector_horizon()')) == (2, 2)
    finally:
        await producer.close()


async def test_a_cached_position_sequence_stops_the_daemon_until_migrate_undoes_it(dsn, conn):
    """With CACHE 20 a session draws positions far below the sequence's last value, which the read
    horizon takes for the highest drawn: the daemon refuses to start (exit 2, which systemd does not
    restart), and `migrate` sets CACHE 1 back."""
    await conn.execute("ALTER SEQUENCE events_position_seq CACHE 20")
    refused = run_cli("run", dsn=dsn, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "events_position_seq has CACHE 20" in refused.stderr and "pgprojector migrate" in refused.stderr
    migrated = run_cli("migrate", dsn=dsn)
    assert migrated.returncode == 0, migrated.stderr
    assert await position_cache(conn) == 1


async def test_a_daemon_newer_than_the_schema_waits_for_migrate(dsn, conn, monkeypatch):
    """A rolling deploy that starts the new daemons before `migrate` runs: they wait (the old ones go
    on), where they once exited 2 and systemd left them stopped. `rebuild` refuses, exit 2."""
    from pgprojector import EventStore, NewEvent
    from pgprojector import daemon as daemon_module
    from pgprojector.settings import load_settings

    latest = latest_version()
    name = await conn.fetchval("DELETE FROM pgprojector_migrations WHERE version = $1 RETURNING name", latest)
    await EventStore(conn).append("order_1", "order", [NewEvent("OrderCancelled", {"order_id": 1})], expected_version=0)
    refused = run_cli("rebuild", "orders", dsn=dsn)
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(f"this pgprojector needs {latest}: run `pgprojector migrate`")

    monkeypatch.setattr(daemon_module, "SCHEMA_WAIT_SECONDS", 0.1)
    daemon = daemon_module.Daemon(load_settings(dsn=dsn, poll_interval=0.1, on_error="park"), load_projections(["orders"]))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(daemon.run)
        await anyio.sleep(1)  # ten looks at the schema
        assert not daemon.workers  # waiting, not projecting, not exited
        await conn.execute("INSERT INTO pgprojector_migrations (version, name) VALUES ($1, $2)", latest, name)
        with anyio.fail_after(20):
            while await conn.fetchval("SELECT position FROM pgprojector_projections WHERE name = 'orders'") < 1:
                await anyio.sleep(0.05)
        daemon.request_stop()
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 1  # it projected: no OrderCreated
