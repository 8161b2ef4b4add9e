"""The embedded PostgreSQL: start, reuse, stop — on a real data directory."""

from __future__ import annotations

import psycopg
import pytest

from tasks.embedded_pg import EmbeddedPostgres, free_port
from tasks.errors import UserError


def test_start_reuse_stop(tmp_path):
    server = EmbeddedPostgres(tmp_path / "pg", free_port())
    assert server.start() is True
    try:
        with psycopg.connect(server.url()) as conn:
            first_pid = conn.execute("SELECT pg_backend_pid()").fetchone()
            version = conn.info.server_version
        assert first_pid and version >= 180000
        postmaster = (tmp_path / "pg" / "postmaster.pid").read_text().split()[0]

        # A second handle on the same data directory (even with another port) reuses the running server.
        again = EmbeddedPostgres(tmp_path / "pg", free_port())
        assert again.start() is False
        assert again.url() == server.url()
        assert (tmp_path / "pg" / "postmaster.pid").read_text().split()[0] == postmaster
    finally:
        assert server.stop() is True
    assert not server.is_running()
    assert server.stop() is False
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url(), connect_timeout=2)

    # Data survives a restart.
    server.start()
    try:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
        server.stop()
        server.start()
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
    finally:
        server.stop()


def test_busy_port_is_a_clear_error(tmp_path, pg):
    clash = EmbeddedPostgres(tmp_path / "pg", pg.running_port())
    with pytest.raises(UserError, match="is taken by another program"):
        clash.start()


def test_stop_after_parent_permissions_were_reset(tmp_path):
    """pytest (and umask-happy tools) may make a parent 0700 again while the server runs."""
    parent = tmp_path / "home"
    server = EmbeddedPostgres(parent / "pg", free_port())
    server.start()
    parent.chmod(0o700)
    tmp_path.chmod(0o700)
    assert server.stop() is True
    assert server.start() is True
    assert server.stop() is True
