"""sd_notify against real unix datagram sockets: a path socket and an abstract one."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from pgprojector import systemd

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def _receiver(sock: socket.socket) -> Callable[[], bytes]:
    sock.settimeout(2)
    return lambda: sock.recv(4096)


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], bytes]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        address = str(tmp_path / "notify")
        sock.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield _receiver(sock)


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], bytes]]:
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract unix sockets are Linux-only")
    name = f"pgprojector-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield _receiver(sock)


@pytest.fixture(params=["path", "abstract"])
def received(request: pytest.FixtureRequest) -> Callable[[], bytes]:
    fixture: Callable[[], bytes] = request.getfixturevalue(f"{request.param}_socket")
    return fixture


def test_each_message_arrives_as_its_exact_bytes(received: Callable[[], bytes]) -> None:
    assert systemd.notify_ready()
    assert received() == b"READY=1"
    assert systemd.notify_ready("caught up: orders, dashboard")
    assert received() == b"READY=1\nSTATUS=caught up: orders, dashboard"
    assert systemd.notify_status("waiting for the database")
    assert received() == b"STATUS=waiting for the database"
    assert systemd.notify_watchdog()
    assert received() == b"WATCHDOG=1"
    assert systemd.notify_stopping()
    assert received() == b"STOPPING=1"
    assert systemd.notify_stopping("finishing the batch in hand")
    assert received() == b"STOPPING=1\nSTATUS=finishing the batch in hand"
    assert systemd.notify("RELOADING=1")
    assert received() == b"RELOADING=1"


def test_a_status_cannot_inject_another_assignment(path_socket: Callable[[], bytes]) -> None:
    assert systemd.notify_status("error: boom\nREADY=1")
    assert path_socket() == b"STATUS=error: boom READY=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    assert not systemd.notify("READY=1")
    assert not systemd.notify_ready("ready")
    assert not systemd.notify_status("status")
    assert not systemd.notify_watchdog()
    assert not systemd.notify_stopping()


def test_a_socket_nobody_listens_on_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not systemd.notify_watchdog()
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert not systemd.notify_watchdog()
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert not systemd.notify_watchdog()


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_USEC", "500000")
    assert systemd.watchdog_interval() == 0.25


@pytest.mark.parametrize("pid", ["1", "0", "", "not-a-pid", "pid"])
def test_watchdog_meant_for_another_process_is_ignored(pid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1) if pid == "pid" else pid)
    assert systemd.watchdog_interval() is None


@pytest.mark.parametrize("usec", ["", "0", "-1000000", "abc", "1.5", " 30000000", "3_000_000", "٣٠"])
def test_malformed_watchdog_usec_means_no_watchdog(usec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert systemd.watchdog_interval() is None


async def test_run_watchdog_pings_until_cancelled(path_socket: Callable[[], bytes]) -> None:
    with anyio.move_on_after(0.35):
        await systemd.run_watchdog(0.1)
    pings = [path_socket() for _ in range(3)]
    assert pings == [b"WATCHDOG=1"] * 3


async def test_the_daemon_reports_ready_watchdog_and_stopping(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end, under a fake service manager: the unit file's Type=notify and WatchdogSec= rely on it."""
    import signal

    from pgprojector import daemon as daemon_module
    from pgprojector.projection import load_projections
    from pgprojector.settings import load_settings

    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        received: list[bytes] = []

        async def until(predicate: Callable[[], bool]) -> None:
            with anyio.fail_after(20):
                while not predicate():
                    try:
                        received.append(manager.recv(4096))
                    except BlockingIOError:
                        await anyio.sleep(0.02)

        daemon = daemon_module.Daemon(load_settings(dsn=dsn, poll_interval=0.1), load_projections(["orders"]))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(daemon.run)
            await until(lambda: any(m.split(b"\n")[0] == b"READY=1" for m in received))
            pings = received.count(b"WATCHDOG=1")
            await until(lambda: received.count(b"WATCHDOG=1") >= pings + 2)
            os.kill(os.getpid(), signal.SIGTERM)  # what systemd sends: KillSignal=SIGTERM
            await until(lambda: any(m.split(b"\n")[0] == b"STOPPING=1" for m in received))
    assert all(b"\n" not in m or m.split(b"\n")[1].startswith(b"STATUS=") for m in received), received


@pytest.mark.parametrize("stalls", [False, True], ids=["moving", "stalled"])
async def test_a_first_catch_up_that_moves_extends_the_start_timeout(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stalls: bool
) -> None:
    """READY=1 waits for the first catch-up; TimeoutStartSec= must not kill a long one that moves,
    and must still end one that applies nothing for START_STALL_SECONDS."""
    from pgprojector import EventStore, NewEvent, db
    from pgprojector import daemon as daemon_module
    from pgprojector.projection import Projection
    from pgprojector.settings import load_settings

    async def slowly(conn: object, events: object) -> None:
        await anyio.sleep(1.5)  # longer than an interval and than an extension: they must go on through it

    conn = await db.connect(dsn)
    try:
        await EventStore(conn).append("ticks", "clock", [NewEvent("Tick", {}) for _ in range(3)], expected_version=0)
    finally:
        await conn.close()
    monkeypatch.setattr(daemon_module, "START_PROGRESS_SECONDS", 0.2)
    if stalls:  # each 1.5 s batch is a stall
        monkeypatch.setattr(daemon_module, "START_STALL_SECONDS", 0.5)
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        received: list[tuple[float, bytes]] = []
        daemon = daemon_module.Daemon(load_settings(dsn=dsn, poll_interval=0.1, batch_size=1),
                                      [Projection(name="slow", handle=slowly, event_types={"Tick"})])
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(daemon.run)
            with anyio.fail_after(30):
                while not received or not received[-1][1].startswith(b"READY=1"):
                    try:
                        received.append((anyio.current_time(), manager.recv(4096)))
                    except BlockingIOError:
                        await anyio.sleep(0.02)
            daemon.request_stop()
    extensions = [(at, m) for at, m in received if m.startswith(b"EXTEND_TIMEOUT_USEC=")]
    assert all(m.startswith(b"EXTEND_TIMEOUT_USEC=400000\nSTATUS=catching up: ") for _, m in extensions)
    gaps = [later - earlier for (earlier, _), (later, _) in zip(extensions, extensions[1:], strict=False)]
    if stalls:  # a message at 0.2 and 0.4 s into each batch, then none until it commits
        assert len(extensions) >= 3 and max(gaps) >= 1.0, gaps
        return
    assert len(extensions) >= 10, received  # 3 batches of 1.5 s, a message every 0.2 s
    # never longer than an extension (0.4 s) without the next, but for the machine's hiccups
    assert max(gaps) < 1.0, gaps
    applied = [int(m.split(b"STATUS=catching up: ")[1].split(b" ")[0]) for _, m in extensions]
    assert applied == sorted(applied) and applied[0] == 0 and 0 < applied[-1] < 3
