"""The servers one benchmark run owns: a private Redis and one Celery worker per namespace.

Each scenario gets its own namespace and its own ``celery -A workers worker -P solo`` process (its
bootstep hosts the router for that namespace; its solo pool runs the Celery anchor's tasks), except
the scenarios of ``WORKER_APPS``, whose worker runs another app: ``celery_default`` runs
:mod:`bench.celery_default` (Celery's default configuration). Workers learn their Redis and
namespace from ``SIDECAR_REDIS_URL`` and ``SIDECAR_NAMESPACE``; nothing here imports ``workers``.
Every process is started here and stopped here, by its own handle, when the run ends.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

import redis

from bench.celery_default import ready_key
from coordinator.keys import Keys
from ops.embedded import RedisServer

__all__ = ["BENCH_PEER_KEY", "SCENARIO_ENV", "WORKER_APPS", "Services"]

BENCH_PEER_KEY = secrets.token_urlsafe(32)
"""The peer key of this run's secure scenario (its identities' secrets derive from it)."""
SCENARIO_ENV = {"secure": {"SIDECAR_AUTH": "required", "SIDECAR_ENFORCE_POLICY": "1",
                           "SIDECAR_PEER_KEY": BENCH_PEER_KEY},
                "routed": {"SIDECAR_DATA_PATH": "routed"}}
"""Settings a scenario's worker runs with beyond the defaults."""
WORKER_APPS = {"celery_default": "bench.celery_default"}
"""Scenarios whose worker runs an app other than the sidecar's (``-A workers``); no router."""

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent


class Services:
    """Redis plus one worker per scenario name; ``namespace(name)`` is that scenario's namespace."""

    def __init__(self, scenarios: list[str]) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.scenarios = scenarios
        self.redis = RedisServer()
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """Redis URL (loopback)."""
        return self.redis.url

    def namespace(self, scenario: str) -> str:
        """The namespace of ``scenario`` in this run."""
        return f"bench-{self.tag}-{scenario}"

    def client(self) -> redis.Redis:
        """A new sync client of the run's Redis."""
        return redis.Redis.from_url(self.url, decode_responses=True)

    def start(self, timeout: float = 30.0) -> Services:
        """Start Redis and every worker; return once each worker's router holds its lease."""
        self.redis.start()
        for name in self.scenarios:
            self.workers[name] = self._worker(name)
        client = self.client()
        deadline = time.monotonic() + timeout
        try:
            for name in self.scenarios:
                lease = (ready_key(self.namespace(name)) if name in WORKER_APPS
                         else Keys(self.namespace(name)).router_lease(0))
                while not client.exists(lease):
                    proc = self.workers[name]
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"worker for {name!r} did not start routing; its log:\n"
                                           f"{self.log_tail(name)}")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()
        return self

    def _worker(self, name: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env.update(SIDECAR_REDIS_URL=self.url, SIDECAR_NAMESPACE=self.namespace(name),
                   PYTHONUNBUFFERED="1", **SCENARIO_ENV.get(name, {}))
        celery = Path(sys.executable).parent / "celery"
        app = WORKER_APPS.get(name, "workers")
        cmd = [str(celery), "-A", app, "worker", "-n", f"bench-{name}@%h", "-P", "solo",
               "-l", "warning", "--without-mingle", "--without-gossip"]
        with open(self.dir / f"worker-{name}.log", "wb") as out:
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=ROOT)

    def cpu_seconds(self, scenario: str | None = None, part: str = "router") -> dict[str, float]:
        """CPU seconds used so far by Redis and (given ``scenario``) that scenario's worker process.

        The worker's figure is named ``part``: ``router`` in the route scenarios (its Celery pool
        idles), ``worker`` in the Celery anchors; read from ``/proc``, so it is missing off Linux.
        """
        client = self.client()
        try:
            info = client.info("cpu")
        finally:
            client.close()
        out = {"redis": float(info["used_cpu_sys"]) + float(info["used_cpu_user"])}
        proc = self.workers.get(scenario or "")
        if proc is not None:
            try:
                stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[part] = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return out

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The end of worker ``name``'s log."""
        path = self.dir / f"worker-{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop every worker (warm shutdown, then kill), then Redis."""
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        for name, proc in self.workers.items():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                log.warning("worker %s ignored SIGTERM; killing pid %s", name, proc.pid)
                proc.kill()
                proc.wait(5)
        self.workers.clear()
        self.redis.stop()

    def __enter__(self) -> Services:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
