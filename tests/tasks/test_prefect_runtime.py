"""The Prefect API server runs on PostgreSQL, and flows report to it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import httpx
import psycopg
import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from psycopg import sql

from tasks import services
from tasks.db import connect, database_name, one_row
from tasks.embedded_pg import free_port
from tasks.errors import ServerReadOnly, UserError
from tasks.prefect_runtime import (
    RUNNING_SERVER_FAILS,
    SERVE,
    SERVER,
    ZOMBIE_AUTOMATION,
    keep_zombie_automation,
    server_database,
    server_service,
    zombie_automation,
)
from tasks.services import log_file
from tasks.settings import Settings
from tests.conftest import TEST_SETTINGS, run_cli
from tests.online_support import WIDEN_AMOUNT, make_schema
from tests.process_support import GUARD_SECONDS, cli_until, sigkill


@flow(name="hello-postgres")
def _hello(n: int) -> int:
    return n * 2


def test_prefect_server_stores_runs_in_postgres(prefect_api, pg):
    assert httpx.get(f"{prefect_api}/health").json() is True
    assert _hello(21) == 42
    with psycopg.connect(pg.url(TEST_SETTINGS.prefect_database)) as conn:
        states = conn.execute(
            "SELECT r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id WHERE f.name = %s",
            ("hello-postgres",),
        ).fetchall()
    assert states == [("COMPLETED",)], "the flow run was not stored in the prefect database on PostgreSQL"


def test_prefect_server_batches_the_task_run_recorder(prefect_api):
    """The running server took flowyard's recorder batching: the setting names are ones Prefect
    reads (a misspelt one would leave the defaults, batch size 1 and a 5 s flush)."""
    recorder = httpx.get(f"{prefect_api}/admin/settings").json()["server"]["services"]["task_run_recorder"]
    assert (recorder["batch_size"], recorder["flush_interval"]) == (50, 1.0)


def test_a_prefect_database_holding_another_roles_prefect_is_one_line(prefect_api, state_db, limited_role):
    """On a shared server the ``prefect`` database may belong to someone else's flowyard; the
    Prefect server would die at start-up on its migrations table, and only its log would say why."""
    with pytest.raises(
        UserError,
        match=rf"^database {TEST_SETTINGS.prefect_database} \(.*\) holds another role's Prefect schema; set FLOWYARD_PREFECT_DATABASE",
    ):
        server_database(TEST_SETTINGS, limited_role.url(state_db))
    assert server_database(TEST_SETTINGS, state_db)[0].startswith("postgresql+asyncpg://")


def test_a_read_only_role_is_one_line_before_the_prefect_server_starts(state_db, limited_role, fresh_db, tmp_path):
    """A DBA's ``ALTER ROLE … SET default_transaction_read_only = on`` reaches the Prefect server's
    sessions too. On a Prefect database migrated before, the server started, answered healthy, and
    every flow run then failed on 503s from its API; on a fresh one it died at its first migration,
    and neither said where the setting was or how to fix it."""
    advice = limited_role.freeze_read_only(fresh_db)
    settings = Settings(home=tmp_path, prefect_port=free_port(), prefect_database=database_name(fresh_db))
    with pytest.raises(ServerReadOnly) as err:
        server_service(settings, limited_role.url(state_db))
    line = str(err.value)
    assert "\n" not in line
    assert advice in line
    assert line.endswith("; the Prefect server, which writes every run's state there, was not started")


def test_up_and_status_on_a_running_server_whose_database_froze_since_say_so_in_one_line(state_db, fresh_db, tmp_path):
    """A DBA's ``default_transaction_read_only``, set while the Prefect server runs, reaches every
    session the server opens from then on (once its pool's are ended or recycled, every flow run
    failed on 503s); its ``/health`` still answers, so ``flowyard up`` and ``status`` said it was
    healthy."""
    database = database_name(fresh_db)
    settings = Settings(home=tmp_path, prefect_port=free_port(), prefect_database=database)
    env = {
        "FLOWYARD_HOME": str(tmp_path),
        "FLOWYARD_PREFECT_PORT": str(settings.prefect_port),
        "FLOWYARD_PREFECT_DATABASE": database,
    }
    services.start(server_service(settings, state_db), settings.run_dir)
    try:
        with connect(fresh_db, autocommit=True) as conn:
            role = one_row(conn, "SELECT current_user")[0]
            conn.execute(
                sql.SQL("ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on").format(
                    sql.Identifier(role), sql.Identifier(database)
                )
            )
        frozen = (
            f"default_transaction_read_only is on, set for role {role} in database {database} (pg_settings.source: "
            f'database user); run ALTER ROLE "{role}" IN DATABASE "{database}" RESET default_transaction_read_only'
        )
        status = run_cli("status", env=env)
        assert status.returncode == 0 and "(healthy)" not in status.stdout, status.stdout
        server_line = next(line for line in status.stdout.splitlines() if line.startswith("prefect server:"))
        assert frozen in server_line and server_line.endswith(f"{RUNNING_SERVER_FAILS})")
        up = run_cli("up", env=env)
        assert up.returncode == 2 and up.stdout == "" and up.stderr.count("\n") == 1, up.stderr
        assert frozen in up.stderr and up.stderr.rstrip().endswith(RUNNING_SERVER_FAILS)
        assert services.running_pid(settings.run_dir, SERVE) is None, "no deployment served on it"
    finally:
        assert run_cli("down", env=env).returncode == 0


def test_a_prefect_database_whose_public_schema_takes_no_tables_of_the_role_is_one_line(
    state_db, limited_role, fresh_db, tmp_path
):
    """A DBA's empty database, with CONNECT and CREATE granted on it: since PostgreSQL 15 its
    ``public`` schema, where Prefect's migrations create its tables, takes tables only from the
    database's owner. The server died at start-up with "permission denied for schema public",
    naming neither the role nor the fix."""
    database = database_name(fresh_db)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("GRANT CONNECT, CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(database), sql.Identifier(limited_role.name)
            )
        )
    settings = Settings(home=tmp_path, prefect_port=free_port(), prefect_database=database)
    with pytest.raises(UserError) as err:
        server_service(settings, limited_role.url(state_db))
    assert str(err.value).startswith(f"database {database} (")
    assert str(err.value).endswith(
        f"lets role {limited_role.name} create no tables in schema public, where Prefect keeps its own; have "
        f'the schema\'s owner run GRANT CREATE ON SCHEMA "public" TO "{limited_role.name}", or set '
        "FLOWYARD_PREFECT_DATABASE to a database of your own"
    )


def test_the_schema_a_roles_search_path_gives_prefect_is_the_one_checked(state_db, limited_role, fresh_db, tmp_path):
    """A role whose ``search_path`` names a schema of its own (a DBA's database: ``CREATE SCHEMA
    prefect AUTHORIZATION …``, ``ALTER ROLE … SET search_path``) gets Prefect's tables there, not
    in ``public``: such a database was refused for lacking CREATE on ``public``, and one whose
    ``public`` took the role's tables passed though the server would die creating them in a
    schema it could not create in."""
    database = database_name(fresh_db)
    with connect(fresh_db, autocommit=True) as conn:
        role = sql.Identifier(limited_role.name)
        conn.execute(sql.SQL("GRANT CONNECT, CREATE ON DATABASE {} TO {}").format(sql.Identifier(database), role))
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(role))
        conn.execute("CREATE SCHEMA prefect")
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA prefect TO {}").format(role))
        conn.execute(
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = prefect, public").format(
                role, sql.Identifier(database)
            )
        )
    settings = Settings(home=tmp_path, prefect_port=free_port(), prefect_database=database)
    with pytest.raises(UserError) as err:
        server_database(settings, limited_role.url(state_db))
    assert str(err.value).endswith(
        f"lets role {limited_role.name} create no tables in schema prefect, where Prefect keeps its own; have "
        f'the schema\'s owner run GRANT CREATE ON SCHEMA "prefect" TO "{limited_role.name}", or set '
        "FLOWYARD_PREFECT_DATABASE to a database of your own"
    )
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(role))
        conn.execute(sql.SQL("ALTER SCHEMA prefect OWNER TO {}").format(role))
    assert server_database(settings, limited_role.url(state_db))[0].startswith("postgresql+asyncpg://")


def test_a_service_that_dies_at_start_up_names_its_root_cause(tmp_path):
    """The first exception line of this start's output: a chained traceback prints the root cause
    first; a failure logged by an earlier start is not this one's."""
    log_file(tmp_path, "dies").write_text("OldError: from an earlier start\n")
    script = "try:\n    raise KeyError('root cause')\nexcept KeyError as exc:\n    raise RuntimeError('wrapper') from exc\n"
    service = services.Service("dies", [sys.executable, "-c", script], ready=lambda: False, ready_timeout=60)
    with pytest.raises(UserError) as err:
        services.start(service, tmp_path)
    assert str(err.value).endswith(": KeyError: 'root cause'")
    assert services.running_pid(tmp_path, "dies") is None


def test_a_service_another_process_is_still_starting_is_waited_for(tmp_path):
    """Two commands at once (two ``sync trigger``) on a cold start: the second finds the server's
    pid file written by the first while the server is not listening yet. It waits until the
    server is ready, as the first does; it used to go on at once and end in a traceback."""
    other_start = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    services.pid_file(tmp_path, "slow").write_text(str(other_start.pid))
    answers = iter([False, False, True])
    asked = []

    def ready() -> bool:
        asked.append(answer := next(answers))
        return answer

    try:
        service = services.Service("slow", [sys.executable, "-c", "pass"], ready=ready)
        assert services.start(service, tmp_path) is False  # not started a second time
        assert asked == [False, False, True]
    finally:
        other_start.kill()
        other_start.wait()


def test_a_service_another_process_started_that_dies_before_it_is_ready_is_one_line(tmp_path):
    """A second command waiting for a server the first is starting stops waiting once that
    server's process has ended, with one line naming the log."""
    other_start = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    services.pid_file(tmp_path, "gone").write_text(str(other_start.pid))

    def dies_on_first_question() -> bool:
        other_start.kill()
        other_start.wait()
        return False

    service = services.Service("gone", [sys.executable, "-c", "pass"], ready=dies_on_first_question)
    with pytest.raises(UserError, match=r"^gone, started by another flowyard process, did not get ready \(see "):
        services.start(service, tmp_path)


def test_two_processes_starting_a_service_at_once_start_it_once(tmp_path):
    """Two commands at once on a cold start both found no pid file and spawned a server each: the
    second died on the taken port and, writing the pid file last, left the running one untracked.
    The second now waits for the first's start (here: the test holds the start lock as a first
    starter that has not written the pid file yet) and then uses its service."""
    import fcntl
    import threading

    spawned = tmp_path / "second-spawned"
    service = services.Service(
        "once", [sys.executable, "-c", f"open({str(spawned)!r}, 'w').close()"], ready=lambda: True
    )
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    returned: list[bool] = []
    try:
        with services.lock_file(tmp_path, "once").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the first starter, mid-start
            second = threading.Thread(target=lambda: returned.append(services.start(service, tmp_path)))
            second.start()
            blocked = f":{services.lock_file(tmp_path, 'once').stat().st_ino} "
            while second.is_alive() and not any(
                "->" in line and blocked in line for line in Path("/proc/locks").read_text().splitlines()
            ):
                time.sleep(0.01)  # until the second waits for the lock (or, unlocked, has spawned and returned)
            services.pid_file(tmp_path, "once").write_text(str(first.pid))  # the first's server is up
            fcntl.flock(lock, fcntl.LOCK_UN)
        second.join()
        assert returned == [False] and not spawned.exists()
        assert services.running_pid(tmp_path, "once") == first.pid
    finally:
        first.kill()
        first.wait()


def test_the_prefect_server_starts_on_a_url_with_libpq_options(state_db, fresh_db, tmp_path):
    """A managed PostgreSQL's URL carries libpq options (``sslmode``, ``application_name``,
    ``connect_timeout``, ``options=-c search_path=…``, ``target_session_attrs``, a TLS version in any
    case), which flowyard's psycopg sessions take; SQLAlchemy's asyncpg dialect handed each to
    ``asyncpg.connect`` as a keyword it has not, and the Prefect server died at start ("unexpected
    keyword argument"; "No such TLS version: tlsv1.2" for the lower-case one libpq takes)."""
    database = database_name(fresh_db)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA prefect_tables")
    settings = Settings(home=tmp_path, prefect_port=free_port(), prefect_database=database)
    options = (
        "sslmode=prefer&application_name=flowyard-test&connect_timeout=10&target_session_attrs=read-write"
        "&options=-c%20search_path%3Dprefect_tables,public&ssl_min_protocol_version=tlsv1.2"
    )
    services.start(server_service(settings, f"{state_db}?{options}"), settings.run_dir)
    try:
        assert httpx.get(f"{settings.prefect_api_url}/health").json() is True
        with connect(fresh_db, autocommit=True) as conn:
            assert one_row(conn, "SELECT to_regclass('prefect_tables.alembic_version') IS NOT NULL")[0]
            names = conn.execute(
                "SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchall()
        assert ("flowyard-test",) in names
    finally:
        services.stop(settings.run_dir, SERVER)


def test_a_libpq_option_the_prefect_server_cannot_take_is_one_line_before_anything_starts(state_db, tmp_path):
    """An option of the URL asyncpg has no equivalent for (``keepalives``), or a session setting in
    its ``options`` Prefect does not apply (``statement_timeout``): the server died at start on it,
    after its database had been created, and only its log said why."""
    database = "prefect_never_created"
    settings = Settings(home=tmp_path, prefect_port=free_port(), prefect_database=database)
    refusals = {
        "keepalives=1": "the Prefect server cannot take libpq's option keepalives of FLOWYARD_DATABASE_URL (",
        "options=-c%20statement_timeout%3D5s": "the Prefect server cannot take the setting statement_timeout of the "
        "options of FLOWYARD_DATABASE_URL (",
    }
    for option, refusal in refusals.items():
        with pytest.raises(UserError) as err:
            server_service(settings, f"{state_db}?sslmode=disable&{option}")
        assert str(err.value).startswith(refusal) and "\n" not in str(err.value)
    assert not services.log_file(settings.run_dir, SERVER).exists()
    with connect(state_db) as conn:
        assert one_row(conn, "SELECT count(*) FROM pg_database WHERE datname = %s", (database,))[0] == 0


T = TypeVar("T")


def _until(
    probe: Callable[[], T | None], what: str, cli: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> T:
    """``probe``'s first answer that is not None (or False), polled; a guard against hanging, not a
    measure. ``cli`` must stay alive meanwhile (its ``log`` says why it did not)."""
    deadline = time.monotonic() + TEST_SETTINGS.zombie_window_seconds + GUARD_SECONDS
    while not (answer := probe()):
        assert cli is None or cli.poll() is None, log.read_text()[-2000:] if log else "the CLI ended"
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.5)
    return answer


def _running_online_run(pg, since: datetime) -> UUID | None:
    with psycopg.connect(pg.url(TEST_SETTINGS.prefect_database)) as conn:
        row = conn.execute(
            "SELECT r.id FROM flow_run r JOIN flow f ON f.id = r.flow_id"
            " WHERE f.name = 'online-migrate' AND r.state_type = 'RUNNING' AND r.start_time >= %s",
            (since,),
        ).fetchone()
    return row[0] if row else None


def _first_heartbeat(api: str, flow_run_id: UUID) -> datetime | None:
    """When the flow run's first heartbeat the server received occurred, or None."""
    body = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            "order": "ASC",
        },
        "limit": 1,
    }
    events = httpx.post(f"{api}/events/filter", json=body, timeout=10).raise_for_status().json()["events"]
    return datetime.fromisoformat(events[0]["occurred"]) if events else None


def _flow_run_state(flow_run_id: UUID):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def _bucket_open(pg, flow_run_id: UUID) -> bool:
    """Does the server's trigger still wait for this run's next heartbeat or final state?"""
    with psycopg.connect(pg.url(TEST_SETTINGS.prefect_database)) as conn:
        return bool(
            conn.execute(
                "SELECT EXISTS (SELECT FROM automation_bucket WHERE bucketing_key::jsonb ? %s)",
                (f"prefect.flow-run.{flow_run_id}",),
            ).fetchone()[0]
        )


@flow(name="zombie-finished")
def _finished() -> int:
    return 1


def test_a_killed_cli_flow_run_is_crashed_by_the_zombie_automation_and_a_finished_one_is_not(
    prefect_api, pg, fresh_db, tmp_path
):
    """A flow run whose process is SIGKILLed (an OOM kill, a lost host) reports no end: it stayed
    Running in the UI and the API for good, in every pipeline but the agent queue (whose next run
    recovers it). Its heartbeats stop now, and the automation flowyard gives the server it starts
    marks it Crashed one window after its last one; a run that ended is left as it ended."""
    keep_zombie_automation(TEST_SETTINGS)  # as ensure_prefect does when it starts the server
    make_schema(fresh_db, rows=300)
    spec = tmp_path / "m.yaml"
    spec.write_text(yaml.safe_dump({"name": "zombie_widen", "operations": [WIDEN_AMOUNT]}))
    log = tmp_path / "cli.log"
    since = datetime.now().astimezone()
    with connect(fresh_db) as holder:
        holder.execute("LOCK TABLE orders IN ACCESS SHARE MODE")  # the run's DDL waits on it
        command = ("online", "start", str(spec), "--database-url", fresh_db)
        cli = cli_until(command, log, lambda: _running_online_run(pg, since) is not None)
        killed = _running_online_run(pg, since)
        _until(lambda: _first_heartbeat(prefect_api, killed), "its heartbeat reached the server", cli, log)
        finished = _finished(return_state=True).state_details.flow_run_id
        finished_beat = _until(lambda: _first_heartbeat(prefect_api, finished), "the finished run's heartbeat")
        sigkill(cli)
    assert _flow_run_state(killed).type == StateType.RUNNING, "nothing else may have marked it"

    crashed = _until(
        lambda: (state := _flow_run_state(killed)).type == StateType.CRASHED and state, "the killed run Crashed"
    )
    assert crashed.message == zombie_automation(TEST_SETTINGS.zombie_window_seconds).actions[0].message

    window_end = finished_beat + timedelta(seconds=TEST_SETTINGS.zombie_window_seconds)
    time.sleep(max((window_end - datetime.now().astimezone()).total_seconds(), 0))
    _until(lambda: not _bucket_open(pg, finished), "the finished run's window evaluated")
    assert _flow_run_state(finished).type == StateType.COMPLETED


def _zombie_automations() -> list[tuple[UUID | None, bool, float]]:
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    return [(a.id, a.enabled, a.trigger.within.total_seconds()) for a in found]


def test_the_zombie_automation_is_made_once_follows_its_window_keeps_its_switch_and_goes_at_0(prefect_api):
    """Starting the server and `flowyard up` keep the automation: made once, not on each call; a
    new FLOWYARD_ZOMBIE_WINDOW_SECONDS updates it in place (left disabled if the UI disabled it); 0
    removes it."""
    keep_zombie_automation(TEST_SETTINGS)
    keep_zombie_automation(TEST_SETTINGS)
    [(made, enabled, window)] = _zombie_automations()
    assert (enabled, window) == (True, 90)
    with get_client(sync_client=True) as client:
        client.pause_automation(made)
    keep_zombie_automation(TEST_SETTINGS.model_copy(update={"zombie_window_seconds": 120}))
    assert _zombie_automations() == [(made, False, 120)]
    keep_zombie_automation(TEST_SETTINGS.model_copy(update={"zombie_window_seconds": 0}))
    assert _zombie_automations() == []
    keep_zombie_automation(TEST_SETTINGS)
    assert [(enabled, window) for _, enabled, window in _zombie_automations()] == [(True, 90)]


def test_a_zombie_window_under_two_heartbeats_is_one_line():
    result = run_cli("status", env={"FLOWYARD_ZOMBIE_WINDOW_SECONDS": "45"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "invalid FLOWYARD_ZOMBIE_WINDOW_SECONDS: 45 is neither 0 (off) nor at least 60" in result.stderr
