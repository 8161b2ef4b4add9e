"""Long-running background services (Prefect server, deployment server) tracked by pid files.

Each service runs in its own process group, so stopping it also ends whatever it spawned.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tasks.errors import UserError
from tasks.file_lock import exclusive
from tasks.process_group import group_members, spawn_group, terminate_group


@dataclass(frozen=True)
class Service:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    ready: Callable[[], bool] | None = None
    ready_timeout: float = 120.0
    cwd: Path | None = None


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def log_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.log"


def running_pid(run_dir: Path, name: str) -> int | None:
    """The pid of the running service, or None (a stale pid file is removed)."""
    path = pid_file(run_dir, name)
    if not path.exists():
        return None
    pid = int(path.read_text().strip() or 0)
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        alive = False
    if not alive:
        path.unlink(missing_ok=True)
        return None
    return pid


def start(service: Service, run_dir: Path) -> bool:
    """Start the service unless it runs already; wait until it is ready. True if it started it.

    Two flowyard processes at once (two ``sync trigger`` on a cold start) take turns, under
    its start lock (:func:`tasks.file_lock.exclusive`, held while it is checked for, spawned
    and waited for): both used to find no pid file and spawn a server each, the second dying on
    the taken port and, when it wrote the pid file last, leaving the running server untracked
    (``flowyard down`` no longer stopped it). A service that runs already is waited for too,
    until it is ready: taken as ready while still coming up, the second command went on to a
    server not yet listening and ended in a traceback."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(lock_file(run_dir, service.name)):
        if running_pid(run_dir, service.name) is not None:
            if not _wait_ready(service, lambda: running_pid(run_dir, service.name) is None):
                raise UserError(
                    f"{service.name}, started by another flowyard process, did not get ready "
                    f"(see {log_file(run_dir, service.name)})"
                )
            return False
        return _spawn(service, run_dir)


def lock_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.lock"


def _spawn(service: Service, run_dir: Path) -> bool:
    """Spawn the service and wait until it is ready; stopped, and one line, when it is not."""
    log_path = log_file(run_dir, service.name)
    with log_path.open("ab") as log:
        this_start = log.tell()
        proc = spawn_group(service.argv, env=service.env, cwd=service.cwd, stdout=log, stderr=log)
    pid_file(run_dir, service.name).write_text(str(proc.pid))
    if not _wait_ready(service, lambda: proc.poll() is not None):
        stop(run_dir, service.name)
        with log_path.open("rb") as log:
            log.seek(this_start)
            output = log.read().decode(errors="replace")
        raise UserError(f"{service.name} did not start (see {log_path}): {failure_cause(output)}")
    return True


def _wait_ready(service: Service, stopped: Callable[[], bool]) -> bool:
    """Wait until ``service`` answers ready: True; False once ``stopped`` says its process ended
    or its ``ready_timeout`` ran out."""
    deadline = time.monotonic() + service.ready_timeout
    while service.ready is not None and not service.ready():
        if stopped() or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


# ``asyncpg.exceptions.InsufficientPrivilegeError: permission denied …``: an exception line of a
# traceback, at column 0 (uvicorn's own ``ERROR:    …`` lines are not).
_EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception): \S")


def failure_cause(output: str) -> str:
    """The cause a service that failed to start printed: the first exception line of its output
    (a chained traceback prints the root cause first, its wrappers after), else its last lines."""
    lines = output.strip().splitlines()
    causes = [line.strip() for line in lines if _EXCEPTION_LINE.match(line)]
    return causes[0] if causes else " | ".join(lines[-3:])


def stop(run_dir: Path, name: str, grace_seconds: float = 60.0) -> bool:
    """Stop the service. False when it was not running.

    SIGTERM goes to the service's own process, which stops what it spawned its own way: the
    deployment server gives each flow run one SIGTERM and waits (up to
    ``deployments.serve.FLOW_RUNS_STOP_SECONDS``) while it stops its agents gracefully; a
    group-wide SIGTERM would reach the flow runs a second time. Whatever of its process group
    is left after ``grace_seconds`` is killed.
    """
    pid = running_pid(run_dir, name)
    if pid is None:
        return False
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    terminate_group(pid, 0.0)
    pid_file(run_dir, name).unlink(missing_ok=True)
    return True
