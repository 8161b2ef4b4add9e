"""Connections: URL resolution, one-line errors, database creation."""

from __future__ import annotations

import socket

import psycopg
import pytest
from psycopg import sql

from tasks.db import (
    connect,
    database_name,
    drop_database,
    ensure_database,
    mask_url,
    resolve_url,
    sqlalchemy_url,
    validate_postgres_url,
    with_database,
)
from tasks.embedded_pg import free_port
from tasks.errors import ConnectionUnavailable, UserError
from tasks.state import state_url
from tests.conftest import run_cli
from tests.process_support import started_together


def test_unreachable_server_is_a_one_line_error_without_password():
    port = free_port()
    url = f"postgresql://app:hunter2@127.0.0.1:{port}/app"
    with pytest.raises(UserError, match="cannot connect to postgresql://app:\\*\\*\\*@127.0.0.1") as info:
        connect(url)
    message = str(info.value)
    assert "hunter2" not in message and "\n" not in message
    # The cause and where it happened, not libpq's generic last-line hint.
    assert f'connection to server at "127.0.0.1", port {port} failed: Connection refused' in message
    assert "Is the server running" not in message
    assert message.endswith("check the URL and that the server is running (`flowyard up` starts the embedded one)")


def test_each_host_tried_is_named_once():
    first, second = free_port(), free_port()
    with pytest.raises(UserError) as info:
        connect(f"postgresql://app@127.0.0.1:{first},127.0.0.1:{second}/app")
    message = str(info.value)
    assert "\n" not in message and "Multiple connection attempts" not in message
    for port in (first, second):
        assert message.count(f"port {port} failed: Connection refused") == 1


@pytest.mark.parametrize("black_hole_first", [True, False], ids=["black-hole-first", "black-hole-last"])
def test_a_host_that_waits_out_the_connect_timeout_makes_the_connect_timed_out(black_hole_first):
    """psycopg raises the error type of the last host tried: a black hole before a host that
    refuses read as a quick refusal, and callers retried at once, each retry waiting out the
    black hole again. Hosts that only refuse are no timeout."""
    refusing = f"127.0.0.1:{free_port()}"
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:  # the kernel takes them; nothing answers
        black_hole = f"127.0.0.1:{silent.getsockname()[1]}"
        hosts = [black_hole, refusing] if black_hole_first else [refusing, black_hole]
        with pytest.raises(ConnectionUnavailable) as caught:
            connect(f"postgresql://postgres@{','.join(hosts)}/nowhere?connect_timeout=2")
    assert caught.value.timed_out
    assert "connection timeout expired" in str(caught.value) and "Connection refused" in str(caught.value)
    with pytest.raises(ConnectionUnavailable) as refused:
        connect(f"postgresql://postgres@{refusing},127.0.0.1:{free_port()}/nowhere")
    assert not refused.value.timed_out


def test_missing_database_is_a_clear_error(pg):
    with pytest.raises(UserError, match='database "no_such_db" does not exist'):
        connect(pg.url("no_such_db"))


def test_a_server_older_than_flowyard_supports_is_named_by_its_release(older_db, monkeypatch):
    """The refusal names the release the user knows (15.18), not libpq's number (150018); a real
    PostgreSQL 15 stands in for a too-old server by raising the floor above it."""
    monkeypatch.setattr("tasks.db.MIN_SERVER_VERSION", 160000)
    with pytest.raises(UserError, match=r"runs PostgreSQL 15\.\d+; flowyard needs 16 or newer$"):
        connect(older_db)


def test_ensure_database_is_idempotent(pg):
    ensure_database(pg.url(), "created_twice")
    ensure_database(pg.url(), "created_twice")
    with connect(pg.url("created_twice")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("created_twice",)


def test_explicit_url_wins_and_is_normalised(pg):
    assert resolve_url("postgres://u@h:1/d") == "postgresql://u@h:1/d"
    assert sqlalchemy_url("postgres://u@h:1/d") == "postgresql+psycopg://u@h:1/d"
    assert (
        with_database("postgresql://u:p@h:1/d?sslmode=require", "x")
        == "postgresql://u:p@h:1/x?sslmode=require"
    )
    assert mask_url("postgresql://u:p@h/d") == "postgresql://u:***@h/d"


def test_a_password_given_in_the_query_is_masked_and_a_database_name_is_percent_decoded():
    """libpq takes ``?password=`` as well as ``user:password@``: it went into logs, artifacts and
    errors as typed. A database name percent-encoded in the path is the decoded one to libpq, and
    to the deploy lock and a restore's renames, which named ``my%20db``."""
    url = "postgresql://u@h/my%20db?sslmode=disable&password=s%40cret"
    assert mask_url(url) == "postgresql://u@h/my%20db?sslmode=disable&password=***"
    assert mask_url("postgresql://u:p@h/d?password=q") == "postgresql://u:***@h/d?password=***"
    assert database_name(url) == "my db"
    assert sqlalchemy_url(url) == "postgresql+psycopg://u@h/my db?sslmode=disable&password=s%40cret"  # SQLAlchemy does not decode it
    assert with_database(url, "other db") == "postgresql://u@h/other%20db?sslmode=disable&password=s%40cret"
    assert database_name(with_database(url, "a/b%c")) == "a/b%c"


def test_state_schema_migrated_once(state_db):
    from tasks.state import state_url

    assert state_url(state_db) == state_db
    from alembic.script import ScriptDirectory

    from tasks.state import migration_config

    shipped_heads = set(ScriptDirectory.from_config(migration_config(state_db)).get_heads())
    with connect(state_db) as conn:
        applied = {row[0] for row in conn.execute("SELECT version_num FROM flowyard.alembic_version")}
    assert applied == shipped_heads


def test_state_schema_comes_back_after_the_database_is_recreated(pg, fresh_db):
    """Same URL, same process: the database dropped and created again has no flowyard schema,
    and state_url must migrate it anew instead of trusting what it did before."""
    state_url(fresh_db)
    name = database_name(fresh_db)
    drop_database(pg.url(), name)
    ensure_database(pg.url(), name)
    assert state_url(fresh_db) == fresh_db
    with connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regclass('flowyard.bulk_runs') IS NOT NULL").fetchone() == (True,)


def test_dropping_a_database_another_role_owns_is_one_line(limited_role, fresh_db):
    name = database_name(fresh_db)
    with pytest.raises(UserError, match=rf"^cannot drop database {name} .*another role owns it") as err:
        drop_database(limited_role.url(fresh_db), name)
    assert "\n" not in str(err.value) and limited_role.password not in str(err.value)
    connect(fresh_db).close()  # still there


def test_a_role_without_create_gets_one_line_then_works_in_a_schema_made_for_it(limited_role, fresh_db):
    role_url = limited_role.url(fresh_db)
    with pytest.raises(UserError, match=r"permission denied for database .*grant the role CREATE") as err:
        state_url(role_url)
    assert "\n" not in str(err.value)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA flowyard AUTHORIZATION {}").format(sql.Identifier(limited_role.name)))
    assert state_url(role_url) == role_url
    with connect(role_url) as conn:
        assert conn.execute("SELECT count(*) FROM flowyard.alembic_version").fetchone()[0] >= 1


@pytest.mark.parametrize("autocommit", [False, True])
def test_a_roles_statement_timeout_does_not_cut_flowyards_sessions(limited_role, fresh_db, autocommit):
    """A production role often has a short statement_timeout; flowyard's sessions lift it as
    pg_dump's do, so a long copy, checksum or index build is not cancelled half way."""
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = '20ms'").format(sql.Identifier(limited_role.name)))
    with connect(limited_role.url(fresh_db), autocommit=autocommit) as conn:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"
        conn.execute("SELECT pg_sleep(0.2)")
    with psycopg.connect(limited_role.url(fresh_db)) as raw, pytest.raises(psycopg.errors.QueryCanceled):
        raw.execute("SELECT pg_sleep(0.2)")  # what the role's own sessions get


@pytest.mark.parametrize("utc", [False, True])
def test_sessions_print_values_in_pinned_text_forms_whatever_the_database_sets(fresh_db, utc):
    """Chunk bounds and cursors travel as text between sessions: a database (or role) set to
    DateStyle 'SQL, DMY' printed 13/01/2024, read back elsewhere as another day or not at all.
    Every flowyard session pins the text forms; the time zone only when asked (``utc``), since it
    changes what date_trunc and ::date mean."""
    with connect(fresh_db, autocommit=True) as conn:
        database = sql.Identifier(database_name(fresh_db))
        for name, value in [
            ("DateStyle", "SQL, DMY"),
            ("IntervalStyle", "sql_standard"),
            ("TimeZone", "Asia/Kolkata"),
            ("extra_float_digits", "-3"),
            ("bytea_output", "escape"),
        ]:
            conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(database, sql.Identifier(name), value))
    query = (
        "SELECT '2024-01-13'::date::text, interval '1 day 2 hours'::text, 0.1::float8::text, '\\x01'::bytea::text,"
        " '2024-01-13 10:00+00'::timestamptz::text"
    )
    with connect(fresh_db, utc=utc) as conn:
        zoned = "2024-01-13 10:00:00+00" if utc else "2024-01-13 15:30:00+05:30"
        assert conn.execute(query).fetchone() == ("2024-01-13", "1 day 02:00:00", "0.1", "\\x01", zoned)
    with psycopg.connect(fresh_db) as raw:  # what the database's own sessions print
        assert raw.execute(query).fetchone()[0] == "13/01/2024"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://app:hun%zzter2@127.0.0.1:5432/app", 'invalid percent-encoded token: "***"'),
        ("postgresql://app:hunter2@127.0.0.1:5432/app?sslmod=require", 'invalid URI query parameter: "sslmod"'),
        ("postgresql://app:hunter2@127.0.0.1:5432/app?connect_timeout=ten", "bad value for connect_timeout: 'ten'"),
    ],
)
def test_a_url_libpq_cannot_parse_is_one_line_without_its_password(url, reason):
    """libpq's parser raised psycopg's ProgrammingError, a traceback, and quoted a malformed
    token as written: a password too."""
    with pytest.raises(UserError) as info:
        connect(url)
    message = str(info.value)
    assert message.startswith("not a usable PostgreSQL URL: 'postgresql://app:***@127.0.0.1:5432/app")
    assert reason in message and "\n" not in message
    assert "hunter2" not in message and "hun%zz" not in message


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("sslmode=bogus", "sslmode 'bogus' is not one of disable, allow, prefer, require, verify-ca, verify-full"),
        ("sslmode=prefer&dbname=other", "its query names the database (dbname=); give the database in the path"),
        ("sslmode=REQUIRE", "sslmode 'REQUIRE' is not one of disable, allow"),
        ("sslmode=", "sslmode '' is not one of disable, allow"),
        ("target_session_attrs=primary&gssencmode=maybe", "gssencmode 'maybe' is not one of disable, prefer, require"),
        ("target_session_attrs=writable", "target_session_attrs 'writable' is not one of any, read-write, read-only"),
        ("load_balance_hosts=roundrobin", "load_balance_hosts 'roundrobin' is not one of disable, random"),
        ("channel_binding=on", "channel_binding 'on' is not one of disable, prefer, require"),
        ("sslnegotiation=tls", "sslnegotiation 'tls' is not one of postgres, direct"),
        ("sslcertmode=yes", "sslcertmode 'yes' is not one of disable, allow, require"),
        ("replication=maybe", "replication 'maybe' is not one of true, on, yes, 1, database, false, off, no, 0"),
        (
            "replication=database",
            "replication 'database' makes a replication connection, which cannot run flowyard's queries "
            "(INSERT, COPY); remove it (or give one of false, off, no, 0)",
        ),
        ("replication=TRUE", "replication 'TRUE' makes a replication connection"),
        (
            "require_auth=kerberos",
            "require_auth 'kerberos' is not a comma-separated list of password, md5, gss, sspi, scram-sha-256, "
            "oauth, none, each with or without a leading '!'",
        ),
        ("require_auth=scram-sha-256,MD5", "require_auth 'scram-sha-256,MD5' is not a comma-separated list of"),
        ("require_auth=!md5,password", "require_auth '!md5,password' mixes methods with and without '!'"),
        ("ssl_min_protocol_version=TLSv1.4", "ssl_min_protocol_version 'TLSv1.4' is not one of TLSv1, TLSv1.1"),
        ("ssl_max_protocol_version=SSLv3", "ssl_max_protocol_version 'SSLv3' is not one of TLSv1, TLSv1.1, TLSv1.2"),
        (
            "ssl_min_protocol_version=TLSv1.3&ssl_max_protocol_version=tlsv1.2",
            "ssl_min_protocol_version 'TLSv1.3' is above ssl_max_protocol_version 'tlsv1.2'",
        ),
    ],
)
def test_a_value_outside_a_libpq_options_set_is_one_line_before_connecting(query, reason):
    """libpq's parser takes any value of these options and only connecting refused it: a sync run
    marked every pending event failed, to wait out a retry backoff, over the typo."""
    with pytest.raises(UserError) as info:
        validate_postgres_url(f"postgresql://app:hunter2@127.0.0.1:5432/app?{query}")
    message = str(info.value)
    assert message.startswith("not a usable PostgreSQL URL: 'postgresql://app:***@127.0.0.1:5432/app?")
    assert reason in message and "\n" not in message and "hunter2" not in message


def test_values_in_a_libpq_options_set_are_kept():
    url = "postgresql://app@127.0.0.1:5432/app?sslmode=verify-full&target_session_attrs=prefer-standby"
    assert validate_postgres_url(url + "&load_balance_hosts=random&gssencmode=disable") == (
        url + "&load_balance_hosts=random&gssencmode=disable"
    )


@pytest.mark.parametrize(
    "query",
    [
        "replication=off",
        "replication=0",
        "require_auth=scram-sha-256,password",
        "require_auth=!md5,!password",
        "require_auth=oauth",
        "require_auth=",
        "ssl_min_protocol_version=tlsv1.2&ssl_max_protocol_version=TLSv1.3",
        "ssl_max_protocol_version=",
    ],
)
def test_values_libpq_takes_for_replication_require_auth_and_tls_versions_are_kept(query):
    url = f"postgresql://app@127.0.0.1:5432/app?{query}"
    assert validate_postgres_url(url) == url


@pytest.mark.parametrize(
    ("url", "char"),
    [
        ("postgresql://app:hun\x1bter2@127.0.0.1:5432/app", "'\\x1b'"),
        ("postgresql://app:hunter2@127.0.0.1:5432/ap\np", "'\\n'"),
        ("postgresql://app:hunter2@127.0.0.1:5432/app?application_name=a\tb", "'\\t'"),
        ("postgresql://app:hunter2@127.0.0.1:5432/app\x00", "'\\x00'"),
        ("postgresql://app:hunter2@127.0.0.1:5432/app\x7f", "'\\x7f'"),
    ],
)
def test_a_url_with_a_control_character_is_one_line(url, char):
    """urllib dropped a tab or newline without a word, and kept an escape or NUL, which
    ``sync configure`` saved and ``sync status`` printed to the terminal as it was."""
    with pytest.raises(UserError) as info:
        validate_postgres_url(url)
    message = str(info.value)
    assert message.startswith("not a usable PostgreSQL URL: 'postgresql://app:***@127.0.0.1:5432/")
    assert f"it holds the control character {char}" in message
    assert message.isprintable() and "hunter2" not in message and "hun" not in message


def test_a_url_with_a_bad_query_parameter_is_one_line_from_the_cli(tmp_path):
    result = run_cli(
        "queue",
        "list",
        env={"FLOWYARD_DATABASE_URL": "postgresql://app:hun%zzter2@127.0.0.1:5432/app", "FLOWYARD_HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "not a usable PostgreSQL URL" in result.stderr and "hun%zz" not in result.stderr


@pytest.mark.parametrize(
    ("query", "env", "expected"),
    [("", None, "10"), ("?connect_timeout=3", None, "3"), ("", "4", "4"), ("?connect_timeout=3", "4", "3")],
)
def test_a_connect_timeout_the_user_gives_wins_over_flowyards_default(pg, monkeypatch, query, env, expected):
    """flowyard passed connect_timeout=10 as an argument, which overrode the URL's and
    ``PGCONNECT_TIMEOUT``: a user could not make a sync give up sooner on an unanswering central."""
    if env is None:
        monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("PGCONNECT_TIMEOUT", env)
    with connect(pg.url() + query) as conn:
        assert conn.info.get_parameters()["connect_timeout"] == expected


def test_a_replication_connection_cannot_run_a_query_with_bound_values(fresh_db: str) -> None:
    """Why ``replication`` is refused rather than checked for its values: a logical replication
    connection (the most a walsender allows SQL on) takes only the simple query protocol, so the
    bound-value INSERT every sync batch sends fails (a physical one runs no SQL at all)."""
    with psycopg.connect(f"{fresh_db}?replication=database", autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the simple query protocol: it is connected
        with pytest.raises(psycopg.errors.ProtocolViolation, match="extended query protocol not supported"):
            conn.execute("SELECT %s::int", (1,))


def test_an_empty_database_url_names_what_was_given_empty_in_flows_and_commands_alike(prefect_api, tmp_path):
    """An empty URL (an unset shell variable, a template that rendered empty) was refused as
    "not a PostgreSQL URL: ''", naming neither the parameter or option nor how to get the default;
    only the sync flows said so, each with a check of its own."""
    from flows.deploy_migrations import migration_status

    default = (
        "give a postgresql:// URL, or leave it out for flowyard's state database "
        "(FLOWYARD_DATABASE_URL, else the embedded server)"
    )
    for run, named in (
        (lambda: resolve_url(""), "database_url"),
        (lambda: state_url("", parameter="state_database_url"), "state_database_url"),
        (lambda: migration_status(database_url=""), "database_url"),
    ):
        with pytest.raises(UserError) as info:
            run()
        assert str(info.value) == f"{named} is empty; {default}"
    home = {"FLOWYARD_HOME": str(tmp_path)}
    for args, named in (
        (("quality", "profile", "events", "--database-url", ""), "--database-url (database_url)"),
        (("migrate", "status", "--database-url", ""), "--database-url (database_url)"),
        (("bulk", "status", "--target", ""), "--target (target_url)"),
    ):
        out = run_cli(*args, env=home)
        assert out.returncode == 2 and out.stdout == "", (args, out.stderr)
        assert out.stderr.splitlines() == [f"flowyard: error: {named} is empty; {default}"], args
    # only whitespace (a quoted variable holding a space) was "not a PostgreSQL URL: ' '"
    out = run_cli("quality", "check", "--database-url", " \t", env=home)
    assert out.stderr.splitlines() == [
        f"flowyard: error: --database-url (database_url) is only whitespace (' \\t'); {default}"
    ]
    with pytest.raises(UserError, match=r"^database_url is only whitespace \(' '\); give a postgresql://"):
        resolve_url(" ")


_MIGRATOR = """
import sys
from tasks.state import state_url
print("ready", flush=True)
sys.stdin.readline()  # both start from the same instant
state_url(sys.argv[1])
"""


@pytest.mark.parametrize("isolation", ["serializable", "repeatable read"])
def test_two_processes_migrating_at_once_under_a_dbas_default_isolation_both_succeed(fresh_db: str, isolation: str) -> None:
    """The state migrations wait for each other on an advisory lock, then read what the first one
    made: under a database's serializable or repeatable read default, the second read the snapshot
    it took before the wait, missed the schema and its version, and failed making them again."""
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}").format(
                sql.Identifier(database_name(fresh_db)), sql.Literal(isolation)
            )
        )
    workers = started_together(_MIGRATOR, [fresh_db], [fresh_db])
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
