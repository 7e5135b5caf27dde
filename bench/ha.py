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

In both, every peer also samples its own ``is_leader`` every 5 ms (:mod:`bench.belief`) and each
scenario returns, under ``belief``, the intervals in which two peers believed they led at once,
each explained (or not) by the member-TTL window (``bench.belief.overlaps``).
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

from bench.belief import BeliefSampler, Interval, Overlap, overlaps
from coordinator.keys import Keys
from coordinator.leases import LeaseToken
from coordinator.settings import Settings

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


def _beliefs(path: Path, peer: str, dead_at: float | None, end: float) -> list[Interval]:
    """The ``is_leader`` intervals a peer wrote; one still open ends at its death (or ``end``)."""
    out: list[Interval] = []
    for record in _lines(path):
        if record.get("belief") == "start":
            out.append(Interval(peer, int(record["term"]), float(record["t"])))
        elif record.get("belief") == "end" and out and out[-1].end is None:
            out[-1].end = float(record["t"])
    if out and out[-1].end is None:
        out[-1].end = dead_at if dead_at is not None else end
    return out


def run_failover(url: str, settings: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """One SIGKILL of the leader among three peers; failover_s, detection_s and ``belief``."""
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
        dead_at = time.monotonic()  # the victim believed nothing after this
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
        procs.close()  # the survivors write the end of what they believe as they stop
        end = time.monotonic()
        intervals = [i for k, f in enumerate(files)
                     for i in _beliefs(f, ids[k], dead_at if k == victim else None, end)]
        ttl = Settings.from_env(procs.env).member_ttl
        label = "failover" + ("_tuned" if settings else "")
        return {"failover_s": failover, "detection_s": detection,
                "belief": _belief_summary(overlaps(label, intervals, ttl, end), intervals)}
    finally:
        procs.close()
        client.close()


def _belief_summary(found: list[Overlap], intervals: list[Interval]) -> dict[str, Any]:
    return {"overlaps": [o.as_dict() for o in found], "intervals": len(intervals),
            "overlap_ms": sum(o.length_ms for o in found),
            "outside_ttl_ms": sum(o.outside_ttl_ms for o in found)}


def _holder_pid(value: str) -> int:
    """The process id in a lease value (``name|pid|nonce``; older beats wrote ``host:pid:nonce``)."""
    token = LeaseToken.parse(value)
    if token is not None:
        return token.pid
    return int(value.split(":")[1])


def run_beat_ha(url: str, settings: dict[str, Any], duration: float = 15.0,
                timeout: float = 30.0) -> dict[str, Any]:
    """Two beats under membership churn; beat_takeover_s, dual_leader_samples and ``belief``."""
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
        intervals: list[Interval] = []
        churn = threading.Thread(target=asyncio.run, args=(_churn(env, duration, stop, intervals),),
                                 daemon=True)
        churn.start()
        time.sleep(duration / 2)  # let churn and elections run on the first beat
        holder = str(client.get(keys.beat_lease) or holder)
        pid = _holder_pid(holder)
        victim = next(b for b in beats if b.pid == pid)
        killed_at = time.monotonic()
        procs.kill(victim)
        _wait(lambda: (client.get(keys.beat_lease) or holder) != holder, timeout,
              "the other beat taking the lease")
        takeover = time.monotonic() - killed_at
        churn.join(duration + timeout)
        if churn.is_alive():
            raise TimeoutError("the churning peers did not finish")
        stop.set()
        sampler.join(5)
        end = time.monotonic()
        ttl = Settings.from_env(env).member_ttl
        return {"beat_takeover_s": takeover, "dual_leader_samples": float(stats["violations"]),
                "leader_samples": float(stats["samples"]), "leader_terms_seen": float(stats["terms"]),
                "belief": _belief_summary(overlaps("churn", intervals, ttl, end), intervals)}
    finally:
        stop.set()
        procs.close()
        client.close()


async def _churn(env: dict[str, str], duration: float, stop: threading.Event,
                 intervals: list[Interval]) -> None:
    """Peers join, leave gracefully, or vanish (link closed without leaving) for ``duration``.

    Every peer's ``is_leader`` is sampled all along; the intervals are appended to ``intervals``.
    """
    from mixin import Agent, SidecarMixin

    class Churner(Agent, SidecarMixin):
        pass

    settings = Settings.from_env(env)
    live: list[Churner] = []
    every: list[Churner] = []
    sampler = BeliefSampler(lambda: [(peer.id, peer) for peer in every])
    sampled = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(sampled))
    try:
        await _churn_peers(Churner, settings, duration, stop, live, every)
    finally:
        sampled.set()
        await sampling
        intervals.extend(sampler.intervals)


async def _churn_peers(kind: Any, settings: Settings, duration: float, stop: threading.Event,
                       live: list[Any], every: list[Any]) -> None:
    end = time.monotonic() + duration
    i = 0
    while time.monotonic() < end and not stop.is_set():
        peer = kind(namespace=settings.namespace, settings=settings, priority=i % 3)
        every.append(peer)
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
