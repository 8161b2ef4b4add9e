"""What a migration run did, as Prefect artifacts: tables of revisions and row counts, and a markdown summary.

The flow fills one :class:`MigrationReport` as it goes and publishes it in a ``finally``,
so failed and restored runs leave the same artifacts as successful ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from tasks.alembic_deploy import MigrationStatus, RevisionRun
from tasks.migration_preflight import Preflight
from tasks.migration_validation import Validation
from tasks.pg_backup import Backup, RestoreReport

PLAN_LIMIT = 50_000


@dataclass
class MigrationReport:
    action: str
    """deploy, dry-run or rollback."""
    database: str
    migrations_dir: str
    outcome: str = "running"
    preflight: Preflight | None = None
    backup: Backup | None = None
    revisions: list[RevisionRun] = field(default_factory=list)
    validation: Validation | None = None
    restore: RestoreReport | None = None
    plan: str | None = None
    adopted: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def row_counts_before(self) -> dict[str, int]:
        return self.preflight.integrity.row_counts if self.preflight else {}

    @property
    def row_counts_after(self) -> dict[str, int]:
        if self.restore:
            return self.restore.row_counts
        return self.validation.integrity.row_counts if self.validation else {}

    def revision_rows(self) -> list[dict[str, object]]:
        return [
            {
                "revision": r.revision,
                "description": r.doc,
                "direction": r.direction,
                "seconds": round(r.seconds, 3),
            }
            for r in self.revisions
        ]

    def row_count_rows(self) -> list[dict[str, object]]:
        before, after = self.row_counts_before, self.row_counts_after
        return [
            {"table": t, "rows_before": before.get(t), "rows_after": after.get(t)}
            for t in sorted(before.keys() | after.keys())
        ]

    def markdown(self) -> str:
        lines = [f"# Migration {self.action}: {self.outcome}", "", f"- database: `{self.database}`"]
        lines.append(f"- migrations: `{self.migrations_dir}`")
        if self.preflight:
            p = self.preflight
            lines.append(f"- server: PostgreSQL {p.server_version}, database {_size(p.database_bytes)}")
            lines.append(
                f"- before: at {_revs(p.status.current)}; pending {_revs(r.revision for r in p.status.pending)}"
            )
            lines += [f"- warning: {w}" for w in p.warnings]
        if self.adopted:
            lines.append(f"- checksums recorded for revisions applied before flowyard: {_revs(self.adopted)}")
        if self.backup:
            b = self.backup
            lines.append(f"- backup: `{b.path}` ({_size(b.size_bytes)}, {_kinds(b.contents)})")
        if self.revisions:
            lines += ["", "| revision | description | direction | seconds |", "|---|---|---|---|"]
            lines += [f"| {r.revision} | {r.doc} | {r.direction} | {r.seconds:.3f} |" for r in self.revisions]
        if self.validation:
            lines += ["", "## Validation"]
            lines += [
                f"- {'✅' if q.passed else '❌'} `{q.query}` {q.detail}" for q in self.validation.queries
            ]
            lines += [
                f"- ❌ {p.check} in {p.table}: {p.detail} ({p.count})" for p in self.validation.new_problems
            ]
            if self.validation.ok:
                lines.append(
                    "- ✅ integrity: no new NULLs in NOT NULL columns, FK orphans or invalid indexes"
                )
        if self.error:
            lines += ["", f"**Error:** {self.error}"]
        if self.restore:
            r = self.restore
            lines.append(
                f"**Restored** `{r.database}` from `{r.backup_path}` in {r.seconds:.1f}s "
                f"({_kinds(r.restored)}; {r.terminated_connections} other sessions terminated)"
            )
        if self.row_count_rows():
            lines += ["", "| table | rows before | rows after |", "|---|---|---|"]
            lines += [
                f"| {r['table']} | {_count(r['rows_before'])} | {_count(r['rows_after'])} |"
                for r in self.row_count_rows()
            ]
        if self.plan is not None:
            plan = self.plan if len(self.plan) <= PLAN_LIMIT else self.plan[:PLAN_LIMIT] + "\n-- (truncated)"
            lines += ["", "## SQL plan (nothing was changed)", "", "```sql", plan.rstrip(), "```"]
        return "\n".join(lines) + "\n"


def status_markdown(database: str, status: MigrationStatus) -> str:
    lines = [f"# Migration status of `{database}`", "", f"- current: {_revs(status.current)}"]
    lines.append(f"- head: {_revs(status.heads)}")
    lines.append(f"- applied: {_revs(r.revision for r in status.applied)}")
    lines.append(f"- pending: {_revs(f'{r.revision} ({r.doc})' for r in status.pending)}")
    return "\n".join(lines) + "\n"


def artifact_key(prefix: str, database: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    name = database.rsplit("/", 1)[-1].split("?")[0]
    return re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{name}".lower()).strip("-")[:100]


def publish(report: MigrationReport) -> None:
    """Table artifacts (revisions with durations, row counts before/after) and the markdown summary."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = artifact_key(f"migrations-{report.action}", report.database)
    create_table_artifact(
        report.revision_rows() or [{"revision": "(none)", "description": "", "direction": "", "seconds": 0}],
        key=f"{key}-revisions",
        description=f"Revisions of this {report.action} run and their durations ({report.outcome})",
    )
    create_table_artifact(
        report.row_count_rows() or [{"table": "(no tables)", "rows_before": None, "rows_after": None}],
        key=f"{key}-row-counts",
        description="Rows per table before and after the run",
    )
    create_markdown_artifact(
        report.markdown(), key=key, description=f"Migration {report.action}: {report.outcome}"
    )


def _revs(revisions: Iterable[str]) -> str:
    items = list(revisions)
    return ", ".join(f"`{r}`" for r in items) if items else "none"


def _kinds(kinds: dict[str, int]) -> str:
    main = ("TABLE", "TABLE DATA", "INDEX", "CONSTRAINT", "FK CONSTRAINT", "SEQUENCE")
    return ", ".join(f"{kinds[k]} {k.lower()}" for k in main if k in kinds) or "empty"


def _count(value: object) -> str:
    return "—" if value is None else f"{value:,}"


def _size(size_bytes: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size_bytes >= factor:
            return f"{size_bytes / factor:,.1f} {unit}"
    return f"{size_bytes} B"
