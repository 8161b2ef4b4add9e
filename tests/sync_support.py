"""Helpers shared by the sync tests."""

from __future__ import annotations

from pathlib import Path

from tasks import device_store


def synced_events(store: Path) -> int:
    """How many of the store's events are marked synced (what a run's counts leave out)."""
    with device_store.open_store(store) as conn:
        return int(conn.execute("SELECT count(*) FROM events WHERE sync_status = 'synced'").fetchone()[0])
