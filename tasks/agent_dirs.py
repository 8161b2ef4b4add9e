"""Where an agent run works: its output and logs directories and a task's working directory.

Apart from :mod:`tasks.agent_execution` (which imports Prefect) so that ``flowyard queue create``
and the CLI's checks before a ``queue run`` check them without importing Prefect, some 2.5 s of
CPU per command on a slow machine.
"""

from __future__ import annotations

from pathlib import Path

from tasks.agent_process import resolve_workdir
from tasks.errors import make_user_dir
from tasks.settings import get_settings


def default_agents_dir() -> Path:
    return get_settings().home_dir / "agents"


def check_new_workdir(workdir: str, output_dir: str | None = None, logs_dir: str | None = None) -> None:
    """Refuse, when a task is created (``queue create``, ``agent-task-create``), a working
    directory that a run with these output and logs directories (the defaults of
    :func:`agent_directories`; nothing is made here) would refuse, failing the task. Checked
    against the defaults only, a run elsewhere was wrongly served: ``logs`` refused though the
    run logs to another directory, a link out of its output directory accepted and the task
    failed when run."""
    if workdir:
        base = Path(output_dir) if output_dir else default_agents_dir()
        resolve_workdir(base, workdir, None, logs_dir=Path(logs_dir) if logs_dir else None)


def agent_directories(
    output_dir: str | Path | None, logs_dir: str | Path | None, names: tuple[str, str] = ("output_dir", "logs_dir")
) -> tuple[Path, Path]:
    """The run's output and logs directories (defaults: ``<FLOWYARD_HOME>/agents`` and its
    ``logs``), created, checked writable and resolved before anything is claimed: one that cannot
    be made (a file in the way, no permission) or that exists but cannot be written (immutable, a
    read-only mount) would otherwise fail every task the run claims, each when its ``task-<id>``
    directory or its ``<id>.jsonl`` log cannot be made: an attempt used, and for the log, every
    retry too. The CLI calls it too, so that such a typo is one line before a flow run starts;
    ``names`` are what that line calls the two directories: the flow's parameters, or the options
    the user of the CLI typed. A logs directory left to default under a given output directory is
    named by that output directory's option: a ``logs`` file in ``--output-dir`` was told as a bad
    ``--logs-dir``, an option the user never passed."""
    base = Path(output_dir) if output_dir else default_agents_dir()
    output_name, logs_name = names
    if output_dir and not logs_dir:
        logs_name = f"the logs directory in {output_name} (no {logs_name} given)"
    directories = base, Path(logs_dir) if logs_dir else base / "logs"
    output, logs = (
        make_user_dir(path, name, writable=True).resolve()
        for path, name in zip(directories, (output_name, logs_name), strict=True)
    )
    return output, logs
