"""Benchmark: the four entity suites on N rows per table (default 1M), three ways, in one run.

1. flowyard: ``quality.runner.run_suites`` - GX SQL datasource (checks run inside
   PostgreSQL) plus the in-database per-row scoring query, 2 workers.
2. GX on pandas, end to end: read each table into a DataFrame, then validate the same rules
   with GX's pandas datasource (foreign keys as a flag column from the loaded parent ids).
3. The practical limit: one hand-written single-pass SQL query per table counting every
   rule's violations (two tables at a time, as flowyard runs).

Each mode runs in its own subprocess so its peak RSS is its own. The three must agree on
every rule's violation count. Usage::

    .venv/bin/python -m bench.quality_suites [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

SINGLE_PASS = {
    "users": r"""
        SELECT count(*) FILTER (WHERE u.id IS NULL), count(*) FILTER (WHERE d.id IS NOT NULL),
               count(*) FILTER (WHERE u.created_at IS NULL OR NOT isfinite(u.created_at) OR u.created_at > now()),
               count(*) FILTER (WHERE u.version < 1),
               count(*) FILTER (WHERE u.email !~ '^[^\s@]+@[^\s@]+\.[^\s@]+$'),
               count(*) FILTER (WHERE u.username !~ '^.{3,30}$'),
               count(*) FILTER (WHERE u.role NOT IN ('admin','developer','viewer','guest')),
               count(*) FILTER (WHERE u.status NOT IN ('active','inactive','suspended','deleted'))
        FROM users u LEFT JOIN (SELECT id FROM users GROUP BY id HAVING count(*) > 1) d ON d.id = u.id""",
    "projects": r"""
        SELECT count(*) FILTER (WHERE p.id IS NULL), count(*) FILTER (WHERE d.id IS NOT NULL),
               count(*) FILTER (WHERE p.created_at IS NULL OR NOT isfinite(p.created_at) OR p.created_at > now()),
               count(*) FILTER (WHERE p.version < 1),
               count(*) FILTER (WHERE p.status NOT IN ('planning','active','paused','completed','archived')),
               count(*) FILTER (WHERE p.type NOT IN ('web','mobile','api','ml','data')),
               count(*) FILTER (WHERE p.visibility NOT IN ('private','team','organization','public')),
               count(*) FILTER (WHERE p.owner_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = p.owner_id))
        FROM projects p LEFT JOIN (SELECT id FROM projects GROUP BY id HAVING count(*) > 1) d ON d.id = p.id""",
    "agents": r"""
        SELECT count(*) FILTER (WHERE a.id IS NULL), count(*) FILTER (WHERE d.id IS NOT NULL),
               count(*) FILTER (WHERE a.created_at IS NULL OR NOT isfinite(a.created_at) OR a.created_at > now()),
               count(*) FILTER (WHERE a.version < 1),
               count(*) FILTER (WHERE a.type !~ 'Agent$'),
               count(*) FILTER (WHERE a.type NOT IN ('ProjectManagerAgent','RequirementsAgent','ArchitectAgent',
                   'BackendAgent','FrontendAgent','DatabaseAgent','DevOpsAgent','TestingAgent','DocumentationAgent')),
               count(*) FILTER (WHERE a.status NOT IN ('idle','initializing','running','paused','completed','failed','terminated')),
               count(*) FILTER (WHERE a.temperature < 0 OR a.temperature > 1),
               count(*) FILTER (WHERE a.project_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM projects p WHERE p.id = a.project_id))
        FROM agents a LEFT JOIN (SELECT id FROM agents GROUP BY id HAVING count(*) > 1) d ON d.id = a.id""",
    "tasks": r"""
        SELECT count(*) FILTER (WHERE t.id IS NULL), count(*) FILTER (WHERE d.id IS NOT NULL),
               count(*) FILTER (WHERE t.created_at IS NULL OR NOT isfinite(t.created_at) OR t.created_at > now()),
               count(*) FILTER (WHERE t.version < 1),
               count(*) FILTER (WHERE t.project_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM projects p WHERE p.id = t.project_id)),
               count(*) FILTER (WHERE t.type NOT IN ('epic','story','task','subtask','bug','spike')),
               count(*) FILTER (WHERE t.status NOT IN ('todo','in_progress','review','testing','done','cancelled')),
               count(*) FILTER (WHERE t.priority NOT IN ('critical','high','medium','low')),
               count(*) FILTER (WHERE t.complexity NOT IN ('XS','S','M','L','XL','XXL')),
               count(*) FILTER (WHERE t.actual_hours < 0 OR t.actual_hours > 10000)
        FROM tasks t LEFT JOIN (SELECT id FROM tasks GROUP BY id HAVING count(*) > 1) d ON d.id = t.id""",
}


def _row_rules(suite: Any) -> list[str]:
    return [r.name for r in suite.rules if r.row_level]


def run_flowyard(url: str) -> dict[str, dict[str, int]]:
    from quality.runner import run_suites
    from quality.suites import ENTITY_SUITES

    results = run_suites(url, list(ENTITY_SUITES.values()), max_workers=2)
    return {r.suite: {x.rule: x.unexpected_count for x in r.rules if x.check != "row_count"} for r in results}


def run_gx_pandas(url: str) -> dict[str, dict[str, int]]:
    """What a pandas user would write: load the table, validate it with GX (SUMMARY results)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    import pandas as pd
    import sqlalchemy as sa

    from quality.runner import GxSession, _unexpected, expectations_for
    from quality.suites import ENTITY_SUITES
    from tasks.db import sqlalchemy_url

    engine = sa.create_engine(sqlalchemy_url(url))
    session = GxSession()
    counts: dict[str, dict[str, int]] = {}
    for name, suite in ENTITY_SUITES.items():
        with engine.connect() as conn:
            frame = pd.read_sql_table(name, conn)
            parents = {
                r.name: pd.read_sql_query(sa.text(f"SELECT id FROM {r.reference('public')[1]}"), conn)["id"]  # noqa: S608
                for r in suite.rules
                if r.check == "foreign_key"
            }
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
        gx_suite = session.context.suites.add(gx.ExpectationSuite(name=f"bench-{name}"))
        for rule in suite.rules:
            if rule.check == "foreign_key":
                # A joined flag column: GX's in_set with a million-value set is pathologically slow.
                flag = f"__{rule.name}"
                frame[flag] = frame[rule.column].isna() | frame[rule.column].isin(
                    set(parents[rule.name].dropna())
                )
                gx_suite.add_expectation(
                    gxe.ExpectColumnValuesToBeInSet(column=flag, value_set=[True], meta={"rule": rule.name})
                )
            elif rule.check != "row_count":
                for expectation in expectations_for(rule, "pandas"):
                    gx_suite.add_expectation(expectation)
        asset = session.context.data_sources.add_pandas(f"bench-{name}").add_dataframe_asset(name)
        definition = session.context.validation_definitions.add(
            gx.ValidationDefinition(
                name=f"bench-{name}", data=asset.add_batch_definition_whole_dataframe("all"), suite=gx_suite
            )
        )
        result = definition.run(
            batch_parameters={"dataframe": frame}, result_format={"result_format": "SUMMARY"}
        )
        per_rule: dict[str, int] = {}
        for r in result.results:
            per_rule[r.expectation_config.meta["rule"]] = (
                per_rule.get(r.expectation_config.meta["rule"], 0) + _unexpected(r)[0]
            )
        counts[name] = per_rule
        del frame, parents
    return counts


def run_single_pass(url: str) -> dict[str, dict[str, int]]:
    """One query per table, two tables at a time like flowyard's run, each on its own connection."""
    from concurrent.futures import ThreadPoolExecutor

    import psycopg

    from quality.suites import ENTITY_SUITES

    def one(name: str) -> dict[str, int]:
        with psycopg.connect(url) as conn:
            row = conn.execute(SINGLE_PASS[name]).fetchone()
        return dict(zip(_row_rules(ENTITY_SUITES[name]), row, strict=True))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SINGLE_PASS, pool.map(one, SINGLE_PASS), strict=True))


MODES = {"flowyard": run_flowyard, "gx-pandas": run_gx_pandas, "single-pass-sql": run_single_pass}


def child(mode: str, url: str) -> None:
    """Run one mode and print its timing, peak RSS and counts as JSON."""
    import great_expectations  # noqa: F401 - imported before the baseline RSS so imports are not counted
    import pandas  # noqa: F401

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    counts = MODES[mode](url)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"seconds": seconds, "base_rss_mb": base / 1024, "peak_rss_mb": peak / 1024, "counts": counts}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from bench._runtime import bench_runtime
    from quality.sample_data import create_entity_tables, fill_entity_tables
    from tasks.db import connection

    with bench_runtime(with_prefect=False) as rt:
        url = rt.database("bench_quality")
        started = time.perf_counter()
        with connection(url) as conn:
            create_entity_tables(conn)
            fill_entity_tables(conn, args.rows)
        print(f"generated 4 x {args.rows:,} rows in {time.perf_counter() - started:.1f} s")
        outcomes = {}
        for mode in MODES:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.quality_suites", "--child", mode, url],
                capture_output=True,
                text=True,
                check=True,
            )
            outcomes[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            o = outcomes[mode]
            print(
                f"{mode:<16} {o['seconds']:8.2f} s   peak RSS {o['peak_rss_mb']:7.0f} MB (after imports {o['base_rss_mb']:.0f} MB)"
            )
    reference = outcomes["single-pass-sql"]["counts"]
    for mode, outcome in outcomes.items():
        agree = outcome["counts"] == reference
        print(f"{mode:<16} counts agree with single-pass SQL: {agree}")
        if not agree:
            print(json.dumps({"mode": outcome["counts"], "single-pass": reference}, indent=1))
    fy, pd_, sp = (outcomes[m]["seconds"] for m in ("flowyard", "gx-pandas", "single-pass-sql"))
    print(f"GX-on-pandas / flowyard: {pd_ / fy:.2f}x (target > 1)")
    print(f"flowyard / single-pass SQL: {fy / sp:.2f}x (target <= 5)")


if __name__ == "__main__":
    main()
