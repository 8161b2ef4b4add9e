"""A PostgreSQL that goes away for a while, as a restart or a failover makes it, without stopping
the session's server (the Prefect server and every other test use it): a TCP proxy in front of
it that a test can cut. During an outage every connection through the proxy is dropped and new
ones are closed as they come, as by a server that is down; afterwards it forwards again."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlsplit


class OutageProxy:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._down = threading.Event()
        self.port = self._listen(0)
        self.url = parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{self.port}")).geturl()

    def _listen(self, port: int) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return int(listener.getsockname()[1])

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: an outage, or the end
                return
            if self._down.is_set():
                _reset(client)
                continue
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        with self._lock:
            self._sockets -= {source, sink}

    def cut(self) -> None:
        """The server goes away: connections drop, new ones are closed at once."""
        self._down.set()
        self._drop_connections()

    def restore(self) -> None:
        """The server is back."""
        self._down.clear()

    @contextmanager
    def outage(self, seconds: float) -> Iterator[None]:
        """The block runs at the start of an outage of ``seconds``, which ends when it is over."""
        self.cut()
        ends = time.monotonic() + seconds
        try:
            yield
        finally:
            time.sleep(max(0.0, ends - time.monotonic()))
            self.restore()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._drop_connections()

    def _drop_connections(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes its pipe threads, which close it


def _reset(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextmanager
def outage_proxy(url: str) -> Iterator[OutageProxy]:
    proxy = OutageProxy(url)
    try:
        yield proxy
    finally:
        proxy.close()
