"""Device-sync state in the ``flowyard`` schema: configuration, devices with cursors, run history.

``flowyard sync configure`` writes here, so a scheduled ``sync-devices`` run with no
parameters knows which stores to sync and where to; every run records each device's
cursor (last local id uploaded, download cursor), status and a history row.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from tasks import device_store
from tasks.db import (
    Db,
    connection,
    ensure_database,
    refuse_empty_url,
    using,
    validate_postgres_url,
    with_database,
)
from tasks.device_store import Identity
from tasks.errors import (
    INT64_MAX,
    MAX_WAIT_SECONDS,
    UserError,
    check_range,
    check_utf8,
    option_and_parameter,
    validation_problem,
)
from tasks.privacy_filter import PrivacyPolicy
from tasks.sync_batches import DeviceReport

MAX_QUEUE_THRESHOLD = 1_000_000_000
"""The largest ``queue_threshold``, in pending events per device: a developer machine's store never
queues that many, so a larger threshold (a typo, or one meant to silence the alert: 10**30 was
saved) could never fire."""

MAX_OFFLINE_SECONDS = MAX_WAIT_SECONDS
"""The largest ``offline_seconds``: 365 days, like every other wait flowyard takes; a larger one
(centuries, or past bigint) was saved and its alert never fired."""

_ALERT_MAXIMUMS = {
    "queue_threshold": (MAX_QUEUE_THRESHOLD, "pending events"),
    "offline_seconds": (MAX_OFFLINE_SECONDS, "seconds (365 days)"),
}


class AlertThresholds(BaseModel):
    """Seed 002 §8.1's alert settings."""

    queue_threshold: int = Field(
        default=1000,
        ge=0,
        description=f"Pending events per device that trigger an alert (at most {MAX_QUEUE_THRESHOLD:,}).",
    )
    failure_rate: float = Field(default=0.1, ge=0, le=1, description="Share of a run's events that failed.")
    offline_seconds: int = Field(
        default=3600,
        ge=0,
        description="Time since a device's last successful sync (never synced: since it was configured), "
        f"in seconds (at most {MAX_OFFLINE_SECONDS:,}: 365 days).",
    )

    @field_validator("queue_threshold", "offline_seconds")
    @classmethod
    def _at_most(cls, value: int, info: ValidationInfo) -> int:
        """The one bound of these thresholds, for ``configure``, the ``sync-configure`` flow and
        :func:`update_config` alike (a stored value over it is brought down to it when loaded:
        :func:`_bounded_alerts`)."""
        maximum, unit = _ALERT_MAXIMUMS[str(info.field_name)]
        if value > maximum:
            option = str(info.field_name)
            raise ValueError(
                f"{value} is over the maximum of {maximum} {unit}; give --{option.replace('_', '-')} "
                f"({option}) 0 to {maximum}"
            )
        return value


class SyncConfig(BaseModel):
    """Seed 002 ``sync/configure``: on/off, endpoint, batch size, plus privacy and alert settings."""

    enabled: bool = True
    central_url: str | None = Field(
        default=None, description="Central PostgreSQL; unset: database devflow_central."
    )
    batch_size: int = Field(default=5000, ge=1)
    download_updates: bool = False
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy)
    alerts: AlertThresholds = Field(default_factory=AlertThresholds)

    @field_validator("central_url")
    @classmethod
    def _postgres(cls, value: str | None) -> str | None:
        return validate_postgres_url(value) if value else None


@dataclass(frozen=True)
class Device:
    device_id: str
    store_path: str
    user_id: str
    project_id: str
    enabled: bool
    registered: bool
    last_local_id: int
    download_cursor: int
    download_central: UUID | None
    """The central database :attr:`download_cursor` counts in (None: none recorded yet)."""
    pending: int | None
    last_attempt_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    created_at: datetime

    @property
    def identity(self) -> Identity:
        """The identity a run or ``migrate up`` stamps on this device's store when it is v1."""
        return Identity.of(self.device_id, self.user_id, self.project_id)

    @property
    def offline_since(self) -> datetime:
        """Where the offline clock starts: the last successful sync, or for a device that never
        synced, when it was configured (or first seen by a run), so it can still raise the alert."""
        return self.last_success_at or self.created_at


@dataclass(frozen=True)
class RunCounts:
    """A device's numbers for one run: the one source of its history row and of its row in the
    run's table artifact, so the two never disagree. A device whose store could not be used
    (corrupt, locked, missing) uploaded, skipped and failed nothing, 0; its pending counts and
    lag were never learnt, None."""

    pending_before: int | None
    uploaded: int
    duplicates: int
    failed: int
    pending_after: int | None
    lag_seconds: float | None

    @classmethod
    def of(cls, report: DeviceReport | None) -> RunCounts:
        """The counts of a device's report; None for a device whose task failed before it had one."""
        if report is None:
            return cls(None, 0, 0, 0, None, None)
        return cls(
            report.pending_before,
            report.uploaded,
            report.duplicates,
            report.failed,
            report.pending_after,
            report.lag_seconds,
        )


@dataclass(frozen=True)
class HistoryRow(RunCounts):
    """A row of ``flowyard.sync_runs``: the counts a run recorded for a device (``pending_before``
    None when the run could not read its store), when it finished and its error."""

    finished_at: datetime
    device_id: str
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        """The row with its time and device first, in the order ``sync history`` prints it."""
        row = asdict(self)
        return {"finished_at": row.pop("finished_at"), "device_id": row.pop("device_id"), **row}


_DEVICE_COLUMNS = sql.SQL(", ").join(
    sql.Identifier(name)
    for name in (
        "device_id",
        "store_path",
        "user_id",
        "project_id",
        "enabled",
        "registered",
        "last_local_id",
        "download_cursor",
        "download_central",
        "pending",
        "last_attempt_at",
        "last_success_at",
        "last_error",
        "created_at",
    )
)


@dataclass(frozen=True)
class SyncTarget:
    """One store a run will sync, with the identity stamped on its events at the v1→v2 upgrade."""

    store: str
    device_id: str
    user_id: str
    project_id: str
    download_since: int | None
    download_central: UUID | None = None
    """The central ``download_since`` counts in; None when none was recorded."""
    known: bool = False
    """flowyard had the device when the run resolved its targets: its row gone at the run's end
    means ``configure --remove-store`` removed it meanwhile, and the run must not add it back."""

    @property
    def identity(self) -> Identity:
        return Identity(self.device_id, self.user_id, self.project_id)


CENTRAL_DATABASE = "devflow_central"
DEFAULT_CENTRAL = "default"
"""What ``--central-url`` (``central_url``) takes for the default central, database
:data:`CENTRAL_DATABASE` on flowyard's server, wherever that server runs now: ``sync configure``
stores it as the central of later runs, a run (``sync trigger``, ``sync-devices``) syncs into it
once, whatever central is configured."""


def check_count(value: int, what: str, where: str = "") -> int:
    """``value`` if it is 1 to :data:`INT64_MAX`, else one line naming ``what``, the range and,
    for a stored setting, ``where`` to change it: 0 and negative numbers mean nothing here
    (SQLite reads LIMIT -5 as no limit at all)."""
    return check_range(value, what, 1, INT64_MAX, f" with `flowyard {where}`" if where else "")


def default_central_url(state: str) -> str:
    """With no central URL configured, the ``devflow_central`` database next to flowyard's state."""
    ensure_database(state, CENTRAL_DATABASE)
    return with_database(state, CENTRAL_DATABASE)


def refuse_empty_central(url: str | None) -> None:
    """Refuse a ``--central-url`` (``central_url``) given empty: in ``configure`` it would switch every
    later run to the default central, in a run it silently synced into the configured one, never
    the central the user meant to name."""
    refuse_empty_url(
        url,
        option_and_parameter("central_url"),
        f"to keep the configured central, or give {DEFAULT_CENTRAL!r} to go back to the default (database "
        f"{CENTRAL_DATABASE} on flowyard's server)",
    )


def check_central_override(url: str | None) -> str | None:
    """A run's ``central_url``, checked before any device is touched: None for none,
    :data:`DEFAULT_CENTRAL` as is, else the URL normalised, or one line when it is not a
    PostgreSQL URL, or empty (:func:`refuse_empty_central`). A malformed override is the
    caller's typo, not an outage: the devices must not mark their pending events failed, to wait
    out a retry backoff, over it."""
    refuse_empty_central(url)
    if url is None or url == DEFAULT_CENTRAL:
        return url
    return validate_postgres_url(url)


def run_central_url(override: str | None, configured: str | None, state: str) -> str:
    """The central a run syncs into: its checked override, else the configured one, else
    (and for :data:`DEFAULT_CENTRAL`) the default central."""
    chosen = override or configured
    return chosen if chosen and chosen != DEFAULT_CENTRAL else default_central_url(state)


@dataclass(frozen=True)
class Targets:
    """What a run syncs, and the disabled devices it leaves out (named, so the run can say why)."""

    sync: list[SyncTarget]
    disabled: list[str]


def resolve_targets(
    state: str, stores: list[str] | None, *, force: bool, download: bool | None, config: SyncConfig
) -> Targets:
    """Explicit store paths, or with None the configured devices; either way without the
    disabled devices unless ``force``. A store named by path is no exception: ``sync disable``
    stops a device's syncing at once, also in a deployment or script that lists its store, and
    whatever path names it (a moved file, a bind mount): disabled is the device id's, not the path's."""
    pull = config.download_updates if download is None else download
    if stores is not None:
        targets = _store_targets(state, stores, pull)
    else:
        targets = [_target(d.store_path, d.identity, d, pull) for d in list_devices(state, registered_only=True)]
    off = set() if force else disabled_devices(state, [t.device_id for t in targets])
    return Targets([t for t in targets if t.device_id not in off], sorted(off))


def disabled_devices(db: Db, device_ids: Collection[str]) -> set[str]:
    """Which of ``device_ids`` ``sync disable`` has switched off (a device flowyard does not know is not)."""
    with using(db) as conn:
        rows = conn.execute(
            "SELECT device_id FROM flowyard.sync_devices WHERE NOT enabled AND device_id = ANY(%s)",
            (list(device_ids),),
        ).fetchall()
    return {device_id for (device_id,) in rows}


def left_out(db: Db, target: SyncTarget, *, force: bool) -> Literal["disabled", "removed"] | None:
    """Why a run's task must leave ``target``'s store alone, read again once it holds the device's
    lock: "removed" when ``configure --remove-store`` removed a device the run started with (also
    when forced: its owner may have rolled the store back to v1 since, which the sync would upgrade
    again; a device flowyard never had is no removal), "disabled" when ``sync disable`` switched it
    off (unless forced); None to sync it."""
    with using(db) as conn:
        row = conn.execute("SELECT enabled FROM flowyard.sync_devices WHERE device_id = %s", (target.device_id,)).fetchone()
    if row is None:
        return "removed" if target.known else None
    return "disabled" if not (row[0] or force) else None


def _store_targets(state: str, stores: list[str], pull: bool) -> list[SyncTarget]:
    """Targets for explicit store paths, each under its own device id.

    A store flowyard has synced before keeps its device row's identity; one upgraded before
    (``sync migrate up``, another flowyard) the identity recorded in it; a new one gets
    :func:`new_device_id`, avoiding every id flowyard knows and the ids of this run's other
    stores, so two ``devflow.db`` files never share a lock, a state row or central's origin key.
    """
    paths = list(dict.fromkeys(device_store.store_path(store) for store in stores))
    _refuse_same_files(paths)
    known = check_stores(state, paths)
    found = {path: device.identity if (device := known[path]) else recorded_identity(path) for path in paths}
    new_stems = Counter(path.stem for path, identity in found.items() if identity is None)
    taken = (
        {d.device_id for d in list_devices(state)}
        | {identity.device_id for identity in found.values() if identity}
        | {stem for stem, count in new_stems.items() if count > 1}
    )
    targets = []
    for path in paths:
        if known[path] is None and (recorded := found[path]) is not None:
            refuse_second_store(state, path, recorded.device_id)  # a copy of a device's store
        identity = found[path] or Identity.of(new_device_id(path, taken))
        targets.append(_target(str(path), identity, known[path], pull))
    _refuse_shared_ids(targets)
    return targets


def _target(store: str, identity: Identity, device: Device | None, pull: bool) -> SyncTarget:
    """A store's target, downloading (with ``pull``) from its device's recorded cursor and
    central, or from 0 for a device flowyard has not synced."""
    fields = _identity_fields(identity)
    if device is None:
        return SyncTarget(store, *fields, 0 if pull else None)
    if not pull:
        return SyncTarget(store, *fields, None, known=True)
    return SyncTarget(store, *fields, device.download_cursor, device.download_central, known=True)


def check_stores(state: str, paths: list[Path]) -> dict[Path, Device | None]:
    """The device flowyard has for each store path given to a run, after refusing a path it has no
    device for that is no file or no SQLite database: a typo or a wrong file, which a run would
    otherwise record as a phantom device in status and history. A
    known device's store is not refused here: whatever became of it (gone, unreadable, overwritten)
    is that device's error, which its own task reports while the run's other devices sync."""
    known = {path: device_for_store(state, path) for path in paths}
    for path, device in known.items():
        if device is None:
            device_store.check_store_file(path)
    return known


def check_store_files(paths: list[Path], state: Callable[[], str]) -> None:
    """:func:`check_stores` before a run starts (``sync trigger --store``), the files first:
    flowyard's state (``state`` opens it) is asked only whether a path that is no store file is
    a device's store, whose run reports whatever became of it. A typo is so its own one line also
    when the state database cannot be reached; that database's error used to hide it."""
    for path in paths:
        try:
            device_store.check_store_file(path)
        except UserError as problem:
            if not _is_device_store(state, path):
                raise problem from None


def _is_device_store(state: Callable[[], str], path: Path) -> bool:
    """Whether flowyard has a device for ``path``; False when its state cannot tell (unreachable,
    refusing), so the path's own error is the one the user sees."""
    try:
        return device_for_store(state(), path) is not None
    except UserError:
        return False


def _refuse_same_files(paths: list[Path]) -> None:
    """Two resolved paths of one file (hard links: :func:`device_store.store_path` resolves
    symlinks and ``..`` already) would be two devices of one store in one run: the one to run
    second failed as "upgraded as device …" (or, for a store upgraded before, both were one
    device id, refused for two stores). Refused rather than one path picked, as
    :func:`_refuse_shared_ids` refuses, since either may be the path the user means to keep. A
    path that cannot be read is left to :func:`check_stores` and the device's own task."""
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:
        key = _file_key(path)
        if key is not None and (other := seen.setdefault(key, path)) != path:
            raise UserError(
                f"device stores {other} and {path} are one file (hard links); name it once: as two "
                "devices, both would sync its events"
            )


def _file_key(path: Path) -> tuple[int, int] | None:
    """What makes ``path`` the file it is, whatever it is named (``st_dev``, ``st_ino``); None
    when it cannot be read."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _refuse_shared_ids(targets: list[SyncTarget]) -> None:
    """Two stores upgraded under one device id (``sync migrate up`` of two ``devflow.db`` files
    by older versions) would share a lock, a state row, the run's result entry and central's
    origin key, under which one store's event can pass for the other's duplicate."""
    stores: dict[str, str] = {}
    for target in targets:
        if (other := stores.setdefault(target.device_id, target.store)) != target.store:
            raise shared_id_error(target.device_id, other, target.store)


def refuse_second_store(state: Db, store: Path, adding: str) -> None:
    """Adding ``store`` as a device flowyard has re-points that device to it, which is right for a
    store that moved, or a new (v1) store the device is to sync from now on; not for a store
    upgraded under that device's id while the device's registered store is still there and
    records the id too (a copy of it, as when one device's store is replaced by another's): the
    registered one was silently dropped from every later run, its new events never synced, and
    the two stores' events shared one origin in central. A sync of a store replaced by another
    device's copy suggests ``--remove-store`` plus ``--add-store``, which so re-pointed that other
    device. A run naming such a copy by its path (``sync trigger --store``) is refused as well: it
    synced the copy as that device, and central got two different events for each of the device's
    later local ids, one from either store, which no one could tell apart."""
    registered = next((d for d in list_devices(state) if d.device_id == adding), None)
    holder = device_for_store(state, store)
    if registered is None or (holder is not None and holder.device_id == adding):
        return  # a new device, or this store is its own (the same path, or a hard link of its file)
    if all(
        (recorded := recorded_identity(path)) is not None and recorded.device_id == adding
        for path in (store, Path(registered.store_path))
    ):
        raise shared_id_error(adding, registered.store_path, store)


def shared_id_error(device_id: str, first: str | Path, second: str | Path) -> UserError:
    """Two store files upgraded under one device id (a copied store, or ``migrate up`` of two
    ``devflow.db`` files by older versions), and what to do about it."""
    return UserError(
        f"device stores {first} and {second} are both device {device_id!r}; central "
        "cannot tell their events apart. Sync only one of them, and re-upgrade the other under its "
        "own id if it has never synced (`flowyard sync migrate down --to=v1 STORE`, then "
        "`flowyard sync migrate up STORE --device-id NEW-ID`)"
    )


def recorded_identity(store: Path) -> Identity | None:
    """The identity a v2 store was upgraded with; None for a v1 store, or for one that cannot
    be read now (a corrupt or locked store fails its own task later, with the reason)."""
    try:
        with device_store.open_store(store, busy_timeout=1.0) as conn:
            if device_store.schema_version(conn) < device_store.V2:
                return None
            return device_store.identity_of(conn)
    except UserError:
        return None


def default_device_id(state: Db, store: Path) -> str:
    """The id a store registered without one gets: the id recorded in it (its events carry it),
    else the id flowyard has for it, else :func:`new_device_id` avoiding every id flowyard knows
    (so registering a second ``devflow.db`` adds a device instead of re-pointing the first)."""
    path = device_store.store_path(store)
    if (identity := recorded_identity(path)) is not None:
        return identity.device_id
    return unrecorded_device_id(state, path)


def unrecorded_device_id(state: Db, store: Path) -> str:
    """The id of a store with none recorded in it (v1): the one flowyard has for it, else
    :func:`new_device_id` avoiding every id flowyard knows."""
    if (device := device_for_store(state, store)) is not None:
        return device.identity.device_id
    return new_device_id(store, {d.device_id for d in list_devices(state)})


def new_device_id(store: Path, taken: Collection[str] = ()) -> str:
    """A device id for a store that has none yet: its file stem (``laptop-1.db``: ``laptop-1``),
    or, when that id is taken (the DevFlow app names every store ``devflow.db``), the stem plus
    the first 8 hex digits of the SHA-256 of the store's absolute path.

    Stable: the first sync records the id in the store (its v2 upgrade), and later runs read
    it back from there or from the device's row.
    """
    if store.stem not in taken:
        return store.stem
    return f"{store.stem}-{hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:8]}"


def _identity_fields(identity: Identity) -> tuple[str, str, str]:
    return identity.device_id, identity.user_id, identity.project_id


def load_config(db: Db) -> SyncConfig:
    return SyncConfig.model_validate(_stored_settings(db))


_SETTING_OPTIONS = {
    "enabled": "--enable/--disable",
    "batch_size": "--batch-size VALUE",
    "download_updates": "--download-updates/--no-download-updates",
    "privacy.allowlist": "--allow FIELD",
    "privacy.mode": "--privacy-mode VALUE",
    "privacy.hash_key": "--hash-key KEY",
    "alerts.queue_threshold": "--queue-threshold VALUE",
    "alerts.failure_rate": "--failure-rate VALUE",
    "alerts.offline_seconds": "--offline-seconds VALUE",
}
"""Each saved setting (a dotted path, as :func:`update_config` names what it sets) that a
``sync configure`` option sets, with that option: what the one line of an unusable saved setting
tells the user to give (:func:`_unusable_setting`). The central URL is left out: it is checked
apart, when a run uses it."""


def _stored_settings(db: Db, replacing: Collection[str] = ()) -> dict[str, Any]:
    """The stored configuration, validated but for its central URL, for :func:`update_config` to
    merge a change into: a URL saved before flowyard refused it (a port out of range) fails every
    load, and ``configure --central-url`` must still be able to replace it. So must ``configure``
    any other setting put into it by hand that the model refuses (a batch size of ``"x"``, a
    negative threshold): the settings in ``replacing`` (those it sets) are left out, not validated.
    Any other unusable setting is one line naming it and the option that replaces it, where it was
    pydantic's ValidationError."""
    with using(db) as conn:
        row = conn.execute("SELECT config FROM flowyard.sync_config").fetchone()
    stored = _bounded_alerts(_without(dict(row[0]) if row else {}, replacing))
    central_url = stored.pop("central_url", None)
    try:
        checked = SyncConfig.model_validate(stored)
    except ValidationError as exc:
        raise _unusable_setting(exc) from None
    return {**checked.model_dump(), "central_url": central_url}


def _without(stored: dict[str, Any], paths: Collection[str]) -> dict[str, Any]:
    """``stored`` without the settings at the dotted ``paths`` (``batch_size``,
    ``alerts.queue_threshold``), which the model then gives their defaults."""
    kept = {}
    for key, value in stored.items():
        inner = [path.split(".", 1)[1] for path in paths if path.startswith(f"{key}.")]
        if key not in paths:
            kept[key] = _without(value, inner) if inner and isinstance(value, dict) else value
    return kept


def _bounded_alerts(stored: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with an alert threshold saved over its maximum (before flowyard had one, or put in
    by hand: a float, or ``1e400``, which jsonb keeps exact and so gives back as an int of 401
    digits, never as inf) brought down to the maximum, so that configuration still loads and syncs,
    and its alert can fire."""
    alerts = stored.get("alerts")
    if not isinstance(alerts, dict):
        return stored
    bounded = {
        name: min(value, _ALERT_MAXIMUMS[name][0])
        if name in _ALERT_MAXIMUMS and isinstance(value, int | float) and value > _ALERT_MAXIMUMS[name][0]
        else value
        for name, value in alerts.items()
    }
    return {**stored, "alerts": bounded}


def _unusable_setting(exc: ValidationError) -> UserError:
    """The one line for a saved setting the model refuses (put into the configuration by hand): the
    setting, its value (not a hash key's: a secret), what is wrong, and the option that replaces it
    (:data:`_SETTING_OPTIONS`), which :func:`update_config` lets replace it."""
    where, problem = validation_problem(exc)
    setting = next((name for name in _SETTING_OPTIONS if f"{where}.".startswith(f"{name}.")), None)
    shown = "unusable" if setting == "privacy.hash_key" else repr(exc.errors()[0]["input"])
    fix = (
        f"set it with `flowyard sync configure {_SETTING_OPTIONS[setting]}`"
        if setting
        else "no `sync configure` option sets it: remove it from the saved configuration (flowyard.sync_config)"
    )
    return UserError(f"the saved sync setting {where} is {shown}: {problem}; {fix}")


def update_config(
    db: Db,
    settings: dict[str, object],
    privacy: dict[str, object] | None = None,
    alerts: dict[str, object] | None = None,
) -> SyncConfig:
    """Merge the given (non-None) values into the stored configuration, validate and save it
    (the given privacy settings and alert thresholds first on their own: :func:`check_change`)."""
    check_change(privacy or {}, alerts or {})
    replacing = [
        *_given(settings),
        *(f"privacy.{name}" for name in _given(privacy or {})),
        *(f"alerts.{name}" for name in _given(alerts or {})),
    ]
    merged = _stored_settings(db, replacing)
    merged.update(_given(settings))
    merged["privacy"].update(_given(privacy or {}))
    merged["alerts"].update(_given(alerts or {}))
    try:
        updated = SyncConfig.model_validate(merged)
    except ValidationError as exc:
        raise _invalid_setting(exc) from None
    check_count(updated.batch_size, "batch size")
    if updated.privacy.mode == "hash" and not updated.privacy.hash_key:
        # Checked here, not in the model: a configuration stored before must still load and sync.
        raise UserError(
            "invalid sync setting privacy.hash_key: privacy mode hash needs a key "
            "(--hash-key; without one the hashes of short values are easy to guess)"
        )
    save_config(db, updated)
    return updated


def check_change(privacy: dict[str, object], alerts: dict[str, object]) -> None:
    """The privacy settings and alert thresholds a ``configure`` gives (None: not given), checked
    on their own before flowyard's state database is opened: its connection error hid a typo in
    them (an empty ``--allow`` name, bytes that are not UTF-8). :func:`update_config` checks the
    configuration they are merged into."""
    try:
        policy = SyncConfig.model_validate({"privacy": _given(privacy), "alerts": _given(alerts)}).privacy
    except ValidationError as exc:
        raise _invalid_setting(exc) from None
    for name in policy.allowlist:
        check_utf8(name, f"{option_and_parameter('allow')} {name!r}", "give it as UTF-8 text")
    if policy.hash_key:  # a secret: not quoted
        check_utf8(policy.hash_key, option_and_parameter("hash_key"), "give it as UTF-8 text")
    if not all(name.strip() for name in policy.allowlist):
        # Checked here, not in the model, like the hash key: a stored configuration must still load.
        raise UserError(
            "invalid sync setting privacy.allowlist: an empty field name; give each "
            f"{option_and_parameter('allow')} the name of an event_data field"
        )


def _invalid_setting(exc: ValidationError) -> UserError:
    """One line for a setting of a change the model refuses. A privacy mode or failure rate names
    the option that sets it, as an alert threshold over its maximum does: pydantic said only
    "Input should be 'drop' or 'hash'", and of a failure rate of nan "less than or equal to 1"."""
    where, problem = validation_problem(exc)
    value = exc.errors()[0]["input"]
    if where == "privacy.mode":
        problem = f"{value!r} is neither drop nor hash; give {option_and_parameter('privacy_mode')} drop or hash"
    elif where == "alerts.failure_rate" and isinstance(value, int | float):
        fault = "is not a number" if math.isnan(value) else "is out of range"
        problem = f"{value} {fault}; give {option_and_parameter('failure_rate')} 0 to 1"
    return UserError(f"invalid sync setting {where}: {problem}")


def _given(values: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in values.items() if value is not None}


def save_config(db: Db, config: SyncConfig) -> None:
    with using(db) as conn:
        conn.execute(
            """
            INSERT INTO flowyard.sync_config (config) VALUES (%s)
            ON CONFLICT (only_row) DO UPDATE SET config = EXCLUDED.config, updated_at = now()
            """,
            (Jsonb(config.model_dump(mode="json")),),
        )


def register_device(db: Db, store: Path, identity: Identity) -> None:
    """Add (or re-point) a device so default runs sync it."""
    with using(db) as conn:
        conn.execute(
            """
            INSERT INTO flowyard.sync_devices (device_id, store_path, user_id, project_id, registered)
            VALUES (%s, %s, %s, %s, true)
            ON CONFLICT (device_id) DO UPDATE SET store_path = EXCLUDED.store_path,
                user_id = EXCLUDED.user_id, project_id = EXCLUDED.project_id, registered = true
            """,
            (identity.device_id, str(store.resolve()), identity.user_id, identity.project_id),
        )


CONFIGURE_LOCK = "flowyard-sync-configure"


@contextmanager
def configuring(url: str) -> Iterator[psycopg.Connection]:
    """One transaction for a whole ``configure``, committed only when all of it succeeded.

    It first takes a transaction-scoped advisory lock, so two configure calls run one after the
    other: each reads the stored configuration it merges into after the other committed (without
    it, the later commit would silently drop the earlier call's settings). A crashed caller's
    transaction is rolled back and its lock released by PostgreSQL."""
    with connection(url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (CONFIGURE_LOCK,))
        yield conn


def _unknown_device(device_id: str) -> UserError:
    return UserError(f"no device {device_id!r}; `flowyard sync status` lists the configured devices")


def _device_key(device_id: str) -> str:
    """A device id to look a device up by, refused in one line when it is not UTF-8: no device
    can have such an id, and psycopg could not even send it."""
    return check_utf8(
        device_id, f"device id {device_id!r}", "no device has such an id; `flowyard sync status` lists the devices"
    )


def require_device(db: Db, device_id: str) -> None:
    """Fail before a multi-part ``configure`` saves anything, when the device it names is unknown."""
    with using(db) as conn:
        known = conn.execute(
            "SELECT 1 FROM flowyard.sync_devices WHERE device_id = %s", (_device_key(device_id),)
        ).fetchone()
    if known is None:
        raise _unknown_device(device_id)


def remove_device(db: Db, device_id: str) -> None:
    with using(db) as conn:
        deleted = conn.execute(
            "DELETE FROM flowyard.sync_devices WHERE device_id = %s", (_device_key(device_id),)
        ).rowcount
    if not deleted:
        raise _unknown_device(device_id)


def set_enabled(db: Db, device_id: str, enabled: bool) -> None:
    with using(db) as conn:
        updated = conn.execute(
            "UPDATE flowyard.sync_devices SET enabled = %s WHERE device_id = %s", (enabled, _device_key(device_id))
        ).rowcount
    if not updated:
        raise _unknown_device(device_id)


def list_devices(db: Db, *, registered_only: bool = False) -> list[Device]:
    query = sql.SQL(
        "SELECT {} FROM flowyard.sync_devices WHERE registered OR NOT %s ORDER BY device_id"
    ).format(_DEVICE_COLUMNS)
    with using(db) as conn:
        rows = conn.execute(query, (registered_only,)).fetchall()
    return [Device(*row) for row in rows]


def device_for_store(db: Db, store: Path) -> Device | None:
    """The device flowyard has for ``store``: by its path, else the device whose store is the
    same file under another path (a hard link, which resolving cannot merge as it merges symlinks
    and ``..``), so that one file is one device however it is named: registered under a second
    path, it was a second device syncing the same events."""
    query = sql.SQL("SELECT {} FROM flowyard.sync_devices WHERE store_path = %s LIMIT 1").format(
        _DEVICE_COLUMNS
    )
    with using(db) as conn:
        row = conn.execute(query, (str(store.resolve()),)).fetchone()
        if row:
            return Device(*row)
        key = _file_key(store)
        return None if key is None else next((d for d in list_devices(conn) if _file_key(Path(d.store_path)) == key), None)


_UNLESS_REMOVED = (
    "WHERE NOT %(known)s OR EXISTS (SELECT FROM flowyard.sync_devices WHERE device_id = %(device_id)s FOR KEY SHARE)"
)
"""The end of a device row's ``INSERT … SELECT`` at a run's end: a device the run started with
(``known``) whose row is gone was removed by ``configure --remove-store`` while the run synced
it, and removal wins. Written back, it came back as ``configured=no``: listed by ``sync status``
and its offline alert armed, for a device its owner had just removed. The row is locked while it
is written: a removal committing between the check and the write waits for it, or is seen."""


def record_device_run(url: str, flow_run_id: UUID | None, report: DeviceReport, *, known: bool = False) -> None:
    """Store a device's outcome: cursors and status on the device row, plus a history row.

    The row takes the user and project ids recorded in the store, which its events carry, also
    when it holds others: they are what the next upgrade of the store (``migrate down`` and a
    sync, or ``migrate up``) stamps on its events again, as the device flowyard has for that
    store, and the store's recorded identity wins wherever else it is read (``configure``). A
    row written before runs recorded ids (empty ones) is so repaired by the device's next run.

    The download cursor only moves forward within one central; a cursor of another central
    replaces it with that central, since the two centrals' seqs cannot be compared. A report
    without a central (no download) keeps both. A device removed during the run (``known``, see
    :data:`_UNLESS_REMOVED`) gets its history row only."""
    succeeded = report.succeeded
    with connection(url) as conn:
        conn.execute(
            """
            INSERT INTO flowyard.sync_devices AS d
                (device_id, store_path, user_id, project_id, last_local_id, download_cursor, download_central,
                 pending, last_attempt_at, last_success_at, last_error)
            SELECT %(device_id)s, %(store)s, %(user_id)s, %(project_id)s, %(last_id)s, coalesce(%(cursor)s, 0),
                   %(central)s, %(pending)s, now(), CASE WHEN %(ok)s THEN now() END, %(error)s
            """
            + _UNLESS_REMOVED
            + """
            ON CONFLICT (device_id) DO UPDATE SET
                last_local_id = greatest(d.last_local_id, EXCLUDED.last_local_id),
                download_cursor = CASE
                    WHEN EXCLUDED.download_central IS NULL OR EXCLUDED.download_central = d.download_central
                    THEN greatest(d.download_cursor, EXCLUDED.download_cursor)
                    ELSE EXCLUDED.download_cursor END,
                download_central = coalesce(EXCLUDED.download_central, d.download_central),
                pending = EXCLUDED.pending, last_attempt_at = now(),
                last_success_at = coalesce(EXCLUDED.last_success_at, d.last_success_at),
                last_error = EXCLUDED.last_error, user_id = EXCLUDED.user_id, project_id = EXCLUDED.project_id
            """,
            {
                "device_id": report.device_id,
                "store": report.store,
                "user_id": report.user_id,
                "project_id": report.project_id,
                "last_id": report.last_local_id,
                "cursor": report.download_cursor,
                "central": report.download_central,
                "pending": report.pending_after,
                "ok": succeeded,
                "error": report.error,
                "known": known,
            },
        )
        _insert_history(conn, flow_run_id, report.device_id, report, report.error)


def record_device_error(url: str, flow_run_id: UUID | None, target: SyncTarget, error: str) -> None:
    """A device whose store could not be used at all (corrupt, locked, missing); a device first
    seen by this run gets the target's identity (what its store is or will be stamped with), one
    removed during the run only its history row (:data:`_UNLESS_REMOVED`)."""
    with connection(url) as conn:
        conn.execute(
            """
            INSERT INTO flowyard.sync_devices AS d (device_id, store_path, user_id, project_id,
                                                   last_attempt_at, last_error)
            SELECT %(device_id)s, %(store)s, %(user_id)s, %(project_id)s, now(), %(error)s
            """
            + _UNLESS_REMOVED
            + """
            ON CONFLICT (device_id) DO UPDATE SET last_attempt_at = now(), last_error = EXCLUDED.last_error
            """,
            {
                "device_id": target.device_id,
                "store": target.store,
                "user_id": target.user_id,
                "project_id": target.project_id,
                "error": error,
                "known": target.known,
            },
        )
        _insert_history(conn, flow_run_id, target.device_id, None, error)


def record_schema_step(url: str, central: str, warning: str | None) -> None:
    """The outcome of a run's schema step on ``central`` (its masked URL): its warning, or None,
    which clears that central's last one, when it completed. In the run's log alone, a refusal only
    central's DBA can lift (the TRIGGER grant the tombstones need, a key only a table's owner may
    build) went unseen by an operator reading ``sync status``, and deleted projects stayed in the
    stores. Kept per central: runs name their own (``--central-url``), and one row for all of them let
    a clean run into one central clear another's standing warning."""
    with connection(url) as conn:
        conn.execute(
            """
            INSERT INTO flowyard.sync_schema_step (central, warning) VALUES (%s, %s)
            ON CONFLICT (central) DO UPDATE SET warning = EXCLUDED.warning, checked_at = now()
            """,
            (central, warning),
        )


def schema_warnings(db: Db) -> list[str]:
    """``sync status``'s line for each central whose last schema step warned, by central."""
    with using(db) as conn:
        rows = conn.execute(
            "SELECT central, warning, checked_at FROM flowyard.sync_schema_step WHERE warning IS NOT NULL "
            "ORDER BY central"
        ).fetchall()
    return [f"not ready on {central} (run at {_when(at)}): {warning}" for central, warning, at in rows]


def _insert_history(
    conn: psycopg.Connection,
    flow_run_id: UUID | None,
    device_id: str,
    report: DeviceReport | None,
    error: str | None,
) -> None:
    counts = RunCounts.of(report)
    conn.execute(
        """
        INSERT INTO flowyard.sync_runs (flow_run_id, device_id, pending_before, uploaded, duplicates, failed,
                                        pending_after, lag_seconds, error)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            flow_run_id,
            device_id,
            counts.pending_before,
            counts.uploaded,
            counts.duplicates,
            counts.failed,
            counts.pending_after,
            counts.lag_seconds,
            error,
        ),
    )


def live_queue(store: Path, device_id: str) -> str:
    """A device's queued events read from the store itself, or why the store cannot be read."""
    try:
        with device_store.open_store(store, busy_timeout=1.0, device_id=device_id) as conn:
            if device_store.schema_version(conn) < device_store.V2:
                total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
                return f"{total} (v1 store, upgraded on first sync)"
            counts = device_store.counts(conn)
            return f"{counts.pending + counts.failed} ({counts.failed} failed)"
    except UserError as exc:
        return f"unreadable: {exc}"


NOT_CONFIGURED = "no (synced only by runs naming its store)"
"""``sync status``'s ``configured`` for a device only runs given its store's path know."""


def status_rows(url: str) -> list[dict[str, str]]:
    """``sync status`` per device flowyard knows, for the CLI and the ``sync-status`` flow alike:
    the configured ones first, then those only runs naming their store (``sync trigger --store``,
    a deployment's ``stores``) know. Those are listed too, since ``sync disable`` switches them
    off like configured ones, and a disabled one was otherwise shown nowhere but in the skip
    line of the next run naming it."""
    devices = sorted(list_devices(url), key=lambda d: not d.registered)  # stable: by id within each
    return [
        {
            "device": d.device_id,
            "configured": "yes" if d.registered else NOT_CONFIGURED,
            "enabled": "yes" if d.enabled else "no",
            "queued": live_queue(Path(d.store_path), d.device_id),
            "last success": _when(d.last_success_at),
            "last error": d.last_error or "-",
            "store": d.store_path,
        }
        for d in devices
    ]


def _when(moment: datetime | None) -> str:
    """A time for ``sync status``, in the UTC its label says: psycopg returns a timestamptz in the
    session's zone, which is the state server's or database's ``TimeZone`` (initdb sets the
    machine's), not UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "never"


def history(url: str, *, limit: int = 20, since: datetime | None = None) -> list[HistoryRow]:
    """The newest ``limit`` history rows finished at or after ``since``, their times in UTC.

    Read in a UTC session, so the rows' times are UTC and a ``since`` without a zone (``--since
    2026-11-01``, a date sent to the flow) means UTC, whatever ``TimeZone`` the state server or
    database has; ``sync status`` prints UTC too."""
    check_count(limit, "history limit")
    with connection(url, utc=True) as conn:
        rows = conn.execute(
            """
            SELECT pending_before, uploaded, duplicates, failed, pending_after, lag_seconds,
                   finished_at, device_id, error
            FROM flowyard.sync_runs
            WHERE finished_at >= coalesce(%s, '-infinity'::timestamptz)
            ORDER BY finished_at DESC, id DESC LIMIT %s
            """,
            (since, limit),
        ).fetchall()
    return [HistoryRow(*row) for row in rows]
