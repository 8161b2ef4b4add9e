"""A project's own Alembic migrations: status, timed upgrades one revision at a time, offline plans, downgrades.

The migrations directory is an ordinary Alembic script directory: an ``env.py`` and a
``versions/`` folder (``script.py.mako`` only matters for ``alembic revision``). No
``alembic.ini`` is needed: flowyard hands ``env.py`` the target as the main option
``sqlalchemy.url`` (a ``postgresql+psycopg://`` URL), which the stock Alembic template reads
through ``config.get_main_option("sqlalchemy.url")`` or ``engine_from_config``. For dry runs
``env.py`` must support offline mode (``context.is_offline_mode()``), as the template does.

Upgrades run one revision per ``alembic upgrade <rev>`` call so each is timed and committed
on its own, and its checksum recorded right after (see :mod:`tasks.revision_checksums`).
Alembic's ``context`` is process-global: run one migration command at a time per process.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError

from tasks import revision_checksums
from tasks.db import connection, sqlalchemy_url
from tasks.errors import UserError, first_line


@dataclass(frozen=True)
class Revision:
    revision: str
    doc: str
    path: str


@dataclass(frozen=True)
class MigrationStatus:
    current: tuple[str, ...]
    heads: tuple[str, ...]
    applied: tuple[Revision, ...]
    """Oldest first."""
    pending: tuple[Revision, ...]
    """In apply order, up to the target."""
    target: str

    @property
    def applied_files(self) -> list[tuple[str, str]]:
        return [(r.revision, r.path) for r in self.applied]


@dataclass(frozen=True)
class RevisionRun:
    revision: str
    doc: str
    direction: str
    seconds: float


def check_migrations_dir(migrations_dir: str | Path) -> Path:
    """The directory as a Path; a one-line UserError unless it holds ``env.py`` and ``versions/``."""
    path = Path(migrations_dir)
    if path.exists() and not path.is_dir():
        raise UserError(
            f"migrations directory {str(path)!r} is a file; pass the path of your Alembic folder (env.py + versions/)"
        )
    if not path.is_dir():
        raise UserError(
            f"migrations directory {str(path)!r} does not exist; pass the path of your Alembic folder (env.py + versions/)"
        )
    if not (path / "env.py").is_file():
        raise UserError(
            f"{str(path)!r} has no env.py; it must be an Alembic script directory (env.py + versions/)"
        )
    if not (path / "versions").is_dir():
        raise UserError(f"{str(path)!r} has no versions/ folder; create it and put the revision files there")
    return path


def alembic_config(url: str, migrations_dir: str | Path, output: io.StringIO | None = None) -> Config:
    """An in-memory Alembic config for the user's directory, pointing ``sqlalchemy.url`` at ``url``."""
    config = Config(output_buffer=output)
    config.set_main_option("script_location", str(check_migrations_dir(migrations_dir).resolve()))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    # As flowyard's own sessions (tasks.db.SESSION_ISOLATION), for an env.py that builds its engine
    # from this section (``engine_from_config``, Alembic's template): a hot standby refuses a DBA's
    # ``serializable`` default, so a status or a dry run of a replica failed at its first statement.
    config.set_main_option("sqlalchemy.isolation_level", "READ COMMITTED")
    return config


def _alembic(action: Callable[[], Any], migrations_dir: str | Path) -> Any:
    """Run an Alembic call, turning its command errors (unknown revision, multiple heads) and a
    revision file or env.py Python cannot parse (Alembic imports them) into UserErrors."""
    try:
        return action()
    except CommandError as exc:
        raise UserError(f"alembic ({migrations_dir}): {first_line(exc)}") from None
    except SyntaxError as exc:
        raise UserError(
            f"{exc.filename}, line {exc.lineno}: {exc.msg}; fix the Python of that migration file"
        ) from None


def _revision(script: Script) -> Revision:
    return Revision(
        script.revision, (script.doc or "").strip().splitlines()[0] if script.doc else "", script.path
    )


def current_heads(config: Config) -> tuple[str, ...]:
    """The revisions the database is at, read through the user's ``env.py`` (so its version table)."""
    scripts = ScriptDirectory.from_config(config)
    heads: list[str] = []

    def capture(_rev: Any, context: Any) -> list[Any]:
        heads.extend(context.get_current_heads())
        return []

    with EnvironmentContext(config, scripts, fn=capture, dont_mutate=True):
        scripts.run_env()
    return tuple(heads)


def migration_status(url: str, migrations_dir: str | Path, target: str = "head") -> MigrationStatus:
    """Applied revisions (ancestors of the current heads), pending ones up to ``target``, and the heads.

    Connects once through flowyard first: an unreachable database is then a one-line
    UserError, not the SQLAlchemy traceback the user's ``env.py`` would raise.
    """
    with connection(url):
        pass
    config = alembic_config(url, migrations_dir)
    scripts = ScriptDirectory.from_config(config)

    def read() -> MigrationStatus:
        current = current_heads(config)
        applied_ids = {s.revision for head in current for s in scripts.walk_revisions("base", head)}
        ordered = list(reversed(list(scripts.walk_revisions("base", "heads"))))
        wanted = {s.revision for s in scripts.walk_revisions("base", target)}
        return MigrationStatus(
            current=current,
            heads=tuple(scripts.get_heads()),
            applied=tuple(_revision(s) for s in ordered if s.revision in applied_ids),
            pending=tuple(_revision(s) for s in ordered if s.revision in wanted - applied_ids),
            target=target,
        )

    return _alembic(read, migrations_dir)


def upgrade_revision(url: str, migrations_dir: str | Path, revision: Revision) -> RevisionRun:
    """Upgrade to exactly ``revision`` (its own transaction), time it, and record its checksum."""
    config = alembic_config(url, migrations_dir)
    started = time.monotonic()
    _alembic(lambda: command.upgrade(config, revision.revision), migrations_dir)
    seconds = time.monotonic() - started
    revision_checksums.record(url, revision.revision, revision.path, seconds)
    return RevisionRun(revision.revision, revision.doc, "upgrade", seconds)


def downgrade_revision(url: str, migrations_dir: str | Path, revision: Revision) -> RevisionRun:
    """Downgrade one step, undoing ``revision`` (the single current head), and forget its checksum."""
    config = alembic_config(url, migrations_dir)
    started = time.monotonic()
    _alembic(lambda: command.downgrade(config, "-1"), migrations_dir)
    seconds = time.monotonic() - started
    revision_checksums.forget(url, revision.revision)
    return RevisionRun(revision.revision, revision.doc, "downgrade", seconds)


def check_rollback_choice(steps: int | None, to: str | None) -> None:
    """Refuse a rollback asked for both ways, or by fewer than one step (before any lock or backup)."""
    if steps is not None and to is not None:
        raise UserError(
            "give --steps or --to, not both: --steps N undoes the N newest revisions, --to REV every one applied after REV"
        )
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")


def rollback_revisions(status: MigrationStatus, steps: int | None = None, to: str | None = None) -> list[Revision]:
    """The revisions a rollback undoes, newest first: the ``steps`` (default 1) most recent applied
    ones, or every one applied after ``to`` (an applied revision or a unique prefix of one; ``base``
    undoes them all). ``to`` makes a rollback safe to re-run: one killed halfway and run again stops
    at the same revision, where ``steps`` would count again from wherever the first run stopped.
    UserError when they cannot be undone."""
    check_rollback_choice(steps, to)
    if len(status.current) > 1:
        raise UserError(
            f"the database has several current heads ({', '.join(status.current)}); roll back with alembic"
        )
    newest_first = list(reversed(status.applied))
    if to is None:
        count = 1 if steps is None else steps
        if count > len(newest_first):
            raise UserError(f"cannot roll back {count} revisions: only {len(newest_first)} are applied")
        return newest_first[:count]
    if to == "base":
        return newest_first
    matches = [i for i, r in enumerate(newest_first) if r.revision.startswith(to)]
    if len(matches) != 1:
        applied = ", ".join(r.revision for r in status.applied) or "none"
        why = "matches several applied revisions" if matches else "is not an applied revision"
        raise UserError(f"cannot roll back to {to!r}: it {why} (applied: {applied}); give one of them, or base")
    return newest_first[: matches[0]]


def offline_plan(url: str, migrations_dir: str | Path, status: MigrationStatus) -> str:
    """The SQL Alembic would run from the current heads to the target (offline mode; touches nothing)."""
    if not status.pending:
        return "-- nothing to apply: the database is at the target\n"
    if len(status.current) > 1:
        raise UserError("the database has several current heads; a dry-run plan needs a single one")
    output = io.StringIO()
    config = alembic_config(url, migrations_dir, output)
    span = f"{status.current[0]}:{status.target}" if status.current else status.target
    _alembic(lambda: command.upgrade(config, span, sql=True), migrations_dir)
    return output.getvalue()
