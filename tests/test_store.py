"""The append API: optimistic concurrency, retries on conflict only, refusal of bad input."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from pgprojector import (
    ConcurrencyError,
    EventStore,
    InvalidEventError,
    NewEvent,
    RecordedEvent,
    RetriesExhaustedError,
)


async def test_append_and_read_back(pool):
    store = EventStore(pool)
    version = await store.append("order_1", "order", [
        NewEvent("OrderCreated", {"order_id": 1, "total_amount": Decimal("12.50")}, {"by": "test"}),
        NewEvent("OrderConfirmed", {"order_id": 1}),
    ], expected_version=0)
    assert version == 2
    history = await store.read_stream("order_1")
    assert [(e.event_type, e.version) for e in history] == [("OrderCreated", 1), ("OrderConfirmed", 2)]
    first = history[0]
    assert isinstance(first, RecordedEvent)
    assert first.data == {"order_id": 1, "total_amount": "12.50"}  # Decimal keeps its digits, as a string
    assert first.metadata == {"by": "test"} and history[1].metadata is None
    assert first.aggregate_type == "order" and first.position < history[1].position
    assert first.created_at.tzinfo is not None and first.id is not None


async def test_wrong_expected_version_raises_concurrency_error_and_writes_nothing(pool):
    store = EventStore(pool)
    await store.append("order_1", "order", [NewEvent("A", {}), NewEvent("B", {})], expected_version=0)
    with pytest.raises(ConcurrencyError) as behind:
        await store.append("order_1", "order", [NewEvent("C", {}), NewEvent("D", {})], expected_version=1)
    assert (behind.value.aggregate_id, behind.value.expected_version, behind.value.actual_version) == ("order_1", 1, 2)
    with pytest.raises(ConcurrencyError) as ahead:
        await store.append("order_1", "order", [NewEvent("C", {})], expected_version=5)
    assert (ahead.value.expected_version, ahead.value.actual_version) == (5, 2)
    assert len(await store.read_stream("order_1")) == 2


async def test_a_conflict_is_one_whatever_the_unique_constraint_is_called(pool):
    """A database adopted from the seed's schema keeps its own name for UNIQUE (aggregate_id, version)
    (a team's CONSTRAINT uq_... or a unique index): every conflict came back as a raw
    UniqueViolationError, which append_with_retry did not retry."""
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE events RENAME CONSTRAINT events_aggregate_id_version_key "
                           "TO uq_events_stream_version")
    store = EventStore(pool)
    await store.append("o", "order", [NewEvent("A", {})], expected_version=0)
    with pytest.raises(ConcurrencyError) as conflict:
        await store.append("o", "order", [NewEvent("B", {})], expected_version=0)
    assert (conflict.value.expected_version, conflict.value.actual_version) == (0, 1)
    calls = 0

    async def decide(history: list[RecordedEvent]) -> list[NewEvent]:
        nonlocal calls
        calls += 1
        if calls == 1:  # someone else gets there first, once
            await store.append("o", "order", [NewEvent("Other", {})], expected_version=history[-1].version)
        return [NewEvent("Mine", {})]

    assert await store.append_with_retry("o", "order", decide) == 3 and calls == 2
    # Another unique index (an idempotency key) is no version conflict: it stays the database's error.
    async with pool.acquire() as conn:
        await conn.execute("CREATE UNIQUE INDEX events_idempotency ON events ((data->>'key'))")
    await store.append("p", "order", [NewEvent("A", {"key": "k1"})], expected_version=0)
    with pytest.raises(asyncpg.UniqueViolationError, match="events_idempotency"):
        await store.append("q", "order", [NewEvent("A", {"key": "k1"})], expected_version=0)


async def test_a_unique_violation_in_another_table_is_no_version_conflict(pool):
    """A trigger on events that writes another table with its own UNIQUE (aggregate_id, version) (an
    outbox): its violation was taken for a version conflict by the index's columns alone and, the
    stream being where it was expected, reported under READ COMMITTED as a stale REPEATABLE READ
    snapshot. It is the database's error, as any other unique index's."""
    store = EventStore(pool)
    async with pool.acquire() as conn:
        await conn.execute("""
            CREATE TABLE outbox (aggregate_id text, version bigint, UNIQUE (aggregate_id, version));
            CREATE FUNCTION to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO outbox VALUES (NEW.aggregate_id, NEW.version); RETURN NEW; END $$;
            CREATE TRIGGER to_outbox AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION to_outbox();
            INSERT INTO outbox VALUES ('order_1', 1);""")
    with pytest.raises(asyncpg.UniqueViolationError, match="outbox_aggregate_id_version_key"):
        await store.append("order_1", "order", [NewEvent("OrderCreated", {})], expected_version=0)
    assert await store.read_stream("order_1") == []


async def test_another_aggregate_type_is_invalid_not_a_conflict(pool):
    """Retrying it could never succeed: the aggregate keeps the type of its first event."""
    store = EventStore(pool)
    await store.append("order_1", "order", [NewEvent("OrderCreated", {})], expected_version=0)
    with pytest.raises(InvalidEventError, match="aggregate order_1: is of type order, not Order"):
        await store.append("order_1", "Order", [NewEvent("OrderConfirmed", {})], expected_version=1)
    calls = 0

    def decide(history: list[RecordedEvent]) -> list[NewEvent]:
        nonlocal calls
        calls += 1
        return [NewEvent("OrderConfirmed", {})]

    with pytest.raises(InvalidEventError):
        await store.append_with_retry("order_1", "Order", decide)
    assert calls == 1
    assert [e.aggregate_type for e in await store.read_stream("order_1")] == ["order"]


async def test_appending_nothing_still_checks_the_expected_version(pool):
    """append returns the aggregate's version: appending no events to a stream at version 2 returned
    whatever expected_version was given (7, or 0), with no ConcurrencyError."""
    store = EventStore(pool)
    await store.append("x", "t", [NewEvent("A", {}), NewEvent("B", {})], expected_version=0)
    assert await store.append("x", "t", [], expected_version=2) == 2
    for stale in (0, 7):
        with pytest.raises(ConcurrencyError) as conflict:
            await store.append("x", "t", [], expected_version=stale)
        assert (conflict.value.expected_version, conflict.value.actual_version) == (stale, 2)
    assert await store.append("new", "t", [], expected_version=0) == 0


async def test_append_is_all_or_nothing(pool):
    store = EventStore(pool)
    await store.append("x", "t", [NewEvent("A", {})], expected_version=0)
    # Second writer with a stale view: its two events collide on version 2; neither is written.
    with pytest.raises(ConcurrencyError):
        await store.append("x", "t", [NewEvent("B", {}), NewEvent("C", {})], expected_version=0)
    assert [e.event_type for e in await store.read_stream("x")] == ["A"]


async def test_conflict_inside_callers_transaction_leaves_it_usable(conn):
    store = EventStore(conn)
    await store.append("x", "t", [NewEvent("A", {})], expected_version=0)
    async with conn.transaction():
        with pytest.raises(ConcurrencyError):
            await store.append("x", "t", [NewEvent("B", {})], expected_version=0)
        await store.append("y", "t", [NewEvent("B", {})], expected_version=0)
    assert len(await store.read_stream("y")) == 1


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(("aggregate_id", "events", "message"), [
    ("o" * 101, [NewEvent("A", {})], "longer than 100"),
    ("", [NewEvent("A", {})], "aggregate_id"),
    ("order_1", [NewEvent("", {})], "event_type"),
    ("order_1", [NewEvent("   ", {})], "event_type"),
    ("order_1", [NewEvent("A", {"when": object()})], "not JSON"),
    ("order_1", [NewEvent("A", {"x": float("nan")})], "not JSON"),
    ("order_1", [NewEvent("A", ["not", "an", "object"])], "JSON object"),  # type: ignore[arg-type]
    ("order_1", [NewEvent("A", {"nul": "a\x00b"})], "NUL"),
    ("order_1", [{"event_type": "A"}], "NewEvent"),
    # (these three reached the database and came back as raw asyncpg errors)
    ("order_\x001", [NewEvent("A", {})], "aggregate_id contains a NUL"),
    ("order_1", [NewEvent("A\x00", {})], "event_type contains a NUL"),
    ("order_1", [NewEvent("A", {"\ud800": 1})], "not JSON"),  # a lone surrogate: no character at all
    ("order_1", [NewEvent("A", {}, {"by": "\udfff"})], "not JSON"),
    ("order_1", [NewEvent("A", _nested(3000))], "not JSON"),  # deeper than json goes: a RecursionError
    # (these three came back as asyncpg's DataError: 'utf-8' codec can't encode character)
    ("order_\ud800", [NewEvent("A", {})], "aggregate_id .*surrogate"),
    ("order_1", [NewEvent("A\udfff", {})], "event_type .*surrogate"),
])
async def test_bad_input_is_refused_before_anything_is_written(pool, aggregate_id, events, message):
    store = EventStore(pool)
    with pytest.raises(InvalidEventError, match=message):
        await store.append(aggregate_id, "order", events, expected_version=0)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM events") == 0


async def test_data_may_be_any_mapping(pool):
    """NewEvent.data is a Mapping (and was checked as one), but json.dumps takes dicts only: a
    MappingProxyType or a UserDict was refused as 'not JSON-serialisable'."""
    from collections import UserDict
    from types import MappingProxyType

    store = EventStore(pool)
    await store.append("order_1", "order", [
        NewEvent("A", MappingProxyType({"a": 1, "nested": UserDict({"b": [MappingProxyType({"c": 2})]})}),
                 UserDict({"by": "me"})),
    ], expected_version=0)
    [event] = await store.read_stream("order_1")
    assert event.data == {"a": 1, "nested": {"b": [{"c": 2}]}} and event.metadata == {"by": "me"}


async def test_text_that_only_looks_like_an_escaped_nul_is_stored(pool):
    """A backslash followed by u0000 is six ordinary characters (a Windows path, a regex, JSON kept as a
    string): only a real NUL is refused."""
    import json

    data = {"path": r"C:\u0000dir", "regex": r"\\u0000", "kept_as_text": json.dumps({"s": "a\x00b"}),
            r"key\u0000": 1}
    store = EventStore(pool)
    await store.append("order_1", "order", [NewEvent("A", data, {"note": r"\u0000"})], expected_version=0)
    [event] = await store.read_stream("order_1")
    assert event.data == data and event.metadata == {"note": r"\u0000"}
    with pytest.raises(InvalidEventError, match="NUL"):
        await store.append("order_1", "order", [NewEvent("B", {"s": "\\\x00"})], expected_version=1)


async def test_what_append_accepted_reads_back_from_a_deeper_call_stack(pool):
    """json.dumps and json.loads both recurse once per level of nesting, within what the call stack
    leaves of the recursion limit: data appended from a shallow stack, read back by a caller 50 frames
    deeper (a web framework's handler), made read_stream, and so append_with_retry, fail on the
    aggregate for good."""
    store = EventStore(pool)
    accepted, refused = 1, 3000
    while refused - accepted > 1:  # the deepest nesting append accepts from this test's stack
        depth = (accepted + refused) // 2
        try:
            await store.append(f"deep_{depth}", "t", [NewEvent("A", _nested(depth))], expected_version=0)
            accepted = depth
        except InvalidEventError:
            refused = depth

    async def deeper(frames: int) -> list[RecordedEvent]:
        if frames:
            return await deeper(frames - 1)
        await store.append_with_retry(f"deep_{accepted}", "t", lambda history: [NewEvent("B", {})])
        return await store.read_stream(f"deep_{accepted}")

    history = await deeper(50)
    assert [e.event_type for e in history] == ["A", "B"] and history[0].data == _nested(accepted)


@pytest.mark.parametrize("expected_version", [-1, 2**63 - 1, 2**63, 2**70])
async def test_bad_expected_version_is_refused(pool, expected_version):
    """(Beyond BIGINT, it came back as asyncpg's DataError or PostgreSQL's bigint out of range.)"""
    with pytest.raises(InvalidEventError, match="expected_version"):
        await EventStore(pool).append("a", "t", [NewEvent("A", {})], expected_version=expected_version)


async def test_aggregate_type_that_is_no_text_is_refused(pool):
    with pytest.raises(InvalidEventError, match="aggregate_type .*surrogate"):
        await EventStore(pool).append("a", "t\ud800", [NewEvent("A", {})], expected_version=0)


async def test_read_stream_as_of(pool):
    store = EventStore(pool)
    await store.append("order_1", "order", [NewEvent("A", {})], expected_version=0)
    await asyncio.sleep(0.05)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await store.append("order_1", "order", [NewEvent("B", {})], expected_version=1)
    assert [e.event_type for e in await store.read_stream("order_1", as_of=middle)] == ["A"]
    assert [e.event_type for e in await store.read_stream("order_1", as_of=middle - timedelta(hours=1))] == []
    assert len(await store.read_stream("order_1", as_of=datetime.now(UTC))) == 2
    with pytest.raises(InvalidEventError):
        await store.read_stream("order_1", as_of=datetime.now())  # naive: ambiguous
    for not_a_moment in (middle.date(), middle.isoformat()):
        with pytest.raises(InvalidEventError, match="timezone-aware datetime"):
            await store.read_stream("order_1", as_of=not_a_moment)  # type: ignore[arg-type]


async def test_read_stream_as_of_is_a_prefix_of_the_history(pool, conn):
    """created_at is the appending transaction's start: a transaction that began before version 1 was
    appended can append version 2 after it. An as_of between the two must not return version 2 alone."""
    store = EventStore(pool)
    async with conn.transaction():
        began = await conn.fetchval("SELECT now()")
        await asyncio.sleep(0.02)
        await store.append("order_1", "order", [NewEvent("OrderCreated", {})], expected_version=0)
        await EventStore(conn).append("order_1", "order", [NewEvent("OrderConfirmed", {})], expected_version=1)
    history = await store.read_stream("order_1")
    assert history[1].created_at < history[0].created_at
    assert await store.read_stream("order_1", as_of=began) == []  # not [version 2] without version 1
    assert [e.version for e in await store.read_stream("order_1", as_of=history[0].created_at)] == [1, 2]


async def test_temporal_read_uses_the_aggregate_time_index(conn):
    plan = await conn.fetchval(
        "EXPLAIN (FORMAT TEXT) SELECT * FROM events WHERE aggregate_id = 'a' AND created_at <= now() ORDER BY version")
    # The planner picks one of the aggregate's indexes rather than scanning the log.
    assert "idx_events_aggregate" in plan or "events_aggregate_id_version_key" in plan


async def test_race_no_lost_or_doubled_update(pool):
    """12 writers x 25 increments on 3 shared counters; each increment depends on the last event."""
    store = EventStore(pool)
    aggregates = ["counter_0", "counter_1", "counter_2"]
    conflicts = Counter()

    async def writer(writer_id: int) -> None:
        for step in range(25):
            aggregate = aggregates[(writer_id + step) % 3]
            calls = 0

            def decide(history: list[RecordedEvent]) -> list[NewEvent]:
                nonlocal calls
                calls += 1
                value = history[-1].data["value"] if history else 0
                return [NewEvent("Incremented", {"value": value + 1, "writer": writer_id, "step": step})]

            await store.append_with_retry(aggregate, "counter", decide, max_attempts=200)
            conflicts[writer_id] += calls - 1

    await asyncio.gather(*(writer(i) for i in range(12)))
    total = 0
    seen = Counter()
    for aggregate in aggregates:
        history = await store.read_stream(aggregate)
        assert [e.data["value"] for e in history] == list(range(1, len(history) + 1))  # nothing lost
        assert [e.version for e in history] == list(range(1, len(history) + 1))
        total += len(history)
        seen.update((e.data["writer"], e.data["step"]) for e in history)
    assert total == 12 * 25
    assert all(count == 1 for count in seen.values()) and len(seen) == 300  # nothing doubled
    assert sum(conflicts.values()) > 0  # the race really happened


async def test_retry_gives_up_with_a_clear_error(pool):
    store = EventStore(pool)
    await store.append("hot", "t", [NewEvent("A", {})], expected_version=0)

    async def decide(history: list[RecordedEvent]) -> list[NewEvent]:
        # Someone else always gets there first.
        await store.append("hot", "t", [NewEvent("Other", {})], expected_version=history[-1].version)
        return [NewEvent("Mine", {})]

    with pytest.raises(RetriesExhaustedError, match="3 attempts") as exhausted:
        await store.append_with_retry("hot", "t", decide, max_attempts=3, base_delay=0.001)
    assert isinstance(exhausted.value.last, ConcurrencyError)
    # The contract's ConcurrencyError, carrying the aggregate, the expected and the actual version:
    # `except ConcurrencyError` around append_with_retry let exhaustion through.
    assert isinstance(exhausted.value, ConcurrencyError)
    assert (exhausted.value.aggregate_id, exhausted.value.expected_version, exhausted.value.actual_version) == (
        "hot", 3, 4)
    assert [e.event_type for e in await store.read_stream("hot")] == ["A", "Other", "Other", "Other"]


@pytest.mark.parametrize("isolation", ["repeatable_read", "serializable"])
async def test_conflict_the_callers_snapshot_cannot_see_is_not_retried_in_vain(pool, conn, isolation):
    """Inside the caller's REPEATABLE READ or SERIALIZABLE transaction, every re-read sees the same
    snapshot, without the event that took the version: retrying could never succeed (and the conflict
    said 'expected version 1, actual version 1')."""
    other = EventStore(pool)
    await other.append("acct", "t", [NewEvent("Opened", {})], expected_version=0)
    calls = 0

    def decide(history: list[RecordedEvent]) -> list[NewEvent]:
        nonlocal calls
        calls += 1
        return [NewEvent("Mine", {})]

    with pytest.raises(ConcurrencyError, match="snapshot") as conflict:
        async with conn.transaction(isolation=isolation):
            await EventStore(conn).read_stream("acct")  # the transaction's snapshot is taken here
            await other.append("acct", "t", [NewEvent("ByOther", {})], expected_version=1)
            await EventStore(conn).append_with_retry("acct", "t", decide, max_attempts=5)
    assert calls == 1
    assert (conflict.value.expected_version, conflict.value.actual_version) == (1, 2)
    assert [e.event_type for e in await other.read_stream("acct")] == ["Opened", "ByOther"]


async def test_retry_does_not_retry_other_errors(pool):
    calls = 0

    def decide(history: list[RecordedEvent]) -> list[NewEvent]:
        nonlocal calls
        calls += 1
        return [NewEvent("", {})]

    with pytest.raises(InvalidEventError):
        await EventStore(pool).append_with_retry("a", "t", decide)
    assert calls == 1


@pytest.mark.parametrize("decided", [None, NewEvent("A", {}), 3])
async def test_decide_returning_no_list_is_a_clear_error(pool, decided):
    """A decide that forgot its return (None), or returned one event unlisted, raised TypeError:
    'NoneType' object is not iterable."""
    with pytest.raises(InvalidEventError, match="decide must return a list of NewEvent"):
        await EventStore(pool).append_with_retry("a", "t", lambda history: decided)


async def test_decide_returning_nothing_appends_nothing(pool):
    store = EventStore(pool)
    assert await store.append_with_retry("a", "t", lambda history: []) == 0
    assert await store.read_stream("a") == []


@pytest.mark.parametrize("codec", ["none", "json.dumps"])
async def test_any_asyncpg_pool_will_do_whatever_its_jsonb_codec(dsn, codec):
    """Users hand EventStore their own pool: a plain one (jsonb as str), or one with asyncpg's usual
    json.dumps/json.loads codec, which would store a str as a JSON string, not an object."""
    import json

    import asyncpg

    async def init(conn: asyncpg.Connection) -> None:
        if codec == "json.dumps":
            await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")

    async with asyncpg.create_pool(dsn, init=init, min_size=1, max_size=2) as users_pool:
        store = EventStore(users_pool)
        await store.append("order_1", "order", [NewEvent("OrderCreated", {"order_id": 1}, {"by": "me"})],
                           expected_version=0)
        seen: list[list[RecordedEvent]] = []

        def decide(history: list[RecordedEvent]) -> list[NewEvent]:
            seen.append(history)
            return [NewEvent("OrderConfirmed", {"order_id": 1})]

        assert await store.append_with_retry("order_1", "order", decide) == 2
        history = await store.read_stream("order_1")
        stored = await users_pool.fetch("SELECT jsonb_typeof(data) AS data, jsonb_typeof(metadata) AS metadata"
                                        " FROM events ORDER BY version")
    assert [(row["data"], row["metadata"]) for row in stored] == [("object", "object"), ("object", None)]
    assert [(e.data, e.metadata) for e in history] == [({"order_id": 1}, {"by": "me"}), ({"order_id": 1}, None)]
    assert seen[0][0].data == {"order_id": 1} and seen[0][0].metadata == {"by": "me"}
