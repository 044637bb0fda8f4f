"""A soak: every kind of producer, and an operator's worst day, against real daemons, for minutes.

While producers of every kind write (racing writers with append_with_retry, rolled-back and long-open
transactions, transactions that write another table first, multi-row INSERTs and COPY, malformed
events, a transaction left open on another table throughout), a chaos loop does, in turn, what
operators and machines do to a daemon: kill -9, SIGTERM, every daemon connection terminated, a
second daemon started beside the first (a rolling deploy) and one of them stopped, `pgprojector
migrate` run again, the server crashed (immediate shutdown) and restarted. Then the chaos and the
producers stop, one daemon catches up, and the run checks:

- the witness projection (tests/daemon_harness.py) holds every committed event exactly once, and
  each aggregate's events in version order;
- every read model equals an independent fold of the whole log (tests/daemon_harness.py), and each
  projection parked exactly the events the fold says it must (`PGPROJECTOR_ON_ERROR=park`);
- every daemon ended as it was told: exit 0 after SIGTERM, none exited on its own;
- no producer failed other than by losing its connection.

It exits 0 when every check passes, 1 otherwise, and prints what it did. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the independent fold and the witness live with the tests

import daemon_harness as h  # noqa: E402
from run import create_database, drop_database  # noqa: E402  (bench/run.py, beside this file)
from witness import witness_problems  # noqa: E402

from pgprojector import EventStore, NewEvent, db  # noqa: E402
from pgprojector.embedded import EmbeddedPostgres  # noqa: E402
from pgprojector.logging import configure_logging  # noqa: E402
from pgprojector.migrations import migrate  # noqa: E402
from pgprojector.projection import load_projections  # noqa: E402
from pgprojector.retry import is_transient  # noqa: E402

PROJECTIONS = h.WITH_WITNESS  # orders, dashboard, analytics and the witness
BATCH_SIZES = (7, 200, 20000)  # each daemon life takes one at random
STOP_TIMEOUT = 20.0
SERVER_ACTIONS = ("server_crash", "server_restart")
ACTIONS = ("kill9", "sigterm", "cut", "second_daemon", "migrate", *SERVER_ACTIONS)

@dataclass
class Report:
    seed: int
    minutes: float
    produced: Counter[str] = field(default_factory=Counter)
    interrupted: Counter[str] = field(default_factory=Counter)  # producer steps cut short by a lost connection
    chaos: Counter[str] = field(default_factory=Counter)
    chaos_turns: int = 0  # turns in which every action was done once
    daemons_started: int = 0
    max_lag: int = 0
    events: int = 0
    orders: int = 0
    parked: dict[str, int] = field(default_factory=dict)
    final_catch_up_s: float = 0.0
    problems: list[str] = field(default_factory=list)


class Fleet:
    """The daemons running now; each one's end is checked against what was done to it."""

    def __init__(self, dsn: str, logdir: Path, rng: random.Random, report: Report) -> None:
        self.dsn, self.logdir, self.rng, self.report = dsn, logdir, rng, report
        self.running: list[h.DaemonProcess] = []

    def start(self) -> h.DaemonProcess:
        self.report.daemons_started += 1
        daemon = h.DaemonProcess(
            self.dsn, self.logdir / f"daemon-{self.report.daemons_started}.log", projections=PROJECTIONS,
            batch_size=str(self.rng.choice(BATCH_SIZES)), on_error="park", max_attempts="2",
            poll_interval="1", stop_timeout=str(STOP_TIMEOUT))
        self.running.append(daemon)
        return daemon

    def pick(self) -> h.DaemonProcess:
        if not self.running:
            self.start()
        return self.rng.choice(self.running)

    async def kill9(self, daemon: h.DaemonProcess) -> None:
        self.running.remove(daemon)
        exited = daemon.returncode  # it ended by itself before the watch saw it: that is no kill to ignore
        await daemon.kill9()
        if exited is not None:
            self.report.problems.append(f"daemon {daemon.log_path.name} exited {exited} on its own:\n{daemon.tail(15)}")
        daemon.close()

    async def stop(self, daemon: h.DaemonProcess) -> None:
        self.running.remove(daemon)
        # Its first log line comes after its signal handler is installed: in the fraction of a second
        # before, SIGTERM ends the process by the signal (which systemd counts as a clean stop too).
        deadline = time.monotonic() + 30
        while daemon.alive and not daemon.text() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if daemon.alive:
            daemon.send(signal.SIGTERM)
        try:
            code = await daemon.wait_exit(STOP_TIMEOUT + 10)
        except AssertionError as exc:
            code = None
            self.report.problems.append(str(exc))
        if code not in (0, None):
            self.report.problems.append(f"daemon {daemon.log_path.name} exited {code} after SIGTERM:\n{daemon.tail(15)}")
        daemon.close()

    def check_alive(self) -> None:
        """A daemon that exits without being told to is a failure (its service manager would restart it)."""
        for daemon in list(self.running):
            if not daemon.alive:
                self.running.remove(daemon)
                self.report.problems.append(
                    f"daemon {daemon.log_path.name} exited {daemon.returncode} on its own:\n{daemon.tail(15)}")
                daemon.close()
        if not self.running:
            self.start()


# --------------------------------------------------------------------------------------------
# Producers: each loops until `stop`, riding out lost connections (the server is crashed on purpose)
# --------------------------------------------------------------------------------------------

def life(order_id: int, rng: random.Random) -> list[NewEvent]:
    """A whole order life, as a command handler would decide it step by step."""
    events: list[NewEvent] = []
    step = h.next_step(None, rng)
    while step is not None:
        events.append(NewEvent(step, h.event_data(step, order_id, rng)))
        step = h.next_step(step, rng)
    return events


def corrupt(events: list[NewEvent], rng: random.Random) -> list[NewEvent]:
    """The same life with one event's data broken in one of the ways the contract refuses."""
    index = rng.randrange(len(events))
    data = dict(events[index].data)
    kind = events[index].event_type
    if kind == "OrderCreated":
        data[rng.choice(["total_amount", "user_id"])] = "not a number"
    elif kind == "OrderConfirmed":
        data["estimated_delivery"] = rng.choice(["tomorrow", "2024-13-01T10:00:00+00:00", "2024-03-01T10:00:00"])
    elif kind == "DriverAssigned":
        data.pop("driver_name")
    else:
        data["order_id"] = data["order_id"] + 1  # names another order than its aggregate
    events[index] = NewEvent(kind, data)
    return events


class Producers:
    def __init__(self, pool: asyncpg.Pool, rng: random.Random, report: Report, stop: asyncio.Event) -> None:
        self.pool, self.rng, self.report, self.stop = pool, rng, report, stop
        self.store = EventStore(pool)
        self.open_orders: list[int] = []
        self.next_id = {"racer": 1_000_000, "odd": 2_000_000, "bulk": 3_000_000, "copy": 4_000_000,
                        "malformed": 5_000_000, "long_open": 6_000_000}

    def new_id(self, kind: str) -> int:
        self.next_id[kind] += 1
        return self.next_id[kind]

    async def loop(self, kind: str, step: Callable[[random.Random], Awaitable[None]], pause: tuple[float, float]) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            try:
                await step(rng)
                self.report.produced[kind] += 1
            except Exception as exc:
                if not is_transient(exc):
                    self.report.problems.append(f"producer {kind} failed: {type(exc).__name__}: {exc}")
                    return
                self.report.interrupted[kind] += 1
                await asyncio.sleep(0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), rng.uniform(*pause))

    async def racer(self, rng: random.Random) -> None:
        """Several racers share the open orders: conflicts, re-reads, re-decisions."""
        if not self.open_orders or rng.random() < 0.3:
            order_id = self.new_id("racer")
            self.open_orders.append(order_id)
        else:
            order_id = rng.choice(self.open_orders)

        def decide(history: list[Any]) -> list[NewEvent]:
            step = h.next_step(history[-1].event_type if history else None, rng)
            return [] if step is None else [NewEvent(step, h.event_data(step, order_id, rng))]

        await self.store.append_with_retry(f"order_{order_id}", "order", decide, max_attempts=100)
        history = await self.store.read_stream(f"order_{order_id}")
        if history and history[-1].event_type in h.TERMINAL and order_id in self.open_orders:
            self.open_orders.remove(order_id)

    async def odd(self, rng: random.Random) -> None:
        """Its own transaction: rolled back, held open, or writing another table first."""
        how = rng.choice(["rolled_back", "held_open", "other_table_first"])
        order_id = self.new_id("odd")
        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                if how == "other_table_first":
                    await conn.execute("INSERT INTO soak_side_table VALUES ($1)", order_id)
                    await asyncio.sleep(rng.uniform(0.1, 1.0))
                await EventStore(conn).append(f"order_{order_id}", "order", life(order_id, rng)[:3],
                                              expected_version=0)
                await asyncio.sleep(rng.uniform(0.2, 2.0))
            except BaseException:
                with contextlib.suppress(Exception):
                    await tx.rollback()
                raise
            await (tx.rollback() if how == "rolled_back" else tx.commit())
        self.report.produced[how] += 1

    async def long_open(self, rng: random.Random) -> None:
        """One transaction holds its events uncommitted for seconds: the read horizon waits for it."""
        order_id = self.new_id("long_open")
        async with self.pool.acquire() as conn, conn.transaction():
            await EventStore(conn).append(f"order_{order_id}", "order", life(order_id, rng)[:2], expected_version=0)
            await asyncio.sleep(rng.uniform(3, 10))

    async def bulk(self, rng: random.Random) -> None:
        """Whole lives of many orders in one multi-row INSERT, as any SQL producer could write them."""
        first = self.next_id["bulk"] + 1
        self.next_id["bulk"] += 30
        await self._insert(h.plan_orders(30, rng, first_id=first, days=0.2), copy=False)

    async def copy(self, rng: random.Random) -> None:
        first = self.next_id["copy"] + 1
        self.next_id["copy"] += 30
        await self._insert(h.plan_orders(30, rng, first_id=first, days=0.2), copy=True)

    async def malformed(self, rng: random.Random) -> None:
        order_id = self.new_id("malformed")
        events = corrupt(life(order_id, rng), rng)
        await self.store.append(f"order_{order_id}", "order", events, expected_version=0)

    async def _insert(self, planned: list[h.Planned], copy: bool) -> None:
        async with self.pool.acquire() as conn:
            if not copy:
                await h.insert_planned(conn, planned)
                return
            await conn.copy_records_to_table(
                "events", columns=["aggregate_id", "aggregate_type", "event_type", "data", "version", "created_at"],
                records=[(p.aggregate_id, "order", p.event_type, json.dumps(p.data), p.version, p.created_at)
                         for p in planned])

    def all(self, racers: int) -> list[Awaitable[None]]:
        return [
            *(self.loop("racer", self.racer, (0.0, 0.05)) for _ in range(racers)),
            *(self.loop("odd", self.odd, (0.0, 0.3)) for _ in range(3)),
            self.loop("long_open", self.long_open, (5, 15)),
            self.loop("bulk", self.bulk, (0.5, 1.5)),
            self.loop("copy", self.copy, (1, 3)),
            self.loop("malformed", self.malformed, (2, 6)),
        ]


async def bystander(dsn: str, stop: asyncio.Event, report: Report) -> None:
    """A transaction open on another table the whole time (renewed after a server restart): it must
    not hold the projections back."""
    while not stop.is_set():
        try:
            conn = await db.connect(dsn, role="producer")
            try:
                tx = conn.transaction()
                await tx.start()
                await conn.execute("INSERT INTO soak_side_table VALUES (0)")
                while not stop.is_set():
                    await conn.execute("SELECT 1")  # notices a lost connection
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
                await tx.rollback()
            finally:
                conn.terminate()
        except Exception as exc:
            if not is_transient(exc):
                report.problems.append(f"bystander failed: {type(exc).__name__}: {exc}")
                return
            report.interrupted["bystander"] += 1
            await asyncio.sleep(0.5)


# --------------------------------------------------------------------------------------------
# Chaos
# --------------------------------------------------------------------------------------------

async def chaos(action: str, fleet: Fleet, server: EmbeddedPostgres | None, dsn: str) -> None:
    if action == "kill9":
        await fleet.kill9(fleet.pick())
    elif action == "sigterm":
        await fleet.stop(fleet.pick())
    elif action == "second_daemon":
        if len(fleet.running) < 2:
            fleet.start()
        else:
            await fleet.stop(fleet.pick())
    elif action == "cut":
        fleet.pick()
        conn = await asyncpg.connect(dsn, server_settings={"application_name": "soak-cutter"})
        try:
            await conn.fetch(h.CUT_DAEMON_CONNECTIONS)
        finally:
            await conn.close()
    elif action == "migrate":
        done = await asyncio.to_thread(h.run_cli, "migrate", dsn=dsn, timeout=120, projections=PROJECTIONS)
        if done.returncode != 0:
            fleet.report.problems.append(f"`pgprojector migrate` beside the daemons exited {done.returncode}: "
                                         f"{done.stderr[-2000:]}")
    elif action in SERVER_ACTIONS:
        assert server is not None
        await asyncio.to_thread(server.restart, crash=action == "server_crash")
    fleet.report.chaos[action] += 1


async def chaos_loop(fleet: Fleet, server: EmbeddedPostgres | None, dsn: str, every: float, rng: random.Random,
                     stop: asyncio.Event) -> None:
    actions = [a for a in ACTIONS if server is not None or a not in SERVER_ACTIONS]
    turn: list[str] = []
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 1.5) * every)
        if stop.is_set():
            return
        if not turn:  # every action once per turn, in a new order each turn
            turn = rng.sample(actions, len(actions))
        await chaos(turn.pop(), fleet, server, dsn)
        if not turn:
            fleet.report.chaos_turns += 1


async def watch(fleet: Fleet, conn_for: Callable[[], Awaitable[asyncpg.Connection]], stop: asyncio.Event) -> None:
    """Every second: no daemon ended on its own, no checkpoint went back, no projection halted."""
    last: dict[str, int] = {}
    report = fleet.report
    while not stop.is_set():
        fleet.check_alive()
        try:
            conn = await conn_for()
            try:
                top = await h.head(conn)
                for name, point in (await h.checkpoints(conn)).items():
                    if point["position"] < last.get(name, 0):
                        report.problems.append(f"{name}'s checkpoint went back from {last[name]} to {point['position']}")
                    if point["state"] == "halted":
                        report.problems.append(f"{name} halted (on_error=park): {point['last_error']}")
                        stop.set()
                    last[name] = point["position"]
                    report.max_lag = max(report.max_lag, top - point["position"])
            finally:
                await conn.close()
        except Exception as exc:
            if not is_transient(exc):
                raise
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------

async def verify(conn: asyncpg.Connection) -> list[str]:
    """Everything a caught-up database must show after the soak ([] when it does)."""
    problems = await witness_problems(conn)
    expected = h.fold(await h.read_log(conn), on_error="park")
    problems += h.compare(await h.read_models(conn), expected)
    for name in h.ALL_WITH_WITNESS:
        parked = sorted(r["event_position"] for r in await conn.fetch(
            "SELECT event_position FROM pgprojector_dead_letters WHERE projection = $1", name))
        if parked != expected.parked.get(name, []):
            problems.append(f"{name} parked {parked[:10]}... ({len(parked)}), the fold parks "
                            f"{expected.parked.get(name, [])[:10]}... ({len(expected.parked.get(name, []))})")
    top = await h.head(conn)
    behind = {name: p["position"] for name, p in (await h.checkpoints(conn)).items() if p["position"] != top}
    if behind:
        problems.append(f"checkpoints not at the head of the log ({top}): {behind}")
    return problems


async def sabotage(conn: asyncpg.Connection) -> None:
    """Proves the checks can fail: one event lost by the witness, one order's status wrong."""
    await conn.execute("DELETE FROM witness WHERE position = (SELECT max(position) FROM witness)")
    await conn.execute("UPDATE read_model_orders SET status = 'lost' WHERE order_id = (SELECT min(order_id) "
                       "FROM read_model_orders)")


# --------------------------------------------------------------------------------------------

async def soak(args: argparse.Namespace, dsn: str, server: EmbeddedPostgres | None, logdir: Path) -> Report:
    rng = random.Random(args.seed)
    report = Report(seed=args.seed, minutes=args.minutes)
    setup = await db.connect(dsn)
    try:
        await migrate(setup, "events", load_projections(PROJECTIONS.split(",")))
        await setup.execute("CREATE TABLE IF NOT EXISTS soak_side_table (x bigint)")
    finally:
        await setup.close()

    fleet = Fleet(dsn, logdir, rng, report)
    try:
        await _produce_and_check(args, dsn, server, fleet, rng, report)
    finally:
        for daemon in fleet.running:  # whatever failed, no daemon outlives the soak
            daemon.close()
    return report


async def _produce_and_check(args: argparse.Namespace, dsn: str, server: EmbeddedPostgres | None, fleet: Fleet,
                             rng: random.Random, report: Report) -> None:
    fleet.start()
    # (min_size 0: no floor for asyncpg to restore, with tracebacks, while the server is down)
    pool = await db.create_pool(dsn, role="producer", min_size=0, max_size=args.racers + 8)
    stop_producing, stop_watching = asyncio.Event(), asyncio.Event()
    producers = Producers(pool, rng, report, stop_producing)
    tasks = [asyncio.ensure_future(t) for t in [*producers.all(args.racers), bystander(dsn, stop_producing, report)]]
    if args.chaos_every > 0:
        tasks.append(asyncio.ensure_future(chaos_loop(fleet, server, dsn, args.chaos_every, rng, stop_producing)))
    watching = asyncio.ensure_future(watch(fleet, lambda: db.connect(dsn, role="soak"), stop_watching))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stop_watching.wait()), args.minutes * 60)  # set early if halted
        # (then until --min-turns whole turns of chaos are done, however slow the machine)
        while report.chaos_turns < args.min_turns and not stop_watching.is_set():
            await asyncio.sleep(0.2)
        stop_producing.set()
        await asyncio.gather(*tasks)
    except BaseException:
        stop_watching.set()
        for task in [*tasks, watching]:
            task.cancel()
        raise
    finally:
        stop_producing.set()
        await pool.close()

    conn = await db.connect(dsn, role="soak")
    try:
        started = time.monotonic()
        try:
            await h.wait_caught_up(conn, h.ALL_WITH_WITNESS, timeout=600, daemons=fleet.running)
        except AssertionError as exc:
            report.problems.append(f"the last daemons did not catch up: {exc}")
        report.final_catch_up_s = round(time.monotonic() - started, 2)
        stop_watching.set()
        await watching
        for daemon in list(fleet.running):
            await fleet.stop(daemon)
        if args.sabotage:
            await sabotage(conn)
        report.problems += await verify(conn)
        report.events = await h.head(conn)
        report.orders = await conn.fetchval("SELECT count(DISTINCT aggregate_id) FROM events")
        report.parked = {r["projection"]: r["n"] for r in await conn.fetch(
            "SELECT projection, count(*) AS n FROM pgprojector_dead_letters GROUP BY projection ORDER BY 1")}
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Exits 0 when every check passes, 1 otherwise. See bench/README.md.")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long producers and chaos run (default 10)")
    parser.add_argument("--chaos-every", type=float, default=8.0,
                        help="mean seconds between chaos actions (default 8; 0: no chaos)")
    parser.add_argument("--min-turns", type=int, default=0,
                        help="go on past --minutes until this many whole turns of chaos (every action once) are "
                             "done (default 0)")
    parser.add_argument("--racers", type=int, default=6, help="producers racing with append_with_retry (default 6)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run's random choices")
    parser.add_argument("--dsn", default=None,
                        help="an existing server (a fresh database is created on it and dropped after; "
                             "no server crashes then). Default: a private throwaway server")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--sabotage", action="store_true",
                        help="damage the results before the checks, to see them fail (exit 1)")
    args = parser.parse_args()
    configure_logging("warning", "console")  # the producers' retried conflicts are not news here
    if args.seed is None:
        args.seed = time.time_ns() % 2**32
    logdir = Path(tempfile.mkdtemp(prefix="pgprojector-soak-"))
    print(f"soak: {args.minutes} min, chaos every ~{args.chaos_every} s, seed {args.seed}, daemon logs in {logdir}",
          flush=True)
    if args.dsn:
        report = asyncio.run(_on_existing_server(args, logdir))
    else:
        # synchronous_commit on: a crashed server must keep every commit it acknowledged.
        with EmbeddedPostgres(settings={"synchronous_commit": "on"}) as server:
            report = asyncio.run(_on_own_server(args, server, logdir))
    summary = {key: (dict(value) if isinstance(value, Counter) else value) for key, value in vars(report).items()}
    print(json.dumps(summary, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    print("soak: PASSED" if not report.problems else f"soak: FAILED ({len(report.problems)} problems; logs in {logdir})")
    return 0 if not report.problems else 1


async def _on_own_server(args: argparse.Namespace, server: EmbeddedPostgres, logdir: Path) -> Report:
    _name, dsn = await create_database(server.dsn)
    return await soak(args, dsn, server, logdir)


async def _on_existing_server(args: argparse.Namespace, logdir: Path) -> Report:
    name, dsn = await create_database(args.dsn)
    try:
        return await soak(args, dsn, None, logdir)
    finally:
        await drop_database(args.dsn, name)


if __name__ == "__main__":
    sys.exit(main())
