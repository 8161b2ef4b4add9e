"""Child processes in their own process group, and how to end the whole group.

Prefect does not kill child processes when a run is cancelled, so everything flowyard
spawns (servers, agents, tools) starts a new session and is stopped by signalling the
group: SIGTERM first, SIGKILL after a grace period. Nothing survives as an orphan.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
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
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def terminate_group(pgid: int, grace_seconds: float = 5.0) -> bool:
    """SIGTERM the group, wait up to ``grace_seconds``, then SIGKILL what is left.

    Returns True when SIGKILL was needed.
    """
    if not _signal_group(pgid, signal.SIGTERM):
        return False
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return False
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True
