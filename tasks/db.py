"""Connections to PostgreSQL, resolved from a flow parameter, ``FLOWYARD_DATABASE_URL`` or the embedded server.

Every flow takes an optional ``database_url``; :func:`resolve_url` turns "not given" into
the embedded server, started on demand. Connection failures become one-line
:class:`~tasks.errors.ConnectionUnavailable` messages (a UserError) with the password masked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.abc import Params, QueryNoTemplate
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo

from tasks.errors import (
    READ_ONLY_CAUSES,
    ConnectionUnavailable,
    ServerReadOnly,
    UserError,
    check_utf8,
    control_character,
    first_line,
    option_and_parameter,
    read_only_error,
)

MIN_SERVER_VERSION = 140000
_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+asyncpg", "postgresql+psycopg2")
_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslcertmode": ("disable", "allow", "require"),
    "sslnegotiation": ("postgres", "direct"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "load_balance_hosts": ("disable", "random"),
}
"""libpq's connection options that take one of a fixed set of values, spelt exactly (libpq
compares them case-sensitively; an empty one is refused too). libpq's parser takes any value and
only connecting refuses it: a sync run marked every pending event failed, to wait out a retry
backoff, over a typo. The options below are checked by their own rules."""
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
"""``ssl_min_protocol_version`` and ``ssl_max_protocol_version``, lowest first; libpq compares them
case-insensitively, and reads an empty one as unset."""
_TLS_RANKS = {version.lower(): rank for rank, version in enumerate(_TLS_VERSIONS)}
"""Each of :data:`_TLS_VERSIONS`, lower-cased as libpq compares it, to its rank (0: the lowest)."""
_AUTH_METHODS = ("password", "md5", "gss", "sspi", "scram-sha-256", "oauth", "none")
"""What ``require_auth`` lists (comma-separated, each negated with ``!``, all or none of them;
empty: unset), spelt exactly: libpq 18's set, the one psycopg's binary package ships."""
_REPLICATION_OFF = ("false", "off", "no", "0")
_REPLICATION_ON = ("true", "on", "yes", "1", "database")
"""``replication`` values that make a walsender connection: a physical one runs no SQL, a logical
one (``database``) only the simple query protocol, so neither runs the bound-parameter queries
and COPY flowyard sends; a sync run's every batch failed over it."""


def validate_postgres_url(url: str) -> str:
    """Normalise a PostgreSQL URL to ``postgresql://``; raise a UserError for anything else,
    also for bytes that are not UTF-8, which libpq cannot be given (:func:`check_utf8`), and for
    a port that is no TCP port or a value outside an option's fixed set (:data:`_CHOICES`), which
    libpq only refuses when connecting: a sync run marked every pending event failed, to wait out
    a retry backoff, over that typo. A control character (a newline, an escape) is refused too: a
    stored URL is printed by ``sync status``, and libpq would take it as part of a host or a name."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # an unclosed '[' of an IPv6 host: urllib's traceback; not quoted, it may hold a password
        raise UserError(
            f"not a PostgreSQL URL ({exc}); expected postgresql://user:password@host:port/database"
        ) from None
    if parts.scheme not in _SCHEMES or not parts.path.strip("/") or not parts.path.startswith("/"):
        raise UserError(
            f"not a PostgreSQL URL: {mask_url(url)!r}; expected postgresql://user:password@host:port/database"
        )
    check_utf8(url, f"not a PostgreSQL URL: {mask_url(url)!r}", "percent-encode them (e.g. %E9)")
    if (char := control_character(url.strip())) is not None:
        raise UserError(
            f"not a usable PostgreSQL URL: {mask_url(url)!r}: it holds the control character {char!r}; "
            f"remove it, or percent-encode it (%{ord(char):02X}) if it belongs there"
        )
    normalised = _unsplit(parts._replace(scheme="postgresql"))
    try:
        params = conninfo_to_dict(normalised)
        timeout_from_conninfo(params)
        reason = (
            _dbname_in_query(parts.query)
            or _bad_port(str(params.get("port") or ""))
            or _bad_choice(params)
            or _bad_replication(params)
            or _bad_require_auth(params)
            or _bad_tls_range(params)
        )
    except psycopg.ProgrammingError as exc:  # libpq's parser, run again by psycopg.connect, would be a traceback
        reason = first_line(exc)
        if parts.password:  # libpq quotes a malformed token as written, a password too
            reason = reason.replace(parts.password, "***")
    if reason:
        raise UserError(
            f"not a usable PostgreSQL URL: {mask_url(url)!r}: {reason}; fix it "
            "(percent-encode special characters, e.g. %25 for %; keep to libpq's query parameters)"
        ) from None
    return normalised


def query_options(query: str) -> list[tuple[str, str]]:
    """A URL query's options in order, each name and value percent-decoded, as libpq reads them
    (not :func:`urllib.parse.parse_qsl`, which takes ``+`` for a blank)."""
    return [
        (unquote(name), unquote(value))
        for name, _, value in (pair.partition("=") for pair in query.split("&") if pair)
    ]


def _dbname_in_query(query: str) -> str | None:
    """Why a URL naming its database in the query (``?dbname=``) is unusable, or None: libpq takes
    it over the path's, while flowyard reads and replaces the path's (the Prefect database, the
    maintenance database a restore drops and renames from), so those sessions reached the query's."""
    if any(name == "dbname" for name, _ in query_options(query)):
        return "its query names the database (dbname=); give the database in the path instead (postgresql://host/database)"
    return None


def _bad_port(ports: str) -> str | None:
    """Why a URL's port list (``host:port``, ``h1:p1,h2:p2`` or ``?port=``) is unusable, or None:
    a port must be 1 to 65535 (an empty one is libpq's default, 5432)."""
    for port in ports.split(","):
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return f"port {port!r} is not a TCP port (1 to 65535)"
    return None


def _bad_choice(params: dict[str, Any]) -> str | None:
    """Why one of the URL's :data:`_CHOICES` options is unusable (a value outside its set), or None."""
    for option, allowed in _CHOICES.items():
        value = params.get(option)
        if value is not None and value not in allowed:
            return f"{option} {value!r} is not one of {', '.join(allowed)}"
    return None


def _bad_replication(params: dict[str, Any]) -> str | None:
    """Why the URL's ``replication`` is unusable (:data:`_REPLICATION_ON`, or no value the server takes), or None."""
    value = params.get("replication")
    if value is None or value.lower() in _REPLICATION_OFF:
        return None
    if value.lower() in _REPLICATION_ON:
        return (
            f"replication {value!r} makes a replication connection, which cannot run flowyard's queries "
            f"(INSERT, COPY); remove it (or give one of {', '.join(_REPLICATION_OFF)})"
        )
    return f"replication {value!r} is not one of {', '.join(_REPLICATION_ON + _REPLICATION_OFF)}"


def _bad_require_auth(params: dict[str, Any]) -> str | None:
    """Why the URL's ``require_auth`` is unusable (a method outside :data:`_AUTH_METHODS`, or negated
    and plain methods mixed, which libpq refuses when connecting), or None."""
    value = params.get("require_auth")
    if not value:
        return None
    methods = value.split(",")
    allowed = f"a comma-separated list of {', '.join(_AUTH_METHODS)}, each with or without a leading '!'"
    if any(method.removeprefix("!") not in _AUTH_METHODS for method in methods):
        return f"require_auth {value!r} is not {allowed}"
    if len({method.startswith("!") for method in methods}) > 1:
        return f"require_auth {value!r} mixes methods with and without '!'; give {allowed}, all alike"
    return None


def tls_version(value: str) -> str:
    """A valid ``ssl_min_protocol_version`` or ``ssl_max_protocol_version`` spelt as
    :data:`_TLS_VERSIONS` spells it (empty stays empty: unset). libpq takes any case; asyncpg, the
    Prefect server's driver, only this one ("No such TLS version: tlsv1.2" at the server's start)."""
    return _TLS_VERSIONS[_TLS_RANKS[value.lower()]] if value else value


def _bad_tls_range(params: dict[str, Any]) -> str | None:
    """Why the URL's ``ssl_min_protocol_version`` or ``ssl_max_protocol_version`` is unusable (no
    TLS version of :data:`_TLS_VERSIONS`, or a minimum above the maximum), or None."""
    ranks = []
    for option in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        value = params.get(option) or ""
        if value and value.lower() not in _TLS_RANKS:
            return f"{option} {value!r} is not one of {', '.join(_TLS_VERSIONS)}"
        ranks.append(_TLS_RANKS.get(value.lower()))
    low, high = ranks
    if low is not None and high is not None and low > high:
        return (
            f"ssl_min_protocol_version {params['ssl_min_protocol_version']!r} is above ssl_max_protocol_version "
            f"{params['ssl_max_protocol_version']!r}; give a minimum at or below the maximum"
        )
    return None


def _unsplit(parts: SplitResult) -> str:
    """``parts`` as a URL, keeping the ``//`` of an empty host (``postgresql:///db?host=/socket``,
    a Unix socket): :func:`urlunsplit` drops it for schemes it does not know, and libpq refuses
    the ``postgresql:/db`` it leaves."""
    return urlunsplit(parts._replace(path="//" + parts.path)) if not parts.netloc else urlunsplit(parts)


def _query_password(query: str) -> tuple[str, str | None]:
    """A URL query without its ``password=`` option (libpq takes one there as well as before the
    ``@``), and that password, percent-decoded (None if the query has none)."""
    kept, password = [], None
    for pair in query.split("&") if query else []:
        name, _, value = pair.partition("=")
        if unquote(name) == "password":
            password = unquote(value)
        else:
            kept.append(pair)
    return "&".join(kept), password


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for messages and logs: the one before the
    ``@`` and one given as ``?password=``, which went into logs, artifacts and errors as typed."""
    parts = urlsplit(url)
    query, in_query = _query_password(parts.query)
    if parts.password is None and in_query is None:
        return url
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    if in_query is not None:
        parts = parts._replace(query="&".join(filter(None, [query, "password=***"])))
    return _unsplit(parts)


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    """The same URL for SQLAlchemy's dialect of ``driver`` (psycopg 3; the Prefect server's asyncpg),
    its database name decoded: SQLAlchemy takes the path as written (it percent-decodes the user and
    the password only), so ``D%C3%A9`` reached the server as the name of a database that does not
    exist, where libpq reads ``Dé``."""
    parts = urlsplit(validate_postgres_url(url))
    return _unsplit(parts._replace(scheme=f"postgresql+{driver}", path="/" + database_name(url)))


def with_database(url: str, database: str) -> str:
    """The URL pointing at another database on the same server (its name percent-encoded, as
    :func:`database_name` decodes it)."""
    parts = urlsplit(validate_postgres_url(url))
    return _unsplit(parts._replace(path=f"/{quote(database, safe='')}"))


def libpq_target(
    url: str, *, reader: bool = False, settings: dict[str, str] | None = None
) -> tuple[str, dict[str, str]]:
    """For a client tool (pg_dump, psql...): the connection URI without its password, since argv
    is visible to every user of the machine, and this process's environment with the password in
    ``PGPASSWORD``.

    ``reader``: the tool only reads (pg_dump of a source), perhaps a hot standby, which refuses
    a DBA's ``serializable`` default: the tool's first statements ran under it and failed
    ("cannot use serializable mode in a hot standby"). There, and only there, it is given
    :data:`SESSION_ISOLATION` as a startup option in ``PGOPTIONS``: the server is asked first,
    since a pooler (pgbouncer) may refuse startup options.

    ``settings``: startup options every connection of the tool gets (``PGOPTIONS``), also the
    ones it opens itself (``pg_restore --create`` reconnects to the database it created), and
    which win over the role's and the database's own settings (see :data:`RESTORE_SETTINGS`)."""
    parts = urlsplit(validate_postgres_url(url))
    env = {**os.environ}
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@", 1))
    query, in_query = _query_password(parts.query)
    if in_query is not None:  # libpq's own order: the query's password wins
        env["PGPASSWORD"] = in_query
        parts = parts._replace(query=query)
    options = {**(SESSION_ISOLATION if reader and _standby_refusing_its_default(url) else {}), **(settings or {})}
    if options:
        escaped = {name: value.replace(" ", "\\ ") for name, value in options.items()}  # libpq's escape
        env["PGOPTIONS"] = " ".join([env.get("PGOPTIONS", ""), *(f"-c {n}={v}" for n, v in escaped.items())]).strip()
    return _unsplit(parts), env


def _standby_refusing_its_default(url: str) -> bool:
    """Whether ``url``'s server is a hot standby whose default isolation for the URL's role and
    database (``reset_val``: :func:`connect` has changed the session's own) is serializable."""
    with connection(url, autocommit=True) as conn:
        return one_row(
            conn,
            "SELECT pg_is_in_recovery() AND reset_val = 'serializable' FROM pg_settings"
            " WHERE name = 'default_transaction_isolation'",
        )[0]


def database_name(url: str) -> str:
    """The database ``url`` names, percent-decoded as libpq reads it: ``my%20db`` is ``my db``,
    which the deploy lock, a restore's renames and its note must name (they named ``my%20db``,
    a database that does not exist)."""
    return unquote(urlsplit(url).path.lstrip("/"))


DATABASE_URL_OPTION = option_and_parameter("database_url")
"""How :func:`resolve_url` names the URL of a CLI command's ``--database-url``: as typed, and as
the parameter of the flow the command runs."""

_DEFAULT_DATABASE = "for flowyard's state database (FLOWYARD_DATABASE_URL, else the embedded server)"
"""What leaving a database URL out gives (:func:`resolve_url`), in :func:`refuse_empty_url`'s words."""


def refuse_empty_url(url: str | None, parameter: str, default: str = _DEFAULT_DATABASE) -> None:
    """Refuse a database URL given empty (an unset shell variable, a template that rendered empty)
    in one line naming ``parameter`` and how to get its ``default``: it names no database the
    user meant, and ``not a PostgreSQL URL: ''`` named neither the parameter nor the default.
    One of only whitespace (a quoted variable holding a space) is refused in the same words."""
    if url is not None and not url.strip():
        given = "empty" if url == "" else f"only whitespace ({url!r})"
        raise UserError(f"{parameter} is {given}; give a postgresql:// URL, or leave it out {default}")


def resolve_url(database_url: str | None = None, *, parameter: str = "database_url") -> str:
    """The URL to use: the explicit one, else ``FLOWYARD_DATABASE_URL``, else the embedded server.

    The embedded server is started if it is not running, and its ``flowyard`` database created.
    An empty URL is refused (:func:`refuse_empty_url`), naming ``parameter``: the flow parameter
    or the CLI option (:data:`DATABASE_URL_OPTION`) it was given as.
    """
    if database_url is not None:  # an empty one (an unset shell variable) is an error, not the default
        refuse_empty_url(database_url, parameter)
        return validate_postgres_url(database_url)
    from tasks.settings import get_settings

    settings = get_settings()
    if settings.database_url:
        return settings.database_url
    from tasks.embedded_pg import EmbeddedPostgres

    server = EmbeddedPostgres(settings.pgdata, settings.pg_port)
    server.start()
    ensure_database(server.url(), "flowyard")
    return server.url("flowyard")


def check_given_url(database_url: str | None, parameter: str = DATABASE_URL_OPTION) -> None:
    """A URL a CLI command was given, checked (not empty, a PostgreSQL URL) but not connected
    to, before any server starts: the flow the command runs resolves it itself, and its error
    came after the Prefect server started and named the flow's parameter, not the option typed.
    None (not given) is left to the flow."""
    if database_url is not None:
        resolve_url(database_url, parameter=parameter)


TEXT_FORMS: dict[str, str] = {
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}
"""How values print as text, pinned on every connection whatever the server, database or role
sets: chunk bounds and cursors travel between sessions and servers as text (a DateStyle of
``SQL, DMY`` prints ``13/01/2024``, and a timestamptz with a zone abbreviation another session
reads as another zone), and psycopg parses dates and intervals only in these forms. They change
no value and no comparison, only text. (Any positive ``extra_float_digits`` prints the shortest
exact float, since PostgreSQL 12.)"""

SESSION_ISOLATION = {"default_transaction_isolation": "read committed"}
"""The isolation of every flowyard transaction that asks for none itself, whatever the server,
database or role sets: the queue's claims (``FOR UPDATE SKIP LOCKED``), the sync's ``INSERT … ON
CONFLICT`` and last-write-wins upserts and the advisory-locked steps are written for READ
COMMITTED, where a row another session changed meanwhile is read again. Under a DBA's
``serializable`` or ``repeatable read`` default, two workers claiming at once, or two devices
uploading at once, failed each other with serialization failures (SQLSTATE 40001), taken for the
database being away. A step that needs a snapshot asks for it (a chunk's source read)."""

RESTORE_SETTINGS = {"default_transaction_read_only": "off"}
"""Startup options of ``pg_restore`` for the archive of a frozen database (only there, see
:func:`tasks.pg_backup.restore_command`): an archive restores its database's own settings (``ALTER
DATABASE … SET``) before its contents, and ``pg_restore --create`` then reconnects under them,
so a database a DBA had frozen (``default_transaction_read_only = on``) failed to restore at its
first table ("cannot execute CREATE TABLE in a read-only transaction"); a deploy then failed
without being put back. ``pg_dumpall``'s scripts turn it off the same way; the setting itself is
restored, and holds for every later session. (``pg_restore`` pins the timeouts and
``search_path`` itself, and a ``serializable`` default restores as it is.)"""

UTC = {"TimeZone": "UTC"}
"""For sessions whose timestamptz text is compared with another session's text (checksums over
row text, CSV streams): the same instant prints alike only in the same zone. Not pinned on every
connection, as it changes what ``date_trunc`` and ``::date`` mean for timestamptz."""


CLIENT_CHECK_INTERVAL = "5s"
"""``client_connection_check_interval`` of every flowyard session (PostgreSQL 14+): while a
statement runs, the server polls the session's socket this often and ends the backend once the
client is gone. Without it a process killed mid-statement (SIGKILL, the OOM killer) left its
statement running, holding its locks: an online step's VALIDATE or ``raw_sql``, a chunk load, a
GX query ran on, and a lock wait waited on, since the server only notices a closed socket at its
next read or write. A re-run then waited behind the orphan. The poll costs a timer signal per
interval while a statement runs, and no round trip. A DBA's own non-zero setting is kept. A
closed socket is all it sees (a host lost without one is left to TCP keepalives)."""

_CLIENT_CHECK = sql.SQL(
    "CASE WHEN current_setting('client_connection_check_interval') = '0'"
    " THEN set_config('client_connection_check_interval', %s, false) END"
)
"""Sets :data:`CLIENT_CHECK_INTERVAL` in the statement that pins the other session settings (no
round trip of its own) unless the server already has an interval."""


DEFAULT_CONNECT_TIMEOUT = 10
"""Seconds to wait for a server that does not answer, unless the URL (``?connect_timeout=``) or
``PGCONNECT_TIMEOUT`` says otherwise: psycopg's own default is 130 s per host."""


def _default_connect_timeout(url: str) -> dict[str, Any]:
    """``connect_timeout`` for psycopg when the user gave none: passed as an argument, it would
    override the URL's and the environment's."""
    given = "connect_timeout" in conninfo_to_dict(url) or os.environ.get("PGCONNECT_TIMEOUT")
    return {} if given else {"connect_timeout": DEFAULT_CONNECT_TIMEOUT}


def connect(
    url: str, *, autocommit: bool = False, application_name: str = "flowyard", utc: bool = False
) -> psycopg.Connection:
    """Open a psycopg connection with flowyard's session settings (``SESSION_ISOLATION``,
    ``TEXT_FORMS``, :data:`CLIENT_CHECK_INTERVAL`, and the time zone ``UTC`` when ``utc``),
    turning connection failures into a one-line UserError."""
    target = validate_postgres_url(url)
    try:
        conn = psycopg.connect(
            target,
            autocommit=autocommit,
            application_name=application_name,
            **_default_connect_timeout(target),
        )
    except psycopg.OperationalError as exc:
        reason, refusal = _failure_reason(exc), _refusal_sqlstate(exc)
        raise ConnectionUnavailable(
            f"cannot connect to {mask_url(url)}: {reason}; {_connect_hint(reason, refusal)}",
            refusal,
            timed_out=_some_host_timed_out(exc),
        ) from None
    if conn.info.server_version < MIN_SERVER_VERSION:
        version = conn.info.parameter_status("server_version") or str(conn.info.server_version)
        conn.close()
        raise UserError(
            f"{mask_url(url)} runs PostgreSQL {version.split(' ')[0]}; "
            f"flowyard needs {MIN_SERVER_VERSION // 10000} or newer"
        )
    # As pg_dump and pg_restore do: a chunk copy, a checksum or an index build lasts as long as its
    # data, and a role's statement_timeout (common in production) would cancel it. Statements that
    # must stay short (online DDL, backfill batches, health queries) set their own limit.
    # Likewise a role's or database's idle_session_timeout: a flowyard session idles on purpose
    # (an advisory lock held for a whole deploy, sync or bulk copy; a restore's maintenance session
    # while pg_restore runs), and its end released the lock to a second run mid-way, or left a
    # restore's renamed-aside copy behind and the run told the restore had failed.
    settings = {
        "statement_timeout": "0",
        "idle_session_timeout": "0",
        **SESSION_ISOLATION,
        **TEXT_FORMS,
        **(UTC if utc else {}),
    }
    # The statement that pins the isolation must not run under the default it replaces: a hot
    # standby refuses to start a transaction under a DBA's ``serializable`` default ("cannot use
    # serializable mode in a hot standby"), so every connection to a replica failed, reads too.
    # psycopg opens each transaction it starts (this one too, in autocommit) at the level set here.
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    try:
        _pin_settings(conn, settings, client_check=True)
    except psycopg.errors.InvalidParameterValue:  # a server whose platform cannot poll a socket for its close (Windows)
        _pin_settings(conn, settings, client_check=False)
    return conn


def _pin_settings(conn: psycopg.Connection, settings: dict[str, str], *, client_check: bool) -> None:
    """Set ``settings`` on ``conn``'s session, and :data:`CLIENT_CHECK_INTERVAL` when
    ``client_check``, in one statement. The interval is the one a server may refuse: it takes only
    0 where its platform has no way to see a client's socket close (Windows), and connecting must
    not fail there, so :func:`connect` pins the rest again without it."""
    calls = [sql.SQL("set_config(%s, %s, false)") for _ in settings]
    values = [v for item in settings.items() for v in item]
    if client_check:
        calls.append(_CLIENT_CHECK)
        values.append(CLIENT_CHECK_INTERVAL)
    with conn.transaction():
        conn.execute(sql.SQL("SELECT {}").format(sql.SQL(", ").join(calls)), values)


_ATTEMPT_TIMED_OUT = ": connection timeout expired"
"""How psycopg ends the line of one host's attempt that waited out the connect timeout, in the
list of every attempt it puts in the message of a URL with several hosts."""


def _some_host_timed_out(exc: psycopg.OperationalError) -> bool:
    """Whether any host of the URL waited out the whole connect timeout (see
    :attr:`ConnectionUnavailable.timed_out`): with several hosts psycopg raises the error type of
    the last one tried, so ``host=a,b`` with a black hole before a host that refuses read as a
    quick refusal, and every immediate retry waited out the black hole again."""
    return isinstance(exc, psycopg.errors.ConnectionTimeout) or any(
        line.startswith("- ") and line.endswith(_ATTEMPT_TIMED_OUT) for line in str(exc).splitlines()
    )


def _connect_hint(reason: str, refusal: str | None) -> str:
    """What to check next. A server that turned the login away for good (``FATAL: password
    authentication failed``, ``database "x" does not exist``) is running: sending its user to
    check that it runs sent them the wrong way. A busy or starting server is running too."""
    if refusal is not None:
        return "the server is running but turns connections away for now; try again shortly"
    if "FATAL:" in reason:
        return "the server answered, so check the URL's user, password and database name"
    return "check the URL and that the server is running (`flowyard up` starts the embedded one)"


def _failure_reason(exc: psycopg.OperationalError) -> str:
    """The driver's reason on one line, e.g. ``connection to server at "db", port 5432 failed:
    Connection refused``.

    libpq states host, port and cause on the first line of each failed attempt; the
    tab-indented lines after it are generic hints ("Is the server running …?"). With several
    hosts psycopg lists every attempt after a header; each distinct cause is kept once.
    """
    reasons: list[str] = []
    for line in str(exc).splitlines():
        if not line.strip() or line[0] == "\t" or line.startswith("Multiple connection attempts failed"):
            continue
        reason = " ".join(line.split()).split("connection failed: ", 1)[-1]
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or type(exc).__name__


# What the server says when it turns a connection away for now, and the SQLSTATE it sends
# with it: libpq keeps the SQLSTATE of an error received while connecting to itself, so
# psycopg's error has none and the server's (English) message is all there is to go by.
_REFUSALS = (
    ("too many clients already", "53300"),
    ("too many connections for", "53300"),  # a role's or a database's CONNECTION LIMIT
    ("remaining connection slots are reserved", "53300"),
    ("the database system is ", "57P03"),  # starting up, shutting down, in recovery mode...
)


def _refusal_sqlstate(exc: psycopg.OperationalError) -> str | None:
    """The SQLSTATE of a refusal that a later attempt may not meet (see ``_REFUSALS``), so
    callers can retry it; None for anything else (a wrong password, a missing database, no
    server), and for a server whose messages are not in English."""
    message = str(exc)
    return exc.sqlstate or next((state for phrase, state in _REFUSALS if phrase in message), None)


@contextmanager
def connection(url: str, *, autocommit: bool = False, utc: bool = False) -> Iterator[psycopg.Connection]:
    """A connection (see :func:`connect`) that commits on success, rolls back on error, and is always closed."""
    conn = connect(url, autocommit=autocommit, utc=utc)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


Db = str | psycopg.Connection
"""A database URL, or a connection whose open transaction the call joins (see :func:`using`)."""


@contextmanager
def using(db: Db) -> Iterator[psycopg.Connection]:
    """``db`` itself when it is a connection, so several calls join the caller's one transaction
    (committed or rolled back by the caller); else a :func:`connection` of its own."""
    if isinstance(db, psycopg.Connection):
        yield db
        return
    with connection(db) as conn:
        yield conn


ReadOnlyWords = psycopg.errors.ReadOnlySqlTransaction | str
"""PostgreSQL's refusal of a write, or what stands for it when none was tried (:func:`refuse_read_only`)."""

_READ_ONLY_CAUSE = """
SELECT pg_is_in_recovery(), s.setting = 'on', s.source, current_user, current_database()
  FROM pg_settings s WHERE s.name = 'default_transaction_read_only'
"""


def read_only_refusal(url: str, error: ReadOnlyWords, outcome: str = "") -> ServerReadOnly:
    """A write ``url``'s server refused as read-only, as one line naming the URL, why and what to
    do (:func:`read_only_reason`), then ``outcome`` (what was left undone) when given."""
    return ServerReadOnly(f"{mask_url(url)} {read_only_reason(url, error)}{f'; {outcome}' if outcome else ''}")


_TAKES_NO_WRITES = "transaction_read_only is on"
""":func:`refuse_read_only`'s words in place of PostgreSQL's: the setting a standby and
``default_transaction_read_only`` both turn on, read before any write was tried."""


def refuse_read_only(conn: psycopg.Connection, url: str, outcome: str) -> None:
    """Refuse ``url`` in :func:`read_only_refusal`'s words, then ``outcome``, when its server takes
    no writes in ``conn``'s session (``transaction_read_only``: a standby, a DBA's
    ``default_transaction_read_only``), for a command that writes only after slower steps: a
    migration deploy met PostgreSQL's refusal at its first revision, after a backup, and then
    rebuilt the database from that backup (ending its sessions) although nothing had been written."""
    if one_row(conn, "SELECT current_setting('transaction_read_only')::boolean")[0]:
        raise read_only_refusal(url, _TAKES_NO_WRITES, outcome)


def read_only_reason(url: str, error: ReadOnlyWords) -> str:
    """``accepts no writes (<PostgreSQL's words>): <why>; <fix>`` for a write ``url``'s server
    refused as read-only: PostgreSQL's words name neither a standby (in recovery, no writes at all)
    nor where ``default_transaction_read_only`` is set (``pg_settings.source``: the role, the
    database, the URL, the server's configuration). Asked on a connection of its own, which meets
    the same role and database settings.

    flowyard does not turn the setting off in its sessions, unlike the isolation level it pins: on
    a standby that changes nothing, and a DBA who set it for flowyard's role or database meant it
    (a freeze during maintenance, a reporting role), so overriding it would write where writes
    were forbidden."""
    try:
        with connection(url, autocommit=True) as conn:
            cause = _read_only_cause(conn, *one_row(conn, _READ_ONLY_CAUSE))
    except (psycopg.Error, UserError):  # the server gone meanwhile: the refusal is still the news
        cause = READ_ONLY_CAUSES
    return f"accepts no writes ({first_line(error)}): {cause}"


def error_line(url: str, error: BaseException) -> str:
    """``error`` on one line (:func:`~tasks.errors.first_line`) for a report or a log about
    ``url``; a write refused as read-only as ``the server`` and :func:`read_only_reason`'s words,
    since PostgreSQL's (``cannot execute CREATE SEQUENCE in a read-only transaction``) name neither
    a standby nor where the setting is, nor the fix."""
    refusal = read_only_error(error)
    return first_line(error) if refusal is None else f"the server {read_only_reason(url, refusal)}"


def _read_only_cause(
    conn: psycopg.Connection, in_recovery: bool, read_only: bool, source: str, role: str, database: str
) -> str:
    """Why the server behind ``conn`` takes no writes and the fix (see :func:`read_only_refusal`)."""
    if in_recovery:
        return "it is a standby (in recovery); point the URL at the primary"
    if not read_only:  # reset since the refusal, or made read-only some other way
        return READ_ONLY_CAUSES
    role_sql, database_sql = (sql.Identifier(name).as_string(conn) for name in (role, database))
    where, fix = {
        "user": (f"role {role}", f"run ALTER ROLE {role_sql} RESET default_transaction_read_only"),
        "database user": (
            f"role {role} in database {database}",
            f"run ALTER ROLE {role_sql} IN DATABASE {database_sql} RESET default_transaction_read_only",
        ),
        "database": (f"database {database}", f"run ALTER DATABASE {database_sql} RESET default_transaction_read_only"),
        "client": ("this connection (the URL's options or PGOPTIONS)", "remove -c default_transaction_read_only=on there"),
        "configuration file": (
            "the server (postgresql.conf or ALTER SYSTEM)",
            "run ALTER SYSTEM RESET default_transaction_read_only and SELECT pg_reload_conf()",
        ),
    }.get(source, (f"the server ({source})", "turn it off there"))
    return (
        f"default_transaction_read_only is on, set for {where} (pg_settings.source: {source}); {fix} "
        "if flowyard may write there, or point the URL at a role and database that may write"
    )


def one_row(conn: psycopg.Connection, query: QueryNoTemplate, params: Params | None = None) -> tuple[Any, ...]:
    """The row of a query that always returns exactly one (``count(*)``, ``SHOW``, a function call).

    psycopg types ``fetchone()`` as possibly ``None``; for these queries no row would be a
    server fault, so it is raised here once instead of being checked at every call site.
    """
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise RuntimeError(f"no row from a query that always returns one: {query!r}")
    return row


def ensure_database(server_url: str, name: str) -> None:
    """Create database ``name`` on the server behind ``server_url`` unless it exists.

    Two processes may race here; the loser's duplicate_database error is ignored.
    """
    with connection(with_database(server_url, "postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            pass


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` (terminating its sessions); used by the demo, tests and restores."""
    conn_url = with_database(server_url, "postgres")
    with connection(conn_url, autocommit=True) as conn:
        try:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except psycopg.errors.InsufficientPrivilege:
            raise UserError(
                f"cannot drop database {name} (connected as {mask_url(conn_url)}): another role owns it; drop it "
                f"as that role or a superuser, or hand it over (ALTER DATABASE {name} OWNER TO ...)"
            ) from None
