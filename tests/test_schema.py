"""The rules the database enforces for every producer, written as plain SQL like any producer would."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from pgprojector import db

INSERT = ("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, metadata, version) "
          "VALUES ($1, 'order', $2, $3, NULL, $4)")


async def test_seed_columns_types_and_indexes(conn):
    columns = {r["column_name"]: (r["data_type"], r["character_maximum_length"], r["is_nullable"])
               for r in await conn.fetch("SELECT column_name, data_type, character_maximum_length, is_nullable "
                                         "FROM information_schema.columns WHERE table_name = 'events'")}
    assert columns == {
        "id": ("uuid", None, "NO"),
        "aggregate_id": ("character varying", 100, "NO"),
        "aggregate_type": ("character varying", 50, "NO"),
        "event_type": ("character varying", 100, "NO"),
        "data": ("jsonb", None, "NO"),
        "metadata": ("jsonb", None, "YES"),
        "version": ("bigint", None, "NO"),
        "created_at": ("timestamp with time zone", None, "NO"),
        "position": ("bigint", None, "NO"),
    }
    indexes = {r["indexname"]: r["indexdef"] for r in await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'events'")}
    assert "(aggregate_id, version)" in indexes["idx_events_aggregate"]
    assert "(event_type)" in indexes["idx_events_type"]
    assert "(created_at)" in indexes["idx_events_created"]
    assert "(aggregate_id, created_at)" in indexes["idx_events_aggregate_time"]
    uniques = [d for d in indexes.values() if "UNIQUE" in d]
    assert any("(aggregate_id, version)" in d for d in uniques)
    assert any("(\"position\")" in d or "(position)" in d for d in uniques)


async def test_plain_multi_row_insert_gets_positions_and_defaults(conn):
    await conn.execute(
        "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, metadata, version) VALUES "
        "('a', 't', 'E', '{}', NULL, 1), ('a', 't', 'E', '{}', NULL, 2), ('b', 't', 'E', '{}', NULL, 1)")
    rows = await conn.fetch("SELECT aggregate_id, version, position, id, created_at FROM events ORDER BY position")
    assert [(r["aggregate_id"], r["version"]) for r in rows] == [("a", 1), ("a", 2), ("b", 1)]
    positions = [r["position"] for r in rows]
    assert positions == sorted(positions) and len(set(positions)) == 3
    assert all(r["id"] is not None and r["created_at"] is not None for r in rows)


@pytest.mark.parametrize("version", [0, -1, 2, 5])
async def test_gap_or_bad_first_version_is_refused_23514(conn, version):
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await conn.execute(INSERT, "order_9", "OrderCreated", "{}", version)
    assert refused.value.sqlstate == "23514"
    assert "order_9" in str(refused.value) and "expected version 1" in str(refused.value)
    assert f"got {version}" in str(refused.value)


async def test_gap_after_existing_versions_names_expected_and_given(conn):
    for version in (1, 2):
        await conn.execute(INSERT, "order_1", "E", "{}", version)
    with pytest.raises(asyncpg.CheckViolationError, match="aggregate order_1: expected version 3, got 4"):
        await conn.execute(INSERT, "order_1", "E", "{}", 4)
    assert await conn.fetchval("SELECT count(*) FROM events") == 2


async def test_an_aggregate_keeps_the_type_of_its_first_event(conn):
    """Or an order's event appended as 'Order' would be one the order projections never see."""
    await conn.execute(INSERT, "order_1", "OrderCreated", "{}", 1)  # aggregate_type 'order'
    with pytest.raises(asyncpg.CheckViolationError, match="aggregate order_1: is of type order, not Order") as refused:
        await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                           "VALUES ('order_1', 'Order', 'OrderConfirmed', '{}', 2)")
    assert refused.value.sqlstate == "23514"
    with pytest.raises(asyncpg.CheckViolationError, match="aggregate x: is of type t, not u"):
        await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) VALUES "
                           "('x', 't', 'E', '{}', 1), ('x', 'u', 'E', '{}', 2)")
    await conn.execute(INSERT, "order_1", "OrderConfirmed", "{}", 2)
    assert await conn.fetchval("SELECT array_agg(DISTINCT aggregate_type) FROM events") == ["order"]


async def test_a_stream_that_mixed_types_before_the_rule_goes_on_with_its_first_or_latest(conn):
    """A database upgraded to migration 003 may hold such a stream: it goes on with its first event's
    type (what the order projections read) or its latest, and no other."""
    await conn.execute(INSERT, "order_1", "OrderCreated", "{}", 1)
    await conn.execute("ALTER TABLE events DISABLE TRIGGER events_before_insert_row")  # as before 003
    await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version, position) "
                       "VALUES ('order_1', 'Order', 'OrderConfirmed', '{}', 2, nextval('events_position_seq'))")
    await conn.execute("ALTER TABLE events ENABLE TRIGGER events_before_insert_row")
    typed = ("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
             "VALUES ('order_1', $1, 'OrderPickedUp', '{}', $2)")
    with pytest.raises(asyncpg.CheckViolationError, match="aggregate order_1: is of type order, not ORDER"):
        await conn.execute(typed, "ORDER", 3)
    await conn.execute(typed, "order", 3)  # its first's
    await conn.execute("ALTER TABLE events DISABLE TRIGGER events_before_insert_row")
    await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version, position) "
                       "VALUES ('order_1', 'Order', 'OrderDelivered', '{}', 4, nextval('events_position_seq'))")
    await conn.execute("ALTER TABLE events ENABLE TRIGGER events_before_insert_row")
    await conn.execute(typed, "Order", 5)  # its latest's
    assert await conn.fetchval("SELECT max(version) FROM events") == 5


async def test_multi_row_insert_out_of_order_is_refused_whole(conn):
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) VALUES "
            "('x', 't', 'E', '{}', 2), ('x', 't', 'E', '{}', 1)")
    assert await conn.fetchval("SELECT count(*) FROM events") == 0


async def test_duplicate_version_is_unique_violation_23505(conn):
    await conn.execute(INSERT, "order_1", "E", "{}", 1)
    with pytest.raises(asyncpg.UniqueViolationError) as refused:
        await conn.execute(INSERT, "order_1", "E", "{}", 1)
    assert refused.value.sqlstate == "23505"


async def test_concurrent_same_version_one_wins_other_gets_23505(dsn):
    first = await db.connect(dsn)
    second = await db.connect(dsn)
    try:
        await first.execute(INSERT, "order_1", "E", "{}", 1)
        tx = first.transaction()
        await tx.start()
        await first.execute(INSERT, "order_1", "E", "{}", 2)
        racing = asyncio.create_task(second.execute(INSERT, "order_1", "E", "{}", 2))
        await asyncio.sleep(0.2)
        assert not racing.done()  # waits on the uncommitted duplicate
        await tx.commit()
        with pytest.raises(asyncpg.UniqueViolationError):
            await racing
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize("statement", [
    "UPDATE events SET data = '{}'",
    "UPDATE events SET version = version WHERE false",
    "DELETE FROM events",
    "DELETE FROM events WHERE false",
    "TRUNCATE events",
    "TRUNCATE events CASCADE",
])
async def test_history_cannot_be_rewritten(conn, statement):
    await conn.execute(INSERT, "order_1", "E", '{"a": 1}', 1)
    with pytest.raises(asyncpg.PostgresError, match="append-only") as refused:
        await conn.execute(statement)
    assert refused.value.sqlstate == "0A000"
    assert await conn.fetchval("SELECT data FROM events") == {"a": 1}


async def test_position_cannot_be_chosen_by_a_producer(conn):
    await conn.execute(
        "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version, position) "
        "VALUES ('a', 't', 'E', '{}', 1, 999999)")
    assert await conn.fetchval("SELECT position FROM events") != 999999


async def _collect_notifications(dsn: str, statement: str, *args: object) -> list[str]:
    listener = await db.connect(dsn)
    producer = await db.connect(dsn)
    received: list[str] = []
    try:
        await listener.add_listener("events", lambda _c, _pid, _channel, payload: received.append(payload))
        await producer.execute(statement, *args)
        await asyncio.sleep(0.5)
    finally:
        await listener.close()
        await producer.close()
    return received


async def test_2000_row_insert_sends_one_small_notification(dsn):
    statement = ("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
                 "SELECT 'order_' || g, 'order', 'OrderCreated', jsonb_build_object('order_id', g), 1 "
                 "FROM generate_series(1, 2000) g")
    received = await _collect_notifications(dsn, statement)
    assert len(received) == 1
    assert len(received[0].encode()) < 100


async def test_transaction_of_many_statements_notifies_once(dsn):
    statement = ("DO $$ BEGIN FOR i IN 1..50 LOOP INSERT INTO events (aggregate_id, aggregate_type, event_type, "
                 "data, version) VALUES ('agg', 't', 'E', '{}', i); END LOOP; END $$")
    assert len(await _collect_notifications(dsn, statement)) == 1


async def test_copy_is_held_to_the_same_rules(conn):
    await conn.copy_records_to_table(
        "events", columns=["aggregate_id", "aggregate_type", "event_type", "data", "version"],
        records=[("c", "t", "E", "{}", 1), ("c", "t", "E", "{}", 2)])
    assert await conn.fetchval("SELECT count(*) FROM events WHERE position IS NOT NULL") == 2
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.copy_records_to_table(
            "events", columns=["aggregate_id", "aggregate_type", "event_type", "data", "version"],
            records=[("c", "t", "E", "{}", 4)])


async def test_in_flight_appender_holds_the_horizon(dsn):
    """An open transaction that appended keeps the horizon below its positions; others do not."""
    producer = await db.connect(dsn)
    other = await db.connect(dsn)
    reader = await db.connect(dsn)
    try:
        await producer.execute(INSERT, "a", "E", "{}", 1)
        open_tx = producer.transaction()
        await open_tx.start()
        await producer.execute(INSERT, "a", "E", "{}", 2)  # position 2, uncommitted
        await other.execute(INSERT, "b", "E", "{}", 1)  # position 3, committed
        unrelated = other.transaction()  # an open transaction on another table holds nothing back
        await unrelated.start()
        await other.execute("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1)")
        horizon, drawn = await reader.fetchrow("SELECT horizon, drawn FROM pgprojector_horizon()")
        assert (horizon, drawn) == (1, 3)
        blockers = await reader.fetch("SELECT pid, marker FROM pgprojector_in_flight_appenders")
        assert [(b["pid"], b["marker"]) for b in blockers] == [(producer.get_server_pid(), 2)]
        await open_tx.commit()
        assert tuple(await reader.fetchrow("SELECT horizon, drawn FROM pgprojector_horizon()")) == (3, 3)
        await unrelated.rollback()
    finally:
        for connection in (producer, other, reader):
            await connection.close()


async def test_rolled_back_savepoint_releases_the_marker(conn):
    async with conn.transaction():
        await conn.execute("SAVEPOINT s")
        await conn.execute(INSERT, "a", "E", "{}", 1)
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_in_flight_appenders") == 1
        await conn.execute("ROLLBACK TO SAVEPOINT s")
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_in_flight_appenders") == 0
        await conn.execute(INSERT, "a", "E", "{}", 1)
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_in_flight_appenders") == 1
    assert await conn.fetchval("SELECT count(*) FROM pgprojector_in_flight_appenders") == 0


async def test_many_statements_in_one_transaction_take_one_marker(conn):
    async with conn.transaction():
        for version in range(1, 201):
            await conn.execute(INSERT, "a", "E", "{}", version)
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_in_flight_appenders") == 1


async def test_metadata_and_payload_roundtrip(conn):
    await conn.execute(
        "INSERT INTO events (aggregate_id, aggregate_type, event_type, data, metadata, version) "
        "VALUES ('a', 't', 'E', $1, $2, 1)", json.dumps({"k": [1, 2]}), json.dumps({"trace": "x"}))
    row = await conn.fetchrow("SELECT data, metadata FROM events")
    assert row["data"] == {"k": [1, 2]} and row["metadata"] == {"trace": "x"}


@pytest.mark.parametrize("forged", ["999999999999", "abc", "-5", "1"])
async def test_forged_marker_setting_cannot_hide_an_open_appender(dsn, forged):
    """A producer that sets the trigger's marker itself can hold the horizon back, never push it past its rows."""
    producer = await db.connect(dsn)
    other = await db.connect(dsn)
    try:
        for version in (1, 2, 3):
            await other.execute(INSERT, "warmup", "E", "{}", version)
        tx = producer.transaction()
        await tx.start()
        await producer.execute(f"SET LOCAL pgprojector.in_flight_marker = '{forged}'")
        await producer.execute(INSERT, "a", "E", "{}", 1)  # position 4, uncommitted
        await other.execute(INSERT, "b", "E", "{}", 1)  # position 5, committed
        horizon = await other.fetchval("SELECT horizon FROM pgprojector_horizon()")
        assert horizon < 4
        await tx.rollback()
    finally:
        await producer.close()
        await other.close()


async def test_a_producers_temporary_objects_do_not_stand_in_for_the_log(dsn):
    """The triggers name the log's table and sequence by their schema. Temporary objects come first
    on a session's search_path: a producer's TEMP SEQUENCE events_position_seq would otherwise hand
    out positions no horizon covers, and its TEMP TABLE events would pass a version gap."""
    other = await db.connect(dsn)
    producer = await db.connect(dsn)
    try:
        await other.execute(INSERT, "order_1", "E", "{}", 1)  # position 1
        schema = await other.fetchval("SELECT relnamespace::regnamespace::text FROM pg_class "
                                      "WHERE oid = 'events'::regclass")
        await producer.execute("CREATE TEMP SEQUENCE events_position_seq START 1000; "
                               "CREATE TEMP TABLE events (aggregate_id TEXT, version BIGINT); "
                               "INSERT INTO events VALUES ('order_1', 4)")
        into_the_log = INSERT.replace("INTO events", f"INTO {schema}.events")
        with pytest.raises(asyncpg.CheckViolationError, match="expected version 2, got 5"):
            await producer.execute(into_the_log, "order_1", "E", "{}", 5)
        await producer.execute(into_the_log, "order_1", "E", "{}", 2)
        assert await other.fetchval("SELECT position FROM events WHERE version = 2") == 2
        assert tuple(await other.fetchrow("SELECT horizon, drawn FROM pgprojector_horizon()")) == (2, 2)
    finally:
        await producer.close()
        await other.close()


# Each returns a wrong answer, for the types the triggers' operators take (bigint and integer,
# character varying and text). Created in a schema the producer puts ahead of pg_catalog.
HIJACKED_OPERATORS = [
    ("+", "bigint", "integer", "bigint", "$1 OPERATOR(pg_catalog.+) $2 OPERATOR(pg_catalog.+) 1000"),
    ("+", "bigint", "bigint", "bigint", "$1 OPERATOR(pg_catalog.+) $2 OPERATOR(pg_catalog.+) 1000"),
    (">", "bigint", "bigint", "boolean", "false"),
    (">", "bigint", "integer", "boolean", "false"),
    ("<", "bigint", "bigint", "boolean", "false"),
    ("<", "bigint", "integer", "boolean", "false"),
    ("<=", "bigint", "bigint", "boolean", "false"),
    ("=", "bigint", "integer", "boolean", "false"),
    ("=", "character varying", "character varying", "boolean", "false"),
    ("<>", "character varying", "text", "boolean", "false"),
    ("!~", "text", "text", "boolean", "false"),
]


async def test_a_producers_own_operators_and_functions_change_nothing(dsn):
    """Operators and functions resolve through the inserting session's search_path too: a producer
    that puts a schema of its own ahead of pg_catalog must not move its marker above its positions
    (an event skipped), pass a version gap (versions out of order), or silence the notification."""
    producer = await db.connect(dsn)
    observer = await db.connect(dsn)
    woken: list[str] = []
    try:
        await observer.add_listener("events", lambda _conn, _pid, _channel, payload: woken.append(payload))
        await producer.execute("CREATE SCHEMA mine; CREATE FUNCTION mine.pg_notify(text, text) RETURNS void "
                               "LANGUAGE sql AS 'SELECT'")
        for number, (name, left, right, returns, body) in enumerate(HIJACKED_OPERATORS):
            await producer.execute(f"CREATE FUNCTION mine.f{number}({left}, {right}) RETURNS {returns} "
                                   f"LANGUAGE sql AS 'SELECT {body}'; "
                                   f"CREATE OPERATOR mine.{name} (LEFTARG = {left}, RIGHTARG = {right}, "
                                   f"FUNCTION = mine.f{number})")
        await producer.execute("SET search_path = mine, pg_catalog, public")

        await producer.execute(INSERT, "order_5", "E", "{}", 1)
        with pytest.raises(asyncpg.CheckViolationError, match="expected version 2, got 3"):
            await producer.execute(INSERT, "order_5", "E", "{}", 3)
        async with producer.transaction():
            await producer.execute(INSERT, "order_6", "E", "{}", 1)
            position = await observer.fetchval("SELECT max(position) FROM events")  # (only committed ones)
            drawn = await producer.fetchval("SELECT max(position) FROM events")  # (its own too)
            markers = await observer.fetch("SELECT marker FROM pgprojector_in_flight_appenders")
            assert [m["marker"] for m in markers] == [drawn] and position == drawn - 1
            assert await observer.fetchval("SELECT horizon FROM pgprojector_horizon()") == drawn - 1
        for _ in range(100):
            if len(woken) == 2:
                break
            await asyncio.sleep(0.02)
        assert woken == ["", ""]  # one notification per committed append
    finally:
        await producer.close()
        await observer.close()


async def test_a_gap_in_an_adopted_history_is_never_filled_in(conn):
    """A history with a gap (a seed table adopted by migrate, or events appended with the rules
    off) goes on above its latest version: the missing one, appended later, would be read after
    the versions above it."""
    await conn.execute("SET session_replication_role = replica")  # (the rules off, as pg_restore can)
    await conn.execute("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version, position) "
                       "VALUES ('order_9', 'order', 'E', '{}', 1, 1), ('order_9', 'order', 'E', '{}', 3, 2)")
    await conn.execute("RESET session_replication_role; SELECT setval('events_position_seq', 2)")
    with pytest.raises(asyncpg.CheckViolationError,
                       match="aggregate order_9: expected version 4, got 2, a version its history lacks"):
        await conn.execute(INSERT, "order_9", "E", "{}", 2)
    with pytest.raises(asyncpg.UniqueViolationError):  # a version it holds is the usual conflict
        await conn.execute(INSERT, "order_9", "E", "{}", 3)
    await conn.execute(INSERT, "order_9", "E", "{}", 4)
    assert await conn.fetchval("SELECT array_agg(version ORDER BY position) FROM events") == [1, 3, 4]


async def test_a_position_from_a_session_cache_is_refused(dsn):
    """With CACHE > 1 (raised while the daemon runs: it checks only at start), a session draws
    positions below the sequence's last value, which its marker is taken from."""
    first = await db.connect(dsn)
    second = await db.connect(dsn)
    try:
        await first.execute("ALTER SEQUENCE events_position_seq CACHE 20")
        await first.execute(INSERT, "order_1", "E", "{}", 1)  # position 1, 2..20 cached by this session
        await second.execute(INSERT, "order_2", "E", "{}", 1)  # position 21
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError,
                           match="events_position_seq handed out position 2, below this transaction's marker 41"):
            await first.execute(INSERT, "order_3", "E", "{}", 1)
        assert await second.fetchval("SELECT array_agg(position ORDER BY position) FROM events") == [1, 21]
    finally:
        await first.execute("ALTER SEQUENCE events_position_seq CACHE 1")
        await first.close()
        await second.close()


async def test_serializable_producers_of_different_aggregates_do_not_fail_each_other(dsn):
    """The insert triggers read nothing of `events` but the appended aggregate's own history: under
    SERIALIZABLE, a read of the log's largest position by every append made two appenders of
    different aggregates a write skew, and one of them failed (40001) at its commit."""
    first = await db.connect(dsn)
    second = await db.connect(dsn)
    try:
        await first.execute(INSERT, "order_0", "E", "{}", 1)  # (a log with a largest position)
        one = first.transaction(isolation="serializable")
        await one.start()
        await first.execute(INSERT, "order_1", "E", "{}", 1)
        async with second.transaction(isolation="serializable"):
            await second.execute(INSERT, "order_2", "E", "{}", 1)
        await one.commit()
        assert await first.fetchval("SELECT count(*) FROM events") == 3
    finally:
        await first.close()
        await second.close()
