"""Two workers form one sidecar: SIGKILL the one routing and the standby takes over."""

from __future__ import annotations

import time

import redis

from coordinator.keys import Keys
from tests.e2e.helpers import Peer, Recorder, lease_holder, start_worker
from tests.support import Processes, async_wait_for, sidecar_env

LEASE = 1.0


async def test_standby_worker_takes_over_when_the_router_is_killed(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    env = sidecar_env(redis_url, namespace, router_lease=LEASE)
    w1 = start_worker(procs, env, client, "w1")
    w2 = start_worker(procs, env, client, "w2", owns=False)
    workers = {"w1": w1, "w2": w2}
    holder = lease_holder(client, namespace)
    owner = holder.split("@", 1)[0]
    standby = "w2" if owner == "w1" else "w1"
    assert owner in workers, holder

    async with Peer(namespace=namespace, redis_url=redis_url) as sub, \
            Peer(namespace=namespace, redis_url=redis_url) as pub:
        rec = Recorder()
        await sub.cluster_subscribe("metrics.>", rec)
        await pub.cluster_publish("metrics.cpu", {"n": 0})
        await rec.wait_for_count(1)

        procs.kill(workers[owner])
        killed = time.monotonic()
        await pub.cluster_publish("metrics.cpu", {"n": 1})
        await pub.cluster_publish("metrics.mem", {"n": 2})
        # lease expiry + one standby renewal round + slack for this small machine
        await rec.wait_for_count(3, timeout=LEASE + 4.0)
        took = time.monotonic() - killed

        assert rec.data == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert lease_holder(client, namespace).startswith(f"{standby}@")
        assert workers[standby].poll() is None
        assert took < LEASE + 4.0
        # the new owner routes control requests too: a fresh subscription works end to end
        late = Recorder()
        await sub.cluster_subscribe("alerts.*", late)
        await pub.cluster_publish("alerts.disk", {"n": 3})
        await late.wait_for_count(1)
        assert late.data == [{"n": 3}]

    # the survivor still counts as a router; the dead one's entry goes stale and is dropped
    await async_wait_for(
        lambda: {str(r).split("@", 1)[0] for r in client.zrange(Keys(namespace).routers, 0, -1)}
        == {standby}, timeout=LEASE * 2 + 5, what="the dead router to leave the routers set")
