"""A bulk run's failure record: written when the target takes it, never in the way of why the run stopped."""

from __future__ import annotations

import pytest

from tasks.chunk_checkpoint import failure_recorded
from tasks.embedded_pg import free_port


@pytest.mark.parametrize("stop", [ValueError("the copy's own error"), KeyboardInterrupt()])
def test_the_runs_own_error_goes_on_when_the_target_refuses_the_failure_record(stop: BaseException) -> None:
    """The target refusing the record's connection (nothing listens at its port here, as with a
    server that went down with the run) raised flowyard's ConnectionUnavailable, which is not a
    ``psycopg.Error``, in place of the run's own error or Ctrl-C."""
    gone = f"postgresql://postgres@127.0.0.1:{free_port()}/flowyard"
    with pytest.raises(type(stop)) as raised, failure_recorded(gone, "run-1"):
        raise stop
    assert raised.value is stop
