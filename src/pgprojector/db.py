"""Connections: every one is tagged with an application_name, and DSNs are never logged with a password."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from pgprojector.retry import is_transient

APPLICATION_NAME = "pgprojector"
_PASSWORD_IN_URL = re.compile(r"(?P<head>^[a-zA-Z][\w+.-]*://[^:/@]*:)(?P<password>[^@]*)(?P<tail>@)")
_PASSWORD_PARAM = re.compile(r"(?P<head>[?&]password=)(?P<password>[^&]*)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ***."""
    dsn = _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", dsn)
    return _PASSWORD_PARAM.sub(r"\g<head>***", dsn)


def redact(text: str, dsn: str | None) -> str:
    """`text` with the DSN's password (if any) removed, for error messages built from driver errors."""
    if not dsn:
        return text
    for pattern in (_PASSWORD_IN_URL, _PASSWORD_PARAM):
        match = pattern.search(dsn)
        if match and match.group("password"):
            text = text.replace(match.group("password"), "***")
    return text.replace(dsn, redact_dsn(dsn))


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb arrives as Python values and leaves as JSON; a str parameter is taken as JSON text already.

    Binary format (a version byte, then the text), so that COPY works too.
    """
    await conn.set_type_codec("jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog",
                              format="binary")
    await conn.set_type_codec("json", encoder=_encode_json, decoder=json.loads, schema="pg_catalog")


def _encode_json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + _encode_json(value).encode()


def _decode_jsonb(data: bytes) -> Any:
    return json.loads(data[1:])


def _server_settings(role: str) -> dict[str, str]:
    return {"application_name": f"{APPLICATION_NAME}-{role}" if role else APPLICATION_NAME}


async def connect(dsn: str, role: str = "", **kwargs: Any) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn, server_settings=_server_settings(role), **kwargs)
    await init_connection(conn)
    return conn


async def create_pool(dsn: str, role: str = "", **kwargs: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, server_settings=_server_settings(role), init=init_connection, **kwargs)
    assert pool is not None
    return pool


def describe_error(exc: BaseException) -> str:
    """`Type: message`, short enough for a log line; never includes a DSN."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


@asynccontextmanager
async def acquire(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """pool.acquire(), but a connection that failed at the connection level is discarded, not reused.

    After a backend is terminated mid-transaction, asyncpg can hand the same connection object back
    out in a confused protocol state ("cannot switch to state 15; another operation is in progress",
    asyncpg#784), and the reset on release can fail the same way. Terminating the connection makes
    the pool open a fresh one; a failed release of such a connection is not the caller's error.
    """
    conn = await pool.acquire()
    try:
        yield conn
    except BaseException as exc:
        if is_transient(exc):
            conn.terminate()
        raise
    finally:
        try:
            await pool.release(conn)
        except Exception as exc:
            if not is_transient(exc):
                raise
            conn.terminate()
