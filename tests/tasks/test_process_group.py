"""Ending several process groups at once, as the reaper does for a dead worker's agents."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tasks.process_group import group_members, spawn_group, terminate_group, terminate_groups

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


# A leader whose child leaves the group (setsid), as a daemon's double fork does; each writes a
# line per SIGTERM it gets to a file of its own, and exits a moment after the first.
_MARKED = """
import os, signal, sys, time
if os.fork() == 0:
    os.setsid()
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(open(f"{sys.argv[1]}/{os.getpid()}", "a").write("term\\n")))
print("ready", flush=True)
while not got:
    time.sleep(0.01)
time.sleep(0.5)  # room for a second SIGTERM
"""


def test_each_process_of_a_group_and_its_escapees_gets_sigterm_once(tmp_path: Path) -> None:
    """The group is signalled, then the processes carrying the mark: an agent, in both, got SIGTERM
    twice, and its handler wrote its checkpoint twice on one line, which was no checkpoint."""
    mark = {"FLOWYARD_TEST_MARK": str(tmp_path)}
    process = spawn_group(
        [sys.executable, "-c", _MARKED, str(tmp_path)], env={**os.environ, **mark}, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    assert [process.stdout.readline() for _ in range(2)] == [b"ready\n", b"ready\n"]
    try:
        assert terminate_group(process.pid, grace_seconds=30, mark=mark) is False
        counts = sorted(path.read_text() for path in tmp_path.iterdir())
        assert counts == ["term\n", "term\n"], "the leader and the child that left its group, once each"
    finally:
        terminate_group(process.pid, grace_seconds=0, mark=mark)
