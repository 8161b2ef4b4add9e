"""Whole-file replacement, read by a concurrent reader the whole time."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tasks.file_replace import replace_file


def test_a_reader_sees_only_whole_versions_while_the_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "dashboard.md"
    versions = [bytes([letter]) * 4_000_000 for letter in b"ab"]
    replace_file(path, versions[0])
    reads: list[bool] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            reads.append(path.read_bytes() in versions)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for turn in range(1, 21):
            replace_file(path, versions[turn % 2])
    finally:
        done.set()
        reader.join()
    assert reads and all(reads), f"{reads.count(False)} of {len(reads)} reads saw a file cut off"
    assert path.read_bytes() == versions[0]
    assert [p.name for p in tmp_path.iterdir()] == ["dashboard.md"]


def test_the_mode_is_a_plain_files_and_a_failed_replace_leaves_nothing(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    replace_file(tmp_path / "new" / "chart.png", b"png")
    assert os.stat(tmp_path / "new" / "chart.png").st_mode == os.stat(plain).st_mode
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        replace_file(tmp_path / "taken", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "plain", "taken"]
    assert list((tmp_path / "taken").iterdir()) == []
