"""Two workers form one sidecar: kill (SIGKILL) or pause (SIGSTOP) the one routing, and the standby
takes over without losing, repeating or reordering anything. Publishes go through the router here
(``data_path=routed``, as in hardened mode): the direct path does not need a router at all."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from coordinator.keys import REQUEST_GROUP, Keys
from mixin import Message
from tests.e2e.helpers import Peer, Recorder, lease_holder, start_worker
from tests.support import Processes, async_wait_for, sidecar_env

LEASE = 1.0
PAUSED_N = 6_000
PAUSE_CYCLES = 16
PAUSE_LEASE = 0.3
PEER_PROC = str(Path(__file__).with_name("peer_proc.py"))


@pytest.mark.slow
async def test_standby_worker_takes_over_when_the_router_is_killed(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    env = sidecar_env(redis_url, namespace, router_lease=LEASE, data_path="routed")
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

        took_over_before = procs.log(workers[standby]).count(" owns partition 0")
        procs.kill(workers[owner])
        await pub.cluster_publish("metrics.cpu", {"n": 1})
        await pub.cluster_publish("metrics.mem", {"n": 2})
        # lease expiry + one standby renewal round + slack for this small machine
        await rec.wait_for_count(3, timeout=LEASE + 4.0)

        assert rec.data == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert lease_holder(client, namespace).startswith(f"{standby}@")
        assert workers[standby].poll() is None
        # the standby took partition 0 over after the kill, once, and routed what came after it
        assert workers[owner].returncode == -signal.SIGKILL
        assert procs.log(workers[standby]).count(" owns partition 0") == took_over_before + 1
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


def pause_right_after_renewal(client: redis.Redis, namespace: str,
                              proc: subprocess.Popen[bytes]) -> None:
    """SIGSTOP ``proc`` (the lease owner) the moment its lease TTL jumps up: it has just renewed.

    That is when a router is about to read its next batch, the moment a pause hurts most.
    """
    key = Keys(namespace).router_lease(0)
    last = client.pttl(key)
    deadline = time.monotonic() + PAUSE_LEASE * 3
    while time.monotonic() < deadline:  # a tight poll: the renewal is a moment, not a state
        ttl = client.pttl(key)
        if ttl > last:
            break
        last = ttl
    os.killpg(proc.pid, signal.SIGSTOP)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_paused_router_is_fenced_off_and_nothing_is_lost_or_routed_twice(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    # SIGSTOP, not SIGKILL: the old router wakes up after the standby took over. Its writes are
    # fenced by the lease token, so it must route nothing more, and whatever it held must still
    # reach the subscriber exactly once, in order. The two workers take turns being paused while
    # two paced publishers keep a stream going.
    #
    # Regression (fixed) (coordinator/router.py, Router.step): XREADGROUP was not fenced. A router paused past
    # its lease reads one more batch (up to batch_size entries) into its own pending list when it
    # wakes, before it notices the lease is gone; route.lua answers "lost", Router.lost() drops the
    # batch, and it stays stranded in the deposed router's PEL, because the new owner XAUTOCLAIMs
    # only when it takes a partition over. The stranded entries come out late (at the next
    # takeover: order broken) or never (lost; XPENDING shows them held by the paused worker). The
    # worker logs show it: "<old> was fenced off partition 0" right after "<new> owns partition 0",
    # then "<next owner> re-routes N pending entries" one takeover later. Pausing each owner right
    # after a lease renewal (it is about to read) catches it on nearly every run.
    env = sidecar_env(redis_url, namespace, router_lease=PAUSE_LEASE, data_path="routed")
    workers = {"w1": start_worker(procs, env, client, "w1"),
               "w2": start_worker(procs, env, client, "w2", owns=False)}
    calls: list[tuple[str, int]] = []
    ends: list[str] = []

    def record(message: Message) -> None:
        if message.data.get("end"):
            ends.append(message.data["pub"])
        else:
            calls.append((message.data["pub"], message.data["seq"]))

    async with Peer(namespace=namespace, redis_url=redis_url) as sub:
        await sub.cluster_subscribe("paused.*", record)
        pubs = [procs.python(env, name, PEER_PROC, name, f"paused.{name}", str(PAUSED_N),
                             "--chunk", "10", "--pace", "0.015") for name in ("p1", "p2")]
        owner, standby = "w1", "w2"
        for cycle in range(PAUSE_CYCLES):
            await async_wait_for(lambda c=cycle: len(calls) >= 200 * (c + 1), timeout=30,
                                 what=f"messages flowing before pause {cycle + 1}")
            pause_right_after_renewal(client, namespace, workers[owner])
            await async_wait_for(lambda s=standby: lease_holder(client, namespace).startswith(f"{s}@"),
                                 timeout=PAUSE_LEASE + 5, what=f"{standby} to take the partition over")
            procs.kill(workers[owner], signal.SIGCONT)
            owner, standby = standby, owner
        assert not ends, "the stream ended before the last pause; pace the publishers slower"
        await async_wait_for(lambda: len(ends) == 2, timeout=60,
                             what=f"both end markers ({len(calls)} of {2 * PAUSED_N} so far)")

        stuck = client.xpending(Keys(namespace).requests(0), REQUEST_GROUP)
        for name in ("p1", "p2"):
            seqs = [seq for pub, seq in calls if pub == name]
            missing = sorted(set(range(PAUSED_N)) - set(seqs))
            assert not missing, (f"{name}: {len(missing)} lost, {missing[0]}..{missing[-1]}; "
                                 f"request entries still pending: {stuck}")
            assert len(seqs) == len(set(seqs)), f"{name}: a handler ran twice for one message"
            first = next((i for i, seq in enumerate(seqs) if seq != i), None)
            assert first is None, f"{name}: order broken at {first}: {seqs[max(0, first - 2):first + 3]}"
        assert len(calls) == 2 * PAUSED_N
        for pub in pubs:  # while a router can still confirm their leave
            procs.kill(pub, signal.SIGTERM)
    # each woken router noticed it no longer owned the partition, and both are still alive
    for name, proc in workers.items():
        assert proc.poll() is None, procs.log(proc)
        assert "lost partition 0" in procs.log(proc) or "fenced off partition 0" in procs.log(proc), name
