"""The ``flowyard`` command line.

Each pipeline adds a sub-command group from its own ``deployments/cli_<name>.py`` module.
A :class:`~tasks.errors.UserError` anywhere, and any usage error (unknown command or option, a
value of the wrong type or out of range), becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import typer
from typer._click.core import Command
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer vendors click, exports neither
from typer.core import TyperGroup

from deployments.cli_options import command_group
from tasks.errors import UserError, exit_on_user_error
from tasks.prefect_runtime import use_flowyard_api
from tasks.settings import get_settings

# (module under deployments/, command group name)
SUBCOMMANDS: list[tuple[str, str]] = [
    ("cli_migrate", "migrate"),
    ("cli_online", "online"),
    ("cli_sync", "sync"),
    ("cli_quality", "quality"),
    ("cli_agents", "queue"),
    ("cli_bulk", "bulk"),
]


class _GroupsOnDemand(MutableMapping[str, Command]):
    """The top-level commands, each group's module imported when the group is first looked up.

    A group's module pulls in its pipeline's libraries (Alembic for ``migrate`` and ``sync``):
    importing every group made each command, even a usage error, spend 4.5 s of CPU on
    imports on a slow machine, against 2.1 s with the one group it names. ``flowyard --help``
    loads them all to list them; an unknown command's suggestion needs only their names."""

    def __init__(self, loaded: MutableMapping[str, Command]) -> None:
        self._loaded = loaded
        self._modules = {group: module for module, group in SUBCOMMANDS}

    def __getitem__(self, name: str) -> Command:
        if name not in self._loaded and name in self._modules:
            group = typer.main.get_command(importlib.import_module(f"deployments.{self._modules[name]}").app)
            group.name = name
            self._loaded[name] = group
        return self._loaded[name]

    def __setitem__(self, name: str, command: Command) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        lazy = self._modules.pop(name, None)
        if name in self._loaded or lazy is None:
            del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> list[str]:
        # a snapshot: listing the commands with their help (``items()``) loads groups meanwhile
        return [*self._loaded, *(name for name in self._modules if name not in self._loaded)]


class _FlowyardGroup(TyperGroup):
    """The ``flowyard`` group, whose sub-command groups load on demand (:class:`_GroupsOnDemand`)."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _GroupsOnDemand(self.commands)


app = command_group(
    "Database-heavy platform operations as Prefect pipelines.",
    name="flowyard",
    cls=_FlowyardGroup,
    pretty_exceptions_enable=False,
)


@app.command()
def up() -> None:
    """Start embedded PostgreSQL (unless FLOWYARD_DATABASE_URL is set), the Prefect server and the deployments."""
    from deployments import runtime

    settings = get_settings()
    runtime.up(settings)
    _print_status()
    typer.echo(f"Prefect UI: http://127.0.0.1:{settings.prefect_port}")


@app.command()
def down() -> None:
    """Stop the deployment server, the Prefect server and the embedded PostgreSQL."""
    from deployments import runtime

    stopped = runtime.down(get_settings())
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status() -> None:
    """Say what runs and where."""
    _print_status()


@app.command()
def demo() -> None:
    """Run the demo pipelines through the Prefect API against the embedded default."""
    from deployments.demo import run_demo

    run_demo(get_settings())


def _print_status() -> None:
    from deployments import runtime

    settings = get_settings()
    st = runtime.status(settings)
    embedded = {None: "not used (FLOWYARD_DATABASE_URL)", True: "running", False: "stopped"}[
        st.embedded_running
    ]
    prefect = "stopped"
    if st.prefect_pid or st.prefect_healthy:
        health = "not answering" if not st.prefect_healthy else st.prefect_unusable or "healthy"
        prefect = f"pid {st.prefect_pid}, {settings.prefect_api_url} ({health})"
    typer.echo(f"database:          {st.database}")
    typer.echo(f"embedded postgres: {embedded} ({settings.pgdata})")
    typer.echo(f"prefect server:    {prefect}")
    typer.echo(f"deployments:       {'pid ' + str(st.serve_pid) if st.serve_pid else 'not served'}")


def _run() -> None:
    # Prefect fixes its settings when first imported. Pointing it at flowyard's server here,
    # before any command imports a flow, keeps every in-process run off Prefect's ephemeral
    # (SQLite) server, whatever a command imports first. Inside the user-error guard: bad
    # settings (e.g. FLOWYARD_DATABASE_URL) are one line, like every other user error.
    use_flowyard_api(get_settings())
    try:
        code = app(prog_name="flowyard", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()  # the help the bare group prints is what was asked for, not an error
        sys.exit(exc.exit_code)
    except UsageError as exc:
        raise UserError(usage_error_line(exc, sys.argv[1:])) from None
    except typer.Abort:
        code = 130
    if code == 130:  # Ctrl-C: typer turns KeyboardInterrupt into Exit(130)
        print("flowyard: interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


def usage_error_line(exc: UsageError, args: Sequence[str]) -> str:
    """Click's usage error as one line: what is wrong, and where the usage is (click prints a
    usage block and a boxed message, five lines or more)."""
    command = exc.ctx.command_path if exc.ctx is not None else _command_path(args)
    message = " ".join(exc.format_message().split())
    return f"{message} (see '{command} --help')"


def _command_path(args: Sequence[str]) -> str:
    """The deepest command ``args`` name: click's option parser raises some usage errors (an
    option missing its value) without the command they belong to."""
    command: Command = typer.main.get_command(app)
    path = ["flowyard"]
    for arg in args:
        sub = command.commands.get(arg) if isinstance(command, TyperGroup) else None
        if sub is None:
            break
        command = sub
        path.append(arg)
    return " ".join(path)


def main() -> None:
    exit_on_user_error(_run, "flowyard")


if __name__ == "__main__":
    main()
