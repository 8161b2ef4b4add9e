"""Progress of a bulk run: rows/s and ETA in a Prefect progress artifact and in the logs, and the
per-run table artifact (table, rows, chunks, seconds, rows/s, validation)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect.artifacts import create_table_artifact, update_progress_artifact

from tasks.prefect_artifacts import new_progress_artifact


@dataclass
class Progress:
    """Counts rows as chunks finish; rows/s is over this run's own work (cached chunks excluded)."""

    total_rows: int
    total_chunks: int
    done_rows: int = 0
    done_chunks: int = 0
    fresh_rows: int = 0
    started: float = field(default_factory=time.monotonic)
    artifact_id: UUID | None = None

    def start(self, run_key: str) -> None:
        self.artifact_id = new_progress_artifact(
            0.0, description=f"bulk copy {run_key}: {self.total_chunks} chunks planned"
        )

    def advance(self, rows: int, fresh: bool) -> str:
        self.done_rows += rows
        self.done_chunks += 1
        if fresh:
            self.fresh_rows += rows
        line = self.describe()
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, progress=self.percent, description=line)
        return line

    @property
    def percent(self) -> float:
        return 100.0 * self.done_chunks / self.total_chunks if self.total_chunks else 100.0

    @property
    def rate(self) -> float:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return self.fresh_rows / elapsed

    def describe(self) -> str:
        """One line for the log and the artifact. Until a chunk was copied in this run (a resumed
        run first counts its cached chunks) there is no rate, so no ETA either."""
        remaining = max(self.total_rows - self.done_rows, 0)
        if not remaining:
            eta = "0s"
        elif self.rate > 0:
            eta = f"{remaining / self.rate:.0f}s"
        else:
            eta = "unknown"
        return (
            f"{self.done_chunks}/{self.total_chunks} chunks, {self.done_rows:,} rows, "
            f"{self.rate:,.0f} rows/s, ETA {eta}"
        )


@dataclass(frozen=True)
class TableStat:
    table: str
    rows: int
    chunks: int
    seconds: float
    validation: str

    def row(self) -> dict[str, Any]:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return {
            "table": self.table,
            "rows": self.rows,
            "chunks": self.chunks,
            "seconds": round(self.seconds, 2),
            "rows/s": round(rate),
            "validation": self.validation,
        }


def publish_table_artifact(run_key: str, stats: list[TableStat]) -> None:
    create_table_artifact(
        table=[s.row() for s in stats],
        key="bulk-migrate",
        description=f"bulk copy {run_key}: per-table rows, chunks, time, throughput and validation",
    )
