"""The progress line of a bulk run."""

from __future__ import annotations

import time

from tasks.bulk_progress import Progress


def test_cached_chunks_alone_give_no_eta_then_fresh_rows_give_one():
    progress = Progress(total_rows=1000, total_chunks=4, started=time.monotonic() - 100.0)
    assert progress.advance(250, fresh=False).endswith("0 rows/s, ETA unknown")
    line = progress.advance(250, fresh=True)
    eta = float(line.rsplit("ETA ", 1)[1].removesuffix("s"))
    # 250 fresh rows in ~100 s: 500 rows left take ~200 s (more only if this test stalls for minutes)
    assert line.startswith("2/4 chunks, 500 rows") and 200 <= eta < 400
    progress.advance(500, fresh=True)
    assert progress.describe().endswith("ETA 0s")
