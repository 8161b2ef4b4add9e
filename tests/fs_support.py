"""File-system states the tests need but cannot make with permissions: they run as root."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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


@contextmanager
def small_tmpfs(path: Path, size: str = "64k", *, inodes: int | None = None) -> Iterator[Path]:
    """``path``, a new tmpfs of ``size`` (root only: skips the test when the mount is refused), a
    disk a test can fill (:func:`fill_up`); unmounted after. A tmpfs takes a new directory or an
    empty file on a full disk (they cost no data block), as most file systems do not: ``inodes``
    caps its files (its root directory counts), so that making one more fails with ENOSPC too."""
    path.mkdir()
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill_up(directory: Path, *, leave: int = 0) -> Path:
    """Fill the file system of ``directory`` (a :func:`small_tmpfs`) with a filler file, all but
    ``leave`` bytes (whole pages of it); returns the filler, whose removal frees the space again."""
    reserve, filler = directory / "reserve", directory / "filler"
    if leave:
        reserve.write_bytes(b"\0" * leave)
    with suppress(OSError), filler.open("ab", buffering=0) as out:
        while True:
            out.write(b"\0" * 4096)
    reserve.unlink(missing_ok=True)
    return filler
