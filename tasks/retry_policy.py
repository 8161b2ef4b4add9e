"""Which database errors are worth retrying, for Prefect's ``retry_condition_fn``.

Transient: the connection was lost or refused mid-way (class 08, admin/crash shutdown),
a serialization failure (40001), a deadlock (40P01), too many connections (53300), a server
starting up or shutting down (57P03) — also when the server turned the connection away
while connecting (:class:`~tasks.errors.ConnectionUnavailable` with one of these codes). A
retry of a chunk is safe because its rows and checkpoint commit together. Anything else (a
constraint violation, bad data, a wrong password or database, any other UserError) is
permanent: retrying would fail the same way.
"""

from __future__ import annotations

from typing import Any

import psycopg

from tasks.errors import ConnectionUnavailable

TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03", "53300"}


def is_transient(exc: BaseException | None) -> bool:
    if isinstance(exc, ConnectionUnavailable):
        return exc.sqlstate in TRANSIENT_SQLSTATES
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        return state is None or state.startswith("08") or state in TRANSIENT_SQLSTATES
    return isinstance(exc, psycopg.InterfaceError | ConnectionError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:  # noqa: ANN401 - Prefect's hook signature
    """``retry_condition_fn`` for Prefect tasks: retry only transient database errors."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classify whatever the task raised
        return is_transient(exc)
    return False
