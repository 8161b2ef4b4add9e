"""The last line against orphaned agents: a sidecar that ends agent groups if their worker dies.

A worker that gets SIGKILL (or whose runner ends it without a graceful shutdown, as a plain
``prefect serve`` 3.8.8 does when it gets SIGTERM itself; flowyard's own server in
``deployments.serve`` lets its flow runs stop first) cannot stop its agents, and each
agent runs in its own session, so nothing else would. Each flow run starts one reaper, in a
session of its own, and tells it on a pipe which agent process groups are alive (``+pgid``
/ ``-pgid``). When the pipe closes – the worker ended, cleanly or not – the reaper
SIGTERMs the groups still listed and every process carrying the worker's mark (agents'
descendants that left their groups, :func:`tasks.process_group.marked_pids`), SIGKILLs
them after the grace period, and exits. The tasks themselves are resumed by the next run
(``recover_stale_tasks``) from their last checkpoint.

Run as ``python -m tasks.agent_reaper <grace_seconds> [NAME=VALUE ...]`` (the mark).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Mapping

from tasks.process_group import terminate_groups


class Reaper:
    """The worker's side: start the sidecar, report agent groups as they come and go."""

    def __init__(self, grace_seconds: float, mark: Mapping[str, str]) -> None:
        entries = [f"{name}={value}" for name, value in mark.items()]
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, "-m", "tasks.agent_reaper", str(grace_seconds), *entries],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unwatch(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def close(self) -> None:
        """The worker is done: the reaper ends what is still listed (normally nothing) and exits."""
        with self._lock:
            if self._proc.stdin is not None and not self._proc.stdin.closed:
                self._proc.stdin.close()
        self._proc.wait()

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        with self._lock:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()


def main(argv: list[str]) -> int:
    grace = float(argv[1]) if len(argv) > 1 else 5.0
    mark = dict(entry.split("=", 1) for entry in argv[2:])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is the worker's business
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        text = line.strip()
        if text.startswith("+"):
            groups.add(int(text[1:]))
        elif text.startswith("-"):
            groups.discard(int(text[1:]))
    terminate_groups(groups, grace, mark or None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
