"""Ending several process groups at once, as the reaper does for a dead worker's agents."""

from __future__ import annotations

import subprocess
import sys

from tasks.process_group import group_members, spawn_group, terminate_groups

# Each group: a leader that forks a child, both sleeping; the stubborn ones ignore SIGTERM.
_GROUP = """
import os, signal, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.fork()
print("ready", flush=True)
time.sleep(600)
"""


def _start(kind: str) -> subprocess.Popen[bytes]:
    process = spawn_group([sys.executable, "-c", _GROUP, kind], stdout=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.readline()  # the leader has forked
    return process


def test_every_group_is_waited_for_and_the_stubborn_one_killed() -> None:
    """A stubborn group after an obedient one is still waited for and SIGKILLed: the wait
    looks at every group, not the first."""
    processes = [_start("obedient"), _start("obedient"), _start("stubborn")]
    pgids = [process.pid for process in processes]
    try:
        assert all(len(group_members(pgid)) == 2 for pgid in pgids)
        assert terminate_groups(pgids, grace_seconds=0.5) is True
        assert [group_members(pgid) for pgid in pgids] == [[], [], []]
        assert [process.wait() for process in processes] == [-15, -15, -9]
    finally:
        terminate_groups(pgids, grace_seconds=0)


def test_groups_that_end_on_sigterm_need_no_sigkill() -> None:
    processes = [_start("obedient"), _start("obedient")]
    pgids = [process.pid for process in processes]
    try:
        assert terminate_groups(pgids, grace_seconds=30) is False
        assert [group_members(pgid) for pgid in pgids] == [[], []]
    finally:
        terminate_groups(pgids, grace_seconds=0)
