"""Two beats for half a minute while peers join, leave and die: one leader per term throughout,
and when the dispatching beat is SIGKILLed the other takes the lease and the duties go on.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from coordinator.keys import Keys
from coordinator.leases import LeaseToken
from tests.e2e.election_peer import PeerHandle, leader_record, members, start_peer, start_sidecar, stop_all
from tests.support import Processes, sidecar_env, wait_for

CHURN_SECONDS = 30.0
FAST = {"heartbeat_interval": 0.2, "member_ttl": 0.6, "beat_lease": 1.0}


@pytest.fixture(autouse=True)
def _stop_peers_first(procs: Processes) -> Iterator[None]:
    yield
    stop_all(procs)


class LeaderChecker(threading.Thread):
    """Samples the leader record every 10 ms and keeps every breach of the election's promises:
    the term never goes backwards, and one term never names two leaders.
    """

    def __init__(self, redis_url: str, namespace: str) -> None:
        super().__init__(name="leader-checker", daemon=True)
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.key = Keys(namespace).leader
        self.samples = 0
        self.by_term: dict[int, str] = {}
        self.violations: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        last = 0
        try:
            while not self.halt.is_set():
                record = self.client.hgetall(self.key)
                term, leader = int(record.get("term", 0)), record.get("id", "")
                self.samples += 1
                if term < last:
                    self.violations.append(f"term went back from {last} to {term}")
                if self.by_term.setdefault(term, leader) != leader:
                    self.violations.append(f"term {term} named {self.by_term[term]} then {leader}")
                last = max(last, term)
                self.halt.wait(0.01)
        finally:
            self.client.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


def beat_pid(client: redis.Redis, namespace: str) -> int:
    """Pid of the beat holding the dispatch lease (its value is a LeaseToken), 0 for none."""
    token = LeaseToken.parse(client.get(Keys(namespace).beat_lease))
    return token.pid if token is not None else 0


@pytest.mark.slow
def test_two_beats_under_churn_keep_one_leader_and_take_over(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    env = sidecar_env(redis_url, namespace, **FAST)
    keys = Keys(namespace)
    started = start_sidecar(procs, env, client, beats=("beat1", "beat2"))
    beats = {started[n].pid: started[n] for n in ("beat1", "beat2")}
    assert beat_pid(client, namespace) in beats

    checker = LeaderChecker(redis_url, namespace)
    checker.start()
    try:
        live: list[PeerHandle] = [start_peer(procs, env, client, f"peer{i}") for i in range(3)]
        everyone = list(live)
        killed: list[str] = []
        left: list[str] = []
        takeover = eviction = None
        begin = time.monotonic()
        i = 0
        while time.monotonic() - begin < CHURN_SECONDS:
            i += 1
            live.append(start_peer(procs, env, client, f"churn{i}"))
            everyone.append(live[-1])
            if takeover is None and time.monotonic() - begin > CHURN_SECONDS / 2:
                takeover, eviction = kill_the_dispatching_beat(procs, client, namespace, beats, live)
            # The oldest peer usually leads (oldest ULID wins), so this keeps the leadership moving.
            victim = live.pop(0)
            if i % 3 == 0:
                procs.kill(victim.proc)
                killed.append(victim.id)
            else:
                victim.leave()
                left.append(victim.id)
    finally:
        checker.stop()

    assert takeover is not None and eviction is not None
    print(f"\n{i} churn rounds, {len(killed)} peers killed, {len(left)} left, "
          f"{len(checker.by_term)} terms seen in {checker.samples} samples; beat takeover "
          f"{takeover:.2f}s; leader killed after the takeover evicted in {eviction:.2f}s")
    assert not checker.violations, checker.violations
    # What the peers believed agrees too: no two peers ever saw different leaders for one term,
    # nor a leader the record never named for that term.
    seen = dict(checker.by_term)
    for peer in everyone:
        for e in peer.events("leader"):
            assert seen.setdefault(e["term"], e["leader"] or "") == (e["leader"] or ""), (peer, e)
    assert checker.samples > CHURN_SECONDS * 20  # the 10 ms sampler really sampled
    assert len(checker.by_term) >= 5, checker.by_term
    # how long the takeover and the eviction took is measured by `make bench` (beat_takeover_s,
    # failover_s); here it matters that they happened, by whom, and in order (see
    # kill_the_dispatching_beat)
    # Every peer that died without leaving was evicted, every one that left is gone, and the
    # live peers (still heartbeating through all of it) agree with the leader record.
    gone = set(killed) | set(left)
    wait_for(lambda: not gone & members(client, namespace), 5, what="dead peers to be evicted")
    assert {live_peer.id for live_peer in live} <= members(client, namespace)
    record = wait_for(lambda: agreement(live, client, namespace), 10, what="live peers to agree")
    assert record[0] in {p.id for p in live}
    events = [f for _, f in client.xrange(keys.events) if f.get("event") == "left"]
    expired = {f["peer"] for f in events if f["reason"] == "expired"}
    assert set(killed) <= expired
    assert {f["peer"] for f in events if f["reason"] == "leave"} >= set(left)


def agreement(peers: list[PeerHandle], client: redis.Redis, namespace: str) -> tuple[str, int] | None:
    """The leader record, once it names one of ``peers`` and every one of them sees it."""
    record = leader_record(client, namespace)
    if record[0] not in {p.id for p in peers} or any(p.view() != record for p in peers):
        return None
    return record[0], record[1]


def kill_the_dispatching_beat(procs: Processes, client: redis.Redis, namespace: str,
                              beats: dict[int, subprocess.Popen[bytes]],
                              live: list[PeerHandle]) -> tuple[float, float]:
    """SIGKILL the lease holder; return (seconds until the other beat holds the lease, seconds until
    a leader peer SIGKILLed after the takeover is evicted and replaced)."""
    holder = beat_pid(client, namespace)
    other = next(pid for pid in beats if pid != holder)
    procs.kill(beats[holder])
    killed_at = time.monotonic()
    wait_for(lambda: beat_pid(client, namespace) == other, 10, what="the standby beat to take the lease")
    takeover = time.monotonic() - killed_at
    assert beats[holder].returncode == -signal.SIGKILL and beats[other].poll() is None

    # Only the new lease holder dispatches now: the sweep and the election must still run.
    leader, term = wait_for(lambda: agreement(live, client, namespace), 10, what="a leader among live peers")
    victim = next(p for p in live if p.id == leader)
    live.remove(victim)
    procs.kill(victim.proc)
    killed_at = time.monotonic()
    wait_for(lambda: victim.id not in members(client, namespace), 10,
             what="the leader killed after the takeover to be evicted")
    eviction = time.monotonic() - killed_at
    new, new_term = wait_for(lambda: agreement(live, client, namespace), 10,
                             what="a new leader after the takeover")
    assert new != leader and new_term > term
    left = [f for _, f in client.xrange(Keys(namespace).events) if f.get("event") == "left"]
    assert (victim.id, "expired") in {(f["peer"], f["reason"]) for f in left}
    return takeover, eviction
