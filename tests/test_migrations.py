"""`pgprojector migrate`: creates everything, is a no-op the second time, and is safe in parallel."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest
from fold import assert_read_models_match_fold
from helpers import cli_env, run_cli

from pgprojector import EventStore, db
from pgprojector.errors import ConfigError
from pgprojector.migrations import latest_version, migrate, position_cache, position_sequence_behind, schema_version
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


async def test_a_daemon_listening_on_another_channel_than_the_trigger_notifies_says_so(dsn):
    """It went unnoticed: the daemon saw new events only at each poll interval."""
    from structlog.testing import capture_logs
    from test_daemon import running_daemon, until_logged

    with capture_logs() as logs:
        async with running_daemon(dsn, ["orders"], channel="orders_feed", poll_interval=0.1):
            await until_logged(logs, "daemon_started")
    mismatches = [entry for entry in logs if entry["event"] == "channel_mismatch"]
    assert [(m["listening"], m["notified"]) for m in mismatches] == [("orders_feed", "events")]


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


async def test_a_position_sequence_moved_back_stops_the_daemon_until_migrate_sets_it_forward(dsn, conn):
    """setval back (or a restore without the sequence's value): new events would take positions the
    checkpoints have passed. The daemon refuses to start (exit 2), `migrate` sets the sequence forward."""
    for version in (1, 2, 3):
        await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                           "VALUES ('order_1', 'order', 'E', '{}', $1)", version)
    await conn.execute("SELECT setval('events_position_seq', 1)")
    refused = run_cli("run", dsn=dsn, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "events_position_seq is at 1, behind the log's largest position 3" in refused.stderr
    migrated = run_cli("migrate", dsn=dsn)
    assert migrated.returncode == 0, migrated.stderr
    assert "position_sequence_set_forward" in migrated.stderr
    await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                       "VALUES ('order_2', 'order', 'E', '{}', 1)")
    assert await conn.fetchval("SELECT position FROM events WHERE aggregate_id = 'order_2'") == 4
    # RESTART WITH the next position is no sequence moved back, though no position is drawn yet
    await conn.execute("ALTER SEQUENCE events_position_seq RESTART WITH 5")
    assert await position_sequence_behind(conn) is None
    await conn.execute("ALTER SEQUENCE events_position_seq RESTART WITH 4")
    assert await position_sequence_behind(conn) == (3, 4)


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


# The seed's schema (../shared/seed), as a team that built on it has it: `events` without `position`,
# and its orders read model.
SEED_SCHEMA = """
CREATE TABLE events (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_id VARCHAR(100) NOT NULL,
    aggregate_type VARCHAR(50) NOT NULL,
    event_type VARCHAR(100) NOT NULL,
    data JSONB NOT NULL,
    metadata JSONB,
    version BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    UNIQUE (aggregate_id, version)
);
CREATE INDEX idx_events_aggregate ON events(aggregate_id, version);
CREATE INDEX idx_events_type ON events(event_type);
CREATE INDEX idx_events_created ON events(created_at);
CREATE INDEX idx_events_aggregate_time ON events(aggregate_id, created_at);
CREATE TABLE read_model_orders (
    order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL, restaurant_id BIGINT, status VARCHAR(50) NOT NULL,
    items JSONB NOT NULL, total_amount DECIMAL(10,2), delivery_address TEXT, created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL, current_version BIGINT NOT NULL, user_name VARCHAR(100),
    restaurant_name VARCHAR(100), driver_name VARCHAR(100), estimated_delivery TIMESTAMPTZ
);
CREATE INDEX idx_orders_user ON read_model_orders(user_id);
CREATE INDEX idx_orders_status ON read_model_orders(status);
CREATE INDEX idx_orders_created ON read_model_orders(created_at DESC);
"""


async def test_migrate_adopts_a_database_made_from_the_seed_schema(empty_dsn):
    """It failed on `column "position" does not exist`: CREATE TABLE IF NOT EXISTS kept the seed's
    table. Its events get positions that keep each order's versions in order, even where a later
    version's created_at (its transaction's start) is the earlier one."""
    from test_daemon import confirmed, created, running_daemon, simple, wait_caught_up

    conn = await db.connect(empty_dsn)
    try:
        await conn.execute(SEED_SCHEMA)
        start = datetime(2026, 5, 1, 10, tzinfo=UTC)
        rows = [("order_1", created(1), 1, start), ("order_2", created(2), 1, start + timedelta(seconds=30)),
                # began 5 minutes before its version 1 was appended, and so before order_2's events
                ("order_1", confirmed(1), 2, start - timedelta(minutes=5)),
                ("order_2", simple("OrderCancelled", 2, reason="no"), 2, start + timedelta(seconds=40))]
        await conn.executemany("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version, created_at)"
                               " VALUES ($1, 'order', $2, $3, $4, $5)",
                               [(aggregate, event.event_type, event.data, version, when)
                                for aggregate, event, version, when in rows])

        result = run_cli("migrate", dsn=empty_dsn)
        assert result.returncode == 0, result.stderr
        assert "events: adopted, 4 events given positions" in result.stderr  # said, where asyncpg dropped it
        assert [tuple(r) for r in await conn.fetch("SELECT position, aggregate_id, version FROM events ORDER BY position")] == [
            (1, "order_1", 1), (2, "order_1", 2), (3, "order_2", 1), (4, "order_2", 2)]
        # New events go after the adopted ones, under the rules every producer is held to.
        await EventStore(conn).append("order_1", "order", [simple("OrderPickedUp", 1)], expected_version=2)
        assert await conn.fetchval("SELECT max(position) FROM events") == 5
        with pytest.raises(asyncpg.CheckViolationError, match="expected version 4, got 5"):
            await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                               "VALUES ('order_1', 'order', 'OrderDelivered', '{\"order_id\": 1}', 5)")

        async with running_daemon(empty_dsn, poll_interval=0.1):
            await wait_caught_up(conn)
        await assert_read_models_match_fold(conn)
        assert await conn.fetchval("SELECT status FROM read_model_orders WHERE order_id = 1") == "picked_up"
    finally:
        await conn.close()


async def test_migrate_warns_of_rows_a_new_projection_did_not_write(empty_dsn):
    """The seed's own handler's rows would be taken for the projection's: say so, and how to rebuild."""
    conn = await db.connect(empty_dsn)
    try:
        await conn.execute(SEED_SCHEMA)
        await conn.execute("INSERT INTO read_model_orders (order_id, user_id, status, items, created_at, updated_at, "
                           "current_version) VALUES (1, 7, 'created', '[]', now(), now(), 1)")
    finally:
        await conn.close()
    result = run_cli("migrate", dsn=empty_dsn, log_format="json")
    assert result.returncode == 0, result.stderr
    warnings = [json.loads(line) for line in result.stderr.splitlines() if "projection_tables_not_empty" in line]
    assert [(w["projection"], w["table"]) for w in warnings] == [("orders", "read_model_orders")]
    assert "pgprojector rebuild orders" in warnings[0]["hint"]
    again = run_cli("migrate", dsn=empty_dsn, log_format="json")  # said once, when the projection is set up
    assert again.returncode == 0 and "projection_tables_not_empty" not in again.stderr


async def test_a_projection_may_name_its_tables_as_postgresql_reads_them(empty_dsn):
    """A schema prefix, or a name created unquoted (stored folded to lowercase): rebuild took them,
    but the set-up's check for rows it did not write quoted the whole name, and migrate failed on
    `relation "reports.event_count" does not exist`; so did `migrate --roles`' GRANT."""
    from structlog.testing import capture_logs

    from pgprojector.migrations import apply_roles
    from pgprojector.projection import Projection

    async def ignore(conn: asyncpg.Connection, events: object) -> None:
        return None

    schema = ("CREATE SCHEMA IF NOT EXISTS reports; CREATE TABLE IF NOT EXISTS reports.event_count (n BIGINT); "
              'CREATE TABLE IF NOT EXISTS EventTally (n BIGINT); CREATE TABLE IF NOT EXISTS "Event Log" (n BIGINT)')
    projection = Projection(name="tally", handle=ignore, schema=schema,
                            tables=("reports.event_count", "EventTally", "Event Log"))
    conn = await db.connect(empty_dsn)
    try:
        await migrate(conn, "events")
        await conn.execute(schema + "; INSERT INTO eventtally VALUES (1)")  # rows it did not write
        with capture_logs() as logs:
            await migrate(conn, "events", [projection])
        assert [entry["table"] for entry in logs if entry["event"] == "projection_tables_not_empty"] == ["EventTally"]
        await apply_roles(conn, [projection])
        for table in ("reports.event_count", '"Event Log"'):
            assert await conn.fetchval("SELECT has_table_privilege('pgprojector_projector', $1, 'INSERT')", table)
        # A name that is no table (a typo, a view, no SQL name at all) is said at set-up, not when a
        # rebuild's TRUNCATE or a GRANT trips on it.
        for wrong in ("reports.event_cuont", "reports.counts_view", "a.b.c.d"):
            typo = Projection(name="typo", handle=ignore, tables=(wrong,),
                              schema=schema + "; CREATE OR REPLACE VIEW reports.counts_view AS SELECT 1 AS n")
            with pytest.raises(ConfigError, match=rf"projection typo: its tables \['{wrong}'\] are no tables"):
                await migrate(conn, "events", [typo])
    finally:
        await conn.close()
