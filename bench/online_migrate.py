"""Online schema changes under full write load, against a naive ALTER TABLE ... TYPE bigint.

For each table size, a ``bench_orders`` table is filled, then two writer processes run INSERTs and
UPDATEs at full speed for the whole run while the seed-000 scenarios run one after another
through the real online-migration code (plan, lint, start, complete; no Prefect in the loop).
The writers are separate processes, as application instances are, so none of them shares a
GIL or a garbage collector with the migration driver:

1. add a NOT NULL column with a default   4. add an index
2. rename a column                         5. add a foreign key
3. int -> bigint and text -> enum          6. add a CHECK
   and int -> bigint of the serial primary key that bench_refunds references (the classic case)

Writers use the old version (previous view schema) during expand and switch to the new
version before complete, as a rolling deploy does. Measured: failed writes, max write latency
per scenario, backfill rows/s, both versions answering during expand, and, after complete, a
checksum of every row against the writers' own record of what they wrote. Then the naive
``ALTER TABLE ... ALTER COLUMN ... TYPE bigint`` runs under the same load, on ``amount`` and on
the primary key ``id`` (which also rebuilds its index and rechecks bench_refunds' foreign key).

    .venv/bin/python -m bench.online_migrate --rows 1000000 --rows 200000
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql
from psycopg.types.string import StrDumperUnknown

from bench._runtime import bench_runtime
from tasks.backfill import BackfillOptions
from tasks.db import connect
from tasks.ddl_retry import LockPolicy
from tasks.online_migration import lint_plan, prepare_plan, run_online_phase
from tasks.online_phases import PhaseReport, RunOptions

STATUSES = ("new", "paid", "shipped")
IDLE_SECONDS = 10.0
SETUP = """
DROP TABLE IF EXISTS bench_refunds, bench_orders, bench_customers CASCADE;
DROP TYPE IF EXISTS order_status;
CREATE TABLE bench_customers (id int PRIMARY KEY);
INSERT INTO bench_customers SELECT generate_series(1, 1000);
CREATE TABLE bench_orders (
    id serial PRIMARY KEY, customer_id int NOT NULL, amount int NOT NULL, note text, status text NOT NULL
);
CREATE TABLE bench_refunds (id int PRIMARY KEY, order_id int NOT NULL REFERENCES bench_orders (id));
INSERT INTO bench_orders
SELECT g, 1 + g % 1000, g % 10000, 'n' || g, (ARRAY['new', 'paid', 'shipped'])[1 + g % 3]
FROM generate_series(1, {rows}) g;
INSERT INTO bench_refunds SELECT g, g * 7 FROM generate_series(1, least({rows} / 10, 10000)) g;
VACUUM ANALYZE bench_orders;
CHECKPOINT;
"""


@dataclass(frozen=True)
class Scenario:
    title: str
    operations: list[dict[str, Any]]
    rename_note: str | None = None
    """What the writers call the ``note`` column in the new version, when the scenario renames it."""


SCENARIOS = [
    Scenario(
        "1 add NOT NULL column with default",
        [
            {
                "add_column": {
                    "table": "bench_orders",
                    "column": {"name": "priority", "type": "int", "nullable": False, "default": "0"},
                }
            }
        ],
    ),
    Scenario(
        "2 rename column",
        [{"rename_column": {"table": "bench_orders", "from": "note", "to": "comment"}}],
        rename_note="comment",
    ),
    Scenario(
        "3a int -> bigint",
        [
            {
                "alter_column": {
                    "table": "bench_orders",
                    "column": "amount",
                    "type": "bigint",
                    "up": "amount::bigint",
                    "down": "amount::int",
                }
            }
        ],
    ),
    Scenario(
        "3b text -> enum",
        [
            {
                "raw_sql": {
                    "up": "CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped')",
                    "down": "DROP TYPE IF EXISTS order_status",
                }
            },
            {
                "alter_column": {
                    "table": "bench_orders",
                    "column": "status",
                    "type": "order_status",
                    "up": "status::order_status",
                    "down": "status::text",
                }
            },
        ],
    ),
    Scenario(
        "3c primary key int -> bigint",
        [
            {
                "alter_column": {
                    "table": "bench_orders",
                    "column": "id",
                    "type": "bigint",
                    "up": "id::bigint",
                    "down": "id::int",
                }
            }
        ],
    ),
    Scenario(
        "4 add index",
        [
            {
                "create_index": {
                    "name": "bench_orders_status_idx",
                    "table": "bench_orders",
                    "columns": ["status"],
                }
            }
        ],
    ),
    Scenario(
        "5 add foreign key",
        [
            {
                "alter_column": {
                    "table": "bench_orders",
                    "column": "customer_id",
                    "references": {"table": "bench_customers", "column": "id"},
                }
            }
        ],
    ),
    Scenario(
        "6 add CHECK",
        [
            {
                "alter_column": {
                    "table": "bench_orders",
                    "column": "amount",
                    "check": {"name": "amount_not_negative", "constraint": "amount >= 0"},
                }
            }
        ],
    ),
]


@dataclass
class WriterLog:
    """What the writers did: the rows they wrote last, every write's latency, their failures."""

    written: dict[int, tuple[int, int, str, str]] = field(default_factory=dict)
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(time.monotonic() at the end of the write, seconds it took); CLOCK_MONOTONIC is system-wide."""
    failures: list[str] = field(default_factory=list)

    def latencies(self, since: float, until: float = float("inf")) -> tuple[float, float]:
        """(max, p99) in seconds of the writes that finished in [since, until)."""
        window = sorted(seconds for end, seconds in self.samples if since <= end < until)
        if not window:
            return 0.0, 0.0
        return window[-1], window[int(0.99 * (len(window) - 1))]

    def merge(self, other: WriterLog) -> None:
        self.written.update(other.written)
        self.samples.extend(other.samples)
        self.failures.extend(other.failures)


def _write(
    conn: psycopg.Connection, note: str, row_id: int, is_new: bool, value: tuple[int, int, str, str]
) -> None:
    if is_new:
        conn.execute(
            sql.SQL(
                "INSERT INTO bench_orders (id, customer_id, amount, {}, status) VALUES (%s, %s, %s, %s, %s)"
            ).format(sql.Identifier(note)),
            (row_id, *value),
        )
    else:
        conn.execute(
            sql.SQL("UPDATE bench_orders SET amount = %s, {} = %s, status = %s WHERE id = %s").format(
                sql.Identifier(note)
            ),
            (value[1], value[2], value[3], row_id),
        )


def _writer_process(url: str, rows: int, seed: int, stride: int, control: Connection) -> None:
    """One application process: INSERTs new rows and UPDATEs random ones as fast as it can.

    ``control`` carries ``(search_path, note_column)`` when a new application version is deployed
    (it comes with its own connections) and ``None`` to stop; the log goes back over it at the end.
    Each process owns the ids ``seed + k * stride`` (it inserts them above ``10 * rows`` and updates
    them below ``rows``), so no two processes write one row and each log is the truth for its rows.
    """
    rng, log = random.Random(seed), WriterLog()
    next_id, note = 10 * rows + seed, "note"
    conn = _app_connection(url)
    control.send("ready")
    while True:
        if control.poll():
            message = control.recv()
            if message is None:
                break
            path, note = message
            conn.close()
            conn = _app_connection(url)
            conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(path)))
        is_new = rng.random() < 0.5
        if is_new:
            next_id += stride
        row_id = next_id if is_new else rng.randrange(1 + seed, rows + 1, stride)
        value = (1 + row_id % 1000, rng.randint(0, 100_000), f"w{rng.random():.6f}", rng.choice(STATUSES))
        started = time.monotonic()
        try:
            _write(conn, note, row_id, is_new, value)
        except Exception as exc:  # noqa: BLE001 - every failed application write is the measurement
            log.failures.append(str(exc).splitlines()[0])
            conn.close()
            conn = _app_connection(url)
            continue
        ended = time.monotonic()
        log.samples.append((ended, ended - started))
        log.written[row_id] = value
    conn.close()
    control.send(log)


class Writers:
    """Writer *processes*, as real application instances are: none shares a GIL with the migration driver."""

    def __init__(self, url: str, rows: int, processes: int = 2) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._processes = []
        for seed in range(processes):
            ours, theirs = context.Pipe()
            self._pipes.append(ours)
            self._processes.append(
                context.Process(
                    target=_writer_process, args=(url, rows, seed, processes, theirs), daemon=True
                )
            )

    def start(self) -> None:
        """Start the writers and return once every one is connected and writing."""
        for process in self._processes:
            process.start()
        for pipe in self._pipes:
            pipe.recv()

    def deploy(self, search_path: str, note_column: str) -> None:
        """Roll out a new application version: new connections with its ``search_path``."""
        for pipe in self._pipes:
            pipe.send((search_path, note_column))

    def finish(self) -> WriterLog:
        """Stop the writers and return their merged log."""
        log = WriterLog()
        for pipe in self._pipes:
            pipe.send(None)
        for pipe, process in zip(self._pipes, self._processes, strict=True):
            log.merge(pipe.recv())
            process.join()
        return log


def _app_connection(url: str) -> psycopg.Connection:
    """An application connection that sends strings untyped, so the server casts them to enums as apps expect."""
    conn = connect(url, autocommit=True)
    conn.adapters.register_dumper(str, StrDumperUnknown)
    return conn


def _setup(url: str, rows: int) -> None:
    with connect(url, autocommit=True) as conn:
        for statement in SETUP.format(rows=int(rows)).strip().split(";\n"):
            conn.execute(statement)


def _data_matches(url: str, rows: int, log: WriterLog, search_path: str, note: str) -> tuple[bool, int]:
    """Checksum of every row (through the new version) against the writers' record; mismatching rows."""
    with connect(url) as conn:
        conn.execute(sql.SQL("SET search_path = {}, public").format(sql.Identifier(search_path)))
        conn.execute(
            "CREATE TEMP TABLE expected_writes (id bigint PRIMARY KEY, customer_id int, amount bigint, note text, status text)"
        )
        with conn.cursor().copy("COPY expected_writes FROM STDIN") as copy:
            for row_id, (customer, amount, text, status) in log.written.items():
                copy.write_row((row_id, customer, amount, text, status))
        expected = (
            "SELECT g AS id, coalesce(e.customer_id, 1 + mod(g, 1000)) AS customer_id, coalesce(e.amount, mod(g, 10000)) AS amount, "
            "coalesce(e.note, 'n' || g) AS note, coalesce(e.status, (ARRAY['new', 'paid', 'shipped'])[1 + mod(g, 3)]) AS status "
            "FROM generate_series(1, %(rows)s::bigint) g LEFT JOIN expected_writes e ON e.id = g "
            "UNION ALL SELECT id, customer_id, amount, note, status FROM expected_writes WHERE id > %(rows)s"
        )
        actual = sql.SQL(
            "SELECT id, customer_id, amount::bigint AS amount, {} AS note, status::text AS status FROM bench_orders"
        ).format(sql.Identifier(note))
        digest = "SELECT md5(string_agg(md5(row(id, customer_id, amount, note, status)::text), '' ORDER BY id)) FROM ({}) q"
        want = conn.execute(sql.SQL(digest).format(sql.SQL(expected)), {"rows": rows}).fetchone()[0]
        got = conn.execute(sql.SQL(digest).format(actual)).fetchone()[0]
        mismatches = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM ({}) a FULL JOIN ({}) b USING (id) WHERE row(a.*) IS DISTINCT FROM row(b.*)"
            ).format(actual, sql.SQL(expected)),
            {"rows": rows},
        ).fetchone()[0]
    return want == got, int(mismatches)


def _versions_answer(url: str, old: str, new: str, note_old: str, note_new: str) -> bool:
    with connect(url, autocommit=True) as conn:
        for path, note in ((old, note_old), (new, note_new)):
            conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(path)))
            conn.execute(
                sql.SQL("SELECT id, amount, {}, status FROM bench_orders ORDER BY id DESC LIMIT 5").format(
                    sql.Identifier(note)
                )
            ).fetchall()
    return True


@dataclass(frozen=True)
class ScenarioRun:
    """One scenario's time window (monotonic seconds) and what its phases reported."""

    scenario: Scenario
    started: float
    expanded: float
    ended: float
    start: PhaseReport
    complete: PhaseReport
    both_versions: bool


def _result(title: str, log: WriterLog, since: float, until: float, **extra: Any) -> dict[str, Any]:
    worst, p99 = log.latencies(since, until)
    return {
        "scenario": title,
        "seconds": until - since,
        "max_write_ms": worst * 1000,
        "p99_write_ms": p99 * 1000,
    } | extra


def run_online(
    url: str, state: str, rows: int, workdir: Path, scenarios: list[Scenario], options: RunOptions
) -> list[dict[str, Any]]:
    writers = Writers(url, rows)
    writers.start()
    time.sleep(1.0)  # warm-up: the writers' first statements load catalog caches and plans
    idle = time.monotonic()
    time.sleep(IDLE_SECONDS)  # the control: the same writers with no migration running
    runs: list[ScenarioRun] = []
    old_path, old_note = "public", "note"
    try:
        for n, scenario in enumerate(scenarios):
            file = workdir / f"s{n}.yaml"
            file.write_text(yaml.safe_dump({"name": f"bench_{n}", "operations": scenario.operations}))
            started = time.monotonic()
            plan = prepare_plan(url, state, str(file), "public")
            lint_plan(plan, options.policy.lock_timeout_ms)
            start = run_online_phase(url, state, plan, "start", options)
            expanded = time.monotonic()
            new_note = scenario.rename_note or old_note
            both = _versions_answer(url, old_path, plan.version_schema, old_note, new_note)
            time.sleep(1.0)  # the old version keeps writing through the sync triggers for a moment
            writers.deploy(plan.version_schema, new_note)  # then the new app version rolls out
            time.sleep(1.0)
            complete = run_online_phase(url, state, plan, "complete", options)
            runs.append(ScenarioRun(scenario, started, expanded, time.monotonic(), start, complete, both))
            old_path, old_note = plan.version_schema, new_note
            print(f"  {scenario.title}: {runs[-1].ended - started:.1f}s", flush=True)
    finally:
        log = writers.finish()
    same, mismatches = _data_matches(url, rows, log, old_path, old_note)
    print(f"  writes: {len(log.samples)}, failed: {len(log.failures)} {log.failures[:3]}", flush=True)
    shared = {"failed_writes": len(log.failures), "checksum_equal": same, "mismatched_rows": mismatches}
    control_end = runs[0].started if runs else idle + IDLE_SECONDS
    results = [
        _result(
            f"0 writers alone for {IDLE_SECONDS:.0f}s (no migration; the control)",
            log,
            idle,
            control_end,
            max_write_ms_start=None,
            backfill_rows_per_s=None,
            lock_timeouts=0,
            both_versions=True,
            **shared,
        )
    ]
    for run in runs:
        backfilled = sum(b.rows for b in run.start.backfills)
        backfill_seconds = sum(b.seconds for b in run.start.backfills)
        results.append(
            _result(
                run.scenario.title,
                log,
                run.started,
                run.ended,
                max_write_ms_start=log.latencies(run.started, run.expanded)[0] * 1000,
                backfill_rows_per_s=backfilled / backfill_seconds if backfill_seconds else None,
                lock_timeouts=run.start.lock_timeouts + run.complete.lock_timeouts,
                both_versions=run.both_versions,
                **shared,
            )
        )
    return results


def run_naive(url: str, rows: int, column: str) -> dict[str, float]:
    """The baseline: ALTER COLUMN ... TYPE bigint, rewriting the table under ACCESS EXCLUSIVE, same load."""
    _setup(url, rows)
    writers = Writers(url, rows)
    writers.start()
    time.sleep(2.0)
    started = time.monotonic()
    with connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER TABLE bench_orders ALTER COLUMN {} TYPE bigint").format(sql.Identifier(column))
        )
    seconds = time.monotonic() - started
    time.sleep(0.5)
    log = writers.finish()
    return {
        "alter_seconds": seconds,
        "max_write_ms": log.latencies(started)[0] * 1000,
        "failed_writes": len(log.failures),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="table size (repeat for several)")
    parser.add_argument("--only", default="", help="run only scenarios whose title starts with this")
    parser.add_argument("--batch-size", type=int, default=BackfillOptions().batch_size)
    parser.add_argument("--skip-naive", action="store_true", help="do not run the naive ALTER TABLE baseline")
    parser.add_argument("--lock-timeout-ms", type=int, default=LockPolicy().lock_timeout_ms)
    args = parser.parse_args()
    sizes = args.rows or [1_000_000]
    with bench_runtime(with_prefect=False) as rt, tempfile.TemporaryDirectory() as tmp:
        from tasks.state import state_url

        state = state_url(rt.state_url)
        for rows in sizes:
            url = rt.database(f"bench_online_{rows}")
            print(f"== {rows:,} rows", flush=True)
            _setup(url, rows)
            scenarios = [s for s in SCENARIOS if s.title.startswith(args.only)]
            options = RunOptions(
                policy=LockPolicy(lock_timeout_ms=args.lock_timeout_ms),
                backfill=BackfillOptions(args.batch_size, policy=LockPolicy(args.lock_timeout_ms, 60_000)),
            )
            online = run_online(url, state, rows, Path(tmp), scenarios, options)
            naive = (
                {}
                if args.skip_naive
                else {column: run_naive(url, rows, column) for column in ("amount", "id")}
            )
            worst = max(r["max_write_ms"] for r in online if r["max_write_ms_start"] is not None)
            backfills = [r["backfill_rows_per_s"] for r in online if r["backfill_rows_per_s"]]
            print(
                f"\n| scenario ({rows:,} rows) | duration s | max write latency ms | p99 write ms | of which in start ms | backfill rows/s | lock timeouts retried |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|")
            for r in online:
                rate = f"{r['backfill_rows_per_s']:,.0f}" if r["backfill_rows_per_s"] else "—"
                in_start = "—" if r["max_write_ms_start"] is None else f"{r['max_write_ms_start']:.0f}"
                print(
                    f"| {r['scenario']} | {r['seconds']:.1f} | {r['max_write_ms']:.0f} | {r['p99_write_ms']:.0f} | {in_start} | {rate} | {r['lock_timeouts']} |"
                )
            print(
                f"\nonline: failed writes {online[0]['failed_writes']}, both versions answered during expand: "
                f"{all(r['both_versions'] for r in online)}, checksum equal after complete: {online[0]['checksum_equal']} "
                f"(mismatched rows {online[0]['mismatched_rows']}), worst write latency {worst:.0f} ms, "
                f"min backfill {min(backfills):,.0f} rows/s"
            )
            for column, result in naive.items():
                print(
                    f"naive ALTER COLUMN {column} TYPE bigint: took {result['alter_seconds']:.1f}s, max write latency "
                    f"{result['max_write_ms']:.0f} ms (blocked writes), failed writes {result['failed_writes']}; "
                    f"ratio naive/online worst latency = {result['max_write_ms'] / worst:.1f}x"
                )


if __name__ == "__main__":
    main()
