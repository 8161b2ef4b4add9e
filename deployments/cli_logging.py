"""Console logging for CLI commands that run flows in-process: Prefect's log lines, without tracebacks.

A failed run raises its error to the CLI, which prints it as one line; Prefect's console
handler would also print the full traceback of every failed task and flow. The Prefect API
still receives the tracebacks (the UI shows them); only the terminal is spared.
"""

from __future__ import annotations

import logging


class _WithoutTraceback(logging.Formatter):
    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(record.__dict__)
        copy.exc_info, copy.exc_text, copy.stack_info = None, None, None
        return self.inner.format(copy)


def console_without_tracebacks() -> None:
    """Configure Prefect logging now and strip tracebacks from its console handlers."""
    from prefect.logging.configuration import setup_logging

    setup_logging()
    # Prefect's background senders warn "Still processing items" while they drain at exit,
    # which would print after the run's one-line error; they still drain, so only the noise goes.
    for service in ("EventsWorker", "APILogWorker"):
        logging.getLogger(service).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not isinstance(
            handler.formatter, _WithoutTraceback
        ):
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))
