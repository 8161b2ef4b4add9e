"""Python subprocesses for tests of work that must really overlap, or really be cut off, and
the waits of such tests for what the other side did."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil
import psycopg

from tasks.process_group import spawn_group
from tests.conftest import ROOT

GUARD_SECONDS = 120.0
"""How long a test polls for something that is bound to come before it gives up. Only a guard
against hanging forever, never a measure: CI runs the whole suite in one process on a 2-core
machine, several times slower than a fast one, so a bound of a few seconds is a flake."""


class Told(logging.Handler):
    """Sets ``seen`` once a record holding ``text`` is logged: a test waits on that instead of
    sleeping for as long as the code usually takes to get there."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen, self.message = text, threading.Event(), ""

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage() and not self.seen.is_set():
            self.message = record.getMessage()
            self.seen.set()


def started_together(script: str, *argvs: list[str]) -> list[subprocess.Popen[str]]:
    """One ``python -c script`` per argument list, told to go only once every one is ready.

    ``script`` prints ``ready`` once set up, then waits for a line on stdin: interpreter start-up
    differs by tens of ms, and without a common start one process could finish its work before the
    other had imported anything, and nothing would be concurrent."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    assert [p.stdout.readline() for p in procs if p.stdout] == ["ready\n"] * len(procs)
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    return procs


def until_its_sessions_end(url: str) -> None:
    """Wait until no session but this process's is connected to ``url``'s database.

    A process killed with SIGKILL may already have sent its COMMIT: the server still reads it
    from the socket, and commits, after the process is gone. A test that reads what was
    committed "before the kill" must wait for the killed process's sessions to end first. The
    test's own sessions may stay open meanwhile (a poll's connection; the idle pooled one of
    each state-schema upgrade, whose engine is never disposed): they are told apart by their
    client ports, those of this process's sockets."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND client_port <> ALL(%s)"
    deadline = time.monotonic() + GUARD_SECONDS
    with psycopg.connect(url, autocommit=True) as conn:
        while conn.execute(query, (_own_ports(),)).fetchone() != (0,):
            assert time.monotonic() < deadline, "a session of the killed process is still there"
            time.sleep(0.01)


def _own_ports() -> list[int]:
    """The local ports of this process's TCP sockets (its database sessions' client ports)."""
    return [c.laddr.port for c in psutil.Process().net_connections(kind="tcp") if c.laddr]


def cli_until(
    command: tuple[str, ...], log: Path, reached: Callable[[], bool], env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The real ``flowyard`` CLI running ``command`` in its own process group (for the test to
    SIGKILL), once ``reached()``; fails, with the CLI's output, if it ends first. ``env``: variables
    added to this process's environment."""
    with log.open("wb") as out:
        cli = spawn_group(
            [sys.executable, "-m", "deployments.cli", *command],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + GUARD_SECONDS
    while not reached():
        assert cli.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"the CLI never got there; its output:\n{log.read_text()[-2000:]}"
        time.sleep(0.05)
    return cli


def sigkill(cli: subprocess.Popen[bytes]) -> int:
    """SIGKILL ``cli``'s whole process group, as the OOM killer or a ``kill -9`` would (no handler
    runs, no child is told), and reap it; returns its exit status."""
    os.killpg(cli.pid, signal.SIGKILL)
    return cli.wait()


def until_not(holds: Callable[[], bool], what: str) -> None:
    """Wait until ``holds()`` no longer does; fail with ``what`` (what still holds) after :data:`GUARD_SECONDS`."""
    deadline = time.monotonic() + GUARD_SECONDS
    while holds():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
