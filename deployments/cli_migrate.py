"""``flowyard migrate``: versioned Alembic deploys with backup, validation and restore."""

from __future__ import annotations

import typer

app = typer.Typer(help="Versioned migrations: deploy, status, rollback.", no_args_is_help=True)
