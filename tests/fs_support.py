"""File-system states the tests need but cannot make with permissions: they run as root."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """``path`` (a file or a directory) immutable (``chattr +i``) for the block: nothing can write
    it (in a directory, create an entry), not even root, whom ``chmod`` does not stop. Skips the
    test when ``chattr`` cannot set the attribute (not root, a file system without it), and
    always clears it again, or pytest could not remove the temporary directory."""
    try:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.skip("chattr is not installed: cannot make a path that root cannot write")
    if made.returncode != 0:
        pytest.skip(f"chattr +i {path} failed: {made.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
