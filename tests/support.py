"""Helpers the suite shares: waiting on conditions and running real sidecar processes.

Every process a test starts goes through :class:`Processes`, which kills whatever is left at the end
of the test, so no worker, beat or peer outlives it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from mixin import Agent, SidecarMixin

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


class Peer(Agent, SidecarMixin):
    """A peer with nothing but the mixin (its status section is ``peer``)."""


class P(Agent, SidecarMixin):
    """The smallest peer application (its status section is ``p``)."""


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
             what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_for(condition: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0,
                         interval: float = 0.01, what: str = "condition") -> Any:
    """Async :func:`wait_for`; ``condition`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


TEST_PEER_KEY = "peer-key-of-the-test-suite-0123456789abcdef"
"""The key the suite's peer secrets derive from (SIDECAR_PEER_KEY of its workers and CLI runs)."""


def sidecar_env(redis_url: str, namespace: str, **extra: Any) -> dict[str, str]:
    """Environment for a sidecar process: ``extra`` keys become ``SIDECAR_<KEY>`` (with the
    suite's peer key unless given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["SIDECAR_REDIS_URL"] = redis_url
    env["SIDECAR_NAMESPACE"] = namespace
    env["SIDECAR_PEER_KEY"] = TEST_PEER_KEY
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in extra.items():
        env[f"SIDECAR_{key.upper()}"] = str(value)
    return env


class Processes:
    """Starts real processes for one test and kills all of them when it ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-test-"))

    def start(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        log = self.dir / f"{name}-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def worker(self, env: dict[str, str], name: str = "w1", *args: str) -> subprocess.Popen[bytes]:
        """``celery -A workers worker`` (one pool process, solo mode keeps it light)."""
        cmd = [str(VENV_BIN / "celery"), "-A", "workers", "worker", "-n", f"{name}@%h",
               "-P", "solo", "-l", "info", "--without-mingle", "--without-gossip", *args]
        return self.start(cmd, env, name)

    def beat(self, env: dict[str, str], name: str = "beat") -> subprocess.Popen[bytes]:
        """``celery -A workers beat`` with its schedule file in a private folder."""
        sched = self.dir / f"{name}-schedule"
        cmd = [str(VENV_BIN / "celery"), "-A", "workers", "beat", "-l", "info", "-s", str(sched)]
        return self.start(cmd, env, name)

    def python(self, env: dict[str, str], name: str, *args: str) -> subprocess.Popen[bytes]:
        """``python <args>`` with this interpreter (peer scripts)."""
        return self.start([sys.executable, *args], env, name)

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """Everything ``proc`` printed so far."""
        return self.logs[proc.pid].read_text(errors="replace")

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process and its children; wait if it ends it."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    continue
                self.kill(proc, signal.SIGTERM)


def request_entry(client: Any, stream: str, message_id: str) -> dict[str, str]:
    """The fields of the request entry that carried publish ``message_id`` ({} if trimmed away)."""
    for _, fields in client.xrevrange(stream, count=1000):
        if fields.get("i") == message_id:
            return dict(fields)
    return {}


def serve_http(server: Any) -> Iterator[str]:
    """Serve ``server`` (an http.server) from a thread; yields its base URL, then shuts it down."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
