"""Instructions per event, counted by callgrind: pgprojector's apply statements and the raw
baselines, deterministic where the benchmark's seconds are not. See bench/README.md.

    python bench/instructions.py [--events N] [--batches K] [--batch-size B] [--only orders,raw_orders] [--stages]

It fills a private cluster with the benchmark's workload, stops it, then runs each measured script
in `postgres --single` under `valgrind --tool=callgrind`, and the same script without the measured
statements; the difference, divided by the events the statements covered, is what it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from benchsql import queries
from run import ALL, fill

from pgprojector.embedded import EmbeddedPostgres
from pgprojector.projection import load_projections
from pgprojector.projections.order_events import APPLY_SETTINGS, APPLY_STATEMENTS, BATCH_BYTES_PER_POSITION

# What --only may name, besides the projections.
BASELINES = ("raw_orders", "raw_all_three")
COLLECTED = re.compile(r"Collected : (\d+)")


def single_user(server: EmbeddedPostgres, script: str, *, callgrind: Path | None = None) -> int | None:
    """Run `script` (statements ending ';' + a blank line) in a single-user backend; under callgrind,
    the instructions it took."""
    assert server.bindir is not None
    command = [str(server.bindir / "postgres"), "--single", "-j", "-D", str(server.data_dir), "postgres"]
    if callgrind is not None:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind}", *command]
    done = subprocess.run(command, input=script, text=True, capture_output=True, user=server.run_as, check=False)
    if done.returncode != 0 or "ERROR:" in done.stdout or "ERROR:" in done.stderr:
        raise RuntimeError(f"single-user backend failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if callgrind is None:
        return None
    found = COLLECTED.search(done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def statement(sql: str) -> str:
    return sql.strip().rstrip(";") + ";\n\n"


def measure(server: EmbeddedPostgres, work: Path, name: str, setup: str, prologue: str,
            steps: Sequence[tuple[str, str]]) -> int:
    """Instructions of `steps` (each (measured statement, what surrounds it)), less the same
    script without the measured statements; `setup` runs first, uncounted."""
    with_work = prologue + "".join(around.format(statement(measured)) for measured, around in steps)
    single_user(server, setup)
    counted = single_user(server, with_work, callgrind=work / f"{name}.callgrind")
    single_user(server, setup)
    without = prologue + "".join(around.format("") for _measured, around in steps)
    baseline = single_user(server, without, callgrind=work / f"{name}.empty.callgrind")
    assert counted is not None and baseline is not None
    return counted - baseline


def projection_steps(name: str, batches: int, batch_size: int,
                     stage: str | None = None) -> tuple[str, str, list[tuple[str, str]]]:
    """A built-in projection's apply statement over `batches` batches from the start of the log, each
    in its transaction with the projections' planner settings, from empty tables (the worker's own
    statements around it, checkpoint and horizon, are a few per batch and not counted). With
    `stage`, only that prefix of the statement is counted (see STAGES), each batch then applied
    whole, uncounted, so that every batch finds the tables as in a real catch-up."""
    (projection,) = load_projections([name])
    assert projection.event_types is not None
    # The event types the projection's own apply passes ($3): analytics wants four of the six.
    types = "ARRAY[{}]".format(", ".join(f"'{t}'" for t in sorted(projection.event_types)))
    setup = statement(f"TRUNCATE {', '.join(projection.tables)}")
    prologue = statement(f"PREPARE apply(bigint, bigint, text[]) AS {APPLY_STATEMENTS[name]}")
    settings = APPLY_SETTINGS.format(batch_bytes=batch_size * BATCH_BYTES_PER_POSITION)
    if stage is not None:
        prologue += statement(f"PREPARE stage(bigint, bigint, text[]) AS {stage_statement(name, stage)}")
    steps = []
    for n in range(batches):
        arguments = f"({n * batch_size}, {(n + 1) * batch_size}, {types})"
        # Measured: the statement, or the stage; with a stage, the whole statement follows, uncounted.
        measured, then = (f"EXECUTE apply{arguments}", "") if stage is None else (
            f"EXECUTE stage{arguments}", statement(f"EXECUTE apply{arguments}"))
        steps.append((measured, "BEGIN;\n\n" + statement(settings) + "{}" + then + "COMMIT;\n\n"))
    return setup, prologue, steps


# What --stages counts of each apply statement: its prefix through one CTE of the common head
# (sql/projections/queries.sql, checked_batch), read to the end by a count(*). By stage name: the
# CTE, and whether the batch's check is replaced by `true`.
STAGES = {"batch, unchecked": ("batch", True), "batch": ("batch", False), "summary": ("summary", False),
          "changed": ("changed", False)}
CHECK = re.compile(r"pgprojector_order_data_ok\(.*?::text\[\]\)", re.DOTALL)


def stage_statement(name: str, stage: str) -> str:
    """Projection `name`'s apply statement through the CTE of `stage`, then `SELECT count(*)` of it."""
    cte, unchecked = STAGES[stage]
    whole = APPLY_STATEMENTS[name]
    # Each of the head's CTEs ends with a line that starts with its closing parenthesis.
    prefix = whole[:whole.index("\n)", whole.index(f"{cte} AS ")) + 2]
    if unchecked:
        prefix, found = CHECK.subn("true", prefix, count=1)
        assert found == 1, "the batch's check was not found"
    return f"{prefix} SELECT count(*) FROM {cte}"


def baseline_steps(name: str) -> tuple[str, str, list[tuple[str, str]]]:
    sql = queries()
    built = {"raw_orders": ["baseline_orders_fast"],
             "raw_all_three": ["baseline_orders_fast", "baseline_dashboard", "baseline_daily"]}[name]
    setup = statement("TRUNCATE bench_base_orders, bench_base_dashboard, bench_base_daily")
    # As bench/run.py times it: one transaction, memory enough that the aggregate never spills.
    around = "BEGIN;\n\n" + statement("SET LOCAL work_mem = '256MB'") + "{}COMMIT;\n\n"
    return setup, "", [("".join(statement(sql[query]) for query in built).rstrip(";\n"), around)]


async def load(dsn: str, events: int) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await fill(conn, events)
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events in the log (default 200000)")
    parser.add_argument("--batches", type=int, default=10, help="batches each projection applies (default 10)")
    parser.add_argument("--batch-size", type=int, default=5000, help="positions per batch (default 5000)")
    parser.add_argument("--profiles", type=Path, metavar="DIR",
                        help="keep the callgrind profiles here (for callgrind_annotate), not in a temporary directory")
    parser.add_argument("--only", default=",".join((*BASELINES, *ALL)),
                        help="what to count, comma-separated (default: %(default)s)")
    parser.add_argument("--stages", action="store_true",
                        help="also count each projection's apply statement up to each stage of its common head")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - {*BASELINES, *ALL}
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}")
    with EmbeddedPostgres() as server, tempfile.TemporaryDirectory(prefix="pgprojector-callgrind-") as tmp:
        work = args.profiles or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if server.run_as:
            shutil.chown(work, server.run_as)
        logged = asyncio.run(load(server.dsn, args.events))
        server.stop_server()
        print(f"{logged} events; {args.batches} batches of {args.batch_size} positions for each projection")
        for name in chosen:
            if name in BASELINES:
                setup, prologue, steps = baseline_steps(name)
                events = logged
            else:
                setup, prologue, steps = projection_steps(name, args.batches, args.batch_size)
                events = min(logged, args.batches * args.batch_size)
            counted = measure(server, work, name, setup, prologue, steps)
            print(f"{name:>14}: {counted / events:>9,.0f} instructions/event ({counted:,} over {events:,} events)",
                  flush=True)
            if args.stages and name not in BASELINES:
                for stage in STAGES:
                    setup, prologue, steps = projection_steps(name, args.batches, args.batch_size, stage)
                    counted = measure(server, work, f"{name}.{stage.replace(', ', '_')}", setup, prologue, steps)
                    print(f"{'':>14}  up to {stage}: {counted / events:>9,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
