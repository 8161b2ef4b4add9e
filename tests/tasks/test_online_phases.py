"""Phase execution against real contention: lock retries while writers keep writing, invalid index rebuilds."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tasks.db import connect
from tasks.ddl_retry import LockPolicy
from tasks.errors import UserError
from tasks.online_phases import RunOptions
from tasks.online_plan import Plan
from tasks.online_state import active_migration, set_steps_done, target_key
from tests.online_support import WIDEN_AMOUNT, make_schema, plan_for, run, schema_dump, widen


def test_long_transaction_makes_start_retry_while_writers_keep_writing(fresh_db: str, state_db: str) -> None:
    make_schema(fresh_db, rows=500)
    plan = plan_for(
        fresh_db,
        state_db,
        {
            "name": "under_lock",
            "operations": [{"add_column": {"table": "orders", "column": {"name": "flag", "type": "int"}}}],
        },
    )
    holder = connect(fresh_db)
    holder.execute("SELECT count(*) FROM orders")  # a long transaction holding ACCESS SHARE on orders
    stop, failures, waits = threading.Event(), [], []

    def write() -> None:
        with connect(fresh_db, autocommit=True) as conn:
            n = 10_000
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    conn.execute("INSERT INTO orders (id, amount) VALUES (%s, 1)", (n,))
                except psycopg.Error as exc:
                    failures.append(exc)
                waits.append(time.monotonic() - started)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    release = threading.Timer(3.0, holder.commit)
    release.start()
    try:
        report = run(
            fresh_db,
            state_db,
            plan,
            "start",
            RunOptions(policy=LockPolicy(lock_timeout_ms=200, deadline_seconds=60)),
        )
    finally:
        release.join()
        holder.close()
        stop.set()
        writer.join()
    assert report.lock_timeouts >= 1
    assert failures == [] and len(waits) > 10
    assert max(waits) < 1.5  # queued behind the waiting DDL for about one lock_timeout, not the 3 s hold


def test_invalid_leftover_index_is_dropped_and_rebuilt(fresh_db: str, state_db: str) -> None:
    make_schema(fresh_db, rows=200)
    plan = plan_for(
        fresh_db,
        state_db,
        {
            "name": "rebuild_idx",
            "operations": [
                {"create_index": {"name": "orders_cust_idx", "table": "orders", "columns": ["customer_id"]}}
            ],
        },
    )
    with connect(fresh_db, autocommit=True) as conn:
        try:  # a failed concurrent build (duplicates) leaves an invalid index with that name behind
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY orders_cust_idx ON orders (customer_id)")
        except psycopg.errors.UniqueViolation:
            pass
        assert conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'orders_cust_idx'::regclass"
        ).fetchone() == (False,)
    run(fresh_db, state_db, plan, "start")
    with connect(fresh_db) as conn:
        assert conn.execute(
            "SELECT indisvalid, indisunique FROM pg_index WHERE indexrelid = 'orders_cust_idx'::regclass"
        ).fetchone() == (True, False)


def test_a_privilege_the_role_lacks_is_one_line_saying_to_connect_as_the_owner(
    limited_role, fresh_db: str, state_db: str
) -> None:
    """Advice to "fix the data" would send the user the wrong way."""
    make_schema(fresh_db, rows=10)
    spec = {
        "name": "not_mine",
        "operations": [{"add_column": {"table": "orders", "column": {"name": "flag", "type": "int"}}}],
    }
    role_url = limited_role.url(fresh_db)
    with pytest.raises(UserError) as err:
        run(role_url, state_db, plan_for(role_url, state_db, spec), "start")
    message = str(err.value)
    assert "step 1 (create version schema public_not_mine) failed: permission denied for database" in message
    assert "connect as the tables' owner (or grant the role in the URL that privilege)" in message
    assert "fix the data" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("tamper", "expected", "app_writes"),
    [
        ("DROP TRIGGER _fy_sync_widen ON orders", "sync trigger _fy_sync_widen on public.orders is gone", True),
        (
            "ALTER TABLE orders DISABLE TRIGGER _fy_sync_widen",
            "sync trigger _fy_sync_widen on public.orders is disabled",
            True,
        ),
        (  # the trigger still names the column: application writes fail loudly, complete must too
            "ALTER TABLE orders RENAME COLUMN _fy_new_amount TO amount_copy",
            "column public.orders._fy_new_amount, which start added and filled, is gone",
            False,
        ),
    ],
)
def test_complete_refuses_a_sync_someone_broke_after_start_and_loses_no_write(
    fresh_db: str, state_db: str, tamper: str, expected: str, app_writes: bool
) -> None:
    """Complete dropped the trigger "IF EXISTS" and swapped in a shadow column that had missed the
    writes since, or skipped the table whose shadow it could not find."""
    make_schema(fresh_db, rows=100)
    plan = plan_for(fresh_db, state_db, {"name": "widen", "operations": [WIDEN_AMOUNT]})
    run(fresh_db, state_db, plan, "start")
    with connect(fresh_db, autocommit=True) as dba:
        dba.execute(tamper)
    if app_writes:
        with connect(fresh_db, autocommit=True) as app:  # an old-version session writes after the change
            app.execute("UPDATE orders SET amount = 4242 WHERE id = 7")
    before = schema_dump(fresh_db)
    with pytest.raises(UserError) as err:
        run(fresh_db, state_db, plan, "complete")
    message = str(err.value)
    assert message.startswith(f"widen: cannot complete, nothing was changed: {expected}")
    assert "roll back (`flowyard online rollback`" in message and "\n" not in message
    rollback_refuses = (  # only where the trigger is broken: new-version writes since are in the shadow only
        "but writes through the new version (search_path=public_widen) since then reached only "
        "public.orders._fy_new_amount, which rollback drops, so it refuses until you copy the ones to keep to "
        "the old column and give --force (force)) and run start again"
    )
    assert (rollback_refuses in message) == ("TRIGGER" in tamper), message
    assert schema_dump(fresh_db) == before
    record = active_migration(state_db, target_key(fresh_db), "public")
    assert record is not None and record.phase == "expanded"
    run(fresh_db, state_db, plan, "rollback", RunOptions(force=True))  # no new-version write to lose
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT amount FROM orders WHERE id = 7").fetchone() == (4242 if app_writes else 8,)


@pytest.mark.parametrize(
    ("tamper", "state"),
    [("DROP TRIGGER _fy_sync_widen ON orders", "gone"), ("ALTER TABLE orders DISABLE TRIGGER _fy_sync_widen", "disabled")],
)
def test_rollback_refuses_to_drop_new_version_writes_a_broken_sync_kept_from_the_old_column(
    fresh_db: str, state_db: str, tamper: str, state: str
) -> None:
    """With the sync trigger gone, a write through the new version reaches only the shadow column,
    never the old one through ``down``: rollback dropped the shadow and the write with it, silently
    (the new version read 4242, the old version read 8 again after the rollback)."""
    refused = _rollback_refused_then_forced(
        fresh_db, state_db, {"name": "widen", "operations": [WIDEN_AMOUNT]}, tamper,
        write="UPDATE orders SET amount = 4242 WHERE id = 7",
        keep="UPDATE orders SET amount = _fy_new_amount WHERE id = 7",  # the user keeps the write, as the line says
    )  # fmt: skip
    assert refused == (
        f"widen: cannot roll back, nothing was changed: sync trigger _fy_sync_widen on public.orders is {state}, "
        "so writes through the new version (search_path=public_widen) since then reached only "
        "public.orders._fy_new_amount, which rollback drops; copy the ones to keep to the old column, then run "
        "rollback again with --force (force)"
    )
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT amount FROM orders WHERE id = 7").fetchone() == (4242,)


def _rollback_refused_then_forced(
    fresh_db: str, state_db: str, migration: dict[str, Any], tamper: str, write: str, keep: str
) -> str:
    """Start ``migration``, break its sync trigger (``tamper``, as a DBA might), ``write`` through
    the new version; rollback must refuse, changing nothing and leaving the migration expanded.
    Then ``keep`` what the line says to keep and roll back with ``force``. Returns the refusal."""
    make_schema(fresh_db, rows=10)
    plan = plan_for(fresh_db, state_db, migration)
    run(fresh_db, state_db, plan, "start")
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute(tamper)
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(plan.version_schema)))
        conn.execute(write)
    before = schema_dump(fresh_db)
    with pytest.raises(UserError) as err:
        run(fresh_db, state_db, plan, "rollback")
    assert schema_dump(fresh_db) == before
    record = active_migration(state_db, target_key(fresh_db), "public")
    assert record is not None and record.phase == "expanded"
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute(keep)
    run(fresh_db, state_db, plan, "rollback", RunOptions(force=True))
    return str(err.value)


def test_rollback_refuses_to_keep_a_dropped_column_null_where_a_broken_sync_skipped_its_down(
    fresh_db: str, state_db: str
) -> None:
    """A drop_column's ``down`` fills the column for inserts through the new version, which no
    longer has it; with the sync trigger gone they left it NULL, and rollback, which keeps the
    column, went through: the old version read NULL where ``down`` gave a value. The refusal
    covered altered columns only."""
    drop = {"drop_column": {"table": "orders", "column": "legacy", "down": "'new ' || id"}}
    refused = _rollback_refused_then_forced(
        fresh_db, state_db, {"name": "drop_legacy", "operations": [drop]}, "DROP TRIGGER _fy_sync_drop_legacy ON orders",
        write="INSERT INTO orders (id, amount) VALUES (1001, 5)",
        keep="UPDATE orders SET legacy = 'new ' || id WHERE id = 1001",  # the user fills it, as the line says
    )  # fmt: skip
    assert refused == (
        "drop_legacy: cannot roll back, nothing was changed: sync trigger _fy_sync_drop_legacy on public.orders "
        "is gone, so writes through the new version (search_path=public_drop_legacy) since then left "
        "public.orders.legacy, which that version drops and rollback keeps, NULL where its `down` fills it; "
        "set it from its `down` on the rows the new version wrote, then run rollback again with --force (force)"
    )
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT legacy FROM orders WHERE id = 1001").fetchone() == ("new 1001",)


DROP_LEGACY = {"drop_column": {"table": "orders", "column": "legacy", "down": "'new ' || id"}}
WRITES = "writes through the new version (search_path=public_lossy) since then"


@pytest.mark.parametrize(
    ("operations", "tamper", "write", "keep", "lost", "kept"),
    [
        (  # an altered and a dropped column on one table: the refusal named the shadow only
            [WIDEN_AMOUNT, DROP_LEGACY],
            "DROP TRIGGER _fy_sync_lossy ON orders",
            "INSERT INTO orders (id, amount) VALUES (1001, 4242)",
            "UPDATE orders SET amount = _fy_new_amount, legacy = 'new ' || id WHERE id = 1001",
            "sync trigger _fy_sync_lossy on public.orders is gone, so " + WRITES + " reached only "
            "public.orders._fy_new_amount, which rollback drops, and left public.orders.legacy, which that version "
            "drops and rollback keeps, NULL where its `down` fills it; copy the ones to keep to the old column and "
            "set it from its `down` on the rows the new version wrote",
            ("SELECT amount, legacy FROM orders WHERE id = 1001", (4242, "new 1001")),
        ),
        (  # two dropped columns on one table: the refusal named the first only
            [DROP_LEGACY, {"drop_column": {"table": "orders", "column": "note", "down": "'n ' || id"}}],
            "ALTER TABLE orders DISABLE TRIGGER _fy_sync_lossy",
            "INSERT INTO orders (id, amount) VALUES (1001, 5)",
            "UPDATE orders SET legacy = 'new ' || id, note = 'n ' || id WHERE id = 1001",
            "sync trigger _fy_sync_lossy on public.orders is disabled, so " + WRITES + " left public.orders.legacy, "
            "public.orders.note, which that version drops and rollback keeps, NULL where its `down` fills it; "
            "set each from its `down` on the rows the new version wrote",
            ("SELECT legacy, note FROM orders WHERE id = 1001", ("new 1001", "n 1001")),
        ),
        (  # two tables: the refusal named the first only
            [WIDEN_AMOUNT, widen("tickets", "score")],
            "DROP TRIGGER _fy_sync_lossy ON orders; DROP TRIGGER _fy_sync_lossy ON tickets",
            "UPDATE orders SET amount = 4242 WHERE id = 7; UPDATE tickets SET score = 4243 WHERE id = 7",
            "UPDATE orders SET amount = _fy_new_amount WHERE id = 7; UPDATE tickets SET score = _fy_new_score WHERE id = 7",
            "sync trigger _fy_sync_lossy on public.orders is gone, so " + WRITES + " reached only "
            "public.orders._fy_new_amount, which rollback drops; copy the ones to keep to the old column; "
            "sync trigger _fy_sync_lossy on public.tickets is gone, so " + WRITES + " reached only "
            "public.tickets._fy_new_score, which rollback drops; copy the ones to keep to the old column",
            ("SELECT o.amount, t.score FROM orders o, tickets t WHERE o.id = 7 AND t.id = 7", (4242, 4243)),
        ),
    ],
)
def test_rollback_refusal_names_every_column_and_table_a_broken_sync_loses(
    fresh_db: str,
    state_db: str,
    operations: list[dict[str, Any]],
    tamper: str,
    write: str,
    keep: str,
    lost: str,
    kept: tuple[str, tuple[Any, ...]],
) -> None:
    """The refusal named the first loss it met: the user kept that one, rollback refused again
    with the same line (the catalog cannot tell a kept write), and the ``--force`` it asks for
    then dropped or left NULL what it never named."""
    refused = _rollback_refused_then_forced(
        fresh_db, state_db, {"name": "lossy", "operations": operations}, tamper, write, keep
    )
    assert refused == f"lossy: cannot roll back, nothing was changed: {lost}, then run rollback again with --force (force)"
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute(kept[0]).fetchone() == kept[1]


def test_rollback_of_a_dropped_column_its_default_fills_needs_no_force(fresh_db: str, state_db: str) -> None:
    """A new-version insert gives a dropped column its default, which the sync trigger keeps (its
    ``down`` fills a NULL only): a broken trigger loses nothing there, yet rollback refused, saying
    the column was left NULL, until ``--force``."""
    make_schema(fresh_db, rows=10)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE orders ALTER COLUMN legacy SET DEFAULT 'd'")
    plan = plan_for(fresh_db, state_db, {"name": "drop_legacy", "operations": [DROP_LEGACY]})
    run(fresh_db, state_db, plan, "start")
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("DROP TRIGGER _fy_sync_drop_legacy ON orders")
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(plan.version_schema)))
        conn.execute("INSERT INTO orders (id, amount) VALUES (1001, 5)")
    run(fresh_db, state_db, plan, "rollback")
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT legacy FROM orders WHERE id = 1001").fetchone() == ("d",)


def _complete_stopped_before_tickets(url: str, state: str) -> Plan:
    """Start a migration of orders and tickets, then a complete that contracts orders and fails on
    tickets, whose contract cannot take its lock behind a long transaction."""
    make_schema(url, rows=100)
    plan = plan_for(url, state, {"name": "two", "operations": [WIDEN_AMOUNT, widen("tickets", "score")]})
    run(url, state, plan, "start")
    holder = connect(url)
    holder.execute("SELECT count(*) FROM tickets")
    try:
        with pytest.raises(UserError, match="contract tickets: .* could not take its lock"):
            run(url, state, plan, "complete", RunOptions(policy=LockPolicy(deadline_seconds=0)))
    finally:
        holder.close()
    record = active_migration(state, target_key(url), "public")
    assert record is not None and record.phase == "completing" and record.steps_done("complete") == 1
    return plan


def test_a_resumed_complete_refuses_a_sync_broken_since_it_began_and_loses_no_write(
    fresh_db: str, state_db: str
) -> None:
    """Complete checked the syncs on its first run only: resumed after a step that failed, it dropped
    the trigger a DBA had disabled meanwhile "IF EXISTS" and swapped in the shadow column that had
    missed the writes since."""
    plan = _complete_stopped_before_tickets(fresh_db, state_db)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE tickets DISABLE TRIGGER _fy_sync_two")  # a DBA, while complete waits
        conn.execute("UPDATE tickets SET score = 4242 WHERE id = 7")  # an old-version write
    before = schema_dump(fresh_db)
    with pytest.raises(UserError) as err:
        run(fresh_db, state_db, plan, "complete")
    message = str(err.value)
    assert message.startswith(
        "two: cannot go on with complete, which began and can no longer roll back; nothing more was changed: "
        "sync trigger _fy_sync_two on public.tickets is disabled"
    ), message
    assert "rewrite every row of public.tickets as the old version" in message and "\n" not in message
    assert schema_dump(fresh_db) == before

    with connect(fresh_db, autocommit=True) as conn:  # what the line says to do
        conn.execute("ALTER TABLE tickets ENABLE TRIGGER _fy_sync_two")
        conn.execute("UPDATE tickets SET id = id")
    run(fresh_db, state_db, plan, "complete")
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT score, pg_typeof(score)::text FROM tickets WHERE id = 7").fetchone() == (
            4242,
            "bigint",
        )


def test_a_complete_resumed_after_a_contract_committed_unrecorded_goes_on(fresh_db: str, state_db: str) -> None:
    """A crash between a contract step's commit and its record in the state: the resumed complete
    checked the sync of that table, whose trigger the step itself had dropped, and refused for good,
    saying to roll back, which a begun complete cannot. The step's guard says it happened."""
    plan = _complete_stopped_before_tickets(fresh_db, state_db)
    record = active_migration(state_db, target_key(fresh_db), "public")
    assert record is not None
    set_steps_done(state_db, record.id, "complete", 0)  # orders' contract committed, then the crash
    run(fresh_db, state_db, plan, "complete")
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute(
            "SELECT pg_typeof(amount)::text, pg_typeof(score)::text FROM orders, tickets LIMIT 1"
        ).fetchone() == ("bigint", "bigint")
