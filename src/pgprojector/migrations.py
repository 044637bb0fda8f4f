"""`pgprojector migrate`: apply the numbered SQL files once each, under a lock, and record them."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import structlog

from pgprojector import sqlfiles
from pgprojector.errors import ConfigError, SchemaBehindError
from pgprojector.projection import Projection

log = structlog.get_logger("pgprojector.migrate")

# Session advisory lock serialising concurrent `migrate` runs (and projection set-up).
MIGRATION_LOCK_KEY = 0x70677072_6D696772  # "pgprmigr"


async def migrate(conn: asyncpg.Connection, channel: str, projections: Sequence[Projection] = ()) -> list[str]:
    """Bring the schema up to date and set up `projections`' tables and checkpoints.

    Returns the names of the migration files applied (empty when nothing was due).
    """
    applied: list[str] = []

    def said(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
        # What a migration says on purpose, with RAISE INFO (001's adoption of a seed database); the
        # server's own NOTICEs (`... does not exist, skipping`) only at debug.
        if message.severity_en == "INFO":
            log.info("migration_notice", message=message.message)
        else:
            log.debug("migration_notice", message=message.message)

    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS pgprojector_migrations (
                   version INTEGER PRIMARY KEY,
                   name TEXT NOT NULL,
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM pgprojector_migrations")}
        for number, name, sql in sqlfiles.migrations():
            if number in done:
                continue
            conn.add_log_listener(said)
            try:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO pgprojector_migrations (version, name) VALUES ($1, $2)",
                                       number, name)
            finally:
                conn.remove_log_listener(said)
            log.info("migration_applied", migration=name)
            applied.append(name)
        cache = await position_cache(conn)
        if cache != 1:
            await conn.execute("ALTER SEQUENCE events_position_seq CACHE 1")
            log.warning("position_cache_reset", was=cache)
        behind = await position_sequence_behind(conn)
        if behind is not None:
            await conn.execute("SELECT setval('events_position_seq', $1)", behind[1])
            log.warning("position_sequence_set_forward", was=behind[0], now=behind[1])
        if await notify_channel(conn) != channel:
            await conn.execute("SELECT pgprojector_set_notify_channel($1)", channel)
            log.info("notify_channel_set", channel=channel)
        for projection in projections:
            await setup_projection(conn, projection)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


async def setup_projection(conn: asyncpg.Connection, projection: Projection) -> None:
    """Create the projection's tables (idempotent DDL) and its checkpoint row."""
    async with conn.transaction():
        # The migration lock (re-entrant within `migrate`'s own session): daemons that start together
        # with a new projection would otherwise race on its CREATE TABLE IF NOT EXISTS.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        if projection.schema:
            await conn.execute(projection.schema)
        registered = await conn.fetchval(
            "INSERT INTO pgprojector_projections (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING true",
            projection.name)
        # (rebuild empties them and `migrate --roles` grants them: a typo would fail there, later)
        tables = await require_tables(conn, projection, "after its schema ran: name each as SQL does "
                                                        "(schema.table, \"Quoted\") or exactly as created")
        if registered:
            # A new projection starts at position 0 and takes the rows it finds for its own work: rows
            # written by something else (the seed's own handler, say) would be kept as they are.
            for table, quoted in tables.items():
                if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {quoted})"):
                    log.warning("projection_tables_not_empty", projection=projection.name, table=table,
                                hint=f"rows pgprojector did not write stay as they are: `pgprojector rebuild "
                                     f"{projection.name}` builds the table from the log")


async def apply_roles(conn: asyncpg.Connection, projections: Sequence[Projection] = ()) -> None:
    """sql/roles.sql (the producer and projector group roles) plus grants on the projections' tables.

    Under the migration lock: two concurrent GRANTs on one object can fail with
    'tuple concurrently updated'.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(sqlfiles.read_sql("roles.sql"))
        for projection in projections:
            tables = await require_tables(conn, projection, "(missing, or a view): run `pgprojector migrate` "
                                                            "with the same PGPROJECTOR_PROJECTIONS first")
            for quoted in tables.values():
                await conn.execute(f"GRANT ALL ON TABLE {quoted} TO pgprojector_projector")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    log.info("roles_applied", roles=["pgprojector_producer", "pgprojector_projector"])


async def resolve_tables(conn: asyncpg.Connection, tables: Sequence[str]) -> dict[str, str | None]:
    """Each of a projection's `tables`, quoted for SQL: the name as SQL reads it (a schema prefix, case
    folding, `"Quoted"`), as rebuild always took it, else the table of exactly that name (`event
    tally`, a quoted `EventTally`); None for one that is no table (or partitioned table) either way."""
    resolved: dict[str, str | None] = {}
    for table in tables:
        quoted = None
        for name in ("$1", "quote_ident($1)"):
            try:
                async with conn.transaction():  # (a savepoint inside set-up's transaction)
                    quoted = await conn.fetchval(
                        f"SELECT c.oid::regclass::text FROM pg_class c WHERE c.oid = to_regclass({name}) "
                        "AND c.relkind IN ('r', 'p')", table)
            except asyncpg.PostgresError:  # no SQL name ("a b", "a.b.c.d", another database's)
                quoted = None
            if quoted is not None:
                break
        resolved[table] = quoted
    return resolved


async def require_tables(conn: asyncpg.Connection, projection: Projection, remedy: str) -> dict[str, str]:
    """Each of the projection's `tables`, quoted for SQL (resolve_tables); ConfigError naming those
    that are no tables, followed by `remedy`."""
    resolved = await resolve_tables(conn, projection.tables)
    missing = [table for table, quoted in resolved.items() if quoted is None]
    if missing:
        raise ConfigError(f"projection {projection.name}: its tables {missing} are no tables {remedy}")
    return {table: quoted for table, quoted in resolved.items() if quoted is not None}


async def schema_version(conn: asyncpg.Connection) -> int | None:
    """The highest migration applied, or None on a database `migrate` has never touched."""
    exists = await conn.fetchval("SELECT to_regclass('pgprojector_migrations') IS NOT NULL")
    if not exists:
        return None
    return await conn.fetchval("SELECT max(version) FROM pgprojector_migrations")


async def position_cache(conn: asyncpg.Connection) -> int:
    """How many positions a session of events_position_seq draws ahead. The read horizon needs 1
    (001 creates it so): it takes the sequence's last value for the highest position drawn, which
    a session drawing ahead from its own cache would be far from."""
    return await conn.fetchval("SELECT seqcache FROM pg_sequence WHERE seqrelid = 'events_position_seq'::regclass")


async def position_sequence_behind(conn: asyncpg.Connection) -> tuple[int, int] | None:
    """(the sequence's last value, the log's largest position) when the sequence is behind the log:
    moved back with setval, or restored without its value. New events would then take positions the
    projections' checkpoints have passed, never to be read. (The log first, then the sequence: a
    position committed between the two reads is then never taken for one passed.)"""
    newest = await conn.fetchval("SELECT max(position) FROM events")
    # (NULL before the sequence's first nextval: RESTART or setval(..., false) made last_value the
    # next one it draws, not one drawn)
    drawn = await conn.fetchval("SELECT coalesce(pg_sequence_last_value('events_position_seq'), "
                                "(SELECT last_value - 1 FROM events_position_seq))")
    return (drawn, newest) if newest is not None and drawn < newest else None


async def require_current_schema(conn: asyncpg.Connection) -> None:
    """ConfigError if `migrate` never ran here, SchemaBehindError if an older pgprojector's did."""
    version = await schema_version(conn)
    if version is None:
        raise ConfigError(f"the database schema is at version 0, this pgprojector needs {latest_version()}: "
                          "run `pgprojector migrate` first")
    if version < latest_version():
        raise SchemaBehindError(f"the database schema is at version {version}, this pgprojector needs "
                                f"{latest_version()}: run `pgprojector migrate`")


async def notify_channel(conn: asyncpg.Connection) -> str | None:
    """The channel the insert trigger notifies (set by `migrate --channel`), or None without one."""
    args = await conn.fetchval(
        "SELECT tgargs FROM pg_trigger WHERE tgrelid = 'events'::regclass AND tgname = 'events_notify'")
    return None if args is None else bytes(args).rstrip(b"\x00").decode()


def latest_version() -> int:
    return max(number for number, _, _ in sqlfiles.migrations())
