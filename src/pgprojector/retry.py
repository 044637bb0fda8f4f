"""Which failures are the database's (wait and retry forever) and which are the event's (count them)."""

from __future__ import annotations

import random

import asyncpg

# Connection lost, server restarting, too many clients, serialization failure or deadlock:
# none of these say anything about the event being applied.
TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")
# Nor does a lock_timeout (a read model locked by someone else, e.g. a CREATE INDEX): counted
# against the event, it would park or halt a valid one. (A missing privilege, 42501, stays the
# event's: a row-level security policy's WITH CHECK refuses an event's data with the same code.)
# Nor does a database that refuses writes, 25006 (a hot standby the DSN reached in a failover, or
# default_transaction_read_only): waited out like a server that is down, never a crash loop, and the
# connection is discarded, as a session keeps the read-only default it started with.
TRANSIENT_SQLSTATES = ("55P03", "25006")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    # The driver's own protocol confusion after a lost connection; db.acquire() discards the connection.
    asyncpg.InternalClientError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.ClientConfigurationError):  # an InterfaceError, but the DSN's: waiting won't help
        return False
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and (sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES)


def backoff(attempt: int, base: float = 0.1, cap: float = 10.0) -> float:
    """Exponential backoff with jitter, in seconds, for the `attempt`-th consecutive failure (1-based)."""
    return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
