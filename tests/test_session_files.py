"""The suite's own session directory: a full run's PostgreSQL data directories take hundreds
of MB, so a passing run removes them, and a failing one keeps them (with the servers' logs).
Whatever a test's CLI run started from the session's home is stopped with the session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

_TEST = """
def test_server(pg):
    from tasks.db import connect

    with connect(pg.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == ({expected},)
"""


_CLI_STARTS_PREFECT = """
def test_a_cli_command_starts_the_prefect_server(state_db):
    from deployments.runtime import prepare_flow_run
    from tasks.prefect_runtime import api_healthy
    from tasks.settings import get_settings

    prepare_flow_run(get_settings())  # what ``flowyard sync trigger`` does before its flow run
    assert api_healthy(get_settings().prefect_api_url)
"""


def _run_suite(
    tmp_path: Path, expected: int, test: str = _TEST
) -> tuple[subprocess.CompletedProcess[str], list[Path]]:
    """Run a one-test session with this suite's conftest (a real embedded PostgreSQL) and its
    own temporary directory; return the run and what it left there."""
    temp = tmp_path / "temp"
    temp.mkdir()
    (tmp_path / "test_one.py").write_text(test.format(expected=expected))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", str(tmp_path / "test_one.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**_environment(), "TMPDIR": str(temp)},
        timeout=600,
    )
    return run, sorted(temp.iterdir())


def _environment() -> dict[str, str]:
    # the child picks its own ports and home, like a user's ``make test``
    return {k: v for k, v in os.environ.items() if not k.startswith(("FLOWYARD_", "PREFECT_"))}


def test_a_passing_run_removes_its_servers_files(tmp_path):
    run, left = _run_suite(tmp_path, expected=1)

    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    assert left == []


def test_a_failing_run_keeps_them_and_says_where(tmp_path):
    run, left = _run_suite(tmp_path, expected=2)

    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert [p.name.startswith("flowyard-tests-") for p in left] == [True]
    assert (left[0] / "pg.log").is_file()
    assert f"kept in {left[0]}" in run.stdout


def _started_under(directory: Path) -> list[psutil.Process]:
    """Live processes whose environment points into ``directory`` (a session's home)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if any(str(directory) in value for value in proc.environ().values()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_prefect_server_a_cli_run_started_is_stopped_with_the_session(tmp_path):
    try:
        run, left = _run_suite(tmp_path, expected=1, test=_CLI_STARTS_PREFECT)
        leaked = _started_under(tmp_path / "temp")

        assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
        assert leaked == []
        assert left == []
    finally:
        for proc in _started_under(tmp_path / "temp"):
            proc.kill()


_WAITS = """
import time
from pathlib import Path


def test_waits_to_be_terminated(pg):
    Path(__file__).with_name("up").write_text(pg.url())
    time.sleep(600)
"""


def test_sigterm_to_the_test_run_stops_its_servers(tmp_path):
    """A run ended by SIGTERM (a CI job's timeout, ``timeout``, ``kill``) stops its embedded
    PostgreSQL as a finished one does; it used to outlive the run for good, holding its port."""
    temp = tmp_path / "temp"
    temp.mkdir()
    (tmp_path / "test_one.py").write_text(_WAITS)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", str(tmp_path / "test_one.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**_environment(), "TMPDIR": str(temp)},
    )
    try:
        while not (tmp_path / "up").exists():
            assert run.poll() is None, run.communicate()[0]
            time.sleep(0.2)
        assert any("postgres" in proc.name() for proc in _started_under(temp))

        run.terminate()
        output = run.communicate(timeout=300)[0]

        assert run.returncode != 0, output
        assert _started_under(temp) == [], output
    finally:
        run.kill()
        for proc in _started_under(temp):
            proc.kill()
