"""A fault-injecting TCP proxy for tests: forwards a port to another, and on ``cut()`` drops
every connection and refuses new ones until ``restore()`` — the network fails, the broker
behind it keeps its data."""

from __future__ import annotations

import contextlib
import socket
import threading


class FaultProxy:
    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.listen = (host, listen_port)
        self.target = (host, target_port)
        self._cut = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(self.listen, reuse_port=False)
        self._closed = False

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, daemon=True, name="faultproxy").start()
        return self

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            _close(c)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._server)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._cut.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)  # the timeout was for connecting; reads may idle
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
