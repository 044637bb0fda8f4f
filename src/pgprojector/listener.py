"""LISTEN on one dedicated connection; wake the projections on every notification and every (re)connect.

A notification is only a wake-up call: projections always read from their checkpoint, so a lost
notification costs at most one poll interval.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import asyncpg
import structlog

from pgprojector import db
from pgprojector.retry import TRANSIENT_ERRORS, backoff

log = structlog.get_logger("pgprojector.listener")

KEEPALIVE_SECONDS = 5.0


class Wakeup:
    """A level-triggered wake-up: set by notifications, consumed by the projection that waits on it."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True if woken, False if `timeout` passed first."""
        with anyio.move_on_after(timeout):
            await self._event.wait()
        woken = self._event.is_set()
        if woken:
            self._event = anyio.Event()
        return woken


class Listener:
    def __init__(self, dsn: str, channel: str, on_wakeup: Callable[[], None],
                 on_reconnect: Callable[[], None] = lambda: None) -> None:
        self._dsn = dsn
        self._channel = channel
        self._on_wakeup = on_wakeup
        self._on_reconnect = on_reconnect

    async def run(self) -> None:
        """Forever: connect, LISTEN, keep the connection alive; reconnect with backoff when it drops."""
        failures = 0
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(self._dsn, role="listener", timeout=10)
                lost = anyio.Event()
                conn.add_termination_listener(lambda _conn: lost.set())
                await conn.add_listener(self._channel, lambda *_args: self._on_wakeup())
                if failures:
                    log.info("listener_reconnected", channel=self._channel, after_failures=failures)
                    self._on_reconnect()
                failures = 0
                # Notifications sent while nobody listened are lost: catch up now.
                self._on_wakeup()
                while not lost.is_set():
                    with anyio.move_on_after(KEEPALIVE_SECONDS):
                        await lost.wait()
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1", timeout=KEEPALIVE_SECONDS)
                raise ConnectionError("listener connection closed")
            except TRANSIENT_ERRORS as exc:
                failures += 1
                delay = backoff(failures, base=0.2, cap=30.0)
                log.warning("listener_reconnect", channel=self._channel, error=db.describe_error(exc),
                            retry_in_s=round(delay, 2))
                await anyio.sleep(delay)
            finally:
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        conn.terminate()
