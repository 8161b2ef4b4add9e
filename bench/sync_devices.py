"""Device sync throughput: 20 stores × 100k events through the real ``sync-devices`` flow,
against a naive per-row INSERT loop in the same run.

Starts its own embedded PostgreSQL and Prefect server in a temporary directory
(``bench/_runtime.py``; nothing shared with a running flowyard). The naive loop (one INSERT + commit per event, one local
UPDATE per event) is run on a subset and extrapolated, because at its speed the full 2M
events would take far longer than the benchmark budget; the output says so.

    .venv/bin/python -m bench.sync_devices [--devices 20] [--events 100000] [--naive-events 2000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench._runtime import CopyReference, bench_runtime
from tasks.embedded_pg import EmbeddedPostgres

TARGET_EVENTS_PER_SECOND = 50_000


def _naive_loop(store: Path, central: str, limit: int) -> float:
    """Seconds for ``limit`` events synced one by one: INSERT + commit, then a local UPDATE each."""
    import psycopg
    from psycopg import sql

    from tasks import central_store, device_store

    central_store.ensure_schema(central)
    with device_store.open_store(store) as local, psycopg.connect(central, autocommit=True) as conn:
        device_store.upgrade_to_v2(local, device_store.Identity("naive", "naive", "naive"))
        events = device_store.read_pending(local, 0, limit, now_ms=device_store.now_ms())
        session = central_store.CentralSession(central)
        session.ensure_partitions([ts_ms for _, _, ts_ms, *_ in events])
        session.close()
        started = time.perf_counter()
        insert = sql.SQL(
            """
            INSERT INTO devflow.events (sync_id, local_id, device_id, user_id, project_id, event_type,
                                        event_data, occurred_at)
            VALUES (%(sync_id)s, %(local_id)s, %(device_id)s, %(user_id)s, %(project_id)s, %(event_type)s,
                    %(event_data)s, {})
            """
        ).format(central_store.event_time(sql.Placeholder("ts_ms")))
        for event in events:  # a local event's fields are the upload columns, in order
            params = dict(zip(central_store.UPLOAD_COLUMNS, event, strict=True))
            conn.execute(insert, params)
            local.execute("UPDATE events SET sync_status = 'synced' WHERE id = ?", (params["local_id"],))
        return time.perf_counter() - started


def _batches_per_store(central: str) -> list[int]:
    """Upload batches per store, read back from central: each batch commits in one transaction,
    so its rows share one ``xmin``. The adaptive batch size shows here (20 at 5,000 events)."""
    import psycopg

    with psycopg.connect(central) as conn:
        rows = conn.execute(
            "SELECT count(DISTINCT xmin::text) FROM devflow.events GROUP BY device_id ORDER BY 1"
        ).fetchall()
    return [r[0] for r in rows]


def _cpu_seconds(server: EmbeddedPostgres) -> float:
    """CPU used so far by this process and by the PostgreSQL server (live and exited backends).

    Events per CPU-second do not depend on how loaded the shared machine is, wall-clock
    events/s do; the benchmark prints both.
    """
    import psutil

    postmaster = psutil.Process(int((server.pgdata / "postmaster.pid").read_text().split()[0]))
    total = sum(postmaster.cpu_times()[:4])  # user, system, reaped children's user and system
    for child in postmaster.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return total + time.process_time()


def _upgrade_all(stores: list[Path], workers: int) -> float:
    """Seconds to upgrade every store to v2 in parallel (a one-time cost, reported on its own)."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks import device_store

    def upgrade(store: Path) -> None:
        with device_store.open_store(store) as conn:
            device_store.upgrade_to_v2(conn, device_store.Identity(store.stem, f"user-{store.stem}", "bench"))

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(upgrade, stores))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--naive-events", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()

    os.environ["FLOWYARD_MAX_WORKERS"] = str(args.workers)
    with bench_runtime() as rt:
        from flows.sync_devices import sync_devices
        from tasks.sample_devices import make_fleet, make_store

        workdir = rt.settings.home_dir
        started = time.perf_counter()
        stores = make_fleet(workdir / "devices", args.devices, args.events)
        naive_store = make_store(workdir / "naive.db", args.naive_events, seed=999)
        print(
            f"generated {args.devices} v1 stores × {args.events} events in {time.perf_counter() - started:.1f}s"
        )
        total = args.devices * args.events
        reference = CopyReference.seeded(rt)
        speed_before = reference.measure()
        upgrade_seconds = _upgrade_all(stores, args.workers)
        cpu_before = _cpu_seconds(rt.server)
        started = time.perf_counter()
        result = sync_devices(
            stores=[str(p) for p in stores], central_url=rt.database("central"), batch_size=args.batch_size
        )
        flow_seconds = time.perf_counter() - started
        flow_cpu = _cpu_seconds(rt.server) - cpu_before
        uploaded = sum(o["uploaded"] for o in result["devices"].values())
        assert uploaded == total, f"uploaded {uploaded} of {total}"
        batches = _batches_per_store(rt.database("central"))
        print(f"upload batches per store: {batches[0]}–{batches[-1]} ({sum(batches)} in all)")

        naive_seconds = _naive_loop(naive_store, rt.database("naive"), args.naive_events)
        speed_after = reference.measure()
        _report(args, total, upgrade_seconds, flow_seconds, flow_cpu, naive_seconds)
        print(CopyReference.describe(speed_before, speed_after))


def _report(
    args: argparse.Namespace,
    total: int,
    upgrade_seconds: float,
    flow_seconds: float,
    flow_cpu: float,
    naive_seconds: float,
) -> None:
    naive_rate = args.naive_events / naive_seconds
    flow_rate = total / flow_seconds
    print(
        f"v1→v2 upgrade of {args.devices} stores ({args.workers} threads): {upgrade_seconds:.1f}s "
        f"(one-time, {total / upgrade_seconds:,.0f} events/s)"
    )
    print(
        f"sync-devices flow: {total} events in {flow_seconds:.1f}s = {flow_rate:,.0f} events/s "
        f"({args.workers} workers, batch size {args.batch_size})"
    )
    print(
        f"  CPU used by the flow process + PostgreSQL: {flow_cpu:.1f}s = {flow_cpu / total * 1e6:.1f} µs/event; "
        f"{total / flow_cpu:,.0f} events per CPU-second (≈ {2 * total / flow_cpu:,.0f} events/s on 2 idle cores)"
    )
    print(f"first sync including the upgrade: {total / (upgrade_seconds + flow_seconds):,.0f} events/s")
    print(
        f"naive per-row loop: {args.naive_events} events in {naive_seconds:.1f}s = {naive_rate:,.0f} events/s "
        f"(subset; extrapolated to {total} events: {total / naive_rate / 60:.1f} min)"
    )
    print(
        f"speed-up: {flow_rate / naive_rate:.1f}x; target {TARGET_EVENTS_PER_SECOND:,} events/s: "
        f"{'met' if flow_rate >= TARGET_EVENTS_PER_SECOND else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
