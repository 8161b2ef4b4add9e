"""Child processes in their own process group, and how to end the whole group.

Prefect does not kill child processes when a run is cancelled, so everything flowyard
spawns (servers, agents, tools) starts a new session and is stopped by signalling the
group: SIGTERM first, SIGKILL after a grace period. Agents' descendants that leave the
group are found by the marks they inherit in their environment (:func:`marked_pids`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil


def spawn_group(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    stdin: IO[Any] | int | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new session (and so of a new process group)."""
    return subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        stdin=stdin,
        start_new_session=True,
    )


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes whose process group is ``pgid`` (zombies excluded)."""
    return [proc for proc, group in _live_processes() if group == pgid]


def _live_processes() -> list[tuple[psutil.Process, int]]:
    """Every live process with its process group, from one walk of the process table."""
    live = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE:
                live.append((proc, os.getpgid(proc.pid)))
        except (ProcessLookupError, psutil.Error):
            continue
    return live


def marked_pids(mark: Mapping[str, str]) -> list[int]:
    """Live processes whose environment carries every entry of ``mark``.

    How the processes of an agent that left its group are found: a ``setsid`` or ``setpgid``
    in a grandchild (Node's ``detached: true``, a daemon's double fork) takes it out of the
    group, but it keeps the environment it inherited. Read from ``/proc/<pid>/environ`` (the
    environment a process started with; a zombie's is empty), ~1 ms for a hundred processes,
    where psutil's ``environ()`` per process costs several. A process that clears its
    environment on ``exec`` is not found; without ``/proc`` (not Linux) none is.
    """
    entries = [b"\0" + f"{name}={value}".encode() + b"\0" for name, value in mark.items()]
    try:
        names = os.listdir("/proc")
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as file:
                environ = b"\0" + file.read()
        except OSError:  # gone meanwhile, or another user's
            continue
        if all(entry in environ for entry in entries):
            found.append(int(name))
    return found


def terminate_group(pgid: int, grace_seconds: float = 5.0, mark: Mapping[str, str] | None = None) -> bool:
    """SIGTERM the group (and every process carrying ``mark``, see :func:`marked_pids`), wait up
    to ``grace_seconds``, then SIGKILL what is left.

    Returns True when SIGKILL was needed.
    """
    return terminate_groups((pgid,), grace_seconds, mark)


def terminate_groups(
    pgids: Collection[int], grace_seconds: float = 5.0, mark: Mapping[str, str] | None = None
) -> bool:
    """:func:`terminate_group` for several groups at once, sharing one grace period."""
    if not _signal_all(pgids, mark, signal.SIGTERM):
        return False
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if not any_left(pgids, mark):
            return False
        time.sleep(0.05)
    _signal_all(pgids, mark, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while any_left(pgids, mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def any_left(pgids: Collection[int], mark: Mapping[str, str] | None) -> bool:
    """Whether a process of the groups, or one carrying ``mark``, still runs. One walk of the
    process table however many groups: the reaper waits for all of a worker's agents at once."""
    wanted = set(pgids)
    return any(group in wanted for _, group in _live_processes()) or bool(mark and marked_pids(mark))


def _signal_all(pgids: Collection[int], mark: Mapping[str, str] | None, sig: signal.Signals) -> bool:
    """Signal the groups and the marked processes that left them; False when none of them exists.

    A marked process still in one of the groups has had the signal already: sent again, it ran an
    agent's SIGTERM handler a second time while the first still wrote its checkpoint, so the two
    were written on one line, which is no checkpoint, and the attempt lost its graceful_shutdown
    checkpoint (1 stop in 8 on a loaded machine)."""
    hit = False
    for pgid in pgids:
        hit = _signal(os.killpg, pgid, sig) or hit
    for pid in marked_pids(mark) if mark else ():
        if _group_of(pid) not in pgids:
            hit = _signal(os.kill, pid, sig) or hit
    return hit


def _group_of(pid: int) -> int | None:
    """The process group of ``pid``, None when it is gone."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _signal(send: Callable[[int, int], None], target: int, sig: signal.Signals) -> bool:
    """False when there is no such process (group), or it is not ours: a recycled id."""
    try:
        send(target, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
