"""The real ``flowyard`` CLI: help everywhere, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from deployments.cli import SUBCOMMANDS, app
from tasks.embedded_pg import free_port
from tests.conftest import ROOT, run_cli


def _command_paths(command: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _command_paths(sub, (*prefix, name))
    return paths


def test_every_command_has_help():
    root = typer.main.get_command(app)
    paths = _command_paths(root)
    assert ("up",) in paths and ("down",) in paths and ("status",) in paths and ("migrate",) in paths
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output, path
        assert "``" not in result.output, path  # a docstring's code shows as code


_LIST_MODULES_AT_EXIT = """
import atexit, runpy, sys
atexit.register(lambda: print("imported:", *sorted(sys.modules), file=sys.stderr))
sys.argv[0] = "flowyard"
runpy.run_module("deployments.cli", run_name="__main__")
"""


def _imported(*args: str) -> tuple[set[str], str]:
    """The modules a real ``flowyard *args`` run has imported when it exits, and its stderr."""
    run = subprocess.run(
        [sys.executable, "-c", _LIST_MODULES_AT_EXIT, *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    listed = [line for line in run.stderr.splitlines() if line.startswith("imported: ")]
    assert len(listed) == 1, run.stderr
    return set(listed[0].split()[1:]), run.stderr


def test_a_command_imports_the_group_it_names_and_no_other():
    groups = {f"deployments.{module}" for module, _ in SUBCOMMANDS}

    queue, _ = _imported("queue", "--help")
    typo, stderr = _imported("queu")
    everything, _ = _imported("--help")
    create, refused = _imported("queue", "create", "x", "--workdir", "../elsewhere")

    assert queue & groups == {"deployments.cli_agents"}
    assert "alembic" not in queue
    assert typo & groups == set() and "Did you mean 'queue'?" in stderr
    assert everything >= groups
    assert "outside the agent output directory" in refused and "prefect" not in create  # checked without Prefect


def test_help_joins_a_docstrings_lines_into_paragraphs_and_keeps_placeholders():
    """Typer's default help kept every line break of a command's docstring, so sentences broke
    in two at any terminal width; and Markdown, which joins them, took ``<output dir>`` for an
    HTML tag and dropped it from the defaults of ``queue run``."""
    runner = CliRunner()
    trigger = runner.invoke(app, ["sync", "trigger", "--help"], env={"COLUMNS": "200"}).output
    assert "ends Failed but still carries every device's outcome: those are printed first" in trigger
    run = " ".join(runner.invoke(app, ["queue", "run", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "Where <task_id>.jsonl logs go (default: <output dir>/logs)." in run


def _assert_one_line_error(result, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("flowyard")]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_bad_url_is_one_line(tmp_path):
    result = run_cli(
        "up", env={"FLOWYARD_DATABASE_URL": "mysql://root@localhost/app", "FLOWYARD_HOME": str(tmp_path)}
    )
    _assert_one_line_error(result, "not a PostgreSQL URL")


def test_unreachable_database_is_one_line(tmp_path):
    url = f"postgresql://app:pw@127.0.0.1:{free_port()}/app"
    result = run_cli("up", env={"FLOWYARD_DATABASE_URL": url, "FLOWYARD_HOME": str(tmp_path)})
    _assert_one_line_error(result, "cannot connect to postgresql://app:***@127.0.0.1")
    assert not (tmp_path / "run" / "prefect-server.pid").exists(), "nothing may be left running"


def test_missing_prefect_yaml_is_one_line(tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "deployments.serve", str(tmp_path / "prefect.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("not found; run from the flowyard project directory")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["queu"], "No such command 'queu'. Did you mean 'queue'? (see 'flowyard --help')"),
        (["up", "--no-such-flag"], "No such option: --no-such-flag (see 'flowyard up --help')"),
        (["queue", "create"], "Missing argument 'title'. (see 'flowyard queue create --help')"),
        (["queue", "create", "x", "--priority"], "requires an argument. (see 'flowyard queue create --help')"),
        (["bulk", "copy", "--parallelism", "two", "src.db"], "Invalid value for '--parallelism'"),
        (["sync", "trigger", "--batch-size", "0"], "'--batch-size': Input should be greater than or equal to 1"),
    ],
)
def test_usage_errors_are_one_line(args, expected):
    """Click would print a usage block and a boxed message; the user gets one line and exit 2."""
    result = run_cli(*args)
    assert result.stderr.count("\n") == 1 and result.stdout == "", result.stderr
    _assert_one_line_error(result, expected)


def test_bare_command_still_prints_help():
    result = run_cli()
    assert "Usage: flowyard" in result.stdout + result.stderr and "error" not in result.stderr
