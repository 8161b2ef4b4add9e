"""Generate realistic v1 device stores: the demo, the benchmark and the tests all use these.

Events carry both metadata (action, language, duration …) and the private fields the
privacy filter must keep on the machine (file paths, code snippets).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from tasks import device_store
from tasks.device_store import Identity

EVENT_TYPES = ("file_edit", "build", "test_run", "commit", "tool_call")
STATUS_EVERY = 50
"""Every 50th event is a ``project_status`` snapshot (the mutable, last-write-wins record)."""


def sample_events(count: int, *, end_ms: int, seed: int, spread_ms: int = 3 * 86_400_000) -> Iterator[tuple]:
    """``count`` events with timestamps ascending over ``spread_ms`` up to ``end_ms``."""
    rng = random.Random(seed)
    step = max(spread_ms // max(count, 1), 1)
    for i in range(count):
        ts = end_ms - (count - i) * step
        if i % STATUS_EVERY == STATUS_EVERY - 1:
            yield ts, "project_status", {"status": rng.choice(("green", "yellow", "red")), "build": i}
            continue
        yield (
            ts,
            rng.choice(EVENT_TYPES),
            {
                "action": rng.choice(("save", "run", "open")),
                "language": rng.choice(("python", "sql", "typescript")),
                "duration_ms": rng.randint(1, 5000),
                "file_path": f"/home/dev/src/module_{rng.randint(1, 99)}.py",
                "code": "def handler(request):\n    return secret_token\n",
            },
        )


def make_store(
    path: Path, count: int, *, seed: int = 0, end_ms: int | None = None, identity: Identity | None = None
) -> Path:
    """A v1 store with ``count`` events; with ``identity`` it is upgraded to v2 as well."""
    device_store.create_v1(path)
    with device_store.open_store(path) as conn:
        device_store.insert_events(
            conn, sample_events(count, end_ms=end_ms or device_store.now_ms(), seed=seed)
        )
        if identity is not None:
            device_store.upgrade_to_v2(conn, identity)
    return path


def make_fleet(directory: Path, devices: int, events_per_device: int, *, prefix: str = "dev") -> list[Path]:
    """``devices`` v1 stores named ``<prefix>NN.db`` (device id = file stem)."""
    return [make_store(directory / f"{prefix}{n:02d}.db", events_per_device, seed=n) for n in range(devices)]


def demo_sync_parameters(demo_url: str) -> dict[str, object]:
    """``flowyard demo``: three fresh device stores under the flowyard home, synced into the demo database."""
    from tasks.settings import get_settings

    directory = get_settings().home_dir / "demo_devices"
    for old in directory.glob("*.db"):
        old.unlink()
    stores = make_fleet(directory, 3, 2000, prefix="demo-laptop-")
    return {"stores": [str(p) for p in stores], "central_url": demo_url, "batch_size": 500}
