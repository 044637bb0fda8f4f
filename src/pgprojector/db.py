"""Connections: every one is tagged with an application_name, and DSNs are never logged with a password."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg

from pgprojector.errors import ConfigError
from pgprojector.retry import is_transient

APPLICATION_NAME = "pgprojector"
# (up to the last @ before the query: a password may hold an @ / # its writer did not percent-encode)
_URL_UP_TO_PASSWORD = r"(?P<head>^\s*[a-zA-Z][\w+.-]*://[^:/@]*:)"
_PASSWORD_IN_URL = re.compile(_URL_UP_TO_PASSWORD + r"(?P<password>[^?]*)(?P<tail>@)")
# Where that finds none, a password may hold an unencoded ? (asyncpg reads the rest as a query): then
# everything up to the last @ is hidden, host included, rather than risk it.
_PASSWORD_IN_URL_WITH_QUERY = re.compile(_URL_UP_TO_PASSWORD + r"(?P<password>.*)(?P<tail>@)")
_PASSWORD_PARAM = re.compile(r"(?P<head>[?&]password=)(?P<password>[^&]*)", re.IGNORECASE)
# The libpq keyword form (host=... password=...), which is refused (dsn_problem) but must not be echoed.
_PASSWORD_KEYWORD = re.compile(r"(?P<head>(?:^|\s)password\s*=\s*)(?P<password>'(?:[^'\\]|\\.)*'|\S*)", re.IGNORECASE)
_URL_SCHEMES = ("postgresql://", "postgres://")


def dsn_problem(dsn: str) -> str | None:
    """What makes `dsn` no PostgreSQL URL that asyncpg can take, or None; never quoting any part of it
    (in `user:password/db`, a forgotten `@host` makes the password read as the port)."""
    dsn = dsn.strip()
    if not dsn:
        return "is empty"
    if not dsn.lower().startswith(_URL_SCHEMES):
        return ("must be a URL, postgresql://user:password@host:port/database (not the libpq keyword form "
                "host=... dbname=...)")
    rest = dsn.split("://", 1)[1]
    # (where asyncpg's URL parser ends the address: an unencoded / or # in a password ends it too,
    # leaving `@host...` in what it takes for the database name, and the password in messages; a
    # database name may hold an @ itself, `team@corp`, but not a host and a path or port after it)
    end = re.search(r"[/?#]", rest)
    authority, after = (rest[:end.start()], rest[end.start():]) if end else (rest, "")
    path = after.split("?", 1)[0]
    if "@" not in authority and "@" in path and re.search(r"/|:[0-9]+$", path.rpartition("@")[2]):
        return ("has an @ after a / or # that asyncpg reads as the end of the host: percent-encode @ # / ? in a "
                "password (postgresql://user:password@host:port/database)")
    hosts = authority.rpartition("@")[2]
    for host in hosts.split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" in port:
            digits = port.rpartition(":")[2]
            if digits and not (digits.isascii() and digits.isdigit() and 1 <= int(digits) <= 65535):
                return ("has a port that is not a number from 1 to 65535 (a password goes between the user and "
                        "@host, with any @ # / ? in it percent-encoded: postgresql://user:password@host:port/database)")
    return None


def _url_password(dsn: str) -> re.Pattern[str]:
    return _PASSWORD_IN_URL if _PASSWORD_IN_URL.search(dsn) else _PASSWORD_IN_URL_WITH_QUERY


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ***."""
    dsn = _url_password(dsn).sub(r"\g<head>***\g<tail>", dsn)
    dsn = _PASSWORD_PARAM.sub(r"\g<head>***", dsn)
    return _PASSWORD_KEYWORD.sub(r"\g<head>***", dsn)


def redact(text: str, dsn: str | None) -> str:
    """`text` with the DSN's password (if any) removed, for error messages built from driver errors."""
    if not dsn:
        return text
    for pattern in (_url_password(dsn), _PASSWORD_PARAM, _PASSWORD_KEYWORD):
        match = pattern.search(dsn)
        password = match.group("password") if match else ""
        if password.startswith("'"):  # the keyword form's quoting; a driver's message shows the value
            text = text.replace(password, "***")
            password = password[1:-1].replace("\\'", "'").replace("\\\\", "\\")
        if password:
            text = text.replace(password, "***")
    return text.replace(dsn, redact_dsn(dsn))


# TCP keepalives and a user timeout on both ends of every connection: a peer that vanished without
# closing (a network partition, a failover) is noticed within about half a minute, where TCP alone
# waits hours. The server's side ends a backend whose daemon is gone, releasing the checkpoint row it
# locked for the next daemon; the client's side fails the batch, which reconnects. (No help against a
# server that is up but does not answer: `batch_slow` and the stop timeout are for that.)
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT, USER_TIMEOUT_MS = 10, 5, 3, 60_000
_SERVER_KEEPALIVE = (f"SET tcp_keepalives_idle = {KEEPALIVE_IDLE_S}; SET tcp_keepalives_interval = "
                     f"{KEEPALIVE_INTERVAL_S}; SET tcp_keepalives_count = {KEEPALIVE_COUNT}; "
                     f"SET tcp_user_timeout = {USER_TIMEOUT_MS}")


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb arrives as Python values and leaves as JSON; a str parameter is taken as JSON text already.
    Binary format (a version byte, then the text), so that COPY works too. And keepalives.
    """
    await conn.set_type_codec("jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog",
                              format="binary")
    await conn.set_type_codec("json", encoder=_encode_json, decoder=json.loads, schema="pg_catalog")
    # (SET, not startup parameters: PgBouncer refuses startup parameters it does not know)
    await conn.execute(_SERVER_KEEPALIVE)
    _client_keepalive(conn)


def _client_keepalive(conn: asyncpg.Connection) -> None:
    # asyncpg has no option for it: the socket, through its transport (tests/test_daemon.py checks
    # that this still reaches it).
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        if hasattr(socket, option):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _encode_json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + _encode_json(value).encode()


def _decode_jsonb(data: bytes) -> Any:
    return json.loads(data[1:])


def _server_settings(role: str) -> dict[str, str]:
    return {"application_name": f"{APPLICATION_NAME}-{role}" if role else APPLICATION_NAME}


async def connect(dsn: str, role: str = "", **kwargs: Any) -> asyncpg.Connection:
    with _dsn_refused(dsn):
        conn = await asyncpg.connect(dsn, server_settings=_server_settings(role), **kwargs)
    await init_connection(conn)
    return conn


async def create_pool(dsn: str, role: str = "", **kwargs: Any) -> asyncpg.Pool:
    with _dsn_refused(dsn):
        pool = await asyncpg.create_pool(dsn, server_settings=_server_settings(role), init=init_connection, **kwargs)
    assert pool is not None
    return pool


@contextmanager
def _dsn_refused(dsn: str) -> Iterator[None]:
    """asyncpg's refusal of a DSN's parameters (sslmode=bogus, say) is a configuration error: exit 2,
    never a database to wait for."""
    try:
        yield
    except asyncpg.ClientConfigurationError as exc:
        raise ConfigError(f"PGPROJECTOR_DSN: {redact(describe_error(exc), dsn)}") from None
    except ValueError:  # the parser's own: its message may quote a piece of the password
        raise ConfigError("PGPROJECTOR_DSN: asyncpg cannot parse it as a PostgreSQL URL "
                          "(postgresql://user:password@host:port/database; percent-encode @ # / ? in a password)"
                          ) from None


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
            _discard(conn)
        raise
    finally:
        try:
            await pool.release(conn)
        except Exception as exc:
            if not is_transient(exc):
                raise
            _discard(conn)


def _discard(conn: asyncpg.Connection) -> None:
    """Terminate a pooled connection, unless asyncpg has released it already: it does so by itself when
    it notices the connection closed, and terminate() would then raise its own InterfaceError ("cannot
    call Connection.terminate(): connection has been released back to the pool") in place of the
    error that says what happened (a server restart, an idle_in_transaction_session_timeout...)."""
    try:
        conn.terminate()
    except asyncpg.InterfaceError:
        pass
