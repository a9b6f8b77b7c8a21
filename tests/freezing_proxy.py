"""A TCP proxy on a loopback port whose path can be dropped in silence, as a failed network link drops it."""

from __future__ import annotations

import socket
import threading


class FreezingProxy:
    """A TCP proxy on a loopback port for one connection to `port`, whose `freeze()` drops the path in
    silence, as a failed network link does: nothing more is forwarded either way and no connection is
    closed; what the server sends is read and dropped, and `server_closed` is set when the server closes
    its side."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.frozen = threading.Event()
        self.server_closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.target))
        self._sockets += [client, upstream]
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while data := source.recv(65536):
                if not self.frozen.is_set():
                    sink.sendall(data)
        except OSError:
            return
        if from_server:
            self.server_closed.set()
