"""SIGKILL the only worker in the middle of a 10,000-message stream, then start another (publishes
go through the router here, ``data_path=routed``: the direct path needs no worker to deliver).

Two publisher processes (tests/e2e/peer_proc.py) each publish 5,000 numbered messages while an
in-test subscriber records one (publisher, seq) per handler call. The worker dies after the
subscriber has seen about 1,000 messages; a new worker takes the partition over. Every message must
arrive, each handler call exactly once, in order per publisher.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from coordinator.keys import REQUEST_GROUP, Keys
from mixin import Message
from tests.e2e.helpers import Peer, lease_holder, start_worker
from tests.support import Processes, async_wait_for, sidecar_env, wait_for

N = 5_000
PUBLISHERS = ("alpha", "beta")
KILL_AFTER = 1_000
PEER_PROC = str(Path(__file__).with_name("peer_proc.py"))


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_worker_killed_mid_stream_loses_nothing_and_repeats_nothing(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    env = sidecar_env(redis_url, namespace, router_lease=1.0, data_path="routed")
    w1 = start_worker(procs, env, client, "w1")
    calls: list[tuple[str, int]] = []
    ends: list[str] = []

    def record(message: Message) -> None:
        data = message.data
        if data.get("end"):
            ends.append(data["pub"])
        else:
            calls.append((data["pub"], data["seq"]))

    async with Peer(namespace=namespace, redis_url=redis_url) as sub:
        await sub.cluster_subscribe("stream.*", record)
        pubs = [procs.python(env, name, PEER_PROC, name, f"stream.{name}", str(N), "--chunk", "10")
                for name in PUBLISHERS]

        await async_wait_for(lambda: len(calls) >= KILL_AFTER, timeout=30,
                             what=f"{KILL_AFTER} messages before the kill")
        procs.kill(w1)
        at_kill = len(calls)
        # the kill must land mid-stream, or this test proves nothing
        assert at_kill < 2 * N, "the stream was over before the worker was killed"

        start_worker(procs, env, client, "w2")
        await async_wait_for(lambda: len(ends) == len(PUBLISHERS), timeout=90,
                             what=f"both end markers ({len(calls)} of {2 * N} messages so far)")

        # Each publisher's end marker follows its last message in the subscriber's inbox, so
        # every message (and any re-delivered copy ahead of it) has been handled by now.
        by_pub: dict[str, list[int]] = {name: [] for name in PUBLISHERS}
        for pub, seq in calls:
            by_pub[pub].append(seq)
        for name, seqs in by_pub.items():
            assert len(seqs) == len(set(seqs)), f"{name}: a handler ran twice for one message"
            missing = sorted(set(range(N)) - set(seqs))
            assert not missing, f"{name}: {len(missing)} messages lost, first {missing[:5]}"
            assert seqs == list(range(N)), f"{name}: order broken"
        assert len(calls) == 2 * N
        assert sorted(ends) == sorted(PUBLISHERS)
        assert sub.status["peer"]["cluster_subscriptions"] == 1
        for pub in pubs:  # while a router can still confirm their leave
            procs.kill(pub, signal.SIGTERM)
            assert pub.returncode == 0, procs.log(pub)

    keys = Keys(namespace)
    assert lease_holder(client, namespace).startswith("w2@")
    # nothing is left stuck in the request stream: every entry was routed and acknowledged
    wait_for(lambda: int(client.xpending(keys.requests(0), REQUEST_GROUP)["pending"]) == 0,
             what="no pending request entries")
