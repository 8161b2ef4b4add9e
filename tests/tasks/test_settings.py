"""Settings come from FLOWYARD_* variables and .env, with clear errors for bad values."""

from __future__ import annotations

import pytest

from tasks.errors import UserError
from tasks.settings import Settings, get_settings


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    for name in ("FLOWYARD_DATABASE_URL", "FLOWYARD_HOME", "FLOWYARD_PG_PORT", "FLOWYARD_PREFECT_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_defaults_mean_embedded(clean_env):
    settings = get_settings()
    assert settings.database_url is None
    assert settings.pgdata == clean_env / ".flowyard" / "pg"
    assert settings.prefect_api_url == "http://127.0.0.1:4200/api"


def test_env_file_and_env_precedence(clean_env, monkeypatch):
    (clean_env / ".env").write_text(
        "FLOWYARD_DATABASE_URL=postgres://u:pw@db.example:5433/app\nFLOWYARD_PG_PORT=6000\n"
    )
    settings = Settings()
    assert settings.database_url == "postgresql://u:pw@db.example:5433/app"
    assert settings.pg_port == 6000
    monkeypatch.setenv("FLOWYARD_PG_PORT", "6001")
    assert Settings().pg_port == 6001


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FLOWYARD_DATABASE_URL", "mysql://root@localhost/app", "not a PostgreSQL URL"),
        ("FLOWYARD_DATABASE_URL", "postgresql://localhost", "not a PostgreSQL URL"),
        ("FLOWYARD_PG_PORT", "not-a-port", "invalid FLOWYARD_PG_PORT"),
    ],
)
def test_bad_values_are_one_line_user_errors(clean_env, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=message) as info:
        get_settings()
    assert "\n" not in str(info.value)


def test_password_never_echoed(clean_env, monkeypatch):
    monkeypatch.setenv("FLOWYARD_DATABASE_URL", "mysql://root:s3cret@localhost/app")
    with pytest.raises(UserError) as info:
        get_settings()
    assert "s3cret" not in str(info.value)
