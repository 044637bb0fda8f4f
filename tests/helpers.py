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


class FreezableProxy:
    """A TCP proxy to a server that can stop passing bytes on (a server that does not answer, a
    connection lost in the network) while every socket stays open."""

    def __init__(self, host: str, port: int) -> None:
        import asyncio

        self.target = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        import asyncio

        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _connect(self, client_reader, client_writer) -> None:  # type: ignore[no-untyped-def]
        import asyncio

        server_reader, server_writer = await asyncio.open_connection(*self.target)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.ensure_future(self._pump(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader, writer) -> None:  # type: ignore[no-untyped-def]
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
