"""Files replaced whole: a reader, or a crash at any instant, sees the old contents or the new, never a mix."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` as ``path`` through a temporary file beside it, flushed to disk and renamed over it.

    Written in place, a file is truncated first: a dashboard open in a viewer, or one whose run
    was killed mid-write, showed an empty or cut-off file. The rename is atomic on one file system;
    a crash before it leaves only a hidden ``.<name>.*.tmp`` file, never a damaged ``path``. The
    new file gets the mode a plain ``open`` would give (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
