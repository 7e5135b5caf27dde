"""A TCP proxy between a client and Redis that cuts connections at the worst moments.

``FaultProxy(target_port)`` listens on a free loopback port and forwards every byte both ways.
Arm it to cut one connection:

* ``cut_after_command(b"XADD")``: the next client chunk holding that command is forwarded to
  Redis (so the command runs), then the reply is swallowed and both sockets close: the client
  never learns that its command ran.
* ``cut_before_command(b"XADD")``: the next client chunk holding that command is dropped and the
  connection closes: the command never reaches Redis.

Each arming cuts once; ``cuts`` counts the cuts made. Commands are matched on the RESP bulk string
(``$4\\r\\nXADD``), so a payload that merely contains the word does not trip it.

``sever()`` cuts every connection and refuses new ones until ``heal()``: a network partition
between the client and its server (any TCP protocol: the NATS tests put one before NATS).
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["FaultProxy"]


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port``; see the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._arms: list[tuple[str, bytes]] = []
        self.cuts = 0
        self._closed = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut_after_command(self, command: bytes, times: int = 1) -> None:
        """Let the next ``times`` chunks holding ``command`` run, but never answer them."""
        with self._lock:
            self._arms += [("after", _bulk(command))] * times

    def cut_before_command(self, command: bytes, times: int = 1) -> None:
        """Drop the next ``times`` chunks holding ``command`` before they reach Redis."""
        with self._lock:
            self._arms += [("before", _bulk(command))] * times

    @property
    def armed(self) -> int:
        with self._lock:
            return len(self._arms)

    def sever(self) -> None:
        """Cut every connection now and refuse new ones until :meth:`heal` (the port stops
        listening, as a server that cannot be reached)."""
        _close(self._listener)  # shutdown first: a bare close does not wake a blocked accept()
        for conn in list(self._conns):
            _close(conn)
        self._conns.clear()

    def heal(self) -> None:
        """Listen on the same port again."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.close()

    # ------------------------------------------------------------------ internals
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns += [client, server]
            state = {"swallow": False}
            threading.Thread(target=self._upstream, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, state), daemon=True).start()

    def _take_arm(self, chunk: bytes) -> str | None:
        with self._lock:
            for i, (mode, needle) in enumerate(self._arms):
                if needle in chunk.upper():
                    del self._arms[i]
                    self.cuts += 1
                    return mode
        return None

    def _upstream(self, client: socket.socket, server: socket.socket, state: dict[str, bool]) -> None:
        try:
            while True:
                chunk = client.recv(1 << 16)
                if not chunk:
                    break
                mode = self._take_arm(chunk) if self._arms else None
                if mode == "before":
                    break
                if mode == "after":
                    state["swallow"] = True  # before forwarding, so its reply cannot slip through
                server.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket, state: dict[str, bool]) -> None:
        try:
            while True:
                chunk = server.recv(1 << 16)
                if not chunk or state["swallow"]:
                    break
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(client, server)


def _bulk(command: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(command), command.upper())


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
