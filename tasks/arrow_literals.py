"""Python values as Arrow arrays without pyarrow's pandas import.

``pa.array`` and ``pa.scalar`` check every Python value for pandas objects, which imports
pandas into the process on first use: ~40 MB of RSS and ~1 s, for a literal or two. Bulk
copies compare and compute with a handful of literals (mapping expressions, incremental
cursor bounds) and never need pandas, so they build those arrays from bytes here.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from typing import Any

import pyarrow as pa


def literal_array(values: Sequence[Any]) -> pa.Array:
    """``values`` as an Arrow array, built from their bytes when they are all None, all bool, all
    int64, all numbers or all str (the 5M-row mapped copy's peak RSS went over 300 MB on the
    pandas import alone). Other values (mixed lists, ints beyond int64) are converted the usual
    way."""
    n, kinds = len(values), {type(v) for v in values}
    if kinds == {type(None)}:
        return pa.nulls(n)
    if kinds == {bool}:
        bits = sum(1 << i for i, v in enumerate(values) if v).to_bytes((n + 7) // 8, "little")
        return pa.Array.from_buffers(pa.bool_(), n, [None, pa.py_buffer(bits)])
    if kinds == {int} and all(-(2**63) <= v < 2**63 for v in values):
        return pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(struct.pack(f"<{n}q", *values))])
    if float in kinds and kinds <= {int, float}:
        return pa.Array.from_buffers(pa.float64(), n, [None, pa.py_buffer(struct.pack(f"<{n}d", *values))])
    if kinds == {str}:
        data = [v.encode() for v in values]
        offsets = list(itertools.accumulate((len(d) for d in data), initial=0))
        if offsets[-1] < 2**31:
            buffers = [pa.py_buffer(struct.pack(f"<{n + 1}i", *offsets)), pa.py_buffer(b"".join(data))]
            return pa.Array.from_buffers(pa.string(), n, [None, *buffers])
    return pa.array(values)
