"""A queue group member SIGKILLed with unhandled work: another member handles that work, once."""

from __future__ import annotations

import pytest
import redis

from coordinator import ClusterSidecar, Keys, Settings
from tests.support import Peer, Processes, async_wait_for, sidecar_env, wait_for

FAST = {"heartbeat_interval": 0.2, "member_ttl": 1.0, "router_lease": 0.6, "request_timeout": 3.0}


@pytest.mark.timeout(90)
async def test_a_killed_members_unhandled_deliveries_go_to_another_member_once(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    st = Settings(redis_url=redis_url, namespace=namespace, **FAST)  # type: ignore[arg-type]
    keys = Keys(namespace)
    sidecar = ClusterSidecar(settings=st)  # routes and runs the sweep (failure detection)
    await sidecar.setup()
    handled: list[int] = []
    try:
        async with Peer(settings=st) as pub, Peer(settings=st) as good:
            await good.cluster_subscribe("work.>", lambda m: handled.append(m.data["n"]), queue="w")
            victim = procs.python(sidecar_env(redis_url, namespace, **FAST), "victim",
                                  "tests/e2e/queue_member.py", "work.>", "w", "--stall")
            victim_id = wait_for(lambda: next((line.split()[1] for line in procs.log(victim).splitlines()
                                               if line.startswith("ready ")), None), 20,
                                 what="the victim to join")
            for n in range(20):
                await pub.cluster_publish("work.item", {"n": n})
            await async_wait_for(lambda: len(handled) == 10, what="the good member's half")
            wait_for(lambda: "stalled" in procs.log(victim), 10, what="the victim to stall")
            unhandled = [f for _, f in client.xrange(keys.responses(victim_id)) if f.get("q") == "w"]
            assert len(unhandled) == 10  # one stuck in its handler, nine never read: none acknowledged
            procs.kill(victim)  # SIGKILL: no leave, no ack
            await async_wait_for(lambda: len(handled) == 20, timeout=20,
                                 what="the victim's ten, handed to the good member")
            await async_wait_for(lambda: client.zscore(keys.members, victim_id) is None,
                                 what="the victim evicted")
            await pub.cluster_publish("work.item", {"n": 20})  # the group goes on with one member
            await async_wait_for(lambda: 20 in handled, what="a message after the hand-off")
        assert sorted(handled) == list(range(21))  # each exactly once
        assert "handled" not in procs.log(victim)
        left = [f for _, f in client.xrange(keys.events) if f.get("event") == "left"]
        assert (victim_id, "expired") in {(f["peer"], f["reason"]) for f in left}
    finally:
        await sidecar.teardown()
