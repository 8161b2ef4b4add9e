"""Python subprocesses started from one instant, for tests of work that must really overlap."""

from __future__ import annotations

import subprocess
import sys


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
