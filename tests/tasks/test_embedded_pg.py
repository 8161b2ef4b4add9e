"""The embedded PostgreSQL: start, reuse, stop — on a real data directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from tasks.embedded_pg import EmbeddedPostgres, free_port
from tasks.errors import UserError
from tasks.process_group import group_members
from tests.conftest import ROOT

_START = (
    "import sys; from pathlib import Path; from tasks.embedded_pg import EmbeddedPostgres; "
    "server = EmbeddedPostgres(Path(sys.argv[1]), int(sys.argv[2])); "
    "print('ready', flush=True); sys.stdin.readline(); print(server.start())"
)
"""A flowyard process starting the embedded server: it says ready, waits for a line, then starts."""


def _starter(pgdata: Path, port: int, script: str = _START) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, str(pgdata), str(port)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_start_reuse_stop(tmp_path):
    server = EmbeddedPostgres(tmp_path / "pg", free_port())
    assert server.start() is True
    try:
        with psycopg.connect(server.url()) as conn:
            first_pid = conn.execute("SELECT pg_backend_pid()").fetchone()
            version = conn.info.server_version
        assert first_pid and version >= 180000
        postmaster = (tmp_path / "pg" / "postmaster.pid").read_text().split()[0]

        # A second handle on the same data directory (even with another port) reuses the running server.
        again = EmbeddedPostgres(tmp_path / "pg", free_port())
        assert again.start() is False
        assert again.url() == server.url()
        assert (tmp_path / "pg" / "postmaster.pid").read_text().split()[0] == postmaster
    finally:
        assert server.stop() is True
    assert not server.is_running()
    assert server.stop() is False
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url(), connect_timeout=2)

    # Data survives a restart.
    server.start()
    try:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
        server.stop()
        server.start()
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
    finally:
        server.stop()


def test_busy_port_is_a_clear_error(tmp_path, pg):
    clash = EmbeddedPostgres(tmp_path / "pg", pg.running_port())
    with pytest.raises(UserError, match="is taken by another program"):
        clash.start()


def test_a_port_bound_without_listening_is_the_same_clear_error(tmp_path):
    """A port another program bound but does not listen on (or bound since the check, by a
    second ``flowyard up`` starting at once) passes the connect check; the server then failed to
    bind and pg_ctl said only "could not start server | Examine the log output"."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        server = EmbeddedPostgres(tmp_path / "pg", port)
        with pytest.raises(UserError) as error:
            server.start()
    assert str(error.value) == f"port {port} on 127.0.0.1 is taken by another program; set FLOWYARD_PG_PORT to a free port"
    assert not server.is_running()


def test_a_server_that_cannot_start_says_its_fatal_line_and_where_its_log_is(tmp_path):
    """Any other start failure: the server's own reason, not pg_ctl's "Examine the log output"."""
    server = EmbeddedPostgres(tmp_path / "pg", free_port())
    assert server.start() and server.stop()
    with (server.pgdata / "postgresql.conf").open("a") as conf:
        conf.write("no_such_setting = 1\n")
    try:
        with pytest.raises(UserError) as error:
            server.start()
    finally:
        server.stop()
    message = str(error.value)
    assert message.startswith("embedded PostgreSQL did not start: ") and message.endswith(f"(its log: {server.log_file})")
    assert "Examine the log" not in message and "\n" not in message


def test_a_server_whose_log_was_deleted_starts_again(tmp_path):
    """The start reads its log's size, to say later what it logged: a deleted log (cleaned up by
    hand) made every later start a FileNotFoundError traceback."""
    server = EmbeddedPostgres(tmp_path / "pg", free_port())
    assert server.start() and server.stop()
    server.log_file.unlink()
    try:
        assert server.start() and server.is_running()
    finally:
        server.stop()
    assert server.log_file.exists()


def test_stop_after_parent_permissions_were_reset(tmp_path):
    """pytest (and umask-happy tools) may make a parent 0700 again while the server runs."""
    parent = tmp_path / "home"
    server = EmbeddedPostgres(parent / "pg", free_port())
    server.start()
    parent.chmod(0o700)
    tmp_path.chmod(0o700)
    assert server.stop() is True
    assert server.start() is True
    assert server.stop() is True


def test_processes_starting_a_fresh_server_at_once_start_it_once(tmp_path):
    """Three processes released together on a fresh data directory: each found no server
    running and ran initdb (all but one failing on a non-empty directory) or ``pg_ctl start``.
    Now one starts it and the others wait for it and use it."""
    pgdata, port = tmp_path / "pg", free_port()
    starters = [_starter(pgdata, port) for _ in range(3)]
    try:
        for proc in starters:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in starters:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate() for proc in starters]
        assert [proc.returncode for proc in starters] == [0, 0, 0], results
        assert sorted(out.strip() for out, _ in results) == ["False", "False", "True"]
        with psycopg.connect(EmbeddedPostgres(pgdata, port).url()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for proc in starters:
            proc.kill()
            proc.wait()
        EmbeddedPostgres(pgdata, port).stop()


def test_a_start_killed_during_initdb_is_made_anew_by_the_next(tmp_path):
    """SIGKILL of a starting process (and its initdb) part-way through initdb, after it wrote
    files: the half-made data directory failed every later start. The next start now makes a
    complete one and runs on it."""
    pgdata = tmp_path / "pg"
    proc = _starter(pgdata, free_port())
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        while proc.poll() is None and not (
            any(tmp_path.rglob("PG_VERSION")) and any(member.name() == "initdb" for member in group_members(proc.pid))
        ):
            time.sleep(0.01)  # until initdb has written files and still runs (or the starter ended early)
        os.killpg(proc.pid, signal.SIGSTOP)
        assert any(member.name() == "initdb" for member in group_members(proc.pid))
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    server = EmbeddedPostgres(pgdata, free_port())
    try:
        assert server.start() is True
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()


def test_a_foreign_directory_in_place_of_the_data_directory_is_one_line(tmp_path):
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"^embedded PostgreSQL: .*/pg exists but is not a PostgreSQL data directory"):
        EmbeddedPostgres(tmp_path / "pg", free_port()).start()
    assert (tmp_path / "pg" / "notes.txt").read_text() == "mine"


_STOP = _START.replace("server.start()", "server.stop()")
"""A flowyard process stopping the embedded server, released like :data:`_START`'s."""


def _released(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """``proc`` (a :func:`_starter`) once it said ready and was told to go."""
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc


def _waits_for_lock(proc: subprocess.Popen[str], lock_file: Path) -> bool:
    """Whether ``proc`` is blocked on the flock of ``lock_file`` (a ``->`` line of /proc/locks)."""
    inode = f":{lock_file.stat().st_ino} "
    lines = Path("/proc/locks").read_text().splitlines()
    return any(" -> FLOCK " in line and f" {proc.pid} " in line and inode in line for line in lines)


def _running_in_group(proc: subprocess.Popen[str], *names: str) -> bool:
    return any(member.name() in names for member in group_members(proc.pid))


def _postmasters_of(pgdata: Path) -> list[psutil.Process]:
    """Live server processes whose command line names ``pgdata``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and str(pgdata) in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_a_start_while_a_stop_runs_waits_for_it_and_starts_the_server_again(tmp_path):
    """One process stops the running server while another starts it: the start waits for the
    stop (held mid-way: its postmaster is frozen, so ``pg_ctl stop`` waits) and then starts a new
    server, running and connectable; no start is lost to a stop that was under way."""
    pgdata, port = tmp_path / "pg", free_port()
    server = EmbeddedPostgres(pgdata, port)
    assert server.start() is True
    old = int((pgdata / "postmaster.pid").read_text().split()[0])
    procs: list[subprocess.Popen[str]] = []
    os.kill(old, signal.SIGSTOP)
    try:
        stopper = _released(_starter(pgdata, port, _STOP))
        procs.append(stopper)
        while stopper.poll() is None and not _running_in_group(stopper, "pg_ctl"):
            time.sleep(0.01)  # until the stopper holds the lock and waits for the frozen server
        assert stopper.poll() is None, stopper.communicate()
        starter = _released(_starter(pgdata, port))
        procs.append(starter)
        while starter.poll() is None and not _waits_for_lock(starter, server.lock_file):
            time.sleep(0.01)
        assert starter.poll() is None, starter.communicate()  # waiting for the stop to finish
        os.kill(old, signal.SIGCONT)
        results = [proc.communicate() for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0], results
        assert [out.strip() for out, _ in results] == ["True", "True"], results  # stopped, then started
        assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
        new = int((pgdata / "postmaster.pid").read_text().split()[0])
        assert new != old and [p.pid for p in _postmasters_of(pgdata)] == [new]
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert server.stop() is True and server.start() is True  # and it stops and starts as ever
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        if psutil.pid_exists(old):
            os.kill(old, signal.SIGCONT)
        for proc in procs:
            proc.kill()
            proc.communicate()
        server.stop()


def test_a_stop_while_a_start_runs_waits_for_it_and_leaves_no_server(tmp_path):
    """One process starts a fresh server (held mid-way, during initdb or ``pg_ctl start``) while
    another stops it: the stop waits for the start and stops the server it started, leaving no
    postmaster and no postmaster.pid behind, and the next start works."""
    pgdata, port = tmp_path / "pg", free_port()
    server = EmbeddedPostgres(pgdata, port)
    procs: list[subprocess.Popen[str]] = []
    try:
        starter = _released(_starter(pgdata, port))
        procs.append(starter)
        while starter.poll() is None and not _running_in_group(starter, "initdb", "pg_ctl"):
            time.sleep(0.01)
        os.killpg(starter.pid, signal.SIGSTOP)  # frozen holding the lock, part-way through the start
        assert starter.poll() is None and _running_in_group(starter, "initdb", "pg_ctl")
        stopper = _released(_starter(pgdata, port, _STOP))
        procs.append(stopper)
        while stopper.poll() is None and not _waits_for_lock(stopper, server.lock_file):
            time.sleep(0.01)
        assert stopper.poll() is None, stopper.communicate()
        os.killpg(starter.pid, signal.SIGCONT)
        results = [proc.communicate() for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0], results
        assert [out.strip() for out, _ in results] == ["True", "True"], results  # started, then stopped
        assert not server.is_running() and not (pgdata / "postmaster.pid").exists()
        assert _postmasters_of(pgdata) == []
        assert server.start() is True
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.communicate()
        server.stop()


_FLICKER = (
    "import os, sys; path, content = sys.argv[1], sys.argv[2]; print('ready', flush=True)\n"
    "while True:\n"
    "    with open(path, 'w') as f: f.write(content)\n"
    "    os.unlink(path)\n"
)
"""Writes and removes a ``postmaster.pid`` as fast as it can, as starts and stops do."""


def test_reading_the_port_while_the_server_file_comes_and_goes_never_raises(tmp_path):
    """``flowyard down`` or a second ``up`` reads ``postmaster.pid`` while the server may be
    removing it: a check that it exists, then a read, raised FileNotFoundError in between."""
    pgdata = tmp_path / "pg"
    pgdata.mkdir()
    content = f"{os.getpid()}\n{pgdata}\n1700000000\n5999\n"
    writer = subprocess.Popen(
        [sys.executable, "-c", _FLICKER, str(pgdata / "postmaster.pid"), content],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        server = EmbeddedPostgres(pgdata, free_port())
        ports = {server.running_port() for _ in range(20_000) if writer.poll() is None}
    finally:
        writer.kill()
        writer.wait()
    assert ports == {None, 5999}
