"""The raw latency baseline, as its own process (like the daemon it is compared with).

One plain asyncpg connection: LISTEN on the events channel; on each notification apply every
event after the last one seen with `raw_apply_next` (bench.sql), one autocommitted statement per
event. Prints `ready` once listening; SIGTERM ends it.

    python bench/raw_consumer.py DSN CHANNEL
"""

from __future__ import annotations

import asyncio
import signal
import sys

import asyncpg
from benchsql import queries


async def consume(dsn: str, channel: str) -> None:
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "pgprojector-bench-raw"})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    wake = asyncio.Event()
    apply_next = await conn.prepare(queries()["raw_apply_next"])
    # Start at the head: this baseline only follows what is appended from now on.
    position = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
    await conn.add_listener(channel, lambda *_: wake.set())
    print("ready", flush=True)
    stopping = asyncio.ensure_future(stop.wait())
    while not stop.is_set():
        woken = asyncio.ensure_future(wake.wait())
        await asyncio.wait({woken, stopping}, return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()
        wake.clear()
        while not stop.is_set():
            applied = await apply_next.fetchval(position)
            if applied is None:
                break
            position = applied
    await conn.close()


if __name__ == "__main__":
    asyncio.run(consume(sys.argv[1], sys.argv[2]))
