"""`flowyard sync …` through the real CLI (subprocesses), and the control flows."""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tasks import device_store, sync_state
from tasks.db import mask_url
from tasks.embedded_pg import free_port
from tasks.errors import UserError
from tasks.sample_devices import demo_sync_parameters, make_store
from tasks.state import state_url
from tasks.sync_report import settle_device
from tasks.sync_state import SyncConfig, SyncTarget
from tests.conftest import ROOT, flow_run_artifacts, run_cli

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_configure_status_disable_trigger_history(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    store = make_store(tmp_path / "cli-dev.db", 75)
    saved = sync_state.load_config(state_db)
    try:
        out = run_cli(
            "sync",
            "configure",
            "--central-url",
            fresh_db,
            "--batch-size",
            "20",
            "--add-store",
            str(store),
            "--device-id",
            "cli-dev",
            "--user-id",
            "dana",
            "--project-id",
            "proj-cli",
            "--allow",
            "action",
        )
        assert out.returncode == 0, out.stderr
        assert "added device cli-dev" in out.stdout and "drop fields outside action" in out.stdout
        assert "cli-dev" in out.stdout and "queued=75 (v1 store, upgraded on first sync)" in out.stdout
        assert f"central:    {mask_url(fresh_db)}" in out.stdout

        assert run_cli("sync", "disable", "cli-dev").returncode == 0
        status = run_cli("sync", "status").stdout
        assert "cli-dev" in status and "enabled=no" in status

        skipped = run_cli("sync", "trigger")
        assert skipped.returncode == 0, skipped.stderr
        assert "skipped: disabled devices not synced: cli-dev" in skipped.stdout
        # named by its path, as a deployment's `stores` or a script might: still not synced
        by_path = run_cli("sync", "trigger", "--store", str(store))
        assert by_path.returncode == 0, by_path.stderr
        assert "skipped: disabled devices not synced: cli-dev" in by_path.stdout
        assert "uploaded=" not in by_path.stdout
        with device_store.open_store(store) as conn:
            assert device_store.schema_version(conn) == device_store.V1  # not even upgraded

        assert run_cli("sync", "configure", "--disable").returncode == 0
        assert "skipped: sync disabled" in run_cli("sync", "trigger").stdout
        assert run_cli("sync", "configure", "--enable").returncode == 0

        assert run_cli("sync", "enable", "cli-dev").returncode == 0
        ran = run_cli("sync", "trigger")
        assert ran.returncode == 0, ran.stderr
        assert "cli-dev: uploaded=75 duplicates=0 failed=0 pending=0" in ran.stdout
        with psycopg.connect(fresh_db) as conn:
            keys = {
                k
                for (k,) in conn.execute("SELECT DISTINCT jsonb_object_keys(event_data) FROM devflow.events")
            }
        assert keys == {"action"}  # the configured allowlist was applied

        history = run_cli("sync", "history", "--limit", "5").stdout
        assert "cli-dev" in history and "uploaded=75" in history
        assert "queued=0 (0 failed)" in run_cli("sync", "status").stdout
    finally:
        sync_state.remove_device(state_db, "cli-dev")
        sync_state.save_config(state_db, saved)


def test_user_errors_are_one_line(state_db: str, tmp_path: Path) -> None:
    for args, expected in (
        (("sync", "configure", "--privacy-mode", "scramble"), "invalid sync setting privacy.mode"),
        (("sync", "configure", "--privacy-mode", "hash"), "privacy mode hash needs a key (--hash-key"),
        (("sync", "configure", "--privacy-mode", "hash", "--hash-key", ""), "needs a key"),
        (("sync", "disable", "no-such-device"), "no device 'no-such-device'; `flowyard sync status` lists"),
        (("sync", "enable", ""), "no device ''; `flowyard sync status` lists the configured devices"),
        (("sync", "configure", "--central-url", "mysql://x/y"), "not a PostgreSQL URL"),
        (("sync", "migrate", "down", "--to=v0", str(tmp_path / "x.db")), "--to must be v1"),
        (("sync", "migrate", "up", str(tmp_path / "missing.db")), "missing.db: no such file"),
    ):
        out = run_cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert expected in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert sync_state.load_config(state_db).privacy.mode == "drop"  # nothing was saved


def test_migrate_down_to_v1_and_up_again(tmp_path: Path) -> None:
    store = make_store(tmp_path / "m.db", 40)
    up = run_cli("sync", "migrate", "up", str(store), "--device-id", "m1")
    assert up.returncode == 0 and "upgraded to v2" in up.stdout
    down = run_cli("sync", "migrate", "down", "--to=v1", str(store))
    assert down.returncode == 0 and "downgraded to v1, 40 events kept" in down.stdout
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == 1


def test_migrate_of_a_v2_store_whose_app_set_its_version_back_to_1(tmp_path: Path) -> None:
    """An app re-running its v1 script on start sets PRAGMA user_version back to 1 and keeps the
    sync columns: `migrate up` failed on "duplicate column name: sync_id" and `migrate down`
    said "already v1" with every sync column still in the store."""
    store = make_store(tmp_path / "reset.db", 40)
    assert run_cli("sync", "migrate", "up", str(store), "--device-id", "r1").returncode == 0
    device_store.create_v1(store)  # the app starting again
    up = run_cli("sync", "migrate", "up", str(store))
    assert up.returncode == 0 and "already v2 as device 'r1'" in up.stdout, up.stderr
    down = run_cli("sync", "migrate", "down", "--to=v1", str(store))
    assert down.returncode == 0 and "downgraded to v1, 40 events kept" in down.stdout, down.stderr
    with device_store.open_store(store) as conn:
        assert {row[1] for row in conn.execute("PRAGMA table_info(events)")} == {
            "id",
            "timestamp",
            "event_type",
            "event_data",
        }


def test_control_flows_and_demo_parameters(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    from flows.sync_controls import sync_configure, sync_history, sync_status
    from flows.sync_devices import sync_devices

    params = demo_sync_parameters(fresh_db)
    assert len(params["stores"]) == 3 and all(os.path.exists(p) for p in params["stores"])
    result = sync_devices(**params)
    assert {o["uploaded"] for o in result["devices"].values()} == {2000}

    saved = sync_state.load_config(state_db)
    sync_state.register_device(
        state_db, Path(params["stores"][0]), device_store.Identity("flow-dev", "u", "p")
    )
    try:
        assert sync_configure(disable_devices=["flow-dev"], batch_size=123)["batch_size"] == 123
        rows = {r["device"]: r for r in sync_status()}
        assert rows["flow-dev"]["enabled"] == "no" and rows["flow-dev"]["queued"] == "0 (0 failed)"
        assert any(r["device_id"] == "demo-laptop-00" for r in sync_history(limit=10))
    finally:
        sync_state.remove_device(state_db, "flow-dev")
        sync_state.save_config(state_db, saved)


def test_history_artifact_shows_what_a_run_never_learned_as_a_dash(state_db: str, tmp_path: Path) -> None:
    """A device whose store did not open has no pending count, lag or pending-after; the
    ``sync-history`` artifact showed them as the word None, where ``flowyard sync history``
    prints ``-``."""
    from flows.sync_controls import sync_history

    target = SyncTarget(str(tmp_path / "gone.db"), "history-dash", "u", "p", None)
    settle_device(state_db, None, target, UserError("store is corrupt"), None, SyncConfig(), logging.getLogger("t"))
    try:
        state = sync_history(limit=50, return_state=True)
        [artifact] = [a for a in flow_run_artifacts(state) if a.key == "sync-history"]
        rows = json.loads(artifact.data)
        [row] = [r for r in rows if r["device_id"] == "history-dash"]
        assert (row["pending_before"], row["pending_after"], row["lag_seconds"]) == ("-", "-", "-")
        assert (row["uploaded"], row["error"]) == ("0", "store is corrupt")
        assert "None" not in json.dumps(row)
        printed = run_cli("sync", "history", "--limit", "50")
        assert printed.returncode == 0, printed.stderr
        assert any("history-dash" in line and "pending_before=-" in line for line in printed.stdout.splitlines())
    finally:
        sync_state.remove_device(state_db, "history-dash")


def test_trigger_with_a_corrupt_store_prints_every_device_then_fails_in_one_line(
    fresh_db: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"SQLite format 3\x00" + b"junk" * 300)  # a SQLite file whose pages are gone
    good = make_store(tmp_path / "good.db", 40, identity=device_store.Identity("cli-good", "u", "p"))
    lines = _trigger_with_one_refused(fresh_db, bad, good, f"bad: device store {bad} is corrupt (file is not a database)")
    assert "cli-good: uploaded=40 duplicates=0 failed=0 pending=0" in lines
    assert any(line.startswith("bad: not synced error=device store") for line in lines), lines


def test_configure_flow_does_what_the_cli_does(state_db: str, tmp_path: Path) -> None:
    from flows.sync_controls import sync_configure

    store = make_store(tmp_path / "flow-store.db", 5)
    saved = sync_state.load_config(state_db)
    try:
        answer = sync_configure(
            allow=["action", "tool"],
            privacy_mode="hash",
            hash_key="flow-key",
            queue_threshold=7,
            failure_rate=0.5,
            add_store=str(store),
            device_id="flow-added",
            project_id="apollo",
            disable_devices=["flow-added"],
        )
        config = sync_state.load_config(state_db)
        assert config.privacy.allowlist == ("action", "tool") and config.privacy.mode == "hash"
        assert config.privacy.hash_key == "flow-key" and "hash_key" not in answer["privacy"]
        assert (config.alerts.queue_threshold, config.alerts.failure_rate) == (7, 0.5)
        (device,) = [d for d in sync_state.list_devices(state_db) if d.device_id == "flow-added"]
        assert (device.store_path, device.project_id) == (str(store.resolve()), "apollo")
        assert not device.enabled
        sync_configure(remove_store="flow-added")
        assert "flow-added" not in {d.device_id for d in sync_state.list_devices(state_db)}
    finally:
        sync_state.save_config(state_db, saved)


def test_configure_flow_with_an_empty_allowlist_keeps_no_field(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    """`allow: []` sent to sync-configure (to keep every event_data field on the machines) was
    read as "no change": the previous allowlist stayed, and its fields kept leaving."""
    from flows.sync_controls import sync_configure
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "nothing-allowed.db", 10)
    saved = sync_state.load_config(state_db)
    try:
        sync_configure(allow=["action", "language"])
        assert sync_configure(allow=[])["privacy"]["allowlist"] == []
        assert sync_state.load_config(state_db).privacy.allowlist == ()
        assert "privacy: drop every event_data field (empty allowlist)" in run_cli("sync", "status").stdout
        assert sync_devices(stores=[str(store)], central_url=fresh_db)["devices"]["nothing-allowed"]["uploaded"] == 10
        with psycopg.connect(fresh_db) as conn:
            assert conn.execute("SELECT DISTINCT event_data::text FROM devflow.events").fetchall() == [("{}",)]
    finally:
        sync_state.remove_device(state_db, "nothing-allowed")
        sync_state.save_config(state_db, saved)


def test_configure_flow_with_an_unknown_device_saves_nothing(state_db: str) -> None:
    from flows.sync_controls import sync_configure

    before = sync_state.load_config(state_db)
    with pytest.raises(UserError) as info:
        sync_configure(batch_size=779, allow=["action"], disable_devices=["no-such-device"])
    message = "no device 'no-such-device'; `flowyard sync status` lists the configured devices"
    assert str(info.value) == message
    assert sync_state.load_config(state_db) == before


def test_configure_with_a_missing_store_changes_nothing(state_db: str, tmp_path: Path) -> None:
    before = sync_state.load_config(state_db)
    out = run_cli("sync", "configure", "--batch-size", "777", "--add-store", str(tmp_path / "missing.db"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"flowyard: error: cannot read device store {tmp_path / 'missing.db'}: no such file; "
        "give the path of the device's SQLite file"
    ]
    assert sync_state.load_config(state_db) == before


def test_configure_refuses_a_file_that_is_not_a_store(state_db: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.db"
    notes.write_text("just some notes\n")
    out = run_cli("sync", "configure", "--add-store", str(notes), "--device-id", "notes")
    assert out.returncode == 2 and out.stdout == ""
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"flowyard: error: device store {notes} is corrupt (file is not a database)")
    assert "--remove-store" not in line and "check that the path names the device's SQLite file" in line
    assert "notes" not in {d.device_id for d in sync_state.list_devices(state_db)}


def test_migrate_up_of_a_corrupt_store_suggests_removing_a_device_only_when_there_is_one(
    state_db: str, tmp_path: Path
) -> None:
    """A file flowyard has no device for was told to `--remove-store`, which answers "no device"."""
    loose = tmp_path / "loose.db"
    kept = make_store(tmp_path / "kept.db", 3)
    sync_state.register_device(state_db, kept, device_store.Identity.of("kept-corrupt"))
    try:
        for store, fix in (
            (loose, "check that the path names the device's SQLite file, or restore it from a backup"),
            (kept, "restore it from a backup or remove it with `flowyard sync configure --remove-store kept-corrupt`"),
        ):
            store.write_bytes(b"junk" * 300)
            out = run_cli("sync", "migrate", "up", str(store))
            assert out.returncode == 2 and out.stdout == ""
            assert out.stderr.strip().splitlines() == [
                f"flowyard: error: device store {store} is corrupt (file is not a database); {fix}"
            ]
    finally:
        sync_state.remove_device(state_db, "kept-corrupt")


def test_migrate_up_refuses_another_device_id_for_a_store_flowyard_has(state_db: str, tmp_path: Path) -> None:
    """`migrate up` of a configured store with another --device-id upgraded it under that id, after
    which every run of the configured device failed (its store carries another id)."""
    store = make_store(tmp_path / "kept-laptop.db", 5)
    sync_state.register_device(state_db, store, device_store.Identity("kept laptop", "u", "p"))
    try:
        out = run_cli("sync", "migrate", "up", str(store), "--device-id", "other-laptop")
        assert out.returncode == 2 and out.stdout == "", out.stdout
        assert out.stderr.strip().splitlines() == [
            f"flowyard: error: device store {store} is already device 'kept laptop'; leave out --device-id "
            "to keep that device, or remove it first with "
            "`flowyard sync configure --remove-store 'kept laptop'`"
        ]
        with device_store.open_store(store) as conn:
            assert device_store.schema_version(conn) == device_store.V1
        same = run_cli("sync", "migrate", "up", str(store), "--device-id", "kept laptop")
        assert same.returncode == 0 and "upgraded to v2 as device 'kept laptop'" in same.stdout, same.stderr
    finally:
        sync_state.remove_device(state_db, "kept laptop")


def test_configure_and_migrate_refuse_sqlite_files_that_are_not_event_stores(state_db: str, tmp_path: Path) -> None:
    """An empty file or a database without an events table used to be registered (status then
    said "unreadable"), and `migrate down` of a store at an unknown version said only
    "no such column"."""
    empty = tmp_path / "empty.db"
    empty.touch()
    newer = make_store(tmp_path / "newer.db", 3)
    with device_store.open_store(newer) as conn:
        conn.execute("PRAGMA user_version = 7")
    for args, expected in (
        (("sync", "configure", "--add-store", str(empty)), f"{empty} has no events table: it is not a DevFlow event store"),
        (("sync", "configure", "--add-store", str(newer)), f"{newer} has unknown schema version 7"),
        (("sync", "migrate", "down", "--to=v1", str(newer)), f"{newer} has unknown schema version 7"),
    ):
        out = run_cli(*args)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert expected in out.stderr, out.stderr
    assert not {"empty", "newer"} & {d.device_id for d in sync_state.list_devices(state_db)}


def test_configure_removing_an_unknown_device_changes_nothing(state_db: str) -> None:
    before = sync_state.load_config(state_db)
    out = run_cli("sync", "configure", "--batch-size", "778", "--remove-store", "no-such-device")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "flowyard: error: no device 'no-such-device'; `flowyard sync status` lists the configured devices"
    ]
    assert sync_state.load_config(state_db) == before


def test_configure_refuses_an_empty_central_url_and_goes_back_to_the_default_when_told(
    fresh_db: str, state_db: str
) -> None:
    """An empty URL was read as unset and silently switched every later run to the default central;
    going back to the default on purpose then meant finding the URL of flowyard's own server."""
    from flows.sync_controls import sync_configure

    saved = sync_state.load_config(state_db)
    expected = (
        "--central-url (central_url) is empty; give a postgresql:// URL, or leave it out to keep the "
        "configured central, or give 'default' to go back to the default (database devflow_central on "
        "flowyard's server)"
    )
    try:
        sync_state.save_config(state_db, saved.model_copy(update={"central_url": fresh_db}))
        out = run_cli("sync", "configure", "--central-url", "", "--batch-size", "783")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip().splitlines() == [f"flowyard: error: {expected}"]
        with pytest.raises(UserError, match="^" + re.escape(expected) + "$"):
            sync_configure(central_url="", batch_size=783)
        config = sync_state.load_config(state_db)
        assert (config.central_url, config.batch_size) == (fresh_db, saved.batch_size)

        back = run_cli("sync", "configure", "--central-url", "default", "--batch-size", "784")
        assert back.returncode == 0, back.stderr
        config = sync_state.load_config(state_db)
        assert (config.central_url, config.batch_size) == (None, 784)
        assert "central:    devflow_central (default)" in run_cli("sync", "status").stdout
        sync_configure(central_url=fresh_db)
        assert sync_state.load_config(state_db).central_url == fresh_db
        sync_configure(central_url="default")
        assert sync_state.load_config(state_db).central_url is None
    finally:
        sync_state.save_config(state_db, saved)


def test_a_run_told_default_syncs_into_the_default_central_whatever_is_configured(
    state_db: str, tmp_path: Path
) -> None:
    """`sync trigger --central-url default` was refused as "not a PostgreSQL URL", although
    `sync configure` takes the keyword: a one-off run into the default central meant finding
    the URL of flowyard's own server."""
    from flows.sync_devices import sync_devices

    saved = sync_state.load_config(state_db)
    default = sync_state.default_central_url(state_db)
    by_cli = make_store(tmp_path / "to-default-cli.db", 7)
    by_flow = make_store(tmp_path / "to-default-flow.db", 5)
    try:
        sync_state.save_config(
            state_db, saved.model_copy(update={"central_url": "postgresql://postgres@127.0.0.1:1/nowhere"})
        )
        out = run_cli("sync", "trigger", "--store", str(by_cli), "--central-url", "default")
        assert out.returncode == 0, out.stderr
        assert "to-default-cli: uploaded=7" in out.stdout
        result = sync_devices(stores=[str(by_flow)], central_url="default")
        assert result["central"] == mask_url(default)
        assert result["devices"]["to-default-flow"]["uploaded"] == 5
        with psycopg.connect(default) as conn:
            stored = conn.execute(
                "SELECT device_id, count(*) FROM devflow.events"
                " WHERE device_id IN ('to-default-cli', 'to-default-flow') GROUP BY 1 ORDER BY 1"
            ).fetchall()
        assert stored == [("to-default-cli", 7), ("to-default-flow", 5)]
    finally:
        sync_state.save_config(state_db, saved)
        for device in ("to-default-cli", "to-default-flow"):
            sync_state.remove_device(state_db, device)


def test_trigger_with_a_malformed_central_url_is_one_line_before_any_run(tmp_path: Path) -> None:
    """The URL was first checked by the flow run, so Prefect's log of the failed run came
    before the one-line error on stderr, after a server had been started for nothing."""
    store = make_store(tmp_path / "url.db", 3)
    out = run_cli("sync", "trigger", "--central-url", "mysql://x/y", "--store", str(store))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "flowyard: error: not a PostgreSQL URL: 'mysql://x/y'; expected postgresql://user:password@host:port/database"
    ]
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1


def test_trigger_with_an_empty_central_url_is_one_line_before_any_run(tmp_path: Path) -> None:
    """``--central-url "$CENTRAL"`` with the variable unset: the run silently synced into the
    configured central instead of the one meant. Refused as ``configure`` refuses it."""
    store = make_store(tmp_path / "empty-url.db", 3)
    out = run_cli("sync", "trigger", "--central-url", "", "--store", str(store))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "flowyard: error: --central-url (central_url) is empty; give a postgresql:// URL, or leave it out to keep "
        "the configured central, or give 'default' to go back to the default (database devflow_central on "
        "flowyard's server)"
    ]
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1


def test_central_urls_libpq_refuses_only_when_connecting_are_one_line_before_any_run(
    state_db: str, tmp_path: Path
) -> None:
    """An unclosed IPv6 bracket was urllib's traceback (`configure`: "Invalid IPv6 URL" naming
    neither the URL nor the fix), and a port out of range or an sslmode libpq does not know was
    accepted, so each run marked every pending event failed, to wait out a retry backoff, over the
    typo. A control character was saved, and ``sync status`` printed it to the terminal as it was."""
    store = make_store(tmp_path / "port.db", 3)
    saved = sync_state.load_config(state_db)
    try:
        for url, message in (
            ("postgresql://u:secret@[::1/db", "not a PostgreSQL URL (Invalid IPv6 URL); expected postgresql://"),
            ("postgresql://u@localhost:99999/db", "port '99999' is not a TCP port (1 to 65535)"),
            ("postgresql://u@localhost/db?port=0", "port '0' is not a TCP port (1 to 65535)"),
            ("postgresql://u@h1:5432,h2:x/db", "port 'x' is not a TCP port (1 to 65535)"),
            ("postgresql://u:secret@localhost/db?sslmode=bogus", "sslmode 'bogus' is not one of disable, allow,"),
            ("postgresql://u:secret@localhost/db\x1b[31m", "it holds the control character '\\x1b'"),
        ):
            for args in (("trigger", "--store", str(store)), ("configure",)):
                out = run_cli("sync", *args, "--central-url", url)
                assert out.returncode == 2 and out.stdout == "", out.stderr
                [line] = out.stderr.splitlines()
                assert line.startswith("flowyard: error: not a ") and message in line and "secret" not in line, line
                assert "\x1b" not in line
        assert sync_state.load_config(state_db) == saved
        with device_store.open_store(store) as conn:
            assert device_store.schema_version(conn) == device_store.V1
        # a port saved before it was refused: status says what is wrong, configure replaces it
        sync_state.save_config(state_db, saved.model_copy(update={"central_url": "postgresql://u@localhost:99999/db"}))
        out = run_cli("sync", "status")
        assert out.returncode == 2 and "port '99999' is not a TCP port" in out.stderr, out.stderr
        out = run_cli("sync", "configure", "--central-url", "default")
        assert out.returncode == 0, out.stderr
        assert sync_state.load_config(state_db).central_url is None
    finally:
        sync_state.save_config(state_db, saved)


def test_configure_names_a_bad_central_url_also_while_the_state_database_is_down(tmp_path: Path) -> None:
    """The URL was first checked when the configuration was merged, after the state database was
    opened: while that was down, its connection error hid the typo."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    out = run_cli(
        "sync",
        "configure",
        "--central-url",
        "postgresql://u:secret@localhost/db?sslmode=bogus",
        env={"FLOWYARD_DATABASE_URL": dead, "FLOWYARD_HOME": str(tmp_path)},
    )
    assert out.returncode == 2 and out.stdout == ""
    [line] = out.stderr.splitlines()
    assert "sslmode 'bogus' is not one of disable, allow" in line and "secret" not in line, line


def test_configure_names_a_bad_setting_also_while_the_state_database_is_down(tmp_path: Path) -> None:
    """The privacy mode, the alert thresholds, the batch size, an empty --allow name and an --allow
    or --hash-key that is not UTF-8 were first checked when the configuration was merged, after the
    state database was opened: while that was down, its connection error hid the typo."""
    dead = {"FLOWYARD_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", "FLOWYARD_HOME": str(tmp_path)}
    for args, refused in (
        (("--privacy-mode", "bogus"), "privacy.mode: 'bogus' is neither drop nor hash; give --privacy-mode (privacy_mode) drop or hash"),
        (("--queue-threshold", str(10**23)), f"alerts.queue_threshold: {10**23} is over the maximum of 1000000000 pending events"),
        (("--offline-seconds", str(2**63)), f"alerts.offline_seconds: {2**63} is over the maximum of 31536000 seconds"),
        (("--failure-rate", "1.5"), "alerts.failure_rate: 1.5 is out of range; give --failure-rate (failure_rate) 0 to 1"),
        (("--batch-size", str(2**63)), "batch size 9223372036854775808 is out of range"),
        (("--allow", "action", "--allow", " "), "privacy.allowlist: an empty field name; give each --allow (allow)"),
        (("--allow", os.fsdecode(b"caf\xe9")), "--allow (allow) 'caf\\udce9' holds bytes that are not UTF-8"),
        (("--privacy-mode", "hash", "--hash-key", os.fsdecode(b"k\xe9y")),
         "--hash-key (hash_key) holds bytes that are not UTF-8; give it as UTF-8 text"),
    ):
        out = run_cli("sync", "configure", *args, env=dead)
        assert out.returncode == 2 and out.stdout == "", (args, out.stderr)
        [line] = out.stderr.splitlines()
        assert line.startswith("flowyard: error: ") and refused in line, line


def test_a_failure_rate_of_nan_is_not_a_number_not_one_over_1(state_db: str) -> None:
    """`configure --failure-rate nan` said "Input should be less than or equal to 1", as if nan were too
    large; a rate in range is still saved."""
    before = sync_state.load_config(state_db)
    try:
        _refused_in_one_line_each(
            (
                ("sync", "configure", "--failure-rate", "nan"),
                "flowyard: error: invalid sync setting alerts.failure_rate: nan is not a number; "
                "give --failure-rate (failure_rate) 0 to 1",
            ),
            (("sync", "configure", "--failure-rate", "inf"), "failure_rate: inf is out of range; give --failure-rate"),
            (("sync", "configure", "--failure-rate", "-0.5"), "failure_rate: -0.5 is out of range; give --failure-rate"),
        )
        assert sync_state.load_config(state_db) == before
        assert run_cli("sync", "configure", "--failure-rate", "1").returncode == 0
        assert sync_state.load_config(state_db).alerts.failure_rate == 1
    finally:
        sync_state.save_config(state_db, before)


def test_a_central_url_with_no_host_before_its_path_is_kept_as_libpq_reads_it(state_db: str) -> None:
    """``postgresql:///db?host=/socket`` (a Unix socket) is a libpq URL; normalising it dropped its
    ``//``, and libpq refused the ``postgresql:/db`` that was left as an invalid connection option."""
    saved = sync_state.load_config(state_db)
    url = "postgresql:///devflow_socket?host=/var/run/postgresql"
    try:
        out = run_cli("sync", "configure", "--central-url", url)
        assert out.returncode == 0, out.stderr
        assert f"central:    {url}" in out.stdout
        assert sync_state.load_config(state_db).central_url == url
    finally:
        sync_state.save_config(state_db, saved)


def test_a_store_path_that_is_a_fifo_or_a_device_is_one_line(state_db: str, tmp_path: Path) -> None:
    """Checking a FIFO by opening it waited for a writer: every command naming one hung for good."""
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/null")):
        for args in (
            ("trigger", "--store", str(path)),
            ("configure", "--add-store", str(path)),
            ("migrate", "up", str(path)),
            ("migrate", "down", str(path)),
        ):
            out = run_cli("sync", *args, timeout=60)
            assert out.returncode == 2 and out.stdout == "", out.stderr
            assert out.stderr.splitlines() == [
                f"flowyard: error: cannot read device store {path}: it is not a regular file (a FIFO, socket or "
                "device); give the path of the device's SQLite file"
            ]
    assert not any(d.store_path == str(fifo) for d in sync_state.list_devices(state_db))


def test_trigger_with_a_mistyped_store_leaves_no_phantom_device(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    typo = tmp_path / "laptop.dbb"
    out = run_cli("sync", "trigger", "--store", str(typo), "--central-url", fresh_db)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr == (
        f"flowyard: error: cannot read device store {typo}: no such file; give the path of the device's SQLite file\n"
    )
    assert str(typo) not in {d.store_path for d in sync_state.list_devices(state_db)}
    assert "laptop" not in {row.device_id for row in sync_state.history(state_db, limit=1000)}


def test_trigger_with_a_mistyped_store_says_so_while_the_state_database_is_down(tmp_path: Path) -> None:
    """The path was checked only after connecting to flowyard's state database: with that
    database down, a typo got the connection error instead of its own one line."""
    typo = tmp_path / "laptop.dbb"
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    out = run_cli("sync", "trigger", "--store", str(typo), env={"FLOWYARD_DATABASE_URL": dead})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        f"flowyard: error: cannot read device store {typo}: no such file; give the path of the device's SQLite file\n"
    )


def test_trigger_refuses_a_store_that_is_not_a_sqlite_file_before_recording_anything(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A text file named by --store (or the flow's stores) was recorded as a device, with its
    error, in status and history."""
    from flows.sync_devices import sync_devices

    notes = tmp_path / "notes.db"
    notes.write_text("just some notes\n")
    good = make_store(tmp_path / "not-yet.db", 3)
    out = run_cli("sync", "trigger", "--store", str(notes), "--store", str(good), "--central-url", fresh_db)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stdout == "" and out.stderr.strip().splitlines() == [
        f"flowyard: error: device store {notes} is not a SQLite database (it does not start with SQLite's "
        "header); give the path of the device's SQLite file"
    ]
    with pytest.raises(UserError, match=f"^device store {notes} is not a SQLite database"):
        sync_devices(stores=[str(good), str(notes)], central_url=fresh_db)
    assert str(notes) not in {d.store_path for d in sync_state.list_devices(state_db)}
    assert "notes" not in {row.device_id for row in sync_state.history(state_db, limit=1000)}
    with device_store.open_store(good) as conn:
        assert device_store.schema_version(conn) == device_store.V1  # nothing ran


def test_a_device_whose_store_became_a_non_sqlite_file_still_gets_its_error(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """Only a file flowyard has no device for is refused up front; a known device's is its error."""
    store = tmp_path / "overwritten.db"
    store.write_text("overwritten by some tool\n")
    sync_state.register_device(state_db, store, device_store.Identity.of("overwritten"))
    try:
        out = run_cli("sync", "trigger", "--store", str(store), "--central-url", fresh_db)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert "overwritten: not synced error=device store" in out.stdout
        [row] = [r for r in sync_state.history(state_db, limit=1000) if r.device_id == "overwritten"]
        assert row.error is not None and "is corrupt (file is not a database)" in row.error
    finally:
        sync_state.remove_device(state_db, "overwritten")


def test_re_adding_a_device_keeps_its_user_and_project(state_db: str, tmp_path: Path) -> None:
    first, moved = make_store(tmp_path / "first.db", 3), make_store(tmp_path / "moved.db", 3)
    added = run_cli("sync", "configure", "--add-store", str(first), "--device-id", "kept",
                    "--user-id", "dana", "--project-id", "apollo")  # fmt: skip
    assert added.returncode == 0, added.stderr
    try:
        moved_out = run_cli("sync", "configure", "--add-store", str(moved), "--device-id", "kept")
        assert moved_out.returncode == 0, moved_out.stderr
        (device,) = [d for d in sync_state.list_devices(state_db) if d.device_id == "kept"]
        assert (device.store_path, device.user_id, device.project_id) == (str(moved.resolve()), "dana", "apollo")
    finally:
        sync_state.remove_device(state_db, "kept")


def test_a_store_flowyard_has_is_not_added_as_a_second_device(state_db: str, tmp_path: Path) -> None:
    """Adding a registered v1 store under another --device-id used to add a second device for
    the same file: every run then synced it twice, and the device that ran second failed for
    good ("was upgraded as device ..."). Removing the first device in the same call is the way."""
    from flows.sync_controls import sync_configure

    store = make_store(tmp_path / "twice.db", 3)
    assert run_cli("sync", "configure", "--add-store", str(store), "--device-id", "twice").returncode == 0
    before = sync_state.load_config(state_db)
    try:
        out = run_cli("sync", "configure", "--batch-size", "776", "--add-store", str(store), "--device-id", "again")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.splitlines() == [
            f"flowyard: error: device store {store} is already device 'twice'; leave out --device-id (device_id) "
            "to keep that device, or remove it first with `flowyard sync configure --remove-store twice`"
        ]
        with pytest.raises(UserError, match="is already device 'twice'"):
            sync_configure(add_store=str(store), device_id="again")
        assert sync_state.load_config(state_db) == before
        assert [d.device_id for d in sync_state.list_devices(state_db) if d.store_path == str(store)] == ["twice"]
        assert run_cli("sync", "configure", "--add-store", str(store), "--device-id", "twice").returncode == 0
        moved = run_cli("sync", "configure", "--remove-store", "twice", "--add-store", str(store), "--device-id", "again")
        assert moved.returncode == 0, moved.stderr
        assert [d.device_id for d in sync_state.list_devices(state_db) if d.store_path == str(store)] == ["again"]
    finally:
        for device in ("twice", "again"):
            if device in {d.device_id for d in sync_state.list_devices(state_db)}:
                sync_state.remove_device(state_db, device)


def test_a_hard_link_to_a_registered_store_is_that_device(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    """A hard link is another path of the registered store's file, which resolving cannot merge:
    `--add-store LINK --device-id OTHER` added a second device for that file (every run then
    synced it twice, and the device that ran second failed for good), and a run naming the link
    took it for a new device."""
    from flows.sync_controls import sync_configure
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "hl-dev.db", 6)
    link = tmp_path / "elsewhere.db"
    os.link(store, link)
    sync_configure(add_store=str(store), device_id="hl-dev")
    try:
        out = run_cli("sync", "configure", "--add-store", str(link), "--device-id", "hl-other")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.splitlines() == [
            f"flowyard: error: device store {link} is already device 'hl-dev'; leave out --device-id (device_id) "
            "to keep that device, or remove it first with `flowyard sync configure --remove-store hl-dev`"
        ]
        result = sync_devices(stores=[str(link)], central_url=fresh_db)
        assert list(result["devices"]) == ["hl-dev"] and result["devices"]["hl-dev"]["uploaded"] == 6
        assert [d.device_id for d in sync_state.list_devices(state_db) if d.device_id.startswith(("hl-", "elsewhere"))] == [
            "hl-dev"
        ]
    finally:
        sync_state.remove_device(state_db, "hl-dev")


def test_out_of_range_numbers_and_orphan_options_are_one_line_and_save_nothing(state_db: str, tmp_path: Path) -> None:
    """A batch size past SQLite's integer range used to be saved, after which every sync of
    every device failed with "Python int too large to convert to SQLite INTEGER"; a huge history
    limit was a traceback; an empty --allow name emptied the allowlist; --device-id without
    --add-store was ignored with exit 0."""
    before = sync_state.load_config(state_db)
    try:
        _refused_in_one_line_each(
            (("sync", "configure", "--batch-size", str(2**63)), "batch size 9223372036854775808 is out of range"),
            (("sync", "history", "--limit", str(2**63)), "history limit 9223372036854775808 is out of range"),
            (("sync", "configure", "--allow", "action", "--allow", " "), "privacy.allowlist: an empty field name"),
            (("sync", "configure", "--device-id", "x"), "--device-id, --user-id and --project-id go with --add-store"),
            (("sync", "configure", "--user-id", "dana"), "go with --add-store"),
        )
        assert sync_state.load_config(state_db) == before
    finally:  # the old code saved the batch size, which would break every later sync in the session
        sync_state.save_config(state_db, before)


def _refused_in_one_line_each(*cases: tuple[tuple[str, ...], str]) -> None:
    for args, expected in cases:
        out = run_cli(*args)
        assert out.returncode == 2 and out.stdout == "", (args, out.stdout, out.stderr)
        [line] = out.stderr.strip().splitlines()
        assert expected in line, line


def _trigger_with_one_refused(central: str, refused: Path, synced: Path, error: str) -> list[str]:
    """``sync trigger`` of both stores: the run fails in one last line, ``error`` (its start) for
    ``refused``'s device, with no traceback, after the other device synced. Its output lines."""
    out = run_cli("sync", "trigger", "--store", str(refused), "--store", str(synced), "--central-url", central)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("flowyard: error:")]
    assert errors == out.stderr.strip().splitlines()[-1:]
    assert errors[0].startswith(f"flowyard: error: 1 of 2 devices did not sync fully: {error}"), errors[0]
    return out.stdout.splitlines()


def test_an_empty_store_path_or_a_bad_id_is_one_line_and_changes_nothing(state_db: str, tmp_path: Path) -> None:
    """An empty store path (an unset shell variable) was read as the current directory and refused
    as "a directory"; an empty --device-id, --user-id or --project-id was taken for none given, so
    the store was upgraded (or registered) under a default id the user never chose; an id with a
    newline was saved, and split the lines of `sync status` and `sync history`, as a store path
    with one split every message naming it."""
    store = make_store(tmp_path / "empty-args.db", 3)
    before = sync_state.load_config(state_db)
    devices = sync_state.list_devices(state_db)
    empty_path = "device store path '' is empty; give the path of the device's SQLite file"
    _refused_in_one_line_each(
        (("sync", "migrate", "up", ""), empty_path),
        (("sync", "migrate", "down", ""), empty_path),
        (("sync", "trigger", "--store", str(store), "--store", ""), empty_path),
        (("sync", "configure", "--add-store", ""), empty_path),
        (("sync", "migrate", "up", str(store), "--device-id", ""), "--device-id (device_id) is empty; give an id"),
        (("sync", "migrate", "up", str(store), "--user-id", ""), "--user-id (user_id) is empty; give an id"),
        (("sync", "migrate", "up", str(store), "--project-id", ""), "--project-id (project_id) is empty"),
        (("sync", "configure", "--add-store", str(store), "--device-id", ""), "--device-id (device_id) is empty"),
        (
            ("sync", "configure", "--add-store", str(store), "--device-id", "a\nb"),
            "--device-id (device_id) 'a\\nb' holds the control character '\\n'; give the id without it",
        ),
        (("sync", "migrate", "up", str(store), "--user-id", "\x1b[2J"), "--user-id (user_id) '\\x1b[2J' holds the"),
        (("sync", "trigger", "--store", str(tmp_path / "a\nb.db")), "b.db' holds the control character '\\n'; rename"),
    )
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1
    assert sync_state.load_config(state_db) == before and sync_state.list_devices(state_db) == devices


def test_an_id_too_long_for_an_index_entry_is_one_line_and_changes_nothing(state_db: str, tmp_path: Path) -> None:
    """A 10,000-character --device-id was recorded in the store: central's origin key refused every
    event (an index entry is at most 2,704 bytes), and the run then stopped with a traceback when
    flowyard's state, whose device key is that id, could not record the device's error."""
    store = make_store(tmp_path / "long-ids.db", 3)
    devices = sync_state.list_devices(state_db)
    _refused_in_one_line_each(
        (("sync", "migrate", "up", str(store), "--device-id", "d" * 10_000), "--device-id (device_id) is 10,000 bytes"),
        (("sync", "migrate", "up", str(store), "--user-id", "é" * 501), "--user-id (user_id) is 1,002 bytes long; give"),
        (("sync", "configure", "--add-store", str(store), "--project-id", "p" * 1001), "an id of at most 1,000 bytes"),
    )
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1
    assert sync_state.list_devices(state_db) == devices


def test_configure_help_gives_the_alert_thresholds_bounds() -> None:
    """--queue-threshold and --offline-seconds had no help: only ``[x>=0]``, where a value past
    the bound docs/sync.md gives (1,000,000,000 events, 365 days) is refused."""
    out = run_cli("sync", "configure", "--help", env={"COLUMNS": "300"})
    assert out.returncode == 0, out.stderr
    assert "Pending events per device that raise an alert, 0 to 1,000,000,000." in out.stdout
    assert "Seconds without a successful sync that raise an alert, 0 to 31,536,000 (365 days)." in out.stdout


def test_status_escapes_a_control_character_in_an_allowed_field_name(state_db: str) -> None:
    """An allowed field name may hold any character a JSON key does (``configure --allow`` takes
    it): one with a newline split the ``privacy:`` line of `sync status` in two, and an escape
    sequence recoloured the terminal."""
    saved = sync_state.load_config(state_db)
    policy = saved.privacy.model_copy(update={"allowlist": ("a\nb", "\x1b[31mred")})
    sync_state.save_config(state_db, saved.model_copy(update={"privacy": policy}))
    try:
        out = run_cli("sync", "status")
    finally:
        sync_state.save_config(state_db, saved)
    assert out.returncode == 0, out.stderr
    assert "privacy: drop fields outside a\\nb, \\x1b[31mred\n" in out.stdout


def test_control_flows_refuse_out_of_range_numbers_before_touching_a_store(state_db: str, tmp_path: Path) -> None:
    """batch_size=0 was silently the configured size and a negative one read every pending
    event in one batch (SQLite's LIMIT -5); a limit under 1 or past bigint failed the run with
    PostgreSQL's error; add_store="" was ignored."""
    from flows.sync_controls import sync_configure, sync_history
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "range.db", 5)
    for size in (0, -5, 2**63):
        with pytest.raises(UserError, match=f"^batch size {size} is out of range; give 1 to 9223372036854775807"):
            sync_devices(stores=[str(store)], batch_size=size, force=True)
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == 1  # never upgraded, nothing sent
    # a size the unchecked `configure` of before saved: the error says where to change it
    config = sync_state.load_config(state_db)
    sync_state.save_config(state_db, config.model_copy(update={"batch_size": 2**63}))
    try:
        with pytest.raises(
            UserError,
            match=r"^the configured batch size 9223372036854775808 is out of range; give 1 to 9223372036854775807 "
            r"with `flowyard sync configure --batch-size`$",
        ):
            sync_devices(stores=[str(store)], force=True)
    finally:
        sync_state.save_config(state_db, config)
    for limit in (0, -1, 2**63):
        with pytest.raises(UserError, match=f"^history limit {limit} is out of range"):
            sync_history(limit=limit)
    with pytest.raises(UserError, match="^device store path '' is empty; give the path of the device's SQLite file"):
        sync_configure(add_store="")


def test_configure_refuses_switching_a_device_it_removes_and_saves_nothing(state_db: str, tmp_path: Path) -> None:
    """Removing a device and enabling or disabling it in one call used to save the settings and
    remove the device, then fail with "no device" at the switch: half a configuration."""
    from flows.sync_controls import sync_configure

    store = make_store(tmp_path / "both.db", 3)
    sync_state.register_device(state_db, store, device_store.Identity("removed-and-disabled", "u", "p"))
    before = sync_state.load_config(state_db)
    try:
        with pytest.raises(UserError) as info:
            sync_configure(
                batch_size=781, allow=["action"], remove_store="removed-and-disabled",
                disable_devices=["removed-and-disabled"],
            )  # fmt: skip
        assert str(info.value) == (
            "device 'removed-and-disabled' is removed by this configure; do not also enable or disable it"
        )
        assert sync_state.load_config(state_db) == before
        (device,) = [d for d in sync_state.list_devices(state_db) if d.device_id == "removed-and-disabled"]
        assert device.enabled
        out = run_cli("sync", "configure", "--add-store", str(store), "--device-id", "removed-and-disabled",
                      "--remove-store", "removed-and-disabled", "--batch-size", "782")  # fmt: skip
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip().splitlines() == [
            "flowyard: error: device 'removed-and-disabled' is removed by this configure; do not also add it"
        ]
        assert sync_state.load_config(state_db) == before
    finally:
        sync_state.remove_device(state_db, "removed-and-disabled")
        sync_state.save_config(state_db, before)


def test_history_since_a_time_after_every_run_says_so(state_db: str) -> None:
    """With runs recorded, `history --since` later than all of them said "no sync runs yet"."""
    with psycopg.connect(state_db) as conn:
        conn.execute("INSERT INTO flowyard.sync_runs (device_id) VALUES ('history-probe')")
    try:
        out = run_cli("sync", "history", "--since", "9999-12-31")
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["no sync runs since 9999-12-31 00:00:00"]
        assert "history-probe" in run_cli("sync", "history", "--limit", "1").stdout
    finally:
        with psycopg.connect(state_db) as conn:
            conn.execute("DELETE FROM flowyard.sync_runs WHERE device_id = 'history-probe'")


def test_history_since_not_a_time_is_one_line_naming_the_formats(state_db: str) -> None:
    """`history --since garbage` said only typer's "Input should be a valid datetime or date, input
    is too short", naming no format it takes; the dates and times it took still work."""
    formats = "give a date or an ISO 8601 time, e.g. 2026-12-05, 2026-12-05T10:00 (UTC) or 2026-12-05T10:00+02:00"
    _refused_in_one_line_each(
        (("sync", "history", "--since", "garbage"), f"flowyard: error: --since 'garbage' is not a time; {formats}"),
        (("sync", "history", "--since", "2026-13-05"), f"--since '2026-13-05' is not a time; {formats}"),
    )
    # checked before the state database is opened: its connection error hid the typo
    unreachable = {"FLOWYARD_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none"}
    for args, refused in (
        (("--since", "garbage"), f"--since 'garbage' is not a time; {formats}"),
        (("--limit", "9" * 20), "history limit 99999999999999999999 is out of range; give 1 to 9223372036854775807"),
    ):
        out = run_cli("sync", "history", *args, env=unreachable)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"flowyard: error: {refused}"], out.stderr
    for given, shown in (
        ("9999-12-31", "9999-12-31 00:00:00"),
        ("9999-12-31T10:00", "9999-12-31 10:00:00"),
        ("9999-12-30T10:00+02:00", "9999-12-30 10:00:00+02:00"),
    ):
        out = run_cli("sync", "history", "--since", given)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [f"no sync runs since {shown}"]


def test_a_central_url_with_a_replication_auth_or_tls_option_libpq_refuses_is_one_line(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """`replication`, `require_auth` and `ssl_*_protocol_version` were not checked: `configure` saved
    a central URL libpq (or the server) refuses at connect, and a run marked every pending event failed
    over it. A replication connection is refused outright: it cannot run the INSERT and COPY a sync sends."""
    store = make_store(tmp_path / "conninfo.db", 3)
    saved = sync_state.load_config(state_db)
    for query, reason in (
        ("replication=database", "replication 'database' makes a replication connection, which cannot run"),
        ("require_auth=scram-sha-256,kerberos", "require_auth 'scram-sha-256,kerberos' is not a comma-separated list"),
        ("ssl_min_protocol_version=TLSv1.4", "ssl_min_protocol_version 'TLSv1.4' is not one of TLSv1, TLSv1.1"),
    ):
        url = f"{fresh_db}?{query}"
        _refused_in_one_line_each(
            (("sync", "configure", "--central-url", url), reason),
            (("sync", "trigger", "--store", str(store), "--central-url", url), reason),
        )
    assert sync_state.load_config(state_db).central_url == saved.central_url
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1  # never touched
    try:
        fine = run_cli("sync", "trigger", "--store", str(store), "--central-url", f"{fresh_db}?replication=off")
        assert "conninfo: uploaded=3 duplicates=0 failed=0 pending=0" in fine.stdout.splitlines(), fine.stderr
    finally:
        if "conninfo" in {device.device_id for device in sync_state.list_devices(state_db)}:
            sync_state.remove_device(state_db, "conninfo")


def _save_by_hand(state_db: str, setting: str, value: str) -> None:
    """Put ``value`` (JSON text) into the saved configuration's ``setting`` (a dotted path, e.g.
    ``alerts.queue_threshold``), as another tool might."""
    with psycopg.connect(state_db) as conn:
        conn.execute(
            "UPDATE flowyard.sync_config SET config = jsonb_set(config, %s, %s::jsonb)", (setting.split("."), value)
        )


def test_a_saved_alert_threshold_put_in_by_hand_loads_capped_or_is_one_line(state_db: str) -> None:
    """A huge threshold saved by hand with a fraction (jsonb keeps 1e400 as an integer, which was
    capped) was not capped like a saved huge int but failed every load with pydantic's
    ValidationError, as a string or a negative threshold did: `sync status` and `sync trigger`
    ended in a traceback, and `configure` could not replace it."""
    before = sync_state.load_config(state_db)
    sync_state.save_config(state_db, before)
    try:
        _save_by_hand(state_db, "alerts.queue_threshold", "2000000000.5")
        _save_by_hand(state_db, "alerts.offline_seconds", "1e400")
        with psycopg.connect(state_db) as conn:  # jsonb keeps 1e400 exact: an int of 401 digits, not inf
            [saved] = conn.execute("SELECT config->'alerts'->'offline_seconds' FROM flowyard.sync_config").fetchone()
        assert saved == 10**400 and isinstance(saved, int)
        assert run_cli("sync", "status").returncode == 0
        alerts = sync_state.load_config(state_db).alerts
        assert (alerts.queue_threshold, alerts.offline_seconds) == (
            sync_state.MAX_QUEUE_THRESHOLD,
            sync_state.MAX_OFFLINE_SECONDS,
        )
        for value, problem in (('"lots"', "'lots': Input should be a valid integer"), ("-5", "-5: Input should be")):
            _save_by_hand(state_db, "alerts.queue_threshold", value)
            refused = (
                f"flowyard: error: the saved sync setting alerts.queue_threshold is {problem}",
                "; set it with `flowyard sync configure --queue-threshold VALUE`",
            )
            for args in (("sync", "status"), ("sync", "trigger"), ("sync", "configure", "--batch-size", "7")):
                out = run_cli(*args)
                assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr)
                [line] = [line for line in out.stderr.splitlines() if line.startswith("flowyard: error:")]
                assert line.startswith(refused[0]) and line.endswith(refused[1]), line
        fixed = run_cli("sync", "configure", "--queue-threshold", "500")
        assert fixed.returncode == 0, fixed.stderr
        assert sync_state.load_config(state_db).alerts.queue_threshold == 500
    finally:
        sync_state.save_config(state_db, before)


def test_any_unusable_saved_setting_is_one_line_and_configure_of_its_option_replaces_it(state_db: str) -> None:
    """Only an alert threshold put in by hand could be replaced: `configure --batch-size 500` of a
    saved batch size of "x" or -5 validated the whole saved configuration first, and so refused
    its own fix in the line that told the user to run it."""
    before = sync_state.load_config(state_db)
    sync_state.save_config(state_db, before)
    try:
        for setting, value, shown, option, fix in (
            ("batch_size", '"x"', "'x': Input should be a valid integer", "--batch-size VALUE", ("--batch-size", "500")),
            ("batch_size", "-5", "-5: Input should be greater than or equal to 1", "--batch-size VALUE", ("--batch-size", "501")),
            ("privacy.mode", '"scramble"', "'scramble': Input should be 'drop' or 'hash'", "--privacy-mode VALUE",
             ("--privacy-mode", "drop")),
            ("enabled", '"maybe"', "'maybe': Input should be a valid boolean", "--enable/--disable", ("--enable",)),
        ):
            _save_by_hand(state_db, setting, value)
            refused = (
                f"flowyard: error: the saved sync setting {setting} is {shown}",
                f"; set it with `flowyard sync configure {option}`",
            )
            for args in (("sync", "status"), ("sync", "trigger"), ("sync", "configure", "--queue-threshold", "7")):
                out = run_cli(*args)
                assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr)
                [line] = [line for line in out.stderr.splitlines() if line.startswith("flowyard: error:")]
                assert line.startswith(refused[0]) and line.endswith(refused[1]), line
            fixed = run_cli("sync", "configure", *fix)
            assert fixed.returncode == 0, (fix, fixed.stderr)
        config = sync_state.load_config(state_db)
        assert (config.batch_size, config.privacy.mode, config.enabled) == (501, "drop", True)
        assert config.alerts == before.alerts  # the refused configure --queue-threshold 7 saved nothing
    finally:
        sync_state.save_config(state_db, before)


def test_status_and_history_times_are_utc_whatever_the_state_servers_time_zone(fresh_db: str, tmp_path: Path) -> None:
    """With the state database in another zone (initdb sets the machine's), `sync status` printed
    that zone's time labelled UTC, `sync history` printed it unlabelled and read `--since` in it."""
    state = state_url(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        database = sql.Identifier(conn.info.dbname)
        conn.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = 'Asia/Tokyo'").format(database))
    store = make_store(tmp_path / "tokyo.db", 2)
    sync_state.register_device(state, store, device_store.Identity("tokyo", "u", "p"))
    with psycopg.connect(fresh_db) as conn:
        conn.execute("UPDATE flowyard.sync_devices SET last_success_at = '2026-01-01 00:00:00+00'")
        conn.execute(
            "INSERT INTO flowyard.sync_runs (device_id, uploaded, finished_at) "
            "VALUES ('tokyo', 1, '2025-12-31 20:00:00+00'), ('tokyo', 2, '2026-01-01 00:00:00+00')"
        )
    env = {"FLOWYARD_DATABASE_URL": fresh_db}
    status = run_cli("sync", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert "last_success=2026-01-01 00:00:00 UTC" in status.stdout, status.stdout
    history = run_cli("sync", "history", "--since", "2026-01-01", env=env)
    assert history.returncode == 0, history.stderr
    assert [line.split(" pending_before")[0] for line in history.stdout.splitlines()] == [
        "2026-01-01 00:00:00 UTC tokyo           "
    ]


def test_a_device_only_synced_by_path_can_be_disabled_and_its_path_runs_then_skip_it(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A device that only `sync trigger --store` runs know (a deployment listing its stores) is
    switched off like a configured one: the next run naming its store leaves it out and says so,
    and ``--force`` syncs it anyway. `sync status` lists it, marked as not configured (it listed
    configured devices only, so a disabled one was shown nowhere)."""
    from flows.sync_controls import sync_status

    store = make_store(tmp_path / "by-path.db", 30)
    configured = make_store(tmp_path / "by-path-z.db", 2)  # sorts after by-path, listed before it
    sync_state.register_device(state_db, configured, device_store.Identity("by-path-z", "u", "p"))
    try:
        first = run_cli("sync", "trigger", "--store", str(store), "--central-url", fresh_db)
        assert first.returncode == 0 and "by-path: uploaded=30" in first.stdout, first.stderr
        with device_store.open_store(store) as conn:
            device_store.insert_events(conn, [(device_store.now_ms(), "edit", {"n": 1})])
        assert run_cli("sync", "disable", "by-path").returncode == 0
        status = run_cli("sync", "status")
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        [(at, line)] = [(n, line) for n, line in enumerate(lines) if line.split()[:1] == ["by-path"]]
        [(configured_at, configured_line)] = [(n, x) for n, x in enumerate(lines) if x.split()[:1] == ["by-path-z"]]
        assert "enabled=no queued=1 (0 failed)" in line, line
        assert line.endswith(" configured=no (synced only by runs naming its store)"), line
        assert configured_at < at and "configured=" not in configured_line, status.stdout
        rows = {r["device"]: r for r in sync_status()}
        assert (rows["by-path"]["configured"], rows["by-path"]["enabled"]) == (sync_state.NOT_CONFIGURED, "no")

        skipped = run_cli("sync", "trigger", "--store", str(store), "--central-url", fresh_db)
        assert skipped.returncode == 0, skipped.stderr
        assert "skipped: disabled devices not synced: by-path" in skipped.stdout
        with device_store.open_store(store) as conn:
            assert device_store.counts(conn).pending == 1

        forced = run_cli("sync", "trigger", "--force", "--store", str(store), "--central-url", fresh_db)
        assert forced.returncode == 0 and "by-path: uploaded=1" in forced.stdout, forced.stderr
    finally:
        sync_state.remove_device(state_db, "by-path")
        sync_state.remove_device(state_db, "by-path-z")


def test_a_store_path_starting_with_a_tilde_is_in_the_home_directory(
    fresh_db: str, state_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`~` is the home directory in every store path: configure, trigger and migrate on the CLI
    (a shell leaves `--store=~/x.db` and a quoted `~` alone), and the control flows' parameters."""
    from flows.sync_controls import sync_configure

    home = {"HOME": str(tmp_path)}
    store, moved = make_store(tmp_path / "home-dev.db", 5), make_store(tmp_path / "moved.db", 2)
    try:
        added = run_cli("sync", "configure", "--add-store", "~/home-dev.db", "--device-id", "home-dev", env=home)
        assert added.returncode == 0, added.stderr
        assert f"added device home-dev: {store.resolve()}" in added.stdout
        ran = run_cli("sync", "trigger", "--store=~/home-dev.db", "--central-url", fresh_db, env=home)
        assert ran.returncode == 0 and "home-dev: uploaded=5" in ran.stdout, ran.stderr
        down = run_cli("sync", "migrate", "down", "--to=v1", "~/home-dev.db", env=home)
        assert down.returncode == 0 and "downgraded to v1, 5 events kept" in down.stdout, down.stderr
        up = run_cli("sync", "migrate", "up", "~/home-dev.db", env=home)
        assert up.returncode == 0 and "upgraded to v2 as device 'home-dev'" in up.stdout, up.stderr

        monkeypatch.setenv("HOME", str(tmp_path))
        sync_configure(add_store="~/moved.db", device_id="home-dev")
        (device,) = [d for d in sync_state.list_devices(state_db) if d.device_id == "home-dev"]
        assert device.store_path == str(moved.resolve())
    finally:
        sync_state.remove_device(state_db, "home-dev")


def test_a_store_named_relatively_through_a_symlink_or_dotdot_is_one_device(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A store path is resolved where it is given, registering and running alike: a relative one
    against the command's directory, and through symlinks and `..`, so it is stored absolute (a
    scheduled run elsewhere finds it) and every name of one file is that one device."""
    (tmp_path / "stores").mkdir()
    store = make_store(tmp_path / "stores" / "path-dev.db", 4).resolve()
    (tmp_path / "link.db").symlink_to(store)
    importable = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=tmp_path, env=importable)

    try:
        added = cli("sync", "configure", "--add-store", "stores/path-dev.db", "--device-id", "path-dev")
        assert added.returncode == 0 and f"added device path-dev: {store}\n" in added.stdout, added.stderr
        again = cli("sync", "configure", "--add-store", "link.db")
        assert again.returncode == 0 and f"added device path-dev: {store}\n" in again.stdout, again.stderr
        second = cli("sync", "configure", "--add-store", "stores/../link.db", "--device-id", "path-dev-2")
        assert second.returncode == 2 and f"device store {store} is already device 'path-dev'" in second.stderr
        ran = cli("sync", "trigger", "--store", "./stores/../link.db", "--central-url", fresh_db)
        assert ran.returncode == 0 and "path-dev: uploaded=4 " in ran.stdout, ran.stderr
        devices = [d for d in sync_state.list_devices(state_db) if d.device_id.startswith("path-dev")]
        assert [(d.device_id, d.store_path, d.registered) for d in devices] == [("path-dev", str(store), True)]
    finally:
        sync_state.remove_device(state_db, "path-dev")


def test_trigger_records_the_resolved_store_paths_as_the_runs_parameters(fresh_db: str, tmp_path: Path) -> None:
    """`sync trigger --store` checked the resolved paths but handed the flow the ones given: the
    run's recorded parameters (the UI, a re-run from another directory) named a relative path."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    name = f"params-{uuid.uuid4().hex[:8]}.db"
    store = make_store(tmp_path / name, 3, identity=device_store.Identity(name[:-3], "u", "p")).resolve()
    importable = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    ran = run_cli("sync", "trigger", "--store", name, "--central-url", fresh_db, cwd=tmp_path, env=importable)
    assert ran.returncode == 0 and f"{name[:-3]}: uploaded=3 " in ran.stdout, ran.stderr
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["sync-devices"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=200,
        )
    recorded = [r.parameters["stores"] for r in runs if any(name in s for s in r.parameters.get("stores") or [])]
    assert recorded == [[str(store)]]


def test_a_store_path_that_cannot_be_resolved_is_one_line(state_db: str, tmp_path: Path) -> None:
    """A `~user` naming no user (also in a flow parameter) and a symlink loop are one line, exit
    2, before anything is read or saved: not pathlib's traceback."""
    from flows.sync_controls import sync_configure

    loop = tmp_path / "loop.db"
    loop.symlink_to(loop)
    nobody = "~no-such-user-flowyard"
    for args, message in (
        (("configure", "--add-store", f"{nobody}/dev.db"), f"starts with {nobody!r}, which names no home directory"),
        (("trigger", "--store", str(loop)), f"device store path {str(loop)!r} runs into a symlink loop"),
        (("migrate", "up", str(loop)), f"device store path {str(loop)!r} runs into a symlink loop"),
    ):
        out = run_cli("sync", *args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("flowyard: error: device store path ") and message in out.stderr, out.stderr
    with pytest.raises(UserError, match=f"^device store path '{nobody}/dev.db' starts with '{nobody}', "):
        sync_configure(add_store=f"{nobody}/dev.db")


def test_a_tilde_with_an_empty_home_is_one_line(state_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty HOME names no home directory: Python reads `~/x.db` as `/x.db`, so flowyard
    registered or synced whatever store sat at the root, or said that `/x.db` was missing."""
    from flows.sync_controls import sync_configure

    message = "device store path '~/x.db' starts with '~', but HOME is set to the empty string; set HOME to"
    for args in (("configure", "--add-store", "~/x.db"), ("trigger", "--store=~/x.db")):
        out = run_cli("sync", *args, env={"HOME": ""})
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith(f"flowyard: error: {message}") and out.stderr.count("\n") == 1, out.stderr
    monkeypatch.setenv("HOME", "")
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        sync_configure(add_store="~/x.db")


def test_trigger_counts_events_waiting_out_their_backoff_apart_from_pending(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """Failed events wait out a retry backoff: a run without --force leaves them, so trigger's
    `pending` (what the next run sends) leaves them out and names them apart."""
    store = make_store(tmp_path / "backoff.db", 40)
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    try:
        down = run_cli("sync", "trigger", "--store", str(store), "--central-url", dead, "--batch-size", "10")
        assert down.returncode == 2, down.stderr
        assert "backoff: uploaded=0 duplicates=0 failed=10 pending=30 waiting_out_backoff=10 error=" in down.stdout
        with sqlite3.connect(store) as conn:  # the 30 s backoff, an hour on: the next two runs may take longer
            conn.execute("UPDATE events SET next_retry_at = next_retry_at + 3600000 WHERE sync_status = 'failed'")
        back = run_cli("sync", "trigger", "--store", str(store), "--central-url", fresh_db)
        assert back.returncode == 0, back.stderr
        assert "backoff: uploaded=30 duplicates=0 failed=0 pending=0 waiting_out_backoff=10" in back.stdout
        idle = run_cli("sync", "trigger", "--store", str(store), "--central-url", fresh_db)
        assert "backoff: uploaded=0 duplicates=0 failed=0 pending=0 waiting_out_backoff=10" in idle.stdout
        forced = run_cli("sync", "trigger", "--force", "--store", str(store), "--central-url", fresh_db)
        assert forced.returncode == 0, forced.stderr
        assert "backoff: uploaded=10 duplicates=0 failed=0 pending=0\n" in forced.stdout
    finally:
        sync_state.remove_device(state_db, "backoff")


def test_trigger_with_a_known_devices_missing_store_still_syncs_the_others(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """Only a path flowyard has no device for is a typo refused up front; a known device's store
    that is gone is that device's error, and the other stores named with it sync."""
    gone, kept = make_store(tmp_path / "cli-gone.db", 5), make_store(tmp_path / "cli-kept.db", 7)
    sync_state.register_device(state_db, gone, device_store.Identity("cli-gone", "u", "p"))
    gone.unlink()
    try:
        missing = f"cannot read device store {gone}: no such file; give the path of the device's SQLite file"
        lines = _trigger_with_one_refused(fresh_db, gone, kept, f"cli-gone: {missing}")
        assert f"cli-gone: not synced error={missing}" in lines
        assert "cli-kept: uploaded=7 duplicates=0 failed=0 pending=0" in lines
    finally:
        sync_state.remove_device(state_db, "cli-gone")
        sync_state.remove_device(state_db, "cli-kept")


def test_arguments_that_are_not_utf8_are_one_line_and_save_nothing(state_db: str, tmp_path: Path) -> None:
    """Bytes that are not UTF-8 in a store path or an id (a shell in a Latin-1 locale) reach
    Python as surrogate escapes, which psycopg could not encode: a traceback, exit code 1."""
    latin1 = make_store(Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.db")), 3)
    good = make_store(tmp_path / "utf8-ok.db", 3)
    cafe = os.fsdecode(b"caf\xe9")
    path_error = (
        f"device store path {str(latin1)!r} holds bytes that are not UTF-8; "
        "rename the file (or its folder) to a UTF-8 name"
    )
    saved = sync_state.load_config(state_db)
    for args, expected in (
        (("sync", "configure", "--add-store", str(latin1)), path_error),
        (("sync", "trigger", "--store", str(latin1)), path_error),
        (("sync", "migrate", "up", str(latin1)), path_error),
        (("sync", "configure", "--batch-size", "9", "--add-store", str(good), "--device-id", cafe),
         "--device-id (device_id) 'caf\\udce9' holds bytes that are not UTF-8; give it as UTF-8 text"),
        (("sync", "configure", "--add-store", str(good), "--user-id", cafe), "--user-id (user_id) 'caf\\udce9'"),
        (("sync", "configure", "--add-store", str(good), "--project-id", cafe), "--project-id (project_id) 'caf"),
        (("sync", "migrate", "up", str(good), "--device-id", cafe), "--device-id (device_id) 'caf\\udce9'"),
        (("sync", "configure", "--batch-size", "9", "--remove-store", cafe),
         "device id 'caf\\udce9' holds bytes that are not UTF-8; no device has such an id"),
        (("sync", "enable", cafe), "device id 'caf\\udce9' holds bytes that are not UTF-8"),
        (("sync", "disable", cafe), "device id 'caf\\udce9' holds bytes that are not UTF-8"),
        (("sync", "configure", "--allow", cafe), "--allow (allow) 'caf\\udce9' holds bytes that are not UTF-8"),
        (("sync", "configure", "--privacy-mode", "hash", "--hash-key", cafe),
         "--hash-key (hash_key) holds bytes that are not UTF-8; give it as UTF-8 text"),
    ):
        out = run_cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert expected in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
    assert sync_state.load_config(state_db) == saved
    assert not {str(latin1), str(good)} & {d.store_path for d in sync_state.list_devices(state_db)}
    with device_store.open_store(good) as conn:
        assert device_store.schema_version(conn) == device_store.V1


def test_flows_given_values_of_the_wrong_type_fail_in_one_line_naming_the_parameter(
    state_db: str, tmp_path: Path
) -> None:
    """What the UI's form, a template or a REST caller may send: "" for a number or a date, null for
    a flag, one string for a list. Prefect's refusal put each parameter on a line of its own under
    "Flow run received invalid parameters:", so the Failed run's one-line message named none; the
    store is never touched."""
    from prefect.client.orchestration import get_client

    from flows.sync_controls import sync_configure, sync_history
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "typed.db", 5)
    cases = [
        (sync_devices, {"batch_size": ""}, 'parameter batch_size is "": Input should be a valid integer'),
        (sync_devices, {"stores": str(store)}, f"parameter stores is {json.dumps(str(store))[:57]}"),
        (sync_devices, {"stores": [str(store)], "force": None}, "parameter force is null: Input should be a valid boolean"),
        (sync_history, {"limit": None}, "parameter limit is null: Input should be a valid integer; give a value of type int"),
        (
            sync_history,
            {"limit": "", "since": ""},
            'parameter limit is "": Input should be a valid integer, unable to parse string as an integer; give a '
            'value of type int; parameter since is "": Input should be a valid datetime',
        ),
        (sync_configure, {"disable_devices": "laptop"}, 'parameter disable_devices is "laptop": Input should be a valid list'),
    ]
    for flow_object, parameters, problem in cases:
        run = flow_object(**parameters, return_state=True)  # type: ignore[operator]
        with get_client(sync_client=True) as client:
            stored = client.read_flow_run(run.state_details.flow_run_id).state
        assert run.is_failed() and stored is not None and stored.is_failed()
        message = stored.message or ""
        assert "\n" not in message and f"UserError: {flow_object.name}: {problem}" in message, message
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1


def test_a_copy_of_a_registered_store_is_not_added_in_its_place(state_db: str, tmp_path: Path) -> None:
    """A device's store replaced by a copy of another registered device's store fails its run
    with "upgraded as device 'copy-b'", suggesting `--remove-store copy-a --add-store PATH`.
    That re-pointed device copy-b to the copy, silently: its own store, still in place, was
    never synced again. Refused in one line while copy-b's store is there and records its id;
    a store that moved (nothing left at the old path that records the id) is still re-pointed."""
    import shutil

    a = make_store(tmp_path / "copy-a.db", 3, identity=device_store.Identity("copy-a", "u", "p"))
    b = make_store(tmp_path / "copy-b.db", 4, identity=device_store.Identity("copy-b", "u", "p"))
    for store in (a, b):
        assert run_cli("sync", "configure", "--add-store", str(store)).returncode == 0
    try:
        shutil.copyfile(b, a)
        out = run_cli("sync", "configure", "--remove-store", "copy-a", "--add-store", str(a))
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.splitlines() == [
            f"flowyard: error: device stores {b} and {a} are both device 'copy-b'; central cannot tell their "
            "events apart. Sync only one of them, and re-upgrade the other under its own id if it has never "
            "synced (`flowyard sync migrate down --to=v1 STORE`, then `flowyard sync migrate up STORE "
            "--device-id NEW-ID`)"
        ]
        devices = {d.device_id: d.store_path for d in sync_state.list_devices(state_db)}
        assert (devices["copy-a"], devices["copy-b"]) == (str(a), str(b))  # nothing saved
        b.unlink()  # copy-b's store moved to where copy-a's was: re-pointed, as before
        moved = run_cli("sync", "configure", "--remove-store", "copy-a", "--add-store", str(a))
        assert moved.returncode == 0, moved.stderr
        devices = {d.device_id: d.store_path for d in sync_state.list_devices(state_db)}
        assert "copy-a" not in devices and devices["copy-b"] == str(a)
    finally:
        for device in ("copy-a", "copy-b"):
            if device in {d.device_id for d in sync_state.list_devices(state_db)}:
                sync_state.remove_device(state_db, device)


def test_alert_thresholds_past_their_maximum_are_one_line_in_the_cli_the_flow_and_python(state_db: str) -> None:
    """A --queue-threshold of 10**30, an --offline-seconds past bigint or of a century were saved
    with exit 0, and their alert could never fire."""
    from flows.sync_controls import sync_configure
    from tasks.sync_state import MAX_OFFLINE_SECONDS, MAX_QUEUE_THRESHOLD

    assert (MAX_QUEUE_THRESHOLD, MAX_OFFLINE_SECONDS) == (1_000_000_000, 365 * 86_400)
    before = sync_state.load_config(state_db)
    queue = "alerts.queue_threshold: {} is over the maximum of 1000000000 pending events; give --queue-threshold"
    offline = "alerts.offline_seconds: {} is over the maximum of 31536000 seconds (365 days); give --offline-seconds"
    try:
        _refused_in_one_line_each(
            (("sync", "configure", "--queue-threshold", str(10**30)), queue.format(10**30)),
            (("sync", "configure", "--queue-threshold", str(2**63)), queue.format(2**63)),
            (("sync", "configure", "--offline-seconds", str(2**63)), offline.format(2**63)),
            (("sync", "configure", "--offline-seconds", str(100 * 365 * 86_400)), offline.format(3153600000)),
        )
        with pytest.raises(UserError, match=r"^invalid sync setting " + re.escape(queue.format(MAX_QUEUE_THRESHOLD + 1))):
            sync_configure(queue_threshold=MAX_QUEUE_THRESHOLD + 1)
        with pytest.raises(UserError, match=r"^invalid sync setting " + re.escape(offline.format(10**30))):
            sync_state.update_config(state_db, {}, alerts={"offline_seconds": 10**30})
        assert sync_state.load_config(state_db) == before
        # the maximum itself is taken
        sync_configure(queue_threshold=MAX_QUEUE_THRESHOLD, offline_seconds=MAX_OFFLINE_SECONDS)
        assert sync_state.load_config(state_db).alerts.queue_threshold == MAX_QUEUE_THRESHOLD
    finally:
        sync_state.save_config(state_db, before)


def test_a_store_whose_events_is_a_view_is_one_line_per_device_and_the_others_sync(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A v1 store whose events is a view read as v1: `configure --add-store` registered it, and
    `migrate up` and every sync failed on SQLite's "Cannot add a column to a view"."""
    view = tmp_path / "cli-view.db"
    with device_store.open_store(make_store(view, 3)) as conn:
        conn.executescript("ALTER TABLE events RENAME TO app_events; CREATE VIEW events AS SELECT * FROM app_events")
    good = make_store(tmp_path / "cli-view-good.db", 6)
    refused = f"device store {view}: events is a view, not a table; flowyard syncs only the DevFlow app's own store"
    _refused_in_one_line_each(
        (("sync", "configure", "--add-store", str(view)), refused),
        (("sync", "migrate", "up", str(view)), refused),
        (("sync", "migrate", "down", "--to=v1", str(view)), refused),
    )
    assert "cli-view" not in {d.device_id for d in sync_state.list_devices(state_db)}
    try:
        lines = _trigger_with_one_refused(fresh_db, view, good, f"cli-view: {refused}")
        assert "cli-view-good: uploaded=6 duplicates=0 failed=0 pending=0" in lines
        status = run_cli("sync", "status")
        assert status.returncode == 0 and f"unreadable: {refused}" in status.stdout, status.stdout
    finally:
        sync_state.remove_device(state_db, "cli-view")
        sync_state.remove_device(state_db, "cli-view-good")
    with sqlite3.connect(view) as conn:
        assert conn.execute("SELECT count(*) FROM app_events").fetchone() == (3,)


@pytest.mark.parametrize(
    ("change", "gone"),
    [("DELETE FROM sync_identity", "is empty"), ("DROP TABLE sync_identity", "is missing")],
    ids=["row-deleted", "table-dropped"],
)
def test_a_v2_store_whose_identity_row_is_gone_is_one_line_per_device_with_the_way_back(
    fresh_db: str, state_db: str, tmp_path: Path, change: str, gone: str
) -> None:
    """A v2 store whose sync_identity table another tool emptied was a TypeError traceback in
    `migrate up` and `configure --add-store`, and ended a whole `trigger` run with no device synced;
    one whose table was dropped by hand was SQLite's bare "no such table: sync_identity", with no way back."""
    store = make_store(tmp_path / "cli-noident.db", 4, identity=device_store.Identity("cli-noident", "u", "p"))
    good = make_store(tmp_path / "cli-noident-good.db", 5)
    try:
        first = run_cli("sync", "trigger", "--store", str(store), "--central-url", fresh_db)
        assert "cli-noident: uploaded=4 duplicates=0 failed=0 pending=0" in first.stdout.splitlines(), first.stderr
        with sqlite3.connect(store) as conn:
            conn.execute(change)
        refused = (
            f"device store {store} is v2 but records no device (its sync_identity table {gone}; another tool "
            f"changed it); upgrade it again under its device's id: `flowyard sync migrate down --to=v1 {store}`, "
            f"then `flowyard sync migrate up {store} --device-id cli-noident`"
        )
        _refused_in_one_line_each(
            (("sync", "migrate", "up", str(store)), refused),
            (("sync", "configure", "--add-store", str(store)), refused),
        )
        lines = _trigger_with_one_refused(fresh_db, store, good, f"cli-noident: {refused}")
        assert "cli-noident-good: uploaded=5 duplicates=0 failed=0 pending=0" in lines
        # the way back the error gives: every event stays, and none reaches central twice
        assert run_cli("sync", "migrate", "down", "--to=v1", str(store)).returncode == 0
        assert run_cli("sync", "migrate", "up", str(store), "--device-id", "cli-noident").returncode == 0
        again = run_cli("sync", "trigger", "--store", str(store), "--central-url", fresh_db)
        assert "cli-noident: uploaded=0 duplicates=4 failed=0 pending=0" in again.stdout.splitlines(), again.stderr
    finally:
        known = {device.device_id for device in sync_state.list_devices(state_db)}
        for device in {"cli-noident", "cli-noident-good"} & known:
            sync_state.remove_device(state_db, device)
