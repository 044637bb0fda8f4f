"""The sd_notify protocol, spoken directly: readiness, status and watchdog pings for systemd.

No dependency (libsystemd, sdnotify...): the protocol is one datagram of newline-separated
KEY=VALUE lines sent to the unix socket named by $NOTIFY_SOCKET. Outside systemd (a terminal, a
container, the tests) the variable is unset and every function here does nothing and returns False,
so the daemon can call them unconditionally.
"""

from __future__ import annotations

import os
import re
import socket

import anyio


def _address(raw: str) -> str | bytes | None:
    # '@' marks a Linux abstract socket, whose real name starts with a NUL byte.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock: addresses are for a VM's init talking to its host, not for a service


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1\\nSTATUS=...") to the service manager; True if it was sent.

    A failed send is reported, not raised: losing a status line must never stop the daemon, and
    a lost READY=1 or WATCHDOG=1 shows up where it matters, in systemd's own timeouts.
    """
    raw = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(raw)
    if address is None or not message or not hasattr(socket, "AF_UNIX"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment: a status text could smuggle in READY=1.
    return " ".join(text.split())


def notify_ready(status: str | None = None) -> bool:
    """Start-up is complete (Type=notify units stay "activating" until this)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def notify_status(text: str) -> bool:
    """A one-line status shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def notify_extend_start(seconds: float, status: str) -> bool:
    """Still starting, and making progress: the start timeout ends `seconds` from now at the earliest."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}\nSTATUS={_one_line(status)}")


def notify_stopping(status: str | None = None) -> bool:
    """A stop has begun, so systemd reports "deactivating" instead of a hung service."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def notify_watchdog() -> bool:
    """The keep-alive ping WatchdogSec= expects."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half the timeout, as sd_watchdog_enabled(3) advises), or None.

    None when systemd expects no pings: WATCHDOG_USEC unset, not a positive integer, or meant for
    another process (WATCHDOG_PID set to a PID that is not ours, e.g. inherited by a child).
    """
    usec = _positive_int(os.environ.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and _positive_int(pid) != os.getpid():
        return None
    return usec / 2 / 1_000_000


def _positive_int(text: str | None) -> int | None:
    # systemd writes plain decimal digits; int() alone would also take " +1_0 ".
    if text is None or not re.fullmatch(r"[0-9]+", text):
        return None
    return int(text) or None


async def run_watchdog(interval: float) -> None:
    """Ping every `interval` seconds until cancelled.

    It proves the event loop turns, which is what a hang would stop; a database outage does not
    stop it, because the daemon rides outages out by itself and a restart would not help.
    """
    while True:
        notify_watchdog()
        await anyio.sleep(interval)
