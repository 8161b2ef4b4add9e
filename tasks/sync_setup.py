"""One code path for ``flowyard sync configure`` and the ``sync-configure`` flow.

A configure call changes settings and the device list together. Everything it names is
checked first (the store to add, the devices to remove, enable or disable, the merged
settings), so a mistake is one line and nothing was saved, never half a configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks import device_store, sync_state
from tasks.db import Db, validate_postgres_url
from tasks.device_store import Identity
from tasks.errors import UserError, check_utf8, control_character, option_and_parameter
from tasks.state import state_url
from tasks.sync_state import SyncConfig

MAX_ID_BYTES = 1000
"""The longest device, user or project id (UTF-8 bytes): far past any real one (a host name is at
most 253), and well within the 2,704 bytes of a PostgreSQL index entry, which the device id shares
with the event type in central's origin key. A 10,000-character id was saved in the store, then
every event was refused by that index and the run stopped with a traceback when flowyard's state
(whose device key is the id) could not record the device's error."""


@dataclass(frozen=True)
class NewStore:
    """A device store to register (or re-point), or to upgrade; unset ids are chosen by
    :func:`store_identity`."""

    path: Path
    device_id: str | None = None
    user_id: str | None = None
    project_id: str | None = None

    def __post_init__(self) -> None:
        """Refuse an id PostgreSQL and the store cannot hold, before anything is read or saved; an
        empty one, which was taken for no id given (an unset shell variable, most likely): the
        store got a default id the caller never chose; and one with a control character (a
        newline, an escape), which split or recoloured the lines of ``sync status`` and ``history``."""
        for option, value in (("device_id", self.device_id), ("user_id", self.user_id), ("project_id", self.project_id)):
            if value is None:
                continue
            named = f"--{option.replace('_', '-')} ({option})"
            if value == "":
                raise UserError(f"{named} is empty; give an id, or leave it out for the default")
            check_utf8(value, f"{named} {value!r}", "give it as UTF-8 text")
            if (char := control_character(value)) is not None:
                raise UserError(f"{named} {value!r} holds the control character {char!r}; give the id without it")
            if (size := len(value.encode())) > MAX_ID_BYTES:
                raise UserError(f"{named} is {size:,} bytes long; give an id of at most {MAX_ID_BYTES:,} bytes")

    def device(self, state: Db) -> str:
        return self.device_id or sync_state.default_device_id(state, self.path)


def new_store(
    path: str | Path | None, device_id: str | None, user_id: str | None, project_id: str | None
) -> NewStore | None:
    """The store ``configure`` adds (its path parsed by :func:`device_store.store_path`), or None;
    ids given without a store are refused, not dropped."""
    if path is None:
        if (device_id, user_id, project_id) != (None, None, None):
            raise UserError(
                "--device-id, --user-id and --project-id go with --add-store (device_id, user_id and "
                "project_id with add_store); name the store they are for"
            )
        return None
    return NewStore(device_store.store_path(path), device_id, user_id, project_id)


@dataclass(frozen=True)
class SetupChange:
    """The options of ``sync configure``; None keeps the current setting (an empty device tuple
    switches no device)."""

    enabled: bool | None = None
    central_url: str | None = None
    batch_size: int | None = None
    download_updates: bool | None = None
    allow: Sequence[str] | None = None
    """Replaces the privacy allowlist; an empty one allows no field (``allow: []`` sent to the flow
    means "no field kept as it is", never "keep the current list")."""
    privacy_mode: str | None = None
    hash_key: str | None = None
    queue_threshold: int | None = None
    failure_rate: float | None = None
    offline_seconds: int | None = None
    add_store: NewStore | None = None
    remove_store: str | None = None
    enable_devices: tuple[str, ...] = ()
    disable_devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class SetupResult:
    config: SyncConfig
    added: Identity | None
    """The identity the added store was registered with."""


def apply_setup(state_database_url: str | None, change: SetupChange) -> SetupResult:
    """Validate the whole change, then save the settings and update the device list, all or nothing.

    The central URL, the batch size, the privacy settings, the alert thresholds and the store
    file are checked before the state database is even opened: a typo in them is reported as
    such, not hidden behind a connection problem.

    Everything else happens in one transaction of the state database
    (:func:`sync_state.configuring`): the checks, the settings, the added, removed, enabled and
    disabled devices. An error found late (a device another process removed meanwhile) or a
    crash part-way rolls all of it back, and running the same command again applies all of it.
    A device store is only ever read here (its schema version and the identity recorded in it
    at its upgrade), never written, so there is no second database whose changes could be left
    behind by a crash: the store's recorded identity wins whenever it is read again."""
    central_url = _central_setting(change.central_url)
    privacy: dict[str, object] = {"allowlist": change.allow, "mode": change.privacy_mode, "hash_key": change.hash_key}
    alerts: dict[str, object] = {
        "queue_threshold": change.queue_threshold,
        "failure_rate": change.failure_rate,
        "offline_seconds": change.offline_seconds,
    }
    sync_state.check_change(privacy, alerts)
    if change.batch_size is not None:
        sync_state.check_count(change.batch_size, "batch size")
    if change.add_store is not None:  # a missing, non-SQLite, corrupt or non-store file is refused here
        with device_store.open_store(change.add_store.path) as conn:
            if device_store.known_version(conn) == device_store.V2:
                device_store.identity_of(conn)  # a v2 store that records no device, too
    with sync_state.configuring(state_url(state_database_url, parameter="state_database_url")) as state:
        _check_devices(state, change)
        config = sync_state.update_config(
            state,
            {
                "enabled": change.enabled,
                "central_url": central_url,
                "batch_size": change.batch_size,
                "download_updates": change.download_updates,
            },
            privacy=privacy,
            alerts=alerts,
        )
        added = _register(state, change.add_store) if change.add_store is not None else None
        if change.remove_store is not None:
            sync_state.remove_device(state, change.remove_store)
        for device in change.enable_devices:
            sync_state.set_enabled(state, device, True)
        for device in change.disable_devices:
            sync_state.set_enabled(state, device, False)
    return SetupResult(config, added)


def _central_setting(url: str | None) -> str | None:
    """The central URL to store: None keeps the configured one, and
    :data:`~tasks.sync_state.DEFAULT_CENTRAL` clears it (the configuration reads an empty URL as
    unset, that is database ``devflow_central`` on flowyard's server). An empty URL is refused:
    an unset shell variable or a template that rendered empty would otherwise silently switch
    every later run to the default central. Any other is checked here, before the state database
    is opened, so a typo in it is not hidden behind that database's connection error."""
    if url == sync_state.DEFAULT_CENTRAL:
        return ""
    sync_state.refuse_empty_central(url)
    return url if url is None else validate_postgres_url(url)


def _check_devices(state: Db, change: SetupChange) -> None:
    """Refuse an unknown device id, one both enabled and disabled, one this call removes and
    also adds or switches (the switch would fail after the removal), or a store added as a
    second device, before anything is saved."""
    both = sorted(set(change.enable_devices) & set(change.disable_devices))
    if both:
        raise UserError(f"device {both[0]!r} is both enabled and disabled; name it in one list only")
    adding = change.add_store.device(state) if change.add_store is not None else None
    removing = change.remove_store
    if removing is not None and removing in (adding, *change.enable_devices, *change.disable_devices):
        raise UserError(
            f"device {removing!r} is removed by this configure; do not also "
            + ("add it" if removing == adding else "enable or disable it")
        )
    if change.add_store is not None and adding is not None:
        refuse_second_device(state, change.add_store.path, adding, removing)
        sync_state.refuse_second_store(state, change.add_store.path, adding)
    named = [removing] if removing is not None else []
    for device in dict.fromkeys([*named, *change.enable_devices, *change.disable_devices]):
        if device != adding:  # the store added by this same call may be switched on or off
            sync_state.require_device(state, device)


def refuse_second_device(
    state: Db,
    store: Path,
    adding: str | None,
    removing: str | None = None,
    option: str = option_and_parameter("device_id"),
) -> None:
    """A store flowyard has as one device cannot be added (or upgraded by ``migrate up``) as another
    while that one stays: both would sync it, and the second to run would fail every time (the
    store carries the first's id), or upgrade it under its own id first and so send every event to
    central a second time. ``option`` names the id as the caller takes it: ``configure`` as a CLI
    option and a flow parameter, ``migrate up`` as a CLI option only."""
    holder = sync_state.device_for_store(state, store)
    if holder is not None and holder.device_id not in (adding, removing):
        raise UserError(
            f"device store {store} is already device {holder.device_id!r}; leave out {option} "
            f"to keep that device, or remove it first with `{device_store.remove_store_command(holder.device_id)}`"
        )


def _register(state: Db, store: NewStore) -> Identity:
    """Register the store (or re-point its device) under :func:`store_identity`."""
    identity = store_identity(state, store)
    sync_state.register_device(state, store.path, identity)
    return identity


def store_identity(state: Db, store: NewStore) -> Identity:
    """The identity a store is registered or upgraded with.

    A v2 store's is the one recorded in it at its upgrade: its events carry it, and central
    recognises the events it already holds by the device id, so other ids given for it are
    refused rather than ignored. A v1 store takes the given ids, else those of the device
    flowyard has for it (a downgraded store re-upgraded keeps its device; an empty id its row
    kept from an older flowyard counts as unknown), else a new device id and 'unknown' / 'default'."""
    recorded = sync_state.recorded_identity(store.path)
    if recorded is not None:
        given = {
            "--device-id": (store.device_id, recorded.device_id),
            "--user-id": (store.user_id, recorded.user_id),
            "--project-id": (store.project_id, recorded.project_id),
        }
        if clashes := [f"{opt} {new!r}" for opt, (new, have) in given.items() if new not in (None, have)]:
            raise UserError(
                f"device store {store.path} was upgraded as device {recorded.device_id!r} (user "
                f"{recorded.user_id!r}, project {recorded.project_id!r}) and its events carry those ids; "
                f"leave out {', '.join(clashes)} to keep them (re-upgrading it under other ids would send "
                "its events to central a second time)"
            )
        return recorded
    device = store.device_id or sync_state.unrecorded_device_id(state, device_store.store_path(store.path))
    known = next((d.identity for d in sync_state.list_devices(state) if d.device_id == device), Identity.of(device))
    return Identity(device, store.user_id or known.user_id, store.project_id or known.project_id)
