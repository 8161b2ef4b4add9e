"""The bundled reference agent: deterministic, offline, speaking flowyard's agent protocol.

Run as ``python -m tasks.reference_agent``. Its start-up is part of each task's overhead,
so it imports the standard library's bare minimum (no ``json``, ``typing``, ``pathlib`` or
``subprocess`` unless asked to spawn a child) and the built-in template starts it without
``site`` and exits without interpreter teardown (see ``tasks.agent_process.REFERENCE_TEMPLATE``
and :func:`serve`). It reads the task envelope from argv[1], the
``FLOWYARD_TASK`` variable (either may name a file holding it: ``tasks.agent_wire.read_task``)
or the first stdin line, then performs ``steps`` steps of a SHA-256 chain, emitting a
checkpoint after each one, and writes ``result.txt`` into its working directory. Handed a
checkpoint, it resumes from that step with that digest, so a resumed run ends with the same
digest as an uninterrupted one.

Knobs (in the task payload), for the demo and the tests:

- ``steps`` (3), ``sleep`` seconds per step (0);
- ``crash_after``: exit 3 right after checkpointing step N, unless the attempt resumed at N or later;
- ``fail``: report this error (a string; any other true value gives a generic one) and exit 1 on
  every attempt;
- ``garbage``: also print lines that are not protocol messages;
- ``spawn_child``: start a long-sleeping child process (to prove the whole group is ended);
- ``detach_child``: start one in a session of its own, out of the agent's group, as a ``setsid``
  or Node's ``detached: true`` does (to prove it is ended too);
- ``ignore_term``: ignore SIGTERM (to exercise the SIGKILL after the grace period);
- ``artifact``: report a markdown artifact with the final digest.

A numeric knob it cannot use is an error that is not retryable (:func:`knob_problem`).
"""

from __future__ import annotations

import os
import sys
import time

# The C halves of ``signal`` and ``threading``: those modules import enum, functools and
# weakref machinery, ~14 ms of every start-up, for the three calls used here.
from _signal import SIG_IGN, SIGTERM, signal
from _thread import RLock, start_new_thread

try:  # CPython's built-in SHA-256: hashlib's default loads OpenSSL, ~2 ms of every start-up
    from _sha256 import sha256
except ImportError:  # Python 3.12+ (``_sha2``) or a build without it
    from hashlib import sha256

from tasks.agent_wire import TASK_ENV_VAR, dumps, is_checkpoint_request, loads, message_line, read_task

_KNOB_RANGES = {"steps": (int, 0, float("inf")), "crash_after": (int, 0, float("inf")), "sleep": (float, 0, 86400)}
"""Each numeric knob's type and range; a null ``crash_after`` is off, as a missing one is."""


def knob_problem(payload: dict) -> str | None:
    """Why a numeric knob of the payload cannot be used, else None. A wrong one (``"steps":
    "abc"``, ``"sleep": -1``) killed the agent with a traceback and Prefect retried it to the
    same end; said as an error that is not retryable, the task fails once, naming the knob."""
    for name, (kind, low, high) in _KNOB_RANGES.items():
        value = payload.get(name)
        if value is None and (name not in payload or name == "crash_after"):
            continue
        kinds = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            what = "a whole number, 0 or more" if kind is int else f"a number of seconds from {low} to {high}"
            return f"the payload's {name} must be {what}, not {dumps(value)}"
    return None


class ReferenceAgent:
    def __init__(self, envelope: dict) -> None:
        self.task_id = int(envelope["task_id"])
        self.payload: dict = envelope.get("payload") or {}
        state = (envelope.get("checkpoint") or {}).get("state") or {}
        # Step and digest in one attribute, replaced in one store: a checkpoint taken between
        # two stores (by the listener thread, or on SIGTERM) would pair a step with the digest
        # of the step before, and the resumed chain would end on another digest.
        self.position = (
            int(state.get("step", 0)),
            str(state.get("digest", sha256(str(self.task_id).encode()).hexdigest())),
        )
        self.resumed_from = self.position[0]
        self._out = RLock()  # the listener thread and the main thread both emit

    def emit(self, kind: str, **fields: object) -> None:
        with self._out:
            sys.stdout.write(message_line(kind, **fields) + "\n")
            sys.stdout.flush()

    def checkpoint(self) -> None:
        step, digest = self.position
        self.emit("checkpoint", state={"step": step, "digest": digest})

    def run(self) -> int:
        problem = knob_problem(self.payload)
        if problem:
            self.emit("error", message=problem, retryable=False)
            return 2
        steps = int(self.payload.get("steps", 3))
        sessions = [False] * bool(self.payload.get("spawn_child"))
        sessions += [True] * bool(self.payload.get("detach_child"))
        if sessions:
            import subprocess

            for new_session in sessions:
                child = subprocess.Popen(  # noqa: S603 - fixed argv
                    [sys.executable, "-c", "import time; time.sleep(600)"],
                    stdout=subprocess.DEVNULL,
                    start_new_session=new_session,
                )
                self.emit("log", message=f"spawned child pid {child.pid}")
        if self.resumed_from:
            self.emit("log", message=f"resuming at step {self.resumed_from}")
        fail = self.payload.get("fail")
        if fail:
            message = fail if isinstance(fail, str) else "failing as the payload's fail asks"
            self.emit("error", message=message, retryable=False)
            return 1
        crash_after = self.payload.get("crash_after")
        step, digest = self.position
        while step < steps:
            if self.payload.get("garbage"):
                print(f"garbage line {step} {{not json", flush=True)
                print(dumps({"kind": "progress", "percent": "lots"}), flush=True)
            time.sleep(float(self.payload.get("sleep", 0)))
            step += 1
            digest = sha256(f"{digest}:{self.task_id}:{step}".encode()).hexdigest()
            self.position = (step, digest)
            self.checkpoint()
            self.emit("progress", percent=100.0 * step / steps, message=f"step {step}")
            if crash_after is not None and step == int(crash_after) and self.resumed_from < step:
                print(f"crashing after step {step} as asked", file=sys.stderr, flush=True)
                return 3
        with open("result.txt", "w") as out:
            out.write(digest + "\n")
        if self.payload.get("artifact"):
            self.emit(
                "artifact",
                key=f"reference-agent-{self.task_id}",
                type="markdown",
                data=f"# Task {self.task_id}\n\nFinal digest after {steps} steps: `{digest}`",
                description="reference agent result",
            )
        self.emit("result", data={"digest": digest, "steps": steps, "resumed_from": self.resumed_from})
        return 0

    def listen(self) -> None:
        """Answer checkpoint requests arriving on stdin (runs in a background thread)."""
        for line in sys.stdin:
            if is_checkpoint_request(line):
                self.checkpoint()


def read_envelope(argv: list[str]) -> dict:
    if len(argv) > 1:
        return read_task(argv[1])
    if os.environ.get(TASK_ENV_VAR):
        return read_task(os.environ[TASK_ENV_VAR])
    return loads(sys.stdin.readline())


class _Terminated(Exception):
    """SIGTERM arrived: the run stops where it is and checkpoints on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    """Stop the run by raising, not by writing here: the signal may land inside a write to
    stdout, and writing from the handler then fails ('reentrant call inside BufferedWriter')
    and loses the checkpoint. Later SIGTERMs (flowyard's and a reaper's may both come) are
    ignored, so none interrupts the checkpoint on the way out."""
    signal(SIGTERM, SIG_IGN)
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    agent = ReferenceAgent(read_envelope(sys.argv if argv is None else argv))
    signal(SIGTERM, SIG_IGN if agent.payload.get("ignore_term") else _on_sigterm)
    start_new_thread(agent.listen, ())  # never joined: serve() leaves with os._exit
    try:
        code = agent.run()
        signal(SIGTERM, SIG_IGN)  # done: a late SIGTERM must not raise out of serve()'s last flush
    except _Terminated:
        agent.checkpoint()
        return 128 + SIGTERM
    return code


def serve() -> None:
    """Run, then leave without interpreter teardown (module cleanup and GC cost milliseconds of
    every task, and there is nothing to clean up: every message is flushed as it is written
    and ``result.txt`` is closed)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    serve()
