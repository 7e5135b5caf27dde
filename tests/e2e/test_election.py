"""Leader election with real processes: three peers, a worker and a beat; kill, pause, leave, rejoin,
and a member trying to forge the sidecar's cluster.leader event.

Every peer is its own process (tests/e2e/election_peer.py) that records its leader view as JSON
lines, so what the tests assert is what each peer believed, not what the leader record says.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest
import redis

from coordinator.keys import Keys
from tests.e2e.election_peer import (
    PeerHandle,
    leader_record,
    members,
    start_peer,
    start_sidecar,
)
from tests.support import Processes, sidecar_env, wait_for

FAST = {"heartbeat_interval": 0.2, "member_ttl": 0.6}
"""Tuned timings: a silent peer is evicted (and a dead leader replaced) within about a second."""


pytestmark = [pytest.mark.usefixtures("stop_peers_first"), pytest.mark.slow]  # each takes 5 s or more


def agreed(peers: list[PeerHandle], client: redis.Redis, namespace: str,
           previous: tuple[str | None, int] = (None, 0)) -> tuple[str, int] | None:
    """The leader every peer in ``peers`` sees, if they all see the recorded one, newer than ``previous``."""
    for p in peers:
        p.check_alive()
    views = {p.view() for p in peers}
    record = leader_record(client, namespace)
    if len(views) != 1 or views != {record} or record[0] is None or record[1] <= previous[1]:
        return None
    return record[0], record[1]


def one_leader_per_term(peers: list[PeerHandle]) -> dict[int, str | None]:
    """Every leader view any peer recorded, as term -> leader; fails if two peers disagree on a term."""
    seen: dict[int, str | None] = {}
    for p in peers:
        for e in p.events("leader"):
            assert seen.setdefault(e["term"], e["leader"]) == e["leader"], (
                f"term {e['term']}: {p} saw {e['leader']}, another peer saw {seen[e['term']]}")
    return seen


def leader_events(client: redis.Redis, namespace: str) -> list[dict[str, Any]]:
    return [f for _, f in client.xrange(Keys(namespace).events) if f.get("event") == "leader"]


def three_peers(procs: Processes, env: dict[str, str], client: redis.Redis,
                namespace: str) -> tuple[list[PeerHandle], tuple[str, int]]:
    peers = [start_peer(procs, env, client, f"peer{i}") for i in range(3)]
    leader = wait_for(lambda: agreed(peers, client, namespace), 10, what="three peers to agree on a leader")
    assert leader[0] in {p.id for p in peers}
    return peers, leader


def test_killing_the_leader_elects_one_new_leader_with_a_higher_term(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    env = sidecar_env(redis_url, namespace, **FAST)
    start_sidecar(procs, env, client)
    peers, (old, old_term) = three_peers(procs, env, client, namespace)
    by_id = {p.id: p for p in peers}
    # the oldest ULID wins among equal priorities, and peer0 registered first
    assert old == min(by_id) == peers[0].id

    procs.kill(by_id[old].proc)
    killed = time.monotonic()
    survivors = [p for p in peers if p.id != old]
    new, new_term = wait_for(lambda: agreed(survivors, client, namespace, (old, old_term)), 10,
                             what="the survivors to agree on a new leader")
    failover = time.monotonic() - killed
    print(f"\nfailover after SIGKILL of the leader: {failover:.2f}s (member_ttl {FAST['member_ttl']}s)")

    assert new != old and new in {s.id for s in survivors}
    assert new_term > old_term
    assert new == min(s.id for s in survivors)  # the fixed rule: oldest live ULID
    # elect.lua goes by liveness, so the new leader may come before the sweep evicts the dead one
    wait_for(lambda: old not in members(client, namespace), 5, what="the dead leader's eviction")
    states = {s.id: s.state() for s in survivors}
    assert {i: s["is_leader"] for i, s in states.items()} == {s.id: s.id == new for s in survivors}
    assert all((s["leader"], s["term"]) == (new, new_term) for s in states.values())
    one_leader_per_term(peers)
    changes = leader_events(client, namespace)
    assert [int(e["term"]) for e in changes] == sorted(int(e["term"]) for e in changes)
    assert changes[-1]["leader"] == new and changes[-1]["previous"] == old
    # what each survivor saw, in order: the old leader, then (only after the kill) the new one, its
    # term never going down
    for s in survivors:
        views = [(e["leader"], e["term"], e["mono"]) for e in s.events("leader")]
        assert [t for _, t, _ in views] == sorted(t for _, t, _ in views), views
        assert views[-1][:2] == (new, new_term)
        first_new = next(i for i, (leader, term, _) in enumerate(views) if (leader, term) == (new, new_term))
        assert (old, old_term) in [v[:2] for v in views[:first_new]], views
        assert views[first_new][2] > killed, views


def test_paused_leader_is_deposed_and_its_fenced_publishes_are_rejected(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    env = sidecar_env(redis_url, namespace, **FAST)
    keys = Keys(namespace)
    start_sidecar(procs, env, client)
    peers, (old, old_term) = three_peers(procs, env, client, namespace)
    leader = next(p for p in peers if p.id == old)
    others = [p for p in peers if p is not leader]
    listener = others[-1]
    listener.subscribe("fence.>")

    def from_old() -> list[dict[str, Any]]:
        return [m for m in listener.messages("fence.") if m["sender"] == old]

    leader.send("fenced_stream", topic="fence.tick", interval=0.02)
    wait_for(lambda: len(from_old()) >= 5, 10, what="fenced publishes from the leader")

    leader.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    new, new_term = wait_for(lambda: agreed(others, client, namespace, (old, old_term)), 10,
                             what="a new leader while the old one is paused")
    wait_for(lambda: old not in members(client, namespace), 5, what="the paused leader's eviction")
    since = int(client.hget(keys.leader, "since") or 0)
    # The eviction can come sooner than a TTL after SIGSTOP (the TTL runs from the last heartbeat);
    # keep the pause at least one TTL long anyway, as a real stall would be.
    time.sleep(max(0.0, stopped + FAST["member_ttl"] - time.monotonic()))
    paused = time.monotonic() - stopped

    resumed = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable with the peer's "mono"
    leader.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: leader.view() == (new, new_term), 5, what="the deposed leader to learn the new one")
    learned = leader.events("leader")[-1]["mono"] - resumed
    assert learned > 0  # it learned after resuming, not before it was stopped
    print(f"\npaused leader replaced after {paused:.2f}s; it learned the new leader "
          f"{learned:.3f}s after SIGCONT")
    state = leader.state()
    assert (state["leader"], state["term"], state["is_leader"]) == (new, new_term, False)

    # Its own fenced publishes now fail locally with NotLeader (the stream kept trying).
    wait_for(lambda: any(not e["ok"] and e["mono"] > resumed for e in leader.events("fenced")), 5,
             what="a fenced publish attempt after SIGCONT")
    after = [e for e in leader.events("fenced") if e["mono"] > resumed]
    assert after and {e.get("error") for e in after if not e["ok"]} == {"NotLeader"}
    assert all(not e["ok"] for e in after[1:]), after[:5]  # the first may have been in flight

    # A fenced entry claiming the old term that bypasses the local check is fenced by the router.
    forged = leader.reply(leader.send("forge_fenced", topic="fence.forged", term=old_term,
                                      data={"forged": True}))
    new_leader = next(p for p in others if p.id == new)
    new_leader.send("fenced_stream", topic="fence.new", interval=0.05)
    # Single partition: the new leader's publishes were written after the forged entry, so once
    # one arrives the router has already decided about the forged one.
    wait_for(lambda: any(m["sender"] == new for m in listener.messages("fence.new")), 10,
             what="a fenced publish of the new leader")
    dead = [f for _, f in client.xrange(keys.deadletter) if f["entry"] == forged["entry"]]
    assert [(f["reason"], f["sender"]) for f in dead] == [("not_leader", old)]

    delivered = from_old()
    assert delivered, "the old leader's fenced publishes before the pause should have arrived"
    assert not [m for m in delivered if m["topic"] == "fence.forged"]
    assert {m["data"]["term"] for m in delivered} == {old_term}
    late = [m for m in delivered if round(m["ts"] * 1000) > since]
    assert not late, f"fenced messages of the deposed leader published after term {new_term} began"
    seqs = [m["data"]["seq"] for m in delivered]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert {m["data"]["term"] for m in listener.messages("fence.new")} == {new_term}
    one_leader_per_term(peers)


def test_graceful_leave_re_elects_without_waiting_for_the_ttl(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    ttl = 10.0
    env = sidecar_env(redis_url, namespace, heartbeat_interval=1.0, member_ttl=ttl)
    start_sidecar(procs, env, client)
    peers, (old, old_term) = three_peers(procs, env, client, namespace)
    leader = next(p for p in peers if p.id == old)
    survivors = [p for p in peers if p is not leader]

    asked = time.monotonic()
    leader.leave()
    new, new_term = wait_for(lambda: agreed(survivors, client, namespace, (old, old_term)), ttl / 2,
                             what="a new leader well before the member TTL")
    took = time.monotonic() - asked
    print(f"\nre-election after a graceful leave: {took:.2f}s (member_ttl {ttl}s)")

    assert new in {s.id for s in survivors} and new_term == old_term + 1
    assert old not in members(client, namespace)
    left = [f for _, f in client.xrange(Keys(namespace).events) if f.get("event") == "left"]
    assert [(f["peer"], f["reason"]) for f in left] == [(old, "leave")]
    assert leader_events(client, namespace)[-1]["reason"] == "leader left"
    # in this order: the leader left, then the election of its successor (on the leave itself: no
    # eviction came in between, see `left`), then each survivor learned the new leader
    events = [f for _, f in client.xrange(Keys(namespace).events)]
    left_at = next(i for i, f in enumerate(events) if f.get("event") == "left" and f["peer"] == old)
    elected_at = next(i for i, f in enumerate(events) if f.get("event") == "leader"
                      and (f["leader"], int(f["term"])) == (new, new_term))
    assert left_at < elected_at, events
    assert events[elected_at]["previous"] == old
    for s in survivors:
        learned_new = next(e for e in s.events("leader") if (e["leader"], e["term"]) == (new, new_term))
        assert learned_new["mono"] > asked
    one_leader_per_term(peers)


def test_evicted_peer_learns_the_current_leader_and_term_when_it_rejoins(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    env = sidecar_env(redis_url, namespace, **FAST)
    keys = Keys(namespace)
    start_sidecar(procs, env, client)
    peers, (old, old_term) = three_peers(procs, env, client, namespace)
    leader = next(p for p in peers if p.id == old)
    paused, other = (p for p in peers if p is not leader)

    paused.proc.send_signal(signal.SIGSTOP)
    wait_for(lambda: paused.id not in members(client, namespace), 10, what="the paused peer's eviction")
    # The leader changes while it is away, so its last view is stale when it comes back.
    procs.kill(leader.proc)
    new, new_term = wait_for(lambda: agreed([other], client, namespace, (old, old_term)), 10,
                             what="a new leader while the peer is paused")
    assert new == other.id
    assert paused.view() == (old, old_term)

    resumed = time.monotonic()
    paused.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: paused.view() == leader_record(client, namespace), 5,
             what="the rejoined peer's view to match the leader record")
    learned = paused.events("leader")[-1]["mono"] - resumed
    print(f"\nrejoined peer learned leader and term {learned:.3f}s after SIGCONT")
    assert paused.view() == (new, new_term)
    assert learned > 0
    # after SIGCONT it went straight from its stale view to the current leader and term, once
    after = [(e["leader"], e["term"]) for e in paused.events("leader") if e["mono"] > resumed]
    assert after == [(new, new_term)]
    wait_for(lambda: paused.id in members(client, namespace), 5, what="the peer to register again")
    joins = [f["peer"] for _, f in client.xrange(keys.events) if f.get("event") == "joined"]
    assert joins.count(paused.id) == 2
    state = paused.state()
    assert (state["leader"], state["term"], state["is_leader"]) == (new, new_term, False)
    # leadership stayed with the live leader: rejoining did not trigger an election
    assert leader_record(client, namespace) == (new, new_term)
    one_leader_per_term(peers)


def test_a_peer_cannot_forge_a_cluster_leader_event(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    # Fails on the source as of this writing (reported): RequestHandler._check_publish
    # (coordinator/requests.py) caches topics it has validated in _valid_topics without noting
    # that a system-stream entry was validated with allow_reserved=True. After the first genuine
    # cluster.leader event went through the router, any member's publish to cluster.leader skips
    # the reserved-topic check and is delivered to every subscriber of the event.
    env = sidecar_env(redis_url, namespace, **FAST)
    keys = Keys(namespace)
    start_sidecar(procs, env, client)
    peers, (first, first_term) = three_peers(procs, env, client, namespace)
    listener, rogue = (p for p in peers if p.id != first)
    listener.subscribe("cluster.leader")
    listener.subscribe("probe.>")
    procs.kill(next(p for p in peers if p.id == first).proc)
    # a genuine event, routed after the listener subscribed: the router has validated the topic
    wait_for(lambda: any(m["sender"] == "sidecar" and m["data"]["term"] > first_term
                         for m in listener.messages("cluster.leader")), 10,
             what="the listener to receive the genuine cluster.leader event")
    leader, term = leader_record(client, namespace)
    assert leader == listener.id

    # the rogue, a registered member, writes its request stream directly (its mixin would refuse)
    forged = client.xadd(keys.requests(0), {"k": "pub", "s": rogue.id, "t": "cluster.leader",
                                            "d": json.dumps({"leader_id": rogue.id, "term": 99})})
    client.xadd(keys.requests(0), {"k": "pub", "s": rogue.id, "t": "probe.marker", "d": "1"})
    wait_for(lambda: listener.messages("probe."), 10, what="the rogue's marker after the forged event")

    assert [m for m in listener.messages("cluster.leader") if m["sender"] != "sidecar"] == []
    dead = [f for _, f in client.xrange(keys.deadletter) if f["entry"] == forged]
    assert [(f["reason"], f["sender"]) for f in dead] == [("invalid_topic", rogue.id)]
    state = listener.state()
    assert (state["leader"], state["term"], state["is_leader"]) == (leader, term, True)
