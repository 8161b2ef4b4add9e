"""The files a quality check reads instead of a table: CSV, Parquet, JSON and JSON lines.

Kept apart from :mod:`quality.runner` (which imports Great Expectations) so that the CLI can
refuse a bad ``--file`` in one line before any server starts, in the words the check would use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tasks.errors import UserError, check_user_file, first_line

_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": pd.read_csv,
    ".parquet": pd.read_parquet,
    ".json": pd.read_json,
    ".jsonl": lambda file: pd.read_json(file, lines=True),
}


def check_data_file(path: str | Path) -> Path:
    """The file, if it can be opened and has a suffix a check reads; else one line saying which."""
    fix = "pass a .csv, .parquet, .json or .jsonl file"
    file = check_user_file(path, "data file", fix)
    if file.suffix not in _READERS:
        raise UserError(f"cannot read data file {file}: its suffix says no format a check reads; {fix}")
    return file


def read_data_file(path: str | Path) -> pd.DataFrame:
    """The file as a DataFrame; content pandas cannot parse (bytes that are not UTF-8, a CSV
    with ragged rows, a Parquet file that is not one) is one line naming the file."""
    file = check_data_file(path)
    try:
        return _READERS[file.suffix](file)
    except (OSError, ValueError) as exc:  # pandas' and pyarrow's parse errors are ValueErrors
        raise UserError(f"cannot read data file {file}: {first_line(exc)}; fix or replace the file") from None
