"""Shared by the tests: running the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys


def cli_env(dsn: str | None = None, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PGPROJECTOR_")}
    if dsn is not None:
        env["PGPROJECTOR_DSN"] = dsn
    env.update({f"PGPROJECTOR_{key.upper()}": value for key, value in settings.items()})
    return env


def run_cli(*args: str, dsn: str | None = None, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgprojector", *args], env=cli_env(dsn, **settings),
                          capture_output=True, text=True, timeout=timeout, check=False)
