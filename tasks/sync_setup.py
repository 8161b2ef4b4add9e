"""One code path for ``flowyard sync configure`` and the ``sync-configure`` flow.

A configure call changes settings and the device list together. Everything it names is
checked first (the store to add, the devices to remove, enable or disable, the merged
settings), so a mistake is one line and nothing was saved, never half a configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks import device_store, sync_state
from tasks.device_store import Identity
from tasks.errors import UserError
from tasks.state import state_url
from tasks.sync_state import SyncConfig


@dataclass(frozen=True)
class NewStore:
    """A device store to register (or re-point). Unset ids: for the device,
    :func:`tasks.sync_state.default_device_id`; for user and project, the ones a re-pointed
    device already has, else 'unknown' / 'default'."""

    path: Path
    device_id: str | None = None
    user_id: str | None = None
    project_id: str | None = None

    def device(self, state: str) -> str:
        return self.device_id or sync_state.default_device_id(state, self.path)


@dataclass(frozen=True)
class SetupChange:
    """The options of ``sync configure``; None (and an empty tuple) keeps the current setting."""

    enabled: bool | None = None
    central_url: str | None = None
    batch_size: int | None = None
    download_updates: bool | None = None
    allow: tuple[str, ...] = ()
    """Replaces the privacy allowlist when not empty."""
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
    """Validate the whole change, then save the settings and update the device list.

    The store file is checked before the state database is even opened: a typo in a path is
    reported as such, not hidden behind a connection problem."""
    if change.add_store is not None:  # a missing, non-SQLite or corrupt file is refused here
        with device_store.open_store(change.add_store.path):
            pass
    state = state_url(state_database_url)
    _check_devices(state, change)
    config = sync_state.update_config(
        state,
        {
            "enabled": change.enabled,
            "central_url": change.central_url,
            "batch_size": change.batch_size,
            "download_updates": change.download_updates,
        },
        privacy={"allowlist": change.allow or None, "mode": change.privacy_mode, "hash_key": change.hash_key},
        alerts={
            "queue_threshold": change.queue_threshold,
            "failure_rate": change.failure_rate,
            "offline_seconds": change.offline_seconds,
        },
    )
    added = _register(state, change.add_store) if change.add_store is not None else None
    if change.remove_store is not None:
        sync_state.remove_device(state, change.remove_store)
    for device in change.enable_devices:
        sync_state.set_enabled(state, device, True)
    for device in change.disable_devices:
        sync_state.set_enabled(state, device, False)
    return SetupResult(config, added)


def _check_devices(state: str, change: SetupChange) -> None:
    """Refuse an unknown device id, or one both enabled and disabled, before anything is saved."""
    both = sorted(set(change.enable_devices) & set(change.disable_devices))
    if both:
        raise UserError(f"device {both[0]!r} is both enabled and disabled; name it in one list only")
    adding = change.add_store.device(state) if change.add_store is not None else None
    named = [change.remove_store] if change.remove_store is not None else []
    for device in dict.fromkeys([*named, *change.enable_devices, *change.disable_devices]):
        if device != adding:  # the store added by this same call may be switched on or off
            sync_state.require_device(state, device)


def _register(state: str, store: NewStore) -> Identity:
    """Register the store; re-pointing a known device keeps its user and project unless given."""
    device = store.device(state)
    known = next((d for d in sync_state.list_devices(state) if d.device_id == device), None)
    identity = Identity(
        device,
        store.user_id or (known.user_id if known else "unknown"),
        store.project_id or (known.project_id if known else "default"),
    )
    sync_state.register_device(state, store.path, identity)
    return identity
