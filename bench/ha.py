"""Failover figures: leader failover and detection after SIGKILL, beat takeover, dual-leader checks.

Each scenario starts its own worker, beat(s) and peer processes on the run's Redis, in a namespace
of its own, and stops them all before returning.

- ``run_failover``: three peers; SIGKILL the leader's process; ``failover_s`` is the time until every
  survivor saw a new leader with a higher term, ``detection_s`` until the first survivor received
  ``cluster.member.left`` for it.
- ``run_beat_ha``: two beats while peers join, leave and vanish; a sampler reads the leader record
  every 10 ms and counts samples where the term went backwards or one term named two leaders
  (``dual_leader_samples``); midway the dispatching beat is SIGKILLed and ``beat_takeover_s`` is the
  time until the other holds the beat lease.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from coordinator.keys import Keys

__all__ = ["run_beat_ha", "run_failover"]

ROOT = Path(__file__).resolve().parent.parent


class _Procs:
    """Child processes of one scenario, each in its own session so a kill reaches its children."""

    def __init__(self, url: str, namespace: str, settings: dict[str, Any]) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.env.update(SIDECAR_REDIS_URL=url, SIDECAR_NAMESPACE=namespace, PYTHONUNBUFFERED="1")
        self.env.update({f"SIDECAR_{k.upper()}": str(v) for k, v in settings.items()})
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-bench-ha-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"p{len(self.procs)}.log", "wb")  # noqa: SIM115 (child owns it)
        proc = subprocess.Popen([sys.executable, *args], env=self.env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def worker(self) -> subprocess.Popen[bytes]:
        return self.spawn("-m", "celery", "-A", "workers", "worker", "-P", "solo", "-l", "warning",
                          "-n", f"ha-{uuid.uuid4().hex[:4]}@%h", "--without-mingle",
                          "--without-gossip")

    def beat(self) -> subprocess.Popen[bytes]:
        return self.spawn("-m", "celery", "-A", "workers", "beat", "-l", "warning",
                          "-s", str(self.dir / f"beat-{uuid.uuid4().hex[:4]}"))

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):  # peers first, then beats and workers
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise TimeoutError(f"timed out waiting for {what}")


def run_failover(url: str, settings: dict[str, Any], timeout: float = 60.0) -> dict[str, float]:
    """One SIGKILL of the leader among three peers; returns failover_s and detection_s."""
    namespace = f"bench-ha-{uuid.uuid4().hex[:6]}"
    procs = _Procs(url, namespace, settings)
    client = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys(namespace)
    try:
        procs.worker()
        procs.beat()
        files = [procs.dir / f"peer{i}.jsonl" for i in range(3)]
        peers = [procs.spawn("-m", "bench.ha_peer", str(f)) for f in files]

        def settled() -> tuple[str, int] | None:
            leader, term = (str(v) if v is not None else None
                            for v in client.hmget(keys.leader, "id", "term"))
            if not leader:
                return None
            views = [[r for r in _lines(f) if "leader" in r] for f in files]
            if all(v and v[-1]["leader"] == leader for v in views):
                return str(leader), int(term or 0)
            return None

        old, old_term = _wait(settled, timeout, "three peers agreeing on a leader")
        ids = [next(r["ready"] for r in _lines(f) if "ready" in r) for f in files]
        victim = ids.index(old)
        killed_at = time.monotonic()
        procs.kill(peers[victim])
        survivors = [f for i, f in enumerate(files) if i != victim]

        def seen_new() -> list[float] | None:
            times = []
            for f in survivors:
                hit = [r["t"] for r in _lines(f) if "leader" in r and r["t"] > killed_at
                       and r["leader"] not in (None, old) and r["term"] > old_term]
                if not hit:
                    return None
                times.append(hit[0])
            return times

        failover = max(_wait(seen_new, timeout, "every survivor seeing a new leader")) - killed_at

        def left() -> float | None:
            hits = [r["t"] for f in survivors for r in _lines(f) if r.get("left") == old]
            return min(hits) if hits else None

        detection = _wait(left, timeout, "cluster.member.left for the old leader") - killed_at
        return {"failover_s": failover, "detection_s": detection}
    finally:
        procs.close()
        client.close()


def run_beat_ha(url: str, settings: dict[str, Any], duration: float = 15.0,
                timeout: float = 30.0) -> dict[str, float]:
    """Two beats under membership churn; returns beat_takeover_s and dual_leader_samples."""
    namespace = f"bench-beat-{uuid.uuid4().hex[:6]}"
    procs = _Procs(url, namespace, settings)
    client = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys(namespace)
    stop = threading.Event()
    stats = {"samples": 0, "violations": 0, "terms": 0}

    def sample() -> None:
        sampler = redis.Redis.from_url(url, decode_responses=True)
        by_term: dict[int, str] = {}
        last = 0
        while not stop.is_set():
            leader, term = (str(v) if v is not None else "" for v in sampler.hmget(keys.leader, "id", "term"))
            t = int(term or 0)
            stats["samples"] += 1
            if t < last or (t in by_term and by_term[t] != (leader or "")):
                stats["violations"] += 1
            by_term.setdefault(t, leader or "")
            last = max(last, t)
            stop.wait(0.01)
        stats["terms"] = len(by_term)
        sampler.close()

    try:
        procs.worker()
        beats = [procs.beat(), procs.beat()]
        holder = _wait(lambda: client.get(keys.beat_lease), timeout, "a beat holding the lease")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        env = dict(procs.env)
        churn = threading.Thread(target=asyncio.run, args=(_churn(env, duration, stop),), daemon=True)
        churn.start()
        time.sleep(duration / 2)  # let churn and elections run on the first beat
        holder = str(client.get(keys.beat_lease) or holder)
        pid = int(holder.split(":")[1])
        victim = next(b for b in beats if b.pid == pid)
        killed_at = time.monotonic()
        procs.kill(victim)
        _wait(lambda: (client.get(keys.beat_lease) or holder) != holder, timeout,
              "the other beat taking the lease")
        takeover = time.monotonic() - killed_at
        churn.join(duration + timeout)
        stop.set()
        sampler.join(5)
        return {"beat_takeover_s": takeover, "dual_leader_samples": float(stats["violations"]),
                "leader_samples": float(stats["samples"]), "leader_terms_seen": float(stats["terms"])}
    finally:
        stop.set()
        procs.close()
        client.close()


async def _churn(env: dict[str, str], duration: float, stop: threading.Event) -> None:
    """Peers join, leave gracefully, or vanish (link closed without leaving) for ``duration``."""
    from coordinator.settings import Settings
    from mixin import Agent, SidecarMixin

    class Churner(Agent, SidecarMixin):
        pass

    settings = Settings.from_env(env)
    live: list[Churner] = []
    end = time.monotonic() + duration
    i = 0
    while time.monotonic() < end and not stop.is_set():
        peer = Churner(namespace=settings.namespace, settings=settings, priority=i % 3)
        await peer.setup()
        live.append(peer)
        if len(live) > 4:
            gone = live.pop(0)
            if i % 2:
                await gone.teardown()
            else:  # vanish: stop heartbeating without leaving, so the sweep must notice
                link, gone._link = gone._link, None
                if link is not None:
                    await link.close(leave=False)
        i += 1
        await asyncio.sleep(0.25)
    for peer in live:
        await peer.teardown()
