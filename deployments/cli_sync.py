"""``flowyard sync``: the seed's ``sync/*`` tools — status, configure, trigger, history,
enable/disable per device — plus ``migrate`` for a device store's local schema (v1 ⇄ v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from pydantic import TypeAdapter, ValidationError

from deployments.cli_options import command_group
from tasks import device_store, sync_state
from tasks.db import mask_url
from tasks.errors import UserError, printable
from tasks.settings import get_settings
from tasks.state import state_url
from tasks.sync_setup import (
    NewStore,
    SetupChange,
    apply_setup,
    new_store,
    refuse_second_device,
    store_identity,
)

app = command_group("Sync developer machines' SQLite event stores into a central PostgreSQL.")
migrate_app = command_group("Upgrade or downgrade a device store's local schema.")
app.add_typer(migrate_app, name="migrate")

_STORE_HELP = "The device's SQLite event store."
"""Store paths are taken as text, not as typer's Path: that reads an empty one as the current
directory, which was refused as "a directory" instead of as the empty path it is."""


@app.command()
def status() -> None:
    """Configuration and, per device: enabled, queued events, last success, last error."""
    state = state_url()
    config = sync_state.load_config(state)
    central = (
        mask_url(config.central_url) if config.central_url else f"{sync_state.CENTRAL_DATABASE} (default)"
    )
    typer.echo(f"sync:       {'enabled' if config.enabled else 'disabled'}")
    typer.echo(f"central:    {central}")
    for warning in sync_state.schema_warnings(state):
        typer.echo(f"schema:     {printable(warning)}")
    # a field name may hold any character JSON allows: a newline or escape split or recoloured this line
    allowed = ", ".join(printable(name) for name in config.privacy.allowlist)
    privacy = f"fields outside {allowed}" if allowed else "every event_data field (empty allowlist)"
    typer.echo(f"batch size: {config.batch_size}   privacy: {config.privacy.mode} {privacy}")
    rows = sync_state.status_rows(state)
    if not rows:
        typer.echo("devices:    none; add one with `flowyard sync configure --add-store PATH`")
    for row in rows:
        configured = f" configured={row['configured']}" if row["configured"] == sync_state.NOT_CONFIGURED else ""
        typer.echo(
            f"  {row['device']:<16} enabled={row['enabled']} queued={row['queued']} "
            f"last_success={row['last success']} error={row['last error']}{configured}"
        )


@app.command()
def configure(
    enable: Annotated[bool | None, typer.Option("--enable/--disable", help="Turn syncing on or off.")] = None,
    central_url: Annotated[
        str | None,
        typer.Option(help="Central PostgreSQL URL; 'default' goes back to database devflow_central on flowyard's server."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Events per batch at best quality.")] = None,
    download_updates: Annotated[bool | None, typer.Option("--download-updates/--no-download-updates")] = None,
    allow: Annotated[
        list[str] | None, typer.Option(help="event_data field allowed to leave devices (repeat).")
    ] = None,
    privacy_mode: Annotated[str | None, typer.Option(help="drop or hash the other fields.")] = None,
    hash_key: Annotated[str | None, typer.Option(help="HMAC key for --privacy-mode hash.")] = None,
    queue_threshold: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=f"Pending events per device that raise an alert, 0 to {sync_state.MAX_QUEUE_THRESHOLD:,}.",
        ),
    ] = None,
    failure_rate: Annotated[  # its range is checked by apply_setup: typer's max=1 called nan too large
        float | None, typer.Option(help="Share of a run's events that failed that raises an alert, 0 to 1.")
    ] = None,
    offline_seconds: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Seconds without a successful sync that raise an alert, "
            f"0 to {sync_state.MAX_OFFLINE_SECONDS:,} (365 days).",
        ),
    ] = None,
    add_store: Annotated[str | None, typer.Option(help="Register a device store (SQLite file).")] = None,
    device_id: Annotated[
        str | None, typer.Option(help="Device id for --add-store (default: an upgraded store's own, else the file name).")
    ] = None,
    user_id: Annotated[
        str | None,
        typer.Option(help="User id stamped on the store's events (default: the device's, else 'unknown')."),
    ] = None,
    project_id: Annotated[
        str | None,
        typer.Option(help="Project id stamped on the store's events (default: the device's, else 'default')."),
    ] = None,
    remove_store: Annotated[str | None, typer.Option(help="Unregister a device by id.")] = None,
) -> None:
    """Change the sync configuration and the device list (unset options keep their value)."""
    added_store = new_store(add_store, device_id, user_id, project_id)
    result = apply_setup(
        None,
        SetupChange(
            enabled=enable,
            central_url=central_url,
            batch_size=batch_size,
            download_updates=download_updates,
            allow=allow,
            privacy_mode=privacy_mode,
            hash_key=hash_key,
            queue_threshold=queue_threshold,
            failure_rate=failure_rate,
            offline_seconds=offline_seconds,
            add_store=added_store,
            remove_store=remove_store,
        ),
    )
    typer.echo("configuration saved")
    if result.added is not None and added_store is not None:
        typer.echo(f"added device {result.added.device_id}: {added_store.path}")
    if remove_store is not None:
        typer.echo(f"removed device {remove_store}")
    status()


@app.command()
def trigger(
    force: Annotated[bool, typer.Option(help="Also disabled devices; retry failed events now.")] = False,
    store: Annotated[list[str] | None, typer.Option(help="Sync only this store path (repeat).")] = None,
    central_url: Annotated[
        str | None,
        typer.Option(help="Central PostgreSQL URL for this run; 'default': database devflow_central on flowyard's server."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Run the ``sync-devices`` flow now and print the per-device results.

    A run where some device did not sync fully ends Failed but still carries every device's
    outcome: those are printed first, then the run's one-line summary is the error."""
    from deployments.runtime import prepare_flow_run

    paths = [device_store.store_path(path) for path in store or []]
    sync_state.check_central_override(central_url)  # a typo or empty: one line, before any server starts
    if batch_size is not None:
        sync_state.check_count(batch_size, "batch size")
    # a mistyped path or a file that is no store, as the run would refuse it, before its flow run is logged
    sync_state.check_store_files(paths, state_url)
    prepare_flow_run(get_settings())
    from flows.sync_devices import sync_devices
    from tasks.sync_report import SyncIncomplete

    try:
        # the resolved paths: the run's recorded parameters (the UI, a re-run from elsewhere) name each file
        stores = [str(path) for path in paths] or None
        result = sync_devices(stores=stores, central_url=central_url, batch_size=batch_size, force=force)
    except SyncIncomplete as incomplete:  # every device's outcome first, then the one-line summary
        _print_outcomes(incomplete.result)
        raise
    _print_outcomes(result)


def _print_outcomes(result: dict[str, Any]) -> None:
    for device, outcome in sorted(result.get("devices", {}).items()):
        typer.echo(_outcome_line(device, outcome))
    if "skipped" in result:
        typer.echo(f"skipped: {result['skipped']}")


def _outcome_line(device: str, outcome: dict[str, Any]) -> str:
    """One device's line; a store that could not be opened at all has only its error.

    ``pending`` is what the next run sends; failed events waiting out their retry backoff are
    counted apart, since a run now (without ``--force``) would leave them where they are."""
    return f"{device}: {_counts(outcome)}" + (f" error={outcome['error']}" if outcome.get("error") else "")


def _counts(outcome: dict[str, Any]) -> str:
    if "uploaded" not in outcome:
        return "not synced"
    waiting = outcome["waiting_after"]
    return (
        f"uploaded={outcome['uploaded']} duplicates={outcome['duplicates']} failed={outcome['failed']} "
        f"pending={outcome['pending_after'] - waiting}" + (f" waiting_out_backoff={waiting}" if waiting else "")
    )


@app.command()
def history(
    limit: Annotated[int, typer.Option(min=1)] = 20,
    since: Annotated[
        str | None,
        typer.Option(help="Only runs finished at or after this time (UTC unless it has a zone), e.g. 2026-12-05T10:00."),
    ] = None,
) -> None:
    """Recent per-device sync results, newest first, with their times in UTC."""
    # before the state database is opened, whose connection error would hide either typo
    after = _since_time(since)
    sync_state.check_count(limit, "history limit")
    rows = sync_state.history(state_url(), limit=limit, since=after)
    if not rows:  # with --since, earlier runs may exist: say which answer is empty
        typer.echo("no sync runs yet" if after is None else f"no sync runs since {after}")
    for row in rows:
        lag = "-" if row.lag_seconds is None else f"{row.lag_seconds:.0f}s"
        pending = "-" if row.pending_before is None else row.pending_before
        typer.echo(
            f"{row.finished_at:%Y-%m-%d %H:%M:%S} UTC {row.device_id:<16} pending_before={pending} "
            f"uploaded={row.uploaded} duplicates={row.duplicates} failed={row.failed} lag={lag}"
            + (f" error={row.error}" if row.error else "")
        )


_TIME = TypeAdapter(datetime)
"""Typer's own parsing of a datetime option, kept: it takes the same inputs (a date, an ISO time
with or without a zone, Unix seconds)."""


def _since_time(given: str | None) -> datetime | None:
    """``--since`` as a time; one line naming the formats it takes when it is none, where typer
    said only "Input should be a valid datetime or date, input is too short"."""
    if given is None:
        return None
    try:
        return _TIME.validate_python(given)
    except ValidationError:
        raise UserError(
            f"--since {given!r} is not a time; give a date or an ISO 8601 time, e.g. 2026-12-05, "
            "2026-12-05T10:00 (UTC) or 2026-12-05T10:00+02:00"
        ) from None


@app.command()
def enable(device: str) -> None:
    """Include a device in scheduled syncs again."""
    sync_state.set_enabled(state_url(), device, True)
    typer.echo(f"device {device} enabled")


@app.command()
def disable(device: str) -> None:
    """Leave a device out of scheduled syncs (its events stay queued locally; nothing is lost)."""
    sync_state.set_enabled(state_url(), device, False)
    typer.echo(f"device {device} disabled")


@migrate_app.command("up")
def migrate_up(
    store: Annotated[str, typer.Argument(help=_STORE_HELP)],
    device_id: Annotated[
        str | None, typer.Option(help="Default: the device flowyard has for this store, else a new id.")
    ] = None,
    user_id: Annotated[str | None, typer.Option(help="Default: the device's, else 'unknown'.")] = None,
    project_id: Annotated[str | None, typer.Option(help="Default: the device's, else 'default'.")] = None,
) -> None:
    """Upgrade a v1 store to v2 in place (sync ids generated for existing events).

    A store flowyard syncs keeps its device's identity by default: the device id is part of how
    central recognises events it already holds, so re-upgrading a downgraded store under another
    id would send every event to central a second time."""
    upgrade = NewStore(device_store.store_path(store), device_id, user_id, project_id)  # an empty id: one line
    path = upgrade.path
    device_store.check_store_path(path)
    state = state_url()
    if device_id:  # another id for a store flowyard has would fail that device's every run
        refuse_second_device(state, path, device_id, option="--device-id")
    identity = store_identity(state, upgrade)
    known = sync_state.device_for_store(state, path)
    with device_store.open_store(path, device_id=known.device_id if known else None) as conn:
        changed = device_store.upgrade_to_v2(conn, identity)
        identity = device_store.identity_of(conn)
    typer.echo(f"{path}: {'upgraded to v2' if changed else 'already v2'} as device {identity.device_id!r}")


@migrate_app.command("down")
def migrate_down(
    store: Annotated[str, typer.Argument(help=_STORE_HELP)],
    to: Annotated[str, typer.Option("--to", help="Target version; only v1 exists below v2.")] = "v1",
) -> None:
    """Remove the sync metadata (``--to=v1``); every event stays."""
    if to != "v1":
        raise UserError(f"--to must be v1 (the only version below v2), not {to!r}")
    path = device_store.store_path(store)
    # flowyard's state is not opened here, so a corrupt store gets the hint that fits any file
    with device_store.open_store(path) as conn:
        changed = device_store.downgrade_to_v1(conn)
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    typer.echo(f"{path}: {'downgraded to v1' if changed else 'already v1'}, {events} events kept")
