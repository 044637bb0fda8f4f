"""Read models versus an independent fold of the whole log (the fold lives in daemon_harness)."""

from __future__ import annotations

import asyncpg
from daemon_harness import compare, fold, read_log, read_models


async def assert_read_models_match_fold(conn: asyncpg.Connection) -> None:
    problems = compare(await read_models(conn), fold(await read_log(conn)))
    assert not problems, "read models differ from the fold of the log:\n" + "\n".join(problems)
