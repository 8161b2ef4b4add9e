"""An exclusive lock between flowyard processes on one machine: a ``flock`` on a file."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing), waiting for its holder.

    The kernel releases it when its holder dies, even by SIGKILL, so a crashed start never
    leaves the next one waiting on a stale lock, as a lock *file* (created, then removed) would."""
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
