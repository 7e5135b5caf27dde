"""SIGKILL a site's active bridge worker in the middle of a cross-site stream, on both sites.

Site A (publisher's) and site B (subscriber's) each run two workers; one bridge per site is
active and the other stands by. A publisher process on A sends 3,000 numbered messages; an in-test
subscriber on B records every handler call. A's active bridge worker is killed after about 600
messages arrived, B's after about 1,800. The standbys take over; every message must arrive, each
handler call exactly once, in publish order.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from coordinator.keys import Keys
from coordinator.leases import LeaseToken
from mixin import Message
from ops.embedded import NatsServer, RedisServer
from tests.e2e.helpers import Peer
from tests.support import Processes, async_wait_for, sidecar_env, wait_for

N = 3_000
PEER_PROC = str(Path(__file__).with_name("peer_proc.py"))


def bridge_holder(client: redis.Redis, namespace: str) -> str:
    """Name (``<worker>``) of the site's active bridge, '' when none."""
    token = LeaseToken.parse(client.get(Keys(namespace).bridge_lease))
    return token.name.split("@", 1)[0] if token else ""


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_bridge_workers_killed_mid_stream_lose_nothing_and_repeat_nothing(
        procs: Processes, redis_server: RedisServer, second_redis: RedisServer,
        nats_server: NatsServer, namespace: str) -> None:
    a = sidecar_env(redis_server.url, namespace, nats_url=nats_server.url, site="a", router_lease=1.0)
    b = sidecar_env(second_redis.url, namespace, nats_url=nats_server.url, site="b", router_lease=1.0)
    ca = redis.Redis.from_url(redis_server.url, decode_responses=True)
    cb = redis.Redis.from_url(second_redis.url, decode_responses=True)
    workers = {name: procs.worker(env, name) for name, env in
               (("a1", a), ("a2", a), ("b1", b), ("b2", b))}
    for client in (ca, cb):
        wait_for(lambda c=client: bridge_holder(c, namespace), timeout=60, what="an active bridge")
    calls: list[int] = []
    ends: list[bool] = []

    def record(message: Message) -> None:
        if message.data.get("end"):
            ends.append(True)
        else:
            calls.append(message.data["seq"])

    try:
        async with Peer(namespace=namespace, redis_url=second_redis.url) as sub:
            await sub.cluster_subscribe("xs.*", record)
            # the subscription reaches site A's bridge, which exports everything: no wait needed,
            # but the stream must have site B's consumer before the first publish
            await async_wait_for(lambda: cb.get(Keys(namespace).bridge_lease), what="B's bridge")
            pub = procs.python(a, "publisher", PEER_PROC, "pub", "xs.run", str(N), "--chunk", "5",
                               "--pace", "0.005")
            killed = []
            for after, client in ((600, ca), (1800, cb)):
                await async_wait_for(lambda n=after: len(calls) >= n, timeout=60,
                                     what=f"{after} messages on site B")
                victim = bridge_holder(client, namespace)
                procs.kill(workers[victim])
                killed.append(victim)
                assert len(calls) < N, "the stream was over before the kill"
            await async_wait_for(lambda: ends, timeout=90,
                                 what=f"the end marker ({len(calls)} of {N} so far)")
            procs.kill(pub, signal.SIGTERM)
    finally:
        ca.close()
        cb.close()
    assert len(calls) == len(set(calls)), "a handler ran twice for one message"
    missing = sorted(set(range(N)) - set(calls))
    assert not missing, f"{len(missing)} messages lost, first {missing[:5]}"
    assert calls == list(range(N)), "order broken"
    assert {k[0] for k in killed} == {"a", "b"}  # one bridge worker on each site
