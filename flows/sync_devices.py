"""``sync-devices``: sync every developer machine's SQLite event store into the central PostgreSQL.

One mapped task per device store, on a bounded thread pool. Each device uploads its pending
events in adaptive batches (COPY + ``ON CONFLICT DO NOTHING`` on sync id and origin) and only
then marks them synced locally, so a crash re-sends and central keeps one copy. A corrupt or locked
store fails its own task with a one-line message; the other devices still sync, and the
run ends Failed with a one-line message naming the devices that need attention, its result
still holding every device's cursors and outcome.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import psycopg
from prefect import get_run_logger, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run

from tasks import central_store, sync_state
from tasks.advisory_lock import LockTimeout, advisory_lock
from tasks.db import error_line, mask_url
from tasks.errors import UserError
from tasks.flow_parameters import checked_flow
from tasks.prefect_artifacts import new_progress_artifact, show_whole_percent
from tasks.settings import get_settings
from tasks.state import state_url
from tasks.sync_batches import DeviceReport, SyncOptions, sync_device
from tasks.sync_report import SyncIncomplete, settle_device
from tasks.sync_state import SyncTarget, resolve_targets
from tasks.task_runners import thread_pool

DEVICE_LOCK_WAIT_SECONDS = 5.0


Skipped = Literal["disabled", "removed", "busy"]
"""Why a device's task left its store alone: disabled or removed after the run resolved its
targets, or synced by another run (its lock held for the whole wait)."""


@task(name="sync-device", cache_policy=NO_CACHE, task_run_name="sync-device-{target.device_id}")
def sync_device_task(target: SyncTarget, options: SyncOptions, state: str) -> DeviceReport | Skipped:
    """One device; the per-device advisory lock keeps a manual trigger and the schedule apart.

    "disabled", with the store left unopened, when the device was disabled after the run resolved
    its targets (and the run is not forced): a task queued on the thread pool must not re-upgrade a
    store that ``sync disable`` and ``migrate down`` have just rolled back to v1. "removed" likewise,
    forced or not, for a device ``configure --remove-store`` removed meanwhile: its task synced the
    store all the same (and upgraded it again), though the run then kept the device removed.

    "busy" when another run held the device's lock for the whole wait: that run is syncing the
    store's events, so this one has nothing to do for it. Recorded as an error, it failed the run
    (a scheduled one overlapping a long manual trigger), added a failed history row, and could
    overwrite the device's status after the other run recorded its success."""
    with ExitStack() as stack:
        try:
            held = stack.enter_context(advisory_lock(state, _device_lock(target), DEVICE_LOCK_WAIT_SECONDS))
        except LockTimeout:
            return "busy"
        if (skipped := sync_state.left_out(held, target, force=options.force)) is not None:
            return skipped
        return sync_device(
            Path(target.store), target.identity, options, target.download_since, target.download_central
        )


def _device_lock(target: SyncTarget) -> str:
    """The advisory lock that serialises the runs of one device."""
    return f"flowyard-sync-device:{target.device_id}"


@checked_flow(name="sync-devices", task_runner=thread_pool(get_settings().max_workers))
def sync_devices(
    stores: list[str] | None = None,
    central_url: str | None = None,
    batch_size: int | None = None,
    force: bool = False,
    download_updates: bool | None = None,
    state_database_url: str | None = None,
) -> dict[str, Any]:
    """Sync the given stores (default, ``stores`` left out or None: the devices set up with
    ``flowyard sync configure``). An empty list is refused, not read as that default: it names
    no store, and syncing every configured device instead would surprise its caller.

    ``force`` also syncs disabled devices and retries failed events before their backoff ends.
    A device another run is syncing is left to that run and named under ``skipped``.
    Returns each device's cursors and outcome (the run's persisted result); when a device did
    not sync fully, raises :class:`SyncIncomplete` carrying that same result.
    """
    logger = get_run_logger()
    if stores is not None and not stores:  # a templated parameter that rendered empty, most likely
        raise UserError("stores=[] names no store; omit stores (or pass null) to sync the configured devices")
    central_override = sync_state.check_central_override(central_url)
    state = state_url(state_database_url, parameter="state_database_url")
    config = sync_state.load_config(state)
    # 0 is a size, not "unset"; a configured size saved before it was range-checked fails here too
    if batch_size is None:
        batch = sync_state.check_count(config.batch_size, "the configured batch size", "sync configure --batch-size")
    else:
        batch = sync_state.check_count(batch_size, "batch size")
    if not config.enabled and not force:
        logger.warning("sync is disabled (`flowyard sync configure --enable` or `sync trigger --force`)")
        return {"devices": {}, "skipped": "sync disabled"}
    resolved = resolve_targets(state, stores, force=force, download=download_updates, config=config)
    targets, disabled = resolved.sync, resolved.disabled
    if disabled:
        logger.info(_disabled_note(disabled))
    if not targets:
        if disabled:
            return {"devices": {}, "skipped": _disabled_note(disabled)}
        logger.info("no devices to sync; add one with `flowyard sync configure --add-store PATH`")
        return {"devices": {}, "skipped": "no devices"}
    central = sync_state.run_central_url(central_override, config.central_url, state)
    schema_warning = None
    try:
        central_store.ensure_schema(central)
    except (UserError, psycopg.Error) as exc:  # unreachable, or a privilege refused: each device records it
        schema_warning = error_line(central, exc)
        logger.warning("central schema not ready on %s: %s", mask_url(central), schema_warning)
    sync_state.record_schema_step(state, mask_url(central), schema_warning)
    options = SyncOptions(
        central_url=central, batch_size=batch, policy=config.privacy, force=force
    )
    offline_since = {d.device_id: d.offline_since for d in sync_state.list_devices(state)}
    progress_id = new_progress_artifact(0.0, description=f"devices synced of {len(targets)}")
    futures = sync_device_task.map(targets, unmapped(options), unmapped(state))
    target_of = {future.task_run_id: target for future, target in zip(futures, targets, strict=True)}
    outcomes = []
    busy: list[str] = []
    removed: list[str] = []
    shown = 0
    for done, future in enumerate(as_completed(futures), start=1):
        target = target_of[future.task_run_id]
        result = future.result(raise_on_failure=False)
        if result == "disabled":  # disabled while its task waited: left out like those disabled at the start
            disabled.append(target.device_id)
            logger.info(_disabled_note([target.device_id]))
        elif result == "busy":
            busy.append(target.device_id)
            logger.info(_busy_note([target.device_id]))
        elif result == "removed":
            removed.append(target.device_id)
            logger.info(_removed_note([target.device_id]))
        else:
            outcomes.append(
                settle_device(
                    state, flow_run.id, target, result, offline_since.get(target.device_id), config, logger
                )
            )
        shown = show_whole_percent(progress_id, done, len(targets), shown)
    create_table_artifact(
        sorted((o.row for o in outcomes), key=lambda r: r["device"]),
        key="sync-devices-run",
        description="Per-device sync results"
        + (f"; central schema not ready: {schema_warning}" if schema_warning else ""),
    )
    run_result: dict[str, Any] = {"central": mask_url(central), "devices": {o.device_id: o.state for o in outcomes}}
    notes = [
        note(sorted(devices))
        for note, devices in ((_disabled_note, disabled), (_removed_note, removed), (_busy_note, busy))
        if devices
    ]
    if notes:
        run_result["skipped"] = "; ".join(notes)
    errors = [f"{o.device_id}: {o.error}" for o in outcomes if o.error]
    if errors:
        summary = f"{len(errors)} of {len(outcomes)} devices did not sync fully: " + "; ".join(errors)
        raise SyncIncomplete(summary, run_result)
    return run_result


def _disabled_note(devices: list[str]) -> str:
    """Why a run left devices out, and the two ways to include them."""
    return f"disabled devices not synced: {', '.join(devices)} (`flowyard sync enable DEVICE`, or force)"


def _removed_note(devices: list[str]) -> str:
    """Why a run left out devices it started with."""
    return f"devices removed during the run, not synced: {', '.join(devices)}"


def _busy_note(devices: list[str]) -> str:
    """Why a run left devices to another run, and where to see how that run went."""
    return (
        f"devices being synced by another run, left to it: {', '.join(devices)} "
        "(`flowyard sync history` shows its result)"
    )
