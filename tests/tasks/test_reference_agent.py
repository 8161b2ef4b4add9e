"""The bundled reference agent, run as the real subprocess flowyard starts (its built-in template)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.agent_process import REFERENCE_TEMPLATE


def _chain(task_id: int, steps: int) -> str:
    digest = hashlib.sha256(str(task_id).encode()).hexdigest()
    for step in range(1, steps + 1):
        digest = hashlib.sha256(f"{digest}:{task_id}:{step}".encode()).hexdigest()
    return digest


def _wchan_exposed() -> bool:
    """Whether this kernel names where a process waits in ``/proc/PID/wchan``; one that hides it
    (no kallsyms, a sandbox) reads ``0`` for every process. Asked of a stopped process, which
    waits in ``do_signal_stop`` until continued: a running one reads ``0`` on every kernel, and
    the agent, sleeping a moment per step, switches between the two faster than they can be read."""
    probe = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        probe.send_signal(signal.SIGSTOP)
        os.waitpid(probe.pid, os.WUNTRACED)  # returns once it is stopped (SIGSTOP cannot be ignored)
        return Path(f"/proc/{probe.pid}/wchan").read_text() != "0"
    finally:
        probe.kill()
        probe.wait()


def _blocked_writing(agent: subprocess.Popen[bytes]) -> None:
    """Wait until the agent is stuck in a write to its stdout pipe, full since nobody reads it
    (the kernel names where a sleeping process waits: ``anon_pipe_write``, ``pipe_write``).

    The wait ends either way: the agent blocks there for good once the pipe is full, or it
    ends, which fails the test. Where the kernel never names the wait, it would spin for good."""
    if not _wchan_exposed():
        pytest.skip("this kernel does not expose /proc/PID/wchan (it reads 0 for a stopped process)")
    wchan = Path(f"/proc/{agent.pid}/wchan")
    while "pipe_write" not in wchan.read_text():
        if agent.poll() is not None:
            pytest.fail(f"the agent ended (exit {agent.returncode}) before its stdout pipe filled")
        os.sched_yield()


def test_sigterm_in_the_middle_of_a_write_still_ends_with_a_consistent_checkpoint(tmp_path: Path) -> None:
    """SIGTERM lands while the agent writes a message (blocked on a full pipe), and flowyard's
    group SIGTERM may be followed by another: the agent still leaves a last checkpoint whose
    step and digest belong together, and exits 143. Its handler wrote the checkpoint itself, so
    the write it interrupted made it fail with 'reentrant call' (a traceback, exit 1, no checkpoint)."""
    task_id = 7
    envelope = {"task_id": task_id, "payload": {"steps": 1_000_000}}
    agent = subprocess.Popen(
        REFERENCE_TEMPLATE.argv,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert agent.stdin is not None
    agent.stdin.write((json.dumps(envelope) + "\n").encode())
    agent.stdin.flush()
    try:
        _blocked_writing(agent)
        for _ in range(3):
            agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate()
    finally:
        if agent.poll() is None:
            agent.kill()
    assert (agent.returncode, err.decode()) == (128 + signal.SIGTERM, "")
    lines = out.decode().splitlines()
    last = json.loads(lines[-1])
    assert last["kind"] == "checkpoint", lines[-3:]
    step = last["state"]["step"]
    assert 0 < step < 1_000_000 and last["state"]["digest"] == _chain(task_id, step)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"steps": "abc"}, 'the payload\'s steps must be a whole number, 0 or more, not "abc"'),
        ({"steps": 2.5}, "the payload's steps must be a whole number, 0 or more, not 2.5"),
        ({"sleep": -1}, "the payload's sleep must be a number of seconds from 0 to 86400, not -1"),
        ({"sleep": 1e300}, "the payload's sleep must be a number of seconds from 0 to 86400, not 1e+300"),
        ({"crash_after": "x"}, 'the payload\'s crash_after must be a whole number, 0 or more, not "x"'),
    ],
)
def test_an_unusable_knob_is_an_error_that_is_not_retried(
    tmp_path: Path, payload: dict[str, object], error: str
) -> None:
    """A knob of the wrong type or out of range killed the agent with a traceback on stderr (exit
    1) and no protocol error, so Prefect retried the task to the same end on every attempt."""
    agent = subprocess.run(
        REFERENCE_TEMPLATE.argv,
        cwd=tmp_path,
        input=json.dumps({"task_id": 3, "payload": payload}) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert (agent.returncode, agent.stderr) == (2, "")
    assert [json.loads(line) for line in agent.stdout.splitlines()] == [
        {"kind": "error", "message": error, "retryable": False}
    ]
    assert not (tmp_path / "result.txt").exists()


def test_the_default_knobs_and_a_null_crash_after_run_to_the_end(tmp_path: Path) -> None:
    agent = subprocess.run(
        REFERENCE_TEMPLATE.argv,
        cwd=tmp_path,
        input=json.dumps({"task_id": 4, "payload": {"crash_after": None, "sleep": 0}}) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert (agent.returncode, agent.stderr) == (0, "")
    assert (tmp_path / "result.txt").read_text() == _chain(4, 3) + "\n"
