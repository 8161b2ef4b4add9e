"""One settings object for flowyard, read from ``FLOWYARD_*`` environment variables and ``.env``.

With no ``FLOWYARD_DATABASE_URL`` flowyard runs everything on its embedded PostgreSQL,
started on demand under ``FLOWYARD_HOME`` (default ``./.flowyard``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWYARD_", env_file=".env", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL >= 14 URL for flowyard's own state. Unset: the embedded server.",
    )
    home: Path = Field(default=Path(".flowyard"), description="Project-local runtime directory.")
    pg_port: int = Field(default=54329, description="TCP port of the embedded PostgreSQL (127.0.0.1).")
    prefect_port: int = Field(default=4200, description="Port of the Prefect API server and UI.")
    prefect_database: str = Field(default="prefect", description="Database that holds Prefect's own state.")
    max_workers: int = Field(
        default=4, ge=1, description="Default bound for Prefect thread-pool task runners."
    )
    zombie_window_seconds: int = Field(
        default=90,
        description="Seconds without a heartbeat after which flowyard's Prefect server marks a flow run "
        "Crashed (tasks.prefect_runtime.keep_zombie_automation); 0: no such automation.",
    )

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        from tasks.db import validate_postgres_url

        return validate_postgres_url(value)

    @field_validator("zombie_window_seconds")
    @classmethod
    def _check_zombie_window(cls, value: int) -> int:
        """A window under two heartbeats (30 s apart) would mark live runs Crashed whenever one
        heartbeat is late."""
        if value != 0 and value < 60:
            raise ValueError(f"{value} is neither 0 (off) nor at least 60 (two 30 s flow-run heartbeats)")
        return value

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def pgdata(self) -> Path:
        return self.home_dir / "pg"

    @property
    def run_dir(self) -> Path:
        return self.home_dir / "run"

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call ``get_settings.cache_clear()`` after changing the env."""
    from pydantic import ValidationError

    from tasks.errors import UserError, validation_problem

    try:
        return Settings()
    except ValidationError as exc:
        field, problem = validation_problem(exc)
        raise UserError(f"invalid FLOWYARD_{(field or 'settings').upper()}: {problem}") from None
