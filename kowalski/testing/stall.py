"""A TCP relay between a client and a real server whose replies a test can hold back: the way to
make "the server did not answer in time" happen on any machine, however fast, without a query
whose cost depends on the CPU it runs on.

    with StallingRelay("127.0.0.1", 27017) as relay:
        uri = relay.mongodb_uri(original_uri)
        ...                              # connect through the relay, warm up
        with relay.held():
            ...                          # the server's replies wait here until the block ends
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

CHUNK = 65536


class StallingRelay:
    """Listens on a free port of 127.0.0.1 and relays every connection to `host:port`; while
    `held()`, bytes from the server are kept (not dropped) and flow again when it ends."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> StallingRelay:
        self._spawn(self._accept)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.flowing.clear()
        try:
            yield
        finally:
            self.flowing.set()

    def mongodb_uri(self, uri: str) -> str:
        """`uri` (a single-host or replica-set URI) through the relay: its first host replaced by
        the relay, with directConnection so the driver does not discover the members and bypass
        the relay."""
        parts = urlsplit(uri)
        credentials, _, _hosts = parts.netloc.rpartition("@")
        netloc = (credentials + "@" if credentials else "") + f"127.0.0.1:{self.port}"
        query = "&".join(
            p
            for p in parts.query.split("&")
            if p and not p.lower().startswith(("replicaset=", "directconnection="))
        )
        query = (query + "&" if query else "") + "directConnection=true"
        return urlunsplit((parts.scheme, netloc, parts.path or "/", query, parts.fragment))

    def close(self) -> None:
        self.closed.set()
        self.flowing.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        for sock in list(self.sockets):
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self.threads:
            thread.join(timeout=5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self.sockets += [client, server]
            self._spawn(self._pump, client, server, False)
            self._spawn(self._pump, server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while not self.closed.is_set():
                ready, _, _ = select.select([source], [], [], 0.2)
                if not ready:
                    continue
                if from_server:
                    self.flowing.wait()
                data = source.recv(CHUNK)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
