"""Flow parameters as users pass them, checked in a fresh interpreter: pytest resets warning
filters around collection and each test, so only a new process shows what a user's console shows."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_parameters_named_like_pydantic_attributes_validate_without_warnings():
    script = (
        "from flows.bulk_migrate import bulk_migrate\n"
        "from flows.online_migrate import online_migrate\n"
        "b = bulk_migrate.validate_parameters({'source_url': 'postgresql://h/db', 'validate': ['count']})\n"
        "o = online_migrate.validate_parameters({'migration_file': 'm.yaml', 'schema': 'app'})\n"
        "print(b['validate'], o['schema'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["['count']", "app"]
    assert "shadows an attribute" not in done.stderr
