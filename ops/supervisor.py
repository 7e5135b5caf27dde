"""``sidecar up``: run a whole sidecar (and demo peers) as child processes of one command.

Starts an embedded Redis when no ``SIDECAR_REDIS_URL`` is set, then a worker (hosting the router),
beat, optionally Flower on loopback, and the demo peers; prints the cluster status each second; on
Ctrl-C, SIGTERM or the end of ``duration`` stops every child (peers first, so they leave cleanly)
and makes sure none is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from coordinator.keys import Keys
from coordinator.settings import Settings
from ops.embedded import RedisServer, free_port
from ops.report import cluster_report

__all__ = ["Supervisor"]


class Supervisor:
    """Owns the child processes of ``sidecar up``."""

    def __init__(self, settings: Settings, *, peers: bool = True, flower: bool = False,
                 echo: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.with_peers = peers
        self.with_flower = flower
        self.echo = echo
        self.redis: RedisServer | None = None
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-up-"))
        self._stopping = False

    def _env(self, url: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SIDECAR_REDIS_URL"] = url
        env["SIDECAR_NAMESPACE"] = self.settings.namespace
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = self.dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.children.append((name, proc))

    def start(self) -> str:
        """Start everything; returns the Redis URL in use."""
        url = self.settings.redis_url
        if not url:
            self.redis = RedisServer().start()
            url = self.redis.url
            self.echo(f"embedded Redis on {url} (log: {self.redis.log_path})")
        env = self._env(url)
        py = sys.executable
        self._spawn("worker", [py, "-m", "celery", "-A", "workers", "worker", "-P", "solo",
                               "-n", "sidecar@%h", "-l", "info", "--without-mingle",
                               "--without-gossip"], env)
        self._spawn("beat", [py, "-m", "celery", "-A", "workers", "beat", "-l", "info",
                             "-s", str(self.dir / "beat-schedule")], env)
        if self.with_flower:
            port = free_port()
            args = [py, "-m", "celery", "-A", "workers", "flower", "--address=127.0.0.1",
                    f"--port={port}"]
            if self.settings.dashboard_user and self.settings.dashboard_password:
                env = {**env, "FLOWER_BASIC_AUTH":
                       f"{self.settings.dashboard_user}:{self.settings.dashboard_password}"}
            self._spawn("flower", args, env)
            self.echo(f"Flower on http://127.0.0.1:{port}")
        if self.with_peers:
            demo = [py, "-m", "examples.sidecar_conductor"]
            self._spawn("conductor", [*demo, "conductor"], env)
            self._spawn("follower-1", [*demo, "follower", "--nudge-every", "5"], env)
            self._spawn("follower-2", [*demo, "follower"], env)
        self.echo(f"logs in {self.dir}")
        return url

    def run(self, duration: float | None = None) -> int:
        """Start, report each second until stopped, stop. Returns the exit status."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum: int, frame: object) -> None:
            self._stopping = True

        for sig in previous:
            signal.signal(sig, on_signal)
        status = 0
        try:
            url = self.start()
            client = redis.Redis.from_url(url, decode_responses=True)
            keys = Keys(self.settings.namespace)
            deadline = None if duration is None else time.monotonic() + duration
            while not self._stopping and (deadline is None or time.monotonic() < deadline):
                dead = [(n, p) for n, p in self.children if p.poll() is not None]
                if dead:
                    for name, proc in dead:
                        self.echo(f"{name} exited with {proc.returncode}; its log:\n"
                                  f"{self._tail(name)}")
                    status = 1
                    break
                self.echo(self._line(cluster_report(client, keys)))
                time.sleep(min(1.0, max(0.0, (deadline or float("inf")) - time.monotonic())))
            client.close()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    @staticmethod
    def _line(r: dict[str, object]) -> str:
        leader = r["leader_id"]
        leader_text = f"{str(leader)[-6:]}@{r['leader_term']}" if leader else "none"
        return (f"peers={r['cluster_size']} subscriptions={r['active_subscriptions']} "
                f"routed={r['routed']} delivered={r['delivered']} rejected={r['rejected']} "
                f"leader={leader_text} routers={len(r['routers'])}")  # type: ignore[arg-type]

    def _tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop peers first (they leave cleanly), then beat, Flower and the worker, then Redis."""
        order = sorted(self.children, key=lambda c: c[0] in ("worker", "beat", "flower"))
        for name, proc in order:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.echo(f"{name} did not stop in 10s; killing it")
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
            _signal_group(proc, signal.SIGKILL)  # anything its children left behind
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
