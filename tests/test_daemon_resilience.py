"""The daemon under abuse: kill -9, severed connections, two daemons at once, poison events, signals.

Real PostgreSQL, real `python -m pgprojector run` subprocesses, real signals; the read models are
checked against an independent fold of the whole log (tests/daemon_harness.py).

Random choices come from one seed per test, printed in failure messages; set
PGPROJECTOR_TEST_SEED to replay one.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from datetime import datetime, timedelta

import asyncpg
import daemon_harness as h
import pytest
from witness import assert_each_event_applied_once_in_version_order

from pgprojector import EventStore, NewEvent, db


def _seed() -> int:
    seed = int(os.environ.get("PGPROJECTOR_TEST_SEED") or time.time_ns() % 2**32)
    print(f"random seed: {seed} (replay with PGPROJECTOR_TEST_SEED={seed})")  # shown with a failure
    return seed


async def _harness_conn(dsn: str, name: str = "test-harness") -> asyncpg.Connection:
    # Not a pgprojector-* application name: the connection-cutting test leaves it alone.
    return await asyncpg.connect(dsn, server_settings={"application_name": name})


def _timestamp(record: dict) -> datetime:
    return datetime.fromisoformat(record["timestamp"])


def _assert_models(actual: h.Actual, expected: h.Expected, seed: int, which=h.BUILTINS) -> None:
    problems = h.compare(actual, expected, which)
    assert not problems, f"read models differ from the fold of the log (seed {seed}):\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# 1. kill -9 at random moments during a long catch-up
# ---------------------------------------------------------------------------------------------

async def test_kill_9_at_random_moments_during_catch_up_loses_and_duplicates_nothing(dsn, tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    conn = await _harness_conn(dsn)
    daemons: list[h.DaemonProcess] = []
    try:
        # A session time zone far from UTC: the analytics `day` is the UTC date, whatever the session's.
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{database}" SET timezone TO \'Pacific/Kiritimati\'')
        planned = h.plan_orders(15_000, rng)
        await h.insert_planned(conn, planned)
        top = await h.head(conn)
        assert top == len(planned) and 55_000 <= top <= 75_000, top

        settings = {"batch_size": "200", "projections": h.WITH_WITNESS}
        kills = rng.randint(4, 6)
        # Where each life dies: once every projection has passed a random position of the first 80% of
        # the log, seen by a poll every 0.1 s (so mid-transaction or not). Set by progress, not by the
        # clock: how far a daemon gets in a given time is the machine's speed, and on a fast one the
        # last lives found it caught up.
        targets = sorted(rng.sample(range(top // 20, top * 4 // 5), kills))
        previous = {name: 0 for name in h.ALL_WITH_WITNESS}
        killed_mid_catch_up = 0
        progress: list[dict[str, int]] = []
        for life, target in enumerate(targets):
            daemon = h.DaemonProcess(dsn, tmp_path / f"daemon-{life}.log", **settings)
            daemons.append(daemon)
            # Each life gets to apply something, then dies at a random moment, mid-transaction or not.
            await daemon.wait_for_log("batch_applied", timeout=30)
            await h.wait_caught_up(conn, h.ALL_WITH_WITNESS, timeout=60, daemons=[daemon], target=target)
            await daemon.kill9()
            assert daemon.returncode == -signal.SIGKILL
            points = await h.checkpoints(conn)
            for name in h.ALL_WITH_WITNESS:
                assert points[name]["position"] >= previous[name], f"{name}'s checkpoint went backwards (seed {seed})"
                assert points[name]["state"] == "running", points[name]
                previous[name] = points[name]["position"]
            if any(points[name]["position"] < top for name in h.ALL_WITH_WITNESS):
                killed_mid_catch_up += 1
            progress.append({name: points[name]["position"] for name in h.ALL_WITH_WITNESS})
            print(f"kill {life + 1}/{kills} (seed {seed}): checkpoints {progress[-1]} of {top}")
            # At every crash point, read-model rows and checkpoint committed together or not at all.
            await assert_each_event_applied_once_in_version_order(conn, upto=points["witness"]["position"])
        assert killed_mid_catch_up == kills, (
            f"only {killed_mid_catch_up} of {kills} kills hit the daemon before it had caught up: "
            f"the test no longer exercises a crash mid-catch-up (make the log longer or the batches smaller): "
            f"{progress}")

        final = h.DaemonProcess(dsn, tmp_path / "daemon-final.log", **settings)
        daemons.append(final)
        await h.wait_caught_up(conn, h.ALL_WITH_WITNESS, timeout=120, daemons=[final])
        final.send(signal.SIGTERM)
        assert await final.wait_exit(10) == 0, final.tail()

        points = await h.checkpoints(conn)
        assert {name: points[name]["position"] for name in h.ALL_WITH_WITNESS} == dict.fromkeys(h.ALL_WITH_WITNESS, top)
        assert await assert_each_event_applied_once_in_version_order(conn) == top
        expected = h.fold(await h.read_log(conn))
        _assert_models(await h.read_models(conn), expected, seed)
        assert len(expected.orders) == 15_000
    finally:
        for daemon in daemons:
            daemon.close()
        await conn.close()


# ---------------------------------------------------------------------------------------------
# 2. every daemon connection cut, again and again, while producers write
# ---------------------------------------------------------------------------------------------

async def test_daemon_survives_pg_terminate_backend_of_all_its_connections(dsn, tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    conn = await _harness_conn(dsn)
    cutter = await _harness_conn(dsn, "test-cutter")
    producers = await db.create_pool(dsn, role="producer", min_size=2, max_size=6)
    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", batch_size="200", poll_interval="5")
    try:
        await daemon.wait_for_log("daemon_started", timeout=30)
        rounds: list[list[asyncpg.Record]] = []

        async def cut_repeatedly(stop: asyncio.Event) -> None:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), rng.uniform(1.0, 2.0))
                except TimeoutError:
                    pass
                rounds.append(await cutter.fetch(h.CUT_DAEMON_CONNECTIONS))

        stop = asyncio.Event()
        cutting = asyncio.create_task(cut_repeatedly(stop))
        try:
            stats = await h.run_producers(producers, 9.0, rng, tasks=5)
        finally:
            stop.set()
            await cutting
        assert not stats.errors, stats.errors

        assert daemon.alive, f"the daemon exited ({daemon.returncode}):\n{daemon.tail()}"
        cut = [row for batch in rounds for row in batch]
        assert all(row["terminated"] for row in cut)
        assert len(rounds) >= 4 and sum(1 for batch in rounds if batch) >= 4, (
            f"the cutter found daemon connections in only {sum(1 for b in rounds if b)} of {len(rounds)} rounds: "
            f"{rounds}\n{daemon.tail()}")
        # The LISTEN connection was cut again and again, so it came back after each cut.
        listener_cut = sum(1 for batch in rounds if any(r["application_name"] == "pgprojector-listener" for r in batch))
        assert listener_cut >= 3, rounds
        assert any(r["application_name"] == "pgprojector-daemon" and r["state"] in ("idle in transaction", "active")
                   for r in cut), (
            "no connection was cut in the middle of a batch", cut)

        await h.wait_caught_up(conn, h.BUILTINS, timeout=60, daemons=[daemon])
        assert daemon.alive, f"the daemon exited ({daemon.returncode}):\n{daemon.tail()}"
        events = {record.get("event") for record in daemon.logs()}
        assert "listener_reconnect" in events, sorted(e for e in events if e)
        assert "database_unavailable" in events or "database_reconnected" in events, sorted(e for e in events if e)
        assert len(daemon.log_events("daemon_started")) == 1, "the daemon restarted itself"

        # Still listening after all that: with a 5 s poll interval, only a notification explains a fresh
        # event projected within 2 s, three times in a row.
        store = EventStore(producers)
        for order_id in (1, 2, 3):
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            await store.append(f"order_{order_id}", "order",
                               [NewEvent("OrderCreated", h.event_data("OrderCreated", order_id, rng))], 0)
            appended = time.monotonic()
            await h.wait_caught_up(conn, h.BUILTINS, timeout=10, daemons=[daemon])
            assert time.monotonic() - appended < 2.0, "the daemon no longer wakes on NOTIFY after the reconnects"

        expected = h.fold(await h.read_log(conn))
        _assert_models(await h.read_models(conn), expected, seed)
        assert len(expected.orders) == stats.orders + 3

        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0, daemon.tail()
    finally:
        daemon.close()
        await producers.close()
        await cutter.close()
        await conn.close()


# ---------------------------------------------------------------------------------------------
# 3. two daemons at once (a rolling deploy)
# ---------------------------------------------------------------------------------------------

async def test_two_daemons_at_once_apply_every_event_exactly_once(dsn, tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    conn = await _harness_conn(dsn)
    producers = await db.create_pool(dsn, role="producer", min_size=2, max_size=6)
    settings = {"batch_size": "50", "poll_interval": "0.5", "projections": h.WITH_WITNESS}
    first = h.DaemonProcess(dsn, tmp_path / "daemon-a.log", **settings)
    second: h.DaemonProcess | None = None
    production: asyncio.Task | None = None
    try:
        await first.wait_for_log("daemon_started", timeout=30)  # the old version is up (and set the witness up)
        production = asyncio.create_task(h.run_producers(producers, 10.0, rng, tasks=6))
        await asyncio.sleep(1.0)
        second = h.DaemonProcess(dsn, tmp_path / "daemon-b.log", **settings)  # the new version comes up
        started = _timestamp((await second.wait_for_log("daemon_started", timeout=30))[0])
        stats = await production
        assert not stats.errors, stats.errors
        await h.wait_caught_up(conn, h.ALL_WITH_WITNESS, timeout=60, daemons=[first, second])

        # Both did work while both were running.
        overlapping_a = [r for r in first.log_events("batch_applied") if _timestamp(r) > started]
        applied_b = second.log_events("batch_applied")
        assert overlapping_a and applied_b, (
            f"daemon A applied {len(overlapping_a)} batches after B started, B applied {len(applied_b)}")

        # The old one leaves; the new one carries on alone.
        first.send(signal.SIGTERM)
        assert await first.wait_exit(10) == 0, first.tail()
        more = await h.run_producers(producers, 1.5, rng, tasks=3, first_id=2_000_000)
        assert not more.errors, more.errors
        await h.wait_caught_up(conn, h.ALL_WITH_WITNESS, timeout=30, daemons=[second])

        assert await assert_each_event_applied_once_in_version_order(conn) == await conn.fetchval("SELECT count(*) FROM events")
        expected = h.fold(await h.read_log(conn))
        _assert_models(await h.read_models(conn), expected, seed)
        for daemon in (first, second):
            assert not daemon.log_events("event_retry") and not daemon.log_events("projection_halted"), daemon.tail()

        second.send(signal.SIGTERM)
        assert await second.wait_exit(10) == 0, second.tail()
    finally:
        if production is not None and not production.done():
            production.cancel()
            await asyncio.gather(production, return_exceptions=True)
        first.close()
        if second is not None:
            second.close()
        await producers.close()
        await conn.close()


# ---------------------------------------------------------------------------------------------
# 4. a malformed event: halt, or park
# ---------------------------------------------------------------------------------------------

def _corrupt(planned: list[h.Planned], event_type: str, change, *, after: int,
             avoid: frozenset[str] = frozenset()) -> h.Planned:
    """Corrupt, in place, the first `event_type` event past index `after` of an order that has at
    least two more events after it."""
    life_length: dict[str, int] = {}
    for event in planned:
        life_length[event.aggregate_id] = max(life_length.get(event.aggregate_id, 0), event.version)
    event = next(
        event for index, event in enumerate(planned)
        if index > after and event.event_type == event_type and event.aggregate_id not in avoid
        and life_length[event.aggregate_id] >= event.version + 2
    )
    change(event.data)
    return event


async def _status(dsn: str) -> dict:
    result = await asyncio.to_thread(h.run_cli, "status", "--json", dsn=dsn)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    return {"head": report["head_position"], **{p["name"]: p for p in report["projections"]}}


async def test_malformed_event_halts_the_projections_that_read_it_and_the_daemon_stays_up(dsn, tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    conn = await _harness_conn(dsn)
    pool = await db.create_pool(dsn, role="tests", min_size=1, max_size=2)
    planned = h.plan_orders(400, rng, days=1)
    # A DriverAssigned without its driver_name, in the middle of the log, with plenty after it.
    bad = _corrupt(planned, "DriverAssigned", lambda data: data.pop("driver_name"), after=len(planned) // 2)
    await h.insert_planned(conn, planned)
    bad_position = await conn.fetchval("SELECT position FROM events WHERE aggregate_id = $1 AND version = $2",
                                       bad.aggregate_id, bad.version)
    top = await h.head(conn)
    assert bad_position < top - 100

    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", on_error="halt", max_attempts="2", batch_size="100")
    try:
        expected = h.fold(await h.read_log(conn), on_error="halt")
        # Only orders reads driver_name, so only orders halts at it; the dashboard reads the event
        # (a status change) but not that field, analytics passes over the type: both run on.
        assert expected.halted_at == {"orders": bad_position, "dashboard": None, "analytics": None}

        deadline = time.monotonic() + 30
        while True:
            points = await h.checkpoints(conn)
            if points["orders"]["state"] == "halted" and points["dashboard"]["position"] == top \
                    and points["analytics"]["position"] == top:
                break
            assert daemon.alive, daemon.tail()
            assert time.monotonic() < deadline, f"not halted / caught up: {points}\n{daemon.tail()}"
            await asyncio.sleep(0.1)

        # The others run on: a new order is projected by analytics while orders/dashboard stay halted.
        store = EventStore(pool)
        version = 0
        for step in ("OrderCreated", "OrderConfirmed", "DriverAssigned", "OrderPickedUp", "OrderDelivered"):
            version = await store.append("order_99999", "order",
                                         [NewEvent(step, h.event_data(step, 99999, rng))], version)
        new_top = await h.head(conn)
        await h.wait_caught_up(conn, ["dashboard", "analytics"], timeout=15, daemons=[daemon])
        await asyncio.sleep(1.5)  # a halted projection given time to (wrongly) move on

        points = await h.checkpoints(conn)
        assert points["orders"]["state"] == "halted"
        assert points["orders"]["position"] == bad_position - 1, (points["orders"], bad_position)
        for name in ("dashboard", "analytics"):
            assert points[name]["state"] == "running" and points[name]["position"] == new_top, points[name]

        status = await _status(dsn)
        assert status["head"] == new_top
        for name in ("orders",):
            report = status[name]
            assert report["state"] == "halted", report
            assert report["position"] == bad_position - 1 and report["lag"] == new_top - bad_position + 1, report
            error = report["last_error"] or ""
            assert "driver_name" in error, report  # the problem
            assert str(bad_position) in error or bad.aggregate_id in error, report  # and the event
        for name in ("dashboard", "analytics"):
            assert status[name]["state"] == "running" and status[name]["lag"] == 0, status[name]
            assert status[name]["last_error"] is None

        assert daemon.alive and len(daemon.log_events("daemon_started")) == 1, daemon.tail()

        expected = h.fold(await h.read_log(conn), on_error="halt")
        actual = await h.read_models(conn)
        _assert_models(actual, expected, seed)
        assert actual.orders[int(bad.aggregate_id.split("_")[1])]["current_version"] == bad.version - 1
        assert 99999 not in actual.orders

        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0, daemon.tail()
    finally:
        daemon.close()
        await pool.close()
        await conn.close()


async def test_malformed_events_are_parked_and_the_projections_move_past_them(dsn, tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    conn = await _harness_conn(dsn)
    planned = h.plan_orders(400, rng, days=1)
    # An OrderCreated whose total_amount is not a number: every later event of that order has no
    # OrderCreated applied, so it fails too. And a DriverAssigned without driver_name elsewhere.
    created = _corrupt(planned, "OrderCreated", lambda data: data.update(total_amount="abc"), after=len(planned) // 3)
    assigned = _corrupt(planned, "DriverAssigned", lambda data: data.pop("driver_name"), after=len(planned) // 2,
                        avoid=frozenset({created.aggregate_id}))
    await h.insert_planned(conn, planned)
    top = await h.head(conn)
    positions = {(r["aggregate_id"], r["version"]): r["position"]
                 for r in await conn.fetch("SELECT aggregate_id, version, position FROM events")}

    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", on_error="park", max_attempts="2", batch_size="100")
    try:
        expected = h.fold(await h.read_log(conn), on_error="park")
        created_pos = positions[(created.aggregate_id, 1)]
        assigned_pos = positions[(assigned.aggregate_id, assigned.version)]
        x_events = sorted(p for (a, _v), p in positions.items() if a == created.aggregate_id)
        x_types = {p: t for p, t in [(positions[(e.aggregate_id, e.version)], e.event_type)
                                     for e in planned if e.aggregate_id == created.aggregate_id]}
        # Spelled out, what the fold computes: every projection reads total_amount, only orders
        # reads driver_name.
        assert expected.parked["orders"] == sorted([*x_events, assigned_pos])
        assert expected.parked["dashboard"] == x_events
        assert expected.parked["analytics"] == [p for p in x_events if x_types[p] in h.KNOWN_TYPES["analytics"]]
        assert created_pos in expected.parked["analytics"] and assigned_pos not in expected.parked["analytics"]

        await h.wait_caught_up(conn, h.BUILTINS, timeout=60, daemons=[daemon])
        assert daemon.alive and len(daemon.log_events("daemon_started")) == 1, daemon.tail()

        result = await asyncio.to_thread(h.run_cli, "dead-letters", "--json", dsn=dsn)
        assert result.returncode == 0, result.stderr
        letters = json.loads(result.stdout)
        found = {name: sorted(letter["position"] for letter in letters if letter["projection"] == name)
                 for name in h.BUILTINS}
        assert found == expected.parked, (found, expected.parked)
        by_key = {(letter["projection"], letter["position"]): letter for letter in letters}
        for name in h.BUILTINS:
            assert "total_amount" in by_key[(name, created_pos)]["error"], by_key[(name, created_pos)]
        assert "driver_name" in by_key[("orders", assigned_pos)]["error"], by_key[("orders", assigned_pos)]
        assert all(letter["error"] for letter in letters)

        status = await _status(dsn)
        for name in h.BUILTINS:
            assert status[name]["state"] == "running", status[name]
            assert status[name]["position"] == top and status[name]["lag"] == 0, status[name]
            assert status[name]["dead_letters"] == len(expected.parked[name]), status[name]

        actual = await h.read_models(conn)
        _assert_models(actual, expected, seed)
        assert int(created.aggregate_id.split("_")[1]) not in actual.orders
        moved_on = actual.orders[int(assigned.aggregate_id.split("_")[1])]
        assert moved_on["driver_name"] is None and moved_on["current_version"] > assigned.version  # later events applied

        assert daemon.alive, daemon.tail()
        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0, daemon.tail()
        assert len(daemon.log_events("daemon_started")) == 1
    finally:
        daemon.close()
        await conn.close()


@pytest.mark.parametrize("batch_size", [1, 7, 500])
async def test_orders_created_twice_are_parked_exactly_as_the_fold_says(dsn, tmp_path, batch_size):
    """Orders created twice: a later event of a life turned into a second OrderCreated, and order
    numbers spelled a second way (order_0<n>, its order_id the string "0<n>") with lives of their
    own, which are no order's (one number, one spelling: a second spelling would be a second stream
    of versions for one order). At each batch size, each projection parks exactly the events
    the fold refuses (the batches run the optimistic check first and must fall back to the full
    one), and its read model equals the fold's."""
    seed = _seed()
    rng = random.Random(seed)
    conn = await _harness_conn(dsn)
    planned = h.plan_orders(200, rng, days=1)
    twice = []
    for _ in range(4):
        event = _corrupt(planned, "DriverAssigned", lambda data: None, after=rng.randrange(len(planned) // 2),
                         avoid=frozenset(e.aggregate_id for e in twice))
        number = int(event.aggregate_id.split("_")[1])
        event.event_type, event.data = "OrderCreated", h.event_data("OrderCreated", number, rng, event.created_at)
        twice.append(event)
    for number in rng.sample(range(1, 201), 3):
        shift = timedelta(minutes=rng.uniform(-30, 30))  # one shift per life: its versions stay in order
        for event in [e for e in planned if e.aggregate_id == f"order_{number}"]:
            planned.append(h.Planned(f"order_0{number}", event.event_type, {**event.data, "order_id": f"0{number}"},
                                     event.version, event.created_at + shift))
    planned.sort(key=lambda p: (p.created_at, p.aggregate_id, p.version))
    await h.insert_planned(conn, planned)
    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", on_error="park", max_attempts="1",
                             batch_size=str(batch_size))
    try:
        expected = h.fold(await h.read_log(conn), on_error="park")
        refused_twice = {await conn.fetchval("SELECT position FROM events WHERE aggregate_id = $1 AND version = $2",
                                             e.aggregate_id, e.version) for e in twice}
        for name in h.BUILTINS:
            assert refused_twice <= set(expected.parked[name])  # the fold refuses each second creation
        await h.wait_caught_up(conn, h.BUILTINS, timeout=60, daemons=[daemon])
        letters = json.loads((await asyncio.to_thread(h.run_cli, "dead-letters", "--json", dsn=dsn)).stdout)
        found = {name: sorted(letter["position"] for letter in letters if letter["projection"] == name)
                 for name in h.BUILTINS}
        assert found == expected.parked, (seed, batch_size, found, expected.parked)
        assert all("the order exists already" in letter["error"] for letter in letters
                   if letter["position"] in refused_twice)
        spelled_twice = [letter for letter in letters if "order_0" in letter["aggregate_id"]]
        assert spelled_twice and all("aggregate_id" in letter["error"] for letter in spelled_twice)
        _assert_models(await h.read_models(conn), expected, seed)
        assert daemon.alive, daemon.tail()
    finally:
        daemon.close()
        await conn.close()


# ---------------------------------------------------------------------------------------------
# 5. SIGTERM / SIGINT mid-catch-up
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_mid_catch_up_commits_the_batch_in_hand_and_exits_0(dsn, tmp_path, signum):
    seed = _seed()
    rng = random.Random(seed)
    conn = await _harness_conn(dsn)
    planned = h.plan_orders(5000, rng)
    await h.insert_planned(conn, planned)
    top = await h.head(conn)
    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", batch_size="250", projections=h.WITH_WITNESS)
    try:
        for name in h.ALL_WITH_WITNESS:  # every projection is busy catching up
            await daemon.wait_for_log("batch_applied", timeout=30, projection=name)
        # A random moment by progress, not by the clock (see the kill -9 test): once every projection has
        # passed a random position of the first 60% of the log.
        await h.wait_caught_up(conn, h.ALL_WITH_WITNESS, timeout=60, daemons=[daemon],
                               target=rng.randrange(top // 20, top * 3 // 5))
        sent = time.monotonic()
        daemon.send(signum)
        code = await daemon.wait_exit(10)
        took = time.monotonic() - sent
        assert code == 0, daemon.tail()
        assert took < 10

        points = await h.checkpoints(conn)
        assert any(points[name]["position"] < top for name in h.ALL_WITH_WITNESS), (
            "the daemon had caught up before the signal: the test no longer stops it mid-catch-up")
        for name in h.ALL_WITH_WITNESS:
            logged = daemon.log_events("batch_applied", projection=name)[-1]["checkpoint"]
            assert points[name]["position"] == logged, (
                f"{name}: stored checkpoint {points[name]['position']}, last logged batch_applied {logged}")
        await assert_each_event_applied_once_in_version_order(conn, upto=points["witness"]["position"])
        non_json = [r["raw"] for r in daemon.logs() if r.get("event") == "<non-json>"]
        assert not non_json, non_json  # no traceback on the way out
    finally:
        daemon.close()
        await conn.close()


async def _blocked_daemon(dsn: str, conn: asyncpg.Connection, locker: asyncpg.Connection, tmp_path,
                          **settings: str) -> h.DaemonProcess:
    """A daemon whose orders batch cannot finish: `locker` holds read_model_orders locked (a migration,
    say) while an event waits to be applied."""
    await EventStore(conn).append("order_1", "order", [NewEvent("OrderCreated", {
        "order_id": 1, "user_id": 7, "user_name": "u", "items": [], "total_amount": "1.00",
        "delivery_address": "x"})], expected_version=0)
    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", projections="orders", **settings)
    await h.wait_caught_up(conn, ["orders"], timeout=30, daemons=[daemon])
    await locker.execute("BEGIN; LOCK TABLE read_model_orders IN ACCESS EXCLUSIVE MODE")
    await EventStore(conn).append("order_1", "order", [NewEvent("OrderPickedUp", {"order_id": 1})], expected_version=1)
    deadline = time.monotonic() + 30
    while not await conn.fetchval("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name = "
                                  "'pgprojector-daemon' AND wait_event_type = 'Lock' AND datname = current_database())"):
        assert time.monotonic() < deadline, daemon.tail()
        await asyncio.sleep(0.05)
    return daemon


async def test_a_batch_that_cannot_finish_holds_a_stop_for_the_stop_timeout_only(dsn, tmp_path):
    """A read model locked by someone else: the stop waited for the lock, however long it was held.
    Now the batch is rolled back after PGPROJECTOR_STOP_TIMEOUT and the daemon exits 1, its
    checkpoint where it was."""
    conn, locker = await _harness_conn(dsn), await _harness_conn(dsn, "test-locker")
    daemon = None
    try:
        daemon = await _blocked_daemon(dsn, conn, locker, tmp_path, stop_timeout="2")
        sent = time.monotonic()
        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(15) == 1, daemon.tail()
        took = time.monotonic() - sent
        assert 2 <= took < 10, took
        [timeout] = daemon.log_events("stop_timeout")
        assert timeout["unfinished"] == ["orders"]
        assert daemon.log_events("daemon_stopped")[-1]["clean"] is False
        assert (await h.checkpoints(conn))["orders"]["position"] == 1
    finally:
        await locker.close()
        if daemon is not None:
            daemon.close()
    # The lock gone, the next daemon applies the event.
    again = h.DaemonProcess(dsn, tmp_path / "again.log", projections="orders")
    try:
        await h.wait_caught_up(conn, ["orders"], timeout=30, daemons=[again])
        again.send(signal.SIGTERM)
        assert await again.wait_exit(10) == 0, again.tail()
    finally:
        again.close()
        await conn.close()


async def test_a_second_signal_stops_a_daemon_whose_batch_cannot_finish_at_once(dsn, tmp_path):
    """It was logged (stop_forced), and the daemon went on waiting: closing the pool waited for the
    stuck connection. It exited 0."""
    conn, locker = await _harness_conn(dsn), await _harness_conn(dsn, "test-locker")
    daemon = None
    try:
        daemon = await _blocked_daemon(dsn, conn, locker, tmp_path, stop_timeout="600")
        daemon.send(signal.SIGTERM)
        await daemon.wait_for_log("stop_requested", timeout=10)
        sent = time.monotonic()
        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(15) == 1, daemon.tail()
        assert time.monotonic() - sent < 10
        assert daemon.log_events("stop_forced") and daemon.log_events("daemon_stopped")[-1]["clean"] is False
        assert (await h.checkpoints(conn))["orders"]["position"] == 1
    finally:
        await locker.close()
        if daemon is not None:
            daemon.close()
        await conn.close()


# ---------------------------------------------------------------------------------------------
# 3b. several daemons starting at the same moment, with a projection nobody has set up yet
# ---------------------------------------------------------------------------------------------

async def test_daemons_starting_together_set_up_a_new_projection_without_failing(dsn, tmp_path):
    """A deploy that adds a projection starts several instances at once: each finds it unregistered
    and sets it up. That must not fail (CREATE TABLE IF NOT EXISTS races without a lock)."""
    conn = await _harness_conn(dsn)
    gate_conn = await _harness_conn(dsn, "test-gate")
    count = 4
    daemons: list[h.DaemonProcess] = []
    try:
        # Line the daemons up. A transaction holds a SHARE lock on the checkpoint table: reading it
        # goes on, registering a projection there waits. So the first daemon to set the projection
        # up waits with its CREATE TABLE uncommitted, and the others reach their set-up meanwhile.
        # When everyone waits on a lock (or has started), the gate opens.
        gate = gate_conn.transaction()
        await gate.start()
        await gate_conn.execute("LOCK TABLE pgprojector_projections IN SHARE MODE")
        daemons = [h.DaemonProcess(dsn, tmp_path / f"daemon-{i}.log", projections=h.WITH_WITNESS)
                   for i in range(count)]
        deadline = time.monotonic() + 30
        while True:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'pgprojector-daemon' AND wait_event_type = 'Lock'")
            started = sum(1 for d in daemons if d.log_events("daemon_started"))
            if waiting + started >= count:
                break
            assert all(d.alive for d in daemons), [d.tail() for d in daemons if not d.alive]
            assert time.monotonic() < deadline, f"only {waiting} daemons waiting, {started} started"
            await asyncio.sleep(0.05)
        await gate.commit()

        for daemon in daemons:
            await daemon.wait_for_log("daemon_started", timeout=30)
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_projections WHERE name = 'witness'") == 1
        for daemon in daemons:
            daemon.send(signal.SIGTERM)
        for daemon in daemons:
            assert await daemon.wait_exit(10) == 0, daemon.tail()
    finally:
        for daemon in daemons:
            daemon.close()
        await gate_conn.close()
        await conn.close()


async def test_a_stop_while_waiting_for_the_database_at_start_is_clean_and_logged(tmp_path):
    """No server where the DSN points: the daemon waits (database_unavailable), and a SIGTERM then
    exits 0 with daemon_stopped, which it did not log."""
    from pgprojector.embedded import _free_port

    daemon = h.DaemonProcess(f"postgresql://nobody@127.0.0.1:{_free_port()}/nowhere", tmp_path / "daemon.log")
    try:
        await daemon.wait_for_log("database_unavailable", timeout=30)
        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0, daemon.tail()
        assert daemon.log_events("daemon_stopped", clean=True)
    finally:
        daemon.close()


async def test_sighup_neither_kills_the_daemon_nor_stops_it(dsn, tmp_path):
    """SIGHUP (a terminal hang-up, `kill -HUP` out of the reload habit) killed the daemon on the spot,
    with no log line; systemd's Restart=on-failure counts death by SIGHUP as clean and left it down."""
    conn = await _harness_conn(dsn)
    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", projections=h.WITH_WITNESS)
    try:
        await daemon.wait_for_log("daemon_ready", timeout=30)
        daemon.send(signal.SIGHUP)
        await daemon.wait_for_log("signal_ignored", timeout=5, signal="SIGHUP")
        await h.insert_planned(conn, h.plan_orders(20, random.Random(1)))
        await h.wait_caught_up(conn, h.ALL_WITH_WITNESS, timeout=30, daemons=[daemon])
        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0, daemon.tail()
        await assert_each_event_applied_once_in_version_order(conn)
    finally:
        daemon.close()
        await conn.close()


async def test_a_stop_while_start_up_waits_on_a_lock_exits_at_once(dsn, tmp_path):
    """A daemon setting up a projection new to the database waits for the migration lock, which a
    `pgprojector migrate` holds for as long as it runs: a SIGTERM then went unheard until the lock was
    free (a service manager's stop timeout, then SIGKILL). Nothing is in hand at start-up: exit 0 now."""
    from pgprojector.migrations import MIGRATION_LOCK_KEY

    conn = await _harness_conn(dsn)
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)  # as a running `migrate` does
    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", projections=h.WITH_WITNESS, stop_timeout="3")
    try:
        deadline = time.monotonic() + 30
        while not await conn.fetchval(  # the daemon's start-up waits on the lock
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name = 'pgprojector-daemon' "
                "AND wait_event_type = 'Lock' AND datname = current_database())"):
            assert time.monotonic() < deadline and daemon.alive, daemon.tail()
            await asyncio.sleep(0.05)
        sent = time.monotonic()
        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0, daemon.tail()
        assert time.monotonic() - sent < 5
        assert daemon.log_events("daemon_stopped", clean=True)
        assert not [r for r in daemon.logs() if r.get("level") == "error"], daemon.tail()
        # nothing half set up is left behind
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_projections WHERE name = 'witness'") == 0
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_daemons") == 0
        # nor its session: cut while it waited, its backend waited on in the lock's queue, the daemon gone
        deadline = time.monotonic() + 5
        while await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                  "'pgprojector-daemon' AND datname = current_database()"):
            assert time.monotonic() < deadline, "the daemon's backend still waits on the lock after its exit"
            await asyncio.sleep(0.1)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        daemon.close()
        await conn.close()


async def test_a_read_only_database_is_waited_out_not_a_crash_loop(dsn, tmp_path):
    """A database that refuses writes (a hot standby the DSN reached in a failover, or
    default_transaction_read_only=on) made the daemon exit 1 with a traceback, at start and under way
    ("cannot execute SELECT FOR UPDATE in a read-only transaction"): a restart loop under systemd.
    Like a server that is down, it says so and waits; then it goes on, skipping and doubling nothing."""
    conn = await _harness_conn(dsn)
    database = await conn.fetchval("SELECT current_database()")
    await h.insert_planned(conn, h.plan_orders(50, random.Random(1)))
    await conn.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", projections=h.WITH_WITNESS)
    try:
        waiting = await daemon.wait_for_log("database_unavailable", timeout=30)
        assert "read-only" in waiting[0]["error"], waiting
        await asyncio.sleep(2)
        assert daemon.alive, daemon.tail()
        await conn.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await h.wait_caught_up(conn, h.ALL_WITH_WITNESS, timeout=60, daemons=[daemon])

        # Under way: the database turns read-only, the daemon's sessions are cut and come back to it.
        await conn.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE application_name LIKE 'pgprojector%' AND datname = current_database()")
        await h.insert_planned(conn, h.plan_orders(50, random.Random(2), first_id=1000))
        await asyncio.sleep(4)
        assert daemon.alive, daemon.tail()
        points = await h.checkpoints(conn)
        assert all(points[name]["state"] == "running" for name in h.ALL_WITH_WITNESS), points
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0
        await conn.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await h.wait_caught_up(conn, h.ALL_WITH_WITNESS, timeout=60, daemons=[daemon])
        _assert_models(await h.read_models(conn), h.fold(await h.read_log(conn)), seed=0)
        await assert_each_event_applied_once_in_version_order(conn)
        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0, daemon.tail()
    finally:
        daemon.close()
        await conn.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await conn.close()


@pytest.mark.parametrize("projection", ["slow_witness", "slow_after_witness"])
async def test_a_handler_slower_than_the_idle_in_transaction_timeout_gets_smaller_batches(dsn, tmp_path, projection):
    """A server that ends sessions idle in a transaction for 300 ms, and a handler that works 50 ms per
    event in Python (idle in its transaction meanwhile): a batch of 16 lost its connection every time,
    was retried as it was, and the projection never moved, logging only "connection is closed". Halved
    after two such losses at one checkpoint, batches of 4 go through; nothing is blamed or parked.

    slow_after_witness writes first and works after: its session ends after the handler has returned,
    and the loss shows at the checkpoint's save or at COMMIT, not in the handler. It was never counted
    as the batch's, and the batch was never halved ('cannot call Transaction.__aexit__(): the
    underlying connection is closed', for ever)."""
    conn = await _harness_conn(dsn)
    database = await conn.fetchval("SELECT current_database()")
    await h.insert_planned(conn, h.plan_orders(15, random.Random(3)))
    top = await h.head(conn)
    assert 40 <= top <= 90, top
    await conn.execute(f"ALTER DATABASE \"{database}\" SET idle_in_transaction_session_timeout = '300ms'")
    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log", projections=f"daemon_harness:{projection}",
                             batch_size="16", on_error="park", max_attempts="2")
    try:
        started = await daemon.wait_for_log("daemon_started", timeout=30)
        assert started[0]["server_timeouts"] == {"idle_in_transaction_session_timeout": "300ms"}, started
        await h.wait_caught_up(conn, [projection], timeout=120, daemons=[daemon])
        assert daemon.log_events("batch_shrunk"), daemon.tail()
        assert await conn.fetchval("SELECT count(*) FROM pgprojector_dead_letters") == 0
        assert await conn.fetchval(f"SELECT count(*) FROM {projection}") == top
        assert await conn.fetchval(f"SELECT count(DISTINCT position) FROM {projection}") == top
        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0, daemon.tail()
    finally:
        daemon.close()
        await conn.execute(f'ALTER DATABASE "{database}" RESET idle_in_transaction_session_timeout')
        await conn.close()


@pytest.mark.parametrize("what", ["database", "user"])
def test_run_with_a_database_or_user_that_does_not_exist_is_a_configuration_error(dsn, what):
    """Once exit 1 with a traceback several KB long, which systemd restarted every 5 s for ever."""
    scheme, rest = dsn.split("://", 1)
    address, database = rest.rsplit("/", 1)
    user, _, host = address.rpartition("@")
    wrong = (f"{scheme}://{user}@{host}/no_such_database" if what == "database"
             else f"{scheme}://no_such_user:Sekr1tPW@{host}/{database}")
    result = h.run_cli("run", dsn=wrong, timeout=60)
    assert result.returncode == 2, result.stderr
    assert ("does not exist" in result.stderr and "PGPROJECTOR_DSN" in result.stderr
            and "Traceback" not in result.stderr and "Sekr1tPW" not in result.stderr), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_a_daemon_that_fails_says_why_not_which_task_group(server, dsn, tmp_path):
    """Its database dropped under it: the daemon exits 1 (its service manager restarts it, and the
    start-up then says the database does not exist, exit 2), and the log line names the cause, where
    it once named `ExceptionGroup: unhandled errors in a TaskGroup`, the cause only in the traceback."""
    database = dsn.rsplit("/", 1)[1]
    daemon = h.DaemonProcess(dsn, tmp_path / "daemon.log")
    try:
        await daemon.wait_for_log("daemon_started", timeout=30)
        admin = await asyncpg.connect(server.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        finally:
            await admin.close()
        assert await daemon.wait_exit(60) == 1, daemon.tail()
        failed = daemon.log_events("daemon_failed")
        assert failed and failed[0]["error"].startswith("InvalidCatalogNameError: "), daemon.tail()
        assert database in failed[0]["error"]
    finally:
        daemon.close()
