"""The benchmark tools still run, on a small log: `bench/run.py` builds every read model exactly as the
raw SQL baselines do (an independent check of the built-in projections against plain SQL), and
`bench/instructions.py` counts each apply statement, and a short `bench/soak.py` passes its checks (which
fail when its results are damaged). The measurements and the long soaks themselves live in bench/."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_benchmark_builds_the_read_models_the_raw_baselines_build(tmp_path):
    results = tmp_path / "results.json"
    run_tool("run.py", "--events", "3000", "--duration", "0", "--repeats", "1", "--batch-sizes", "200,1000",
             "--json", str(results))
    report = json.loads(results.read_text())
    assert report["dataset"]["events"] >= 3000 and report["dataset"]["fast_baseline_assumptions_hold"]
    assert [run["batch_size"] for run in report["all_three"]] == [200, 1000]
    for run in report["orders_only"] + report["all_three"]:
        assert all(run["equals_baseline"].values()) and run["events_per_s"] > 0
    assert set(report["all_three"][0]["equals_baseline"]) == {"orders", "dashboard", "analytics"}


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instruction_counts_of_each_apply_statement_and_baseline():
    output = run_tool("instructions.py", "--events", "2000", "--batches", "2", "--batch-size", "500",
                      "--only", "raw_orders,orders,dashboard").stdout
    counts = {name: int(count.replace(",", "")) for name, count in
              re.findall(r"^\s*(\w+):\s+([\d,]+) instructions/event", output, re.MULTILINE)}
    assert set(counts) == {"raw_orders", "orders", "dashboard"}
    # Every count is the work of the measured statements alone, so none is small, and `orders`,
    # which checks every field, does more than the raw build that checks none.
    assert all(count > 5_000 for count in counts.values())
    assert counts["orders"] > counts["raw_orders"]


def test_soak_survives_every_kind_of_chaos_and_checks_the_result(tmp_path):
    results = tmp_path / "soak.json"
    run_tool("soak.py", "--minutes", "0.4", "--min-turns", "1", "--chaos-every", "1.5", "--json", str(results))
    report = json.loads(results.read_text())
    assert report["problems"] == []
    # every action of the chaos loop (at least one whole turn, however slow the machine), and every kind
    # of producer, really ran
    assert report["chaos_turns"] >= 1
    assert set(report["chaos"]) == {"kill9", "sigterm", "cut", "second_daemon", "migrate", "server_crash",
                                    "server_restart"}, report["chaos"]
    assert {"racer", "odd", "bulk", "copy", "malformed"} <= set(report["produced"]), report["produced"]
    # (a step cut short by a server crash ran too; with a crash every few seconds, the longest may never finish)
    assert {"rolled_back", "held_open", "other_table_first", "long_open"} <= (
        set(report["produced"]) | set(report["interrupted"])), report
    assert report["events"] > 1000 and report["daemons_started"] >= 3
    assert report["parked"].get("orders", 0) >= 1 and "witness" not in report["parked"]


def test_soak_fails_when_the_results_are_wrong(tmp_path):
    results = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(BENCH / "soak.py"), "--minutes", "0.1", "--chaos-every", "0",
                           "--sabotage", "--json", str(results)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    problems = "\n".join(json.loads(results.read_text())["problems"])
    assert "never reached the witness" in problems and "read_model_orders" in problems, problems
    assert "soak: FAILED" in done.stdout


async def test_soak_reports_a_daemon_that_exited_on_its_own_when_chaos_picks_it_for_kill_9(dsn, tmp_path):
    """A daemon that exits by itself is a failure, seen by the watch each second; but one picked for
    kill -9 meanwhile was killed "again" and its exit code dropped: the soak passed."""
    sys.path.insert(0, str(BENCH))
    import soak

    report = soak.Report(seed=0, minutes=0)
    fleet = soak.Fleet(dsn.rsplit("/", 1)[0] + "/no_such_database", tmp_path, random.Random(0), report)
    daemon = fleet.start()
    assert await daemon.wait_exit(30) == 2, daemon.tail()
    await fleet.kill9(daemon)
    assert len(report.problems) == 1 and "exited 2 on its own" in report.problems[0], report.problems
