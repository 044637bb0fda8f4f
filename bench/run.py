"""pgprojector benchmark: catch-up throughput and commit-to-read-model latency, each beside a raw
asyncpg baseline measured in the same run, printed as a ratio. See bench/README.md.

    python bench/run.py [--events N] [--dsn DSN] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import platform
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from anyio.abc import Process
from benchsql import queries
from workload import COPY_COLUMNS, Workload

from pgprojector import db
from pgprojector.daemon import Daemon
from pgprojector.embedded import EmbeddedPostgres
from pgprojector.listener import Wakeup
from pgprojector.logging import configure_logging
from pgprojector.migrations import migrate
from pgprojector.projection import Projection, load_projections
from pgprojector.settings import Settings
from pgprojector.worker import ProjectionWorker

BENCH_DIR = Path(__file__).resolve().parent
ALL = ("orders", "dashboard", "analytics")
TARGET_CATCH_UP_RATIO = 0.5
TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
VISIBLE_CHANNEL = "bench_visible"
# Each read model pgprojector builds, and the raw baselines' copy of it.
ORDERS_TABLES = ("read_model_orders", "bench_base_orders")
ALL_TABLES = {"orders": ORDERS_TABLES, "dashboard": ("read_model_dashboard", "bench_base_dashboard"),
              "analytics": ("read_model_restaurant_daily", "bench_base_daily")}


def now() -> float:
    return time.perf_counter()


def with_database(dsn: str, database: str) -> str:
    base, _, query = dsn.partition("?")
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def backend_cpu(pids: Sequence[int]) -> float | None:
    """CPU seconds (user + system) used so far by these server backends, when the server runs on
    this machine (the embedded one does); None when it cannot be read."""
    total = 0.0
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
                return None
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 2)


def cpu_ratio(baseline: dict[str, Any], run: dict[str, Any]) -> float | None:
    """Raw baseline's CPU seconds over pgprojector's (client + server): steadier than wall-clock
    ratios when the machine is shared. The baseline's client does nothing but wait."""
    if baseline.get("server_cpu_s") is None or run.get("server_cpu_s") is None:
        return None
    if not run["client_cpu_s"] + run["server_cpu_s"]:
        return None  # a run too short for /proc's clock ticks (10 ms) to count (the tests' small logs)
    return round(baseline["server_cpu_s"] / (run["client_cpu_s"] + run["server_cpu_s"]), 3)


async def median_run(conn: asyncpg.Connection, repeats: int, run_once: Callable[[int], Awaitable[dict[str, Any]]],
                     read_models: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """`run_once(repeat)` `repeats` times, each run's read models compared with the baselines'
    (`read_models`: name -> (pgprojector's table, the baseline's)): the run of median duration,
    with every run's seconds, and per read model whether every run built it right.

    Each run also sits between two builds by the raw baselines (the one after a run is the one before
    the next): `paired_ratio` is, per baseline, the median over the runs of (the mean of the two raw
    builds' seconds) / (the run's seconds). On a shared machine whose speed drifts over minutes, a
    ratio of builds a few seconds apart is steadier than one of medians taken minutes apart."""
    runs = []
    before = await raw_builds(conn)
    for repeat in range(repeats):
        run = await run_once(repeat)
        after = await raw_builds(conn)
        run["raw_around_s"] = {name: round((before[name] + after[name]) / 2, 3) for name in before}
        before = after
        run["equals_baseline"] = {name: await table_difference(conn, *tables) == 0
                                  for name, tables in read_models.items()}
        runs.append(run)
    chosen = dict(sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2])
    chosen["runs_s"] = [run["seconds"] for run in runs]
    chosen["raw_around_s"] = [run["raw_around_s"] for run in runs]
    chosen["paired_ratio"] = {name: round(median([run["raw_around_s"][name] / run["seconds"] for run in runs]), 3)
                              for name in before}
    chosen["equals_baseline"] = {name: all(run["equals_baseline"][name] for run in runs) for name in read_models}
    return chosen


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# ---------------------------------------------------------------------------------------------
# Set-up: a fresh database, migrated, filled with order lives


async def create_database(admin_dsn: str) -> tuple[str, str]:
    name = f"pgprojector_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name, with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def fill(conn: asyncpg.Connection, events: int) -> dict[str, Any]:
    """Migrate, append ~`events` order events (COPY: the row trigger assigns positions and checks
    versions; rows go in created_at order, so each order's versions arrive in order).
    `conn` is a plain asyncpg connection: JSON goes in as text."""
    await migrate(conn, "events", load_projections(ALL))
    await conn.execute(queries()["scratch_tables"])
    started = now()
    rows, orders = Workload().log(events)
    generated = now() - started
    started = now()
    for chunk in range(0, len(rows), 50_000):
        await conn.copy_records_to_table("events", records=rows[chunk:chunk + 50_000], columns=COPY_COLUMNS)
    inserted = now() - started
    await conn.execute("VACUUM (ANALYZE) events")
    shape = dict(await conn.fetchrow(queries()["dataset_shape"]))
    by_type = {r["event_type"]: r["n"] for r in await conn.fetch(
        "SELECT event_type, count(*) AS n FROM events GROUP BY 1 ORDER BY 1")}
    span = await conn.fetchrow("SELECT min(created_at) AS first, max(created_at) AS last, "
                               "count(DISTINCT (created_at AT TIME ZONE 'UTC')::date) AS days, "
                               "count(DISTINCT data->>'restaurant_id') AS restaurants FROM events")
    size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('events'))")
    return {
        "events": len(rows), "orders": orders, "by_type": by_type, "generate_s": round(generated, 2),
        "insert_s": round(inserted, 2), "first_event": span["first"].isoformat(),
        "last_event": span["last"].isoformat(), "utc_days": span["days"], "restaurants": span["restaurants"],
        "events_table_size": size, "shape": shape,
        "fast_baseline_assumptions_hold": shape["not_one_created"] == 0 and shape["repeated_fields"] == 0
        and shape["time_going_back"] == 0,
    }


async def table_difference(conn: asyncpg.Connection, left: str, right: str) -> int:
    """Rows in one table and not the other (as multisets), both ways: 0 means the same rows."""
    return await conn.fetchval(
        f"SELECT (SELECT count(*) FROM (TABLE {left} EXCEPT ALL TABLE {right}) a)"
        f" + (SELECT count(*) FROM (TABLE {right} EXCEPT ALL TABLE {left}) b)")


# ---------------------------------------------------------------------------------------------
# Catch-up


async def time_baseline(conn: asyncpg.Connection, tables: Sequence[str],
                        statements: Sequence[str]) -> tuple[float, float | None]:
    """(seconds, server CPU seconds) of one build of `tables` by `statements`, in one transaction."""
    await conn.execute(f"TRUNCATE {', '.join(tables)}")
    await conn.execute("CHECKPOINT")
    cpu_before = backend_cpu([conn.get_server_pid()])
    started = now()
    async with conn.transaction():
        # The baseline may use all the memory it likes: in memory, the aggregate never spills.
        await conn.execute("SET LOCAL work_mem = '256MB'")
        for statement in statements:
            await conn.execute(statement)
    return now() - started, cpu_delta(cpu_before, backend_cpu([conn.get_server_pid()]))


def baseline_variants() -> dict[str, tuple[list[str], list[str]]]:
    """The raw builds, by name: (the scratch tables they fill, their statements)."""
    sql = queries()
    return {
        "orders_fast": (["bench_base_orders"], [sql["baseline_orders_fast"]]),
        "orders_general": (["bench_base_general_orders"], [sql["baseline_orders_general"]]),
        "all_three": (["bench_base_orders", "bench_base_dashboard", "bench_base_daily"],
                      [sql["baseline_orders_fast"], sql["baseline_dashboard"], sql["baseline_daily"]]),
    }


async def raw_builds(conn: asyncpg.Connection) -> dict[str, float]:
    """Seconds of one raw build of the orders table (the fast variant) and one of all three read models."""
    variants = baseline_variants()
    return {name: (await time_baseline(conn, *variants[variant]))[0]
            for name, variant in (("orders", "orders_fast"), ("all_three", "all_three"))}


async def catch_up_baselines(conn: asyncpg.Connection, events: int, repeats: int) -> dict[str, Any]:
    variants = baseline_variants()
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float | None]] = {name: [] for name in variants}
    for repeat in range(repeats):  # interleaved, so that a noisy neighbour hurts all of them alike
        for name, (tables, statements) in variants.items():
            if name == "orders_general" and repeat > 0:
                continue  # a reference for the fast one, slower by construction: once is enough
            elapsed, cpu = await time_baseline(conn, tables, statements)
            times[name].append(elapsed)
            cpus[name].append(cpu)
    result: dict[str, Any] = {}
    for name, runs in times.items():
        known = [c for c in cpus[name] if c is not None]
        result[name] = {"seconds": round(median(runs), 3), "runs_s": [round(t, 3) for t in runs],
                        "events_per_s": round(events / median(runs)),
                        "server_cpu_s": round(median(known), 2) if known else None}
    fastest = min(("orders_fast", "orders_general"), key=lambda name: result[name]["seconds"])
    result["orders"] = {**result[fastest], "variant": fastest}
    # The last all_three run left bench_base_orders, _dashboard and _daily filled; _general_orders too.
    result["general_equals_fast"] = await table_difference(conn, "bench_base_orders", "bench_base_general_orders") == 0
    return result


async def reset_projections(conn: asyncpg.Connection, projections: Sequence[Projection]) -> None:
    tables = [table for projection in projections for table in projection.tables]
    await conn.execute(f"TRUNCATE {', '.join(tables)}")
    await conn.execute(
        "UPDATE pgprojector_projections SET position = 0, state = 'running', halted_at_position = NULL, "
        "last_error = NULL, updated_at = now() WHERE name = ANY($1)", [p.name for p in projections])
    await conn.execute("CHECKPOINT")


async def catch_up_worker(dsn: str, conn: asyncpg.Connection, projection: Projection, batch_size: int,
                          profile: Path | None) -> dict[str, Any]:
    """(b): one projection from checkpoint 0, through pgprojector's own worker, batch after batch."""
    await reset_projections(conn, [projection])
    pool = await db.create_pool(dsn, role="bench-catchup", min_size=1, max_size=1)
    try:
        async with pool.acquire() as pooled:
            backend = pooled.get_server_pid()
        worker = ProjectionWorker(pool, projection, batch_size=batch_size, poll_interval=1.0, on_error="halt",
                                  max_attempts=1, stopping=anyio.Event(), wakeup=Wakeup())
        batch_ms: list[float] = []
        profiler = cProfile.Profile() if profile else None
        server_before, client_before = backend_cpu([backend]), time.process_time()
        started = now()
        if profiler:
            profiler.enable()
        while True:
            batch_started = now()
            batch = await worker.apply_next_batch()
            batch_ms.append((now() - batch_started) * 1000)
            if batch.inactive:  # the checkpoint is not 'running' (halted?)
                raise RuntimeError(f"projection {projection.name} stopped applying events during the benchmark")
            if batch.caught_up:
                break
        elapsed = now() - started
        client_cpu = time.process_time() - client_before
        server_cpu = cpu_delta(server_before, backend_cpu([backend]))
        if profiler:
            profiler.disable()
            assert profile is not None
            profiler.dump_stats(str(profile))
            say(f"  cProfile of orders catch-up, batch {batch_size} (written to {profile}):")
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(18)
    finally:
        await pool.close()
    applied = worker.events_applied
    tenth = max(1, len(batch_ms) // 10)
    return {"batch_size": batch_size, "seconds": round(elapsed, 3), "events": applied,
            "events_per_s": round(applied / elapsed), "client_cpu_s": round(client_cpu, 2),
            "server_cpu_s": server_cpu, "batches": len(batch_ms),
            "batch_ms_mean": round(sum(batch_ms) / len(batch_ms), 1),
            "batch_ms_first_tenth": round(sum(batch_ms[:tenth]) / tenth, 1),
            "batch_ms_last_tenth": round(sum(batch_ms[-tenth - 1:-1] or batch_ms) / tenth, 1),
            "profiled": profile is not None}


async def catch_up_daemon(dsn: str, conn: asyncpg.Connection, projections: Sequence[Projection],
                          batch_size: int, head: int) -> dict[str, Any]:
    """(c): the projections side by side in pgprojector's Daemon, in this process, from 0 to the head."""
    await reset_projections(conn, projections)
    settings = Settings(dsn=dsn, batch_size=batch_size, projections=",".join(p.name for p in projections),
                        log_level="warning", log_format="json")
    daemon = Daemon(settings, projections)
    finished: dict[str, float] = {}

    async def until_caught_up(worker: ProjectionWorker) -> None:
        await worker.caught_up_once.wait()
        finished[worker.projection.name] = now() - started

    async with anyio.create_task_group() as tasks:
        client_before = time.process_time()
        started = now()
        tasks.start_soon(daemon.run)
        # The workers' own signal, not a query every few ms that would compete with them for the cores.
        while not daemon.workers:
            await anyio.sleep(0.005)
        async with anyio.create_task_group() as waiting:
            for worker in daemon.workers:
                waiting.start_soon(until_caught_up, worker)
        client_cpu = time.process_time() - client_before
        behind = await conn.fetch("SELECT name, state, position FROM pgprojector_projections "
                                  "WHERE name = ANY($1) AND (position < $2 OR state <> 'running')",
                                  [p.name for p in projections], head)
        if behind:  # caught_up_once is also set by a halted projection
            raise RuntimeError(f"projections stopped short of the head of the log: {[dict(r) for r in behind]}")
        backends = [r["pid"] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgprojector-daemon%' "
            "AND datname = current_database()")]
        server_cpu = backend_cpu(backends)
        daemon.request_stop()
    elapsed = max(finished.values())
    events = await conn.fetchval("SELECT count(*) FROM events")
    return {"batch_size": batch_size, "seconds": round(elapsed, 3), "events_per_s": round(events / elapsed),
            "client_cpu_s": round(client_cpu, 2), "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
            "per_projection_s": {name: round(t, 3) for name, t in sorted(finished.items())}}


# ---------------------------------------------------------------------------------------------
# Latency


class Visibility:
    """LISTENs on bench_visible: when did (table, order_id, version) become visible?"""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int, int], float] = {}

    def on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        at = now()
        table, order_id, version = payload.split(" ")
        self.seen.setdefault((table, int(order_id), int(version)), at)


@asynccontextmanager
async def subprocess_running(command: list[str], env: dict[str, str],
                             ready: Callable[[Process], Awaitable[bool]]) -> AsyncIterator[Process]:
    """Start `command`, wait until `ready(process)`, yield the process, SIGTERM it (and wait) on exit."""
    with tempfile.TemporaryFile() as log:
        process = await anyio.open_process(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=log)
        try:
            started = False
            with anyio.move_on_after(30):
                while process.returncode is None and not started:
                    started = await ready(process)
                    await anyio.sleep(0.05)
            if not started:
                log.seek(0)
                raise RuntimeError(f"{' '.join(command[:4])} did not start; its stderr:\n"
                                   f"{log.read().decode(errors='replace')[-2000:]}")
            yield process
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(15):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


async def trickle(producer: asyncpg.Connection, feed: Any, visibility: Visibility, table: str, rate: float,
                  duration: float, warmup: int) -> dict[str, Any]:
    """Append single events at `rate`/s for `duration` s; latency = COMMIT returned -> row visible in `table`."""
    insert = ("INSERT INTO events (aggregate_id, aggregate_type, event_type, data, version) "
              "VALUES ($1, 'order', $2, $3::jsonb, $4)")
    committed: dict[tuple[str, int, int], float] = {}
    started = now()
    count = int(rate * duration) + warmup
    for i in range(count):
        delay = started + i / rate - now()
        if delay > 0:
            await asyncio.sleep(delay)
        aggregate_id, version, event_type, data = next(feed)
        await producer.execute(insert, aggregate_id, event_type, data, version)
        if i >= warmup:
            committed[(table, int(aggregate_id.removeprefix("order_")), version)] = now()
    produced_s = now() - started
    deadline = now() + 5
    while now() < deadline and any(key not in visibility.seen for key in committed):
        await asyncio.sleep(0.05)
    latencies = sorted((visibility.seen[key] - at) * 1000 for key, at in committed.items() if key in visibility.seen)
    missing = sum(1 for key in committed if key not in visibility.seen)
    result: dict[str, Any] = {"samples": len(latencies), "missing": missing, "rate_per_s": rate,
                              "achieved_rate_per_s": round(count / produced_s, 1)}
    if latencies:
        result.update({
            "p50_ms": round(percentile(latencies, 50), 2), "p95_ms": round(percentile(latencies, 95), 2),
            "p99_ms": round(percentile(latencies, 99), 2), "max_ms": round(latencies[-1], 2),
            "mean_ms": round(sum(latencies) / len(latencies), 2), "min_ms": round(latencies[0], 2),
        })
    return result


async def latency(dsn: str, conn: asyncpg.Connection, rate: float, duration: float, warmup: int) -> dict[str, Any]:
    await conn.execute(queries()["visibility_triggers"])
    head_order = await conn.fetchval("SELECT max((data->>'order_id')::bigint) FROM events")
    workload = Workload(seed=7)

    def feed(run: int) -> Any:
        """Fresh orders for each run, so that the raw consumer never meets an order created before it started."""
        return workload.trickle(first_order_id=head_order + 1 + run * 1_000_000)

    visibility = Visibility()
    listener = await asyncpg.connect(dsn, server_settings={"application_name": "pgprojector-bench-visible"})
    producer = await asyncpg.connect(dsn, server_settings={"application_name": "pgprojector-bench-producer"})
    await listener.add_listener(VISIBLE_CHANNEL, visibility.on_notify)
    results: dict[str, Any] = {}
    try:
        for run, (label, projections) in enumerate((("pgprojector_all_three", ALL),
                                                    ("pgprojector_orders_only", ("orders",)))):
            env = {**os.environ, "PGPROJECTOR_DSN": dsn, "PGPROJECTOR_PROJECTIONS": ",".join(projections),
                   "PGPROJECTOR_LOG_LEVEL": "warning", "PGPROJECTOR_LOG_FORMAT": "json"}

            async def daemon_ready(process: Process, names: Sequence[str] = projections) -> bool:
                registered = await conn.fetchval("SELECT count(*) FROM pgprojector_daemons WHERE pid = $1", process.pid)
                behind = await conn.fetchval(
                    "SELECT count(*) FROM pgprojector_projections WHERE name = ANY($1) "
                    "AND position < (SELECT coalesce(max(position), 0) FROM events)", list(names))
                return registered > 0 and behind == 0

            async with subprocess_running([sys.executable, "-m", "pgprojector", "run"], env, daemon_ready):
                await asyncio.sleep(1.0)  # idle: listener connected, workers waiting
                results[label] = await trickle(producer, feed(run), visibility, "read_model_orders", rate, duration,
                                               warmup)
            say(f"  {label}: {fmt_latency(results[label])}")

        raw_started = anyio.Event()

        async def raw_ready(process: Process) -> bool:
            if not raw_started.is_set():
                assert process.stdout is not None
                with contextlib.suppress(anyio.EndOfStream):
                    if (await process.stdout.receive()).strip() == b"ready":
                        raw_started.set()
            return raw_started.is_set()

        async with subprocess_running([sys.executable, str(BENCH_DIR / "raw_consumer.py"), dsn, "events"],
                                      dict(os.environ), raw_ready):
            await asyncio.sleep(1.0)
            results["raw"] = await trickle(producer, feed(2), visibility, "bench_raw_orders", rate, duration, warmup)
        say(f"  raw asyncpg: {fmt_latency(results['raw'])}")
        raw_vs_model = await conn.fetchval(
            "SELECT count(*) FROM bench_raw_orders r JOIN read_model_orders m USING (order_id)")
        results["raw_orders_rows"] = await conn.fetchval("SELECT count(*) FROM bench_raw_orders")
        results["raw_rows_also_in_read_model"] = raw_vs_model
    finally:
        await listener.close()
        await producer.close()
    return results


def fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.1%}"


def fmt_latency(result: dict[str, Any]) -> str:
    if not result.get("samples"):
        return f"no samples ({result.get('missing')} missing)"
    return (f"p50 {result['p50_ms']:.2f} ms  p95 {result['p95_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
            f"max {result['max_ms']:.2f} ms  ({result['samples']} samples, {result['missing']} missing)")


# ---------------------------------------------------------------------------------------------
# The run


async def server_facts(conn: asyncpg.Connection) -> dict[str, Any]:
    facts = {"server_version": await conn.fetchval("SHOW server_version")}
    for setting in ("synchronous_commit", "fsync", "shared_buffers", "work_mem", "max_parallel_workers_per_gather"):
        facts[setting] = await conn.fetchval(f"SHOW {setting}")
    return facts


async def bench(admin_dsn: str, args: argparse.Namespace, embedded: bool) -> dict[str, Any]:
    name, dsn = await create_database(admin_dsn)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "server": "embedded" if embedded else "given DSN",
        "python": platform.python_version(), "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        "batch_sizes": args.batch_sizes,
    }
    conn = await db.connect(dsn, role="bench")
    try:
        results["postgres"] = await server_facts(conn)
        say(f"PostgreSQL {results['postgres']['server_version']} ({results['server']}, synchronous_commit="
            f"{results['postgres']['synchronous_commit']}, fsync={results['postgres']['fsync']}); "
            f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        say(f"generating and inserting ~{args.events:,} events ...")
        raw_conn = await asyncpg.connect(dsn)  # plain codecs, for COPY
        try:
            results["dataset"] = dataset = await fill(raw_conn, args.events)
        finally:
            await raw_conn.close()
        events = dataset["events"]
        head = await conn.fetchval("SELECT max(position) FROM events")
        say(f"  {events:,} events, {dataset['orders']:,} orders, {dataset['restaurants']} restaurants, "
            f"{dataset['utc_days']} UTC days, {dataset['shape']['lives_crossing_midnight_utc']} lives crossing "
            f"midnight; generated in {dataset['generate_s']} s, inserted in {dataset['insert_s']} s "
            f"(not measured); {dataset['events_table_size']}")

        say("catch-up: raw set-based SQL baselines ...")
        results["baseline"] = base = await catch_up_baselines(conn, events, args.repeats)
        say(f"  orders, fast ({base['orders_fast']['runs_s']} s, server CPU {base['orders_fast']['server_cpu_s']} s): "
            f"{base['orders_fast']['events_per_s']:,} events/s; "
            f"general ({base['orders_general']['runs_s']} s): {base['orders_general']['events_per_s']:,} events/s; "
            f"all three read models: {base['all_three']['events_per_s']:,} events/s; "
            f"fast == general: {base['general_equals_fast']}")

        orders, all_three = load_projections(["orders"])[0], load_projections(ALL)
        results["orders_only"] = []
        for i, batch_size in enumerate(args.batch_sizes):
            say(f"catch-up: pgprojector orders projection alone, batch {batch_size} ...")
            profile = args.profile if args.profile and i == 0 else None
            run = await median_run(conn, args.repeats, lambda repeat: catch_up_worker(
                dsn, conn, orders, batch_size, profile if repeat == 0 else None), {"orders": ORDERS_TABLES})
            run["ratio"] = round(run["events_per_s"] / base["orders"]["events_per_s"], 3)
            run["paired_ratio_to_orders_baseline"] = run["paired_ratio"]["orders"]
            run["cpu_ratio"] = cpu_ratio(base["orders"], run)
            results["orders_only"].append(run)
            say(f"  {run['events_per_s']:,} events/s (median of {run['runs_s']} s, {run['batches']} batches, "
                f"{run['batch_ms_mean']} ms each; CPU s: client {run['client_cpu_s']}, server "
                f"{run['server_cpu_s']}); ratio to raw {run['ratio']:.1%}, paired {run['paired_ratio']['orders']:.1%} "
                f"(CPU ratio {fmt_ratio(run['cpu_ratio'])}); "
                f"same rows as baseline: {run['equals_baseline']['orders']}")

        results["all_three"] = []
        for batch_size in args.batch_sizes:
            say(f"catch-up: pgprojector daemon, all three projections, batch {batch_size} ...")
            run = await median_run(conn, args.repeats, lambda _: catch_up_daemon(
                dsn, conn, all_three, batch_size, head), ALL_TABLES)
            run["ratio_to_orders_baseline"] = round(run["events_per_s"] / base["orders"]["events_per_s"], 3)
            run["ratio_to_all_three_baseline"] = round(run["events_per_s"] / base["all_three"]["events_per_s"], 3)
            run["cpu_ratio_to_all_three_baseline"] = cpu_ratio(base["all_three"], run)
            results["all_three"].append(run)
            say(f"  {run['events_per_s']:,} events/s (median of {run['runs_s']} s; per projection {run['per_projection_s']}; "
                f"CPU s: client {run['client_cpu_s']}, server {run['server_cpu_s']}); "
                f"ratio to raw orders {run['ratio_to_orders_baseline']:.1%} (paired "
                f"{run['paired_ratio']['orders']:.1%}), to raw all-three {run['ratio_to_all_three_baseline']:.1%} "
                f"(paired {run['paired_ratio']['all_three']:.1%}; CPU ratio "
                f"{fmt_ratio(run['cpu_ratio_to_all_three_baseline'])}); "
                f"same rows as baselines: {run['equals_baseline']}")

        if args.duration > 0:
            say(f"latency: {args.rate:g} events/s for {args.duration:g} s per run, idle daemon ...")
            results["latency"] = await latency(dsn, conn, args.rate, args.duration, args.warmup)
    finally:
        await conn.close()
        results["load_average_at_end"] = os.getloadavg()
        if args.keep:
            say(f"kept database {name}: {db.redact_dsn(dsn)}")
        elif not embedded:
            await drop_database(admin_dsn, name)
    return results


def summary(results: dict[str, Any]) -> list[str]:
    base = results["baseline"]
    dataset = results["dataset"]
    lines = ["", "=" * 100, "SUMMARY", "=" * 100]
    lines.append(f"catch-up over {dataset['events']:,} events ({dataset['orders']:,} orders); "
                 f"target: pgprojector >= {TARGET_CATCH_UP_RATIO:.0%} of the raw baseline's events/s")
    for label, run in ((f"raw SQL, orders ({base['orders']['variant']})", base["orders"]),
                       ("raw SQL, all three read models", base["all_three"])):
        lines.append(f"  {label:<46} {run['events_per_s']:>9,} ev/s  (server CPU {run['server_cpu_s']} s)")
    for run in results["orders_only"]:
        paired = run["paired_ratio"]["orders"]
        verdict = "meets" if paired >= TARGET_CATCH_UP_RATIO else "BELOW"
        lines.append(f"  {'pgprojector orders, batch ' + str(run['batch_size']):<46} {run['events_per_s']:>9,} ev/s  "
                     f"ratio {run['ratio']:6.1%}, paired {paired:6.1%} (CPU {fmt_ratio(run['cpu_ratio'])})  "
                     f"{verdict} target  "
                     f"rows equal: {all(run['equals_baseline'].values())}")
    for run in results["all_three"]:
        paired = run["paired_ratio"]
        verdict = "meets" if paired["orders"] >= TARGET_CATCH_UP_RATIO else "BELOW"
        lines.append(f"  {'pgprojector daemon, all three, batch ' + str(run['batch_size']):<46} "
                     f"{run['events_per_s']:>9,} ev/s  ratio {run['ratio_to_orders_baseline']:6.1%}, paired "
                     f"{paired['orders']:6.1%} (vs raw orders); {run['ratio_to_all_three_baseline']:6.1%}, paired "
                     f"{paired['all_three']:6.1%} (vs raw all three; CPU "
                     f"{fmt_ratio(run['cpu_ratio_to_all_three_baseline'])})  {verdict} target (vs raw orders)  "
                     f"rows equal: {all(run['equals_baseline'].values())}")
    lat = results.get("latency")
    if lat:
        lines.append(f"commit -> visible in the orders read model, {lat['raw']['rate_per_s']:g} events/s trickle; "
                     f"target p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms")
        raw = lat["raw"]
        for label in ("pgprojector_all_three", "pgprojector_orders_only", "raw"):
            run = lat[label]
            line = f"  {label:<26} {fmt_latency(run)}"
            if label != "raw" and run.get("samples") and raw.get("samples"):
                ok = run["p50_ms"] <= TARGET_P50_MS and run["p99_ms"] <= TARGET_P99_MS
                line += (f"\n  {'':<26} ratio to raw: p50 x{run['p50_ms'] / raw['p50_ms']:.1f}, "
                         f"p99 x{run['p99_ms'] / raw['p99_ms']:.1f}  {'meets' if ok else 'MISSES'} target")
            lines.append(line)
    lines.append(f"load average at start {results['load_average_at_start'][0]:.2f}, "
                 f"at end {results['load_average_at_end'][0]:.2f} ({results['cpus']} CPUs)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events in the log (default 200000)")
    parser.add_argument("--dsn", default=os.environ.get("PGPROJECTOR_BENCH_DSN"),
                        help="a server to use (a fresh database is created and dropped in it) "
                             "[PGPROJECTOR_BENCH_DSN; default: a private embedded server]")
    parser.add_argument("--json", type=Path, help="also write the results here, as JSON")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[5000, 20000],
                        help="catch-up batch sizes to try, comma-separated (default 5000,20000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each raw baseline and of each pgprojector catch-up; the median counts")
    parser.add_argument("--rate", type=float, default=25.0, help="trickle rate, events/s (default 25)")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="seconds of trickle per latency run (default 15; 0 skips latency)")
    parser.add_argument("--warmup", type=int, default=20, help="first trickle events not counted (default 20)")
    parser.add_argument("--profile", type=Path, help="cProfile the first orders catch-up into this file")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database (with --dsn)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning", "json")
    if args.dsn:
        results = asyncio.run(bench(args.dsn, args, embedded=False))
    else:
        with EmbeddedPostgres() as server:
            results = asyncio.run(bench(server.dsn, args, embedded=True))
    for line in summary(results):
        say(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        say(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
