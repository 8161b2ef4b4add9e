"""The REST trigger helper (``deployments.trigger``) refusing parameters before any request."""

from __future__ import annotations

import socket

import pytest

from deployments.trigger import create_flow_run
from tasks.errors import UserError


def test_text_postgresql_cannot_store_is_one_line_before_any_request() -> None:
    """The Prefect server answered a NUL (jsonb refuses \\u0000) with a 500 its client retried for
    minutes; a surrogate was a UnicodeEncodeError from httpx, and NaN its ValueError. The API URL is a socket that listens
    but never answers: a request would hang on it and leave a connection to accept, so the check
    must have run before any."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.setblocking(False)
        api = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        with pytest.raises(UserError) as refused:
            create_flow_run(api, "agent-task-create", "agent-task-create", {"title": "a\x00b"})
        assert str(refused.value) == (
            'agent-task-create: parameter title is "a\\u0000b": a NUL character (\\u0000), which PostgreSQL'
            " cannot store; remove it"
        )
        with pytest.raises(UserError) as refused:
            create_flow_run(api, "run-agent-queue", "hourly", {"agents": [{"env": {"K\ud800": "v"}}], "n\x00": 1})
        assert str(refused.value) == (
            'run-agent-queue: parameter name "n\\u0000": a NUL character (\\u0000), which PostgreSQL cannot store;'
            ' rename the parameter; parameter agents.0.env has the key "K\\ud800": a surrogate (\\ud800, half of'
            " a character in UTF-16), which is not UTF-8 text; rename the key"
        )
        with pytest.raises(UserError) as refused:  # httpx raised ValueError, after a first request
            create_flow_run(api, "agent-task-create", "agent-task-create", {"payload": {"loss": float("nan")}})
        assert str(refused.value) == (
            "agent-task-create: parameter payload.loss is NaN: not a finite number, which JSON cannot hold (the"
            " flow run would record null); give a finite number"
        )
        with pytest.raises(BlockingIOError):
            silent.accept()  # nobody connected
