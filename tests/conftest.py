"""Real PostgreSQL for every test: PGPROJECTOR_TEST_DSN if set, else a private throwaway server.

A template database is migrated once per session; each test gets its own database cloned from it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from pgprojector import db
from pgprojector.embedded import EmbeddedPostgres
from pgprojector.logging import configure_logging
from pgprojector.migrations import migrate
from pgprojector.projection import load_projections

TEMPLATE = f"pgprojector_template_{os.getpid()}"

configure_logging("info", "console")


def _with_database(dsn: str, database: str) -> str:
    base, _, query = dsn.partition("?")
    scheme, _, rest = base.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{database}" + (f"?{query}" if query else "")


@dataclass(frozen=True)
class Server:
    admin_dsn: str

    def dsn_for(self, database: str) -> str:
        return _with_database(self.admin_dsn, database)


async def _create_template(server: Server) -> None:
    admin = await asyncpg.connect(server.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await admin.close()
    conn = await db.connect(server.dsn_for(TEMPLATE), role="tests")
    try:
        await migrate(conn, channel="events", projections=load_projections(["orders", "dashboard", "analytics"]))
    finally:
        await conn.close()


async def _drop(server: Server, database: str) -> None:
    admin = await asyncpg.connect(server.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    given = os.environ.get("PGPROJECTOR_TEST_DSN")
    if given:
        found = Server(given)
        asyncio.run(_create_template(found))
        yield found
        asyncio.run(_drop(found, TEMPLATE))
        return
    with EmbeddedPostgres() as embedded:
        found = Server(embedded.dsn)
        asyncio.run(_create_template(found))
        yield found


async def _fresh_database(server: Server, prefix: str, template: str | None) -> AsyncIterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await admin.close()
    yield server.dsn_for(name)
    await _drop(server, name)


@pytest.fixture
async def dsn(server: Server) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    async for name in _fresh_database(server, "pgprojector_test", TEMPLATE):
        yield name


@pytest.fixture
async def empty_dsn(server: Server) -> AsyncIterator[str]:
    """A fresh database with nothing in it, for migration tests."""
    async for name in _fresh_database(server, "pgprojector_empty", None):
        yield name


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(dsn, role="tests", min_size=1, max_size=20)
    yield pool
    await pool.close()


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await db.connect(dsn, role="tests")
    yield connection
    await connection.close()
