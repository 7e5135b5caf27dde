"""The direct data path (publish.lua): what a publisher sees at the call, and how it copes with a
route that changed, an eviction, and a lost reply while handing a queue group its messages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from coordinator.cluster.membership import Membership
from coordinator.errors import PayloadTooLarge
from coordinator.keys import Keys
from coordinator.routing.direct import publish_dataplane
from coordinator.scripts import scripts_for
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from mixin import Message
from ops.embedded import RedisServer
from tests.faultproxy import FaultProxy
from tests.support import Peer, async_wait_for


@pytest.fixture
async def small_sidecar(settings: Settings) -> AsyncIterator[ClusterSidecar]:
    """A router whose data plane refuses payloads over 100 bytes (peers keep their own settings)."""
    sc = ClusterSidecar(settings=settings.replace(max_payload_bytes=100), run_duties=False)
    await sc.setup()
    try:
        yield sc
    finally:
        await sc.teardown()


def _script_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_publish_needs_no_router_and_follows_route_changes(
        settings: Settings, client: redis.Redis, sidecar: ClusterSidecar) -> None:
    keys = Keys(settings.namespace)
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        assert pub._require_link().data_path == "direct"
        got: list[Any] = []
        await pub.cluster_publish("news.a", 0)  # nobody listens yet: the route is empty
        await sub.cluster_subscribe("news.*", lambda m: got.append(m.data))
        await pub.cluster_publish("news.a", 1)  # the cached route is stale: resolved again
        await async_wait_for(lambda: got == [1], what="the publish after the subscribe")
        await sub.cluster_unsubscribe("news.*")
        await pub.cluster_publish("news.a", 2)
        await sub.cluster_subscribe("news.>", lambda m: got.append(m.data))
        await pub.cluster_publish("news.a", 3)
        await async_wait_for(lambda: got == [1, 3], what="the publish after resubscribing")
        # nothing went through the request stream but control requests
        kinds = {f.get("k") for _, f in client.xrange(keys.requests(0))}
        assert not kinds & {"pub", "pubs"}, kinds
        assert client.hget(keys.routes, "news.>") == sub.id


async def test_publishes_keep_flowing_while_no_router_runs(settings: Settings,
                                                           client: redis.Redis) -> None:
    sc = ClusterSidecar(settings=settings, run_duties=False)
    await sc.setup()
    stopped = False
    try:
        async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
            got: list[Any] = []
            await sub.cluster_subscribe("live.>", lambda m: got.append(m.data))
            await pub.cluster_publish("live.x", 0)
            await sc.teardown()  # the only router is gone (a killed worker, say)
            stopped = True
            assert not client.exists(Keys(settings.namespace).router_lease(0))
            for i in range(1, 20):
                await pub.cluster_publish("live.x", i)
            await async_wait_for(lambda: got == list(range(20)), what="every publish, routerless")
    finally:
        if not stopped:
            await sc.teardown()


@pytest.mark.usefixtures("small_sidecar")
async def test_too_large_a_payload_is_refused_at_the_call(
        settings: Settings, client: redis.Redis) -> None:
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        got: list[Any] = []
        await sub.cluster_subscribe("big.>", lambda m: got.append(m.data))
        # the peer knows the router's limit from the data plane: it refuses, nothing is sent
        with pytest.raises(PayloadTooLarge, match="100-byte limit"):
            await pub.cluster_publish("big.x", "x" * 200)
        assert not client.exists(Keys(settings.namespace).deadletter)
        # a publish that gets past the peer's check (written to the link itself): publish.lua
        # refuses it, at the call too, and dead-letters it
        with pytest.raises(PayloadTooLarge, match="100-byte limit"):
            await pub._require_link().write(big(pub.id, "big.x"))
        await pub.cluster_publish("big.x", "small")
        await async_wait_for(lambda: got == ["small"], what="the small publish")
        [(_, dead)] = client.xrange(Keys(settings.namespace).deadletter)
        assert (dead["reason"], dead["sender"], dead["topic"]) == ("payload_too_large", pub.id,
                                                                   "big.x")


def big(sender: str, topic: str) -> dict[str, str]:
    """A publish of 200 bytes of payload, as the mixin would write it were it not checked."""
    return {"k": "pub", "s": sender, "t": topic, "d": json.dumps("x" * 200), "i": f"big-{sender}"}


async def test_an_evicted_publisher_registers_again_and_its_publish_arrives(
        settings: Settings, client: redis.Redis, sidecar: ClusterSidecar) -> None:
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        got: list[Any] = []
        await sub.cluster_subscribe("back.>", lambda m: got.append(m.data))
        await pub.cluster_publish("back.x", 1)
        Membership(client, Keys(settings.namespace)).leave(pub.id, "evicted")
        await pub.cluster_publish("back.x", 2)  # unknown to Redis: waits for its own rejoin
        await async_wait_for(lambda: got == [1, 2], what="the publish after the eviction")
        assert client.zscore(Keys(settings.namespace).members, pub.id) is not None


async def test_a_lost_reply_never_hands_a_group_message_to_a_second_member(
        redis_server: RedisServer, settings: Settings, client: redis.Redis,
        sidecar: ClusterSidecar) -> None:
    proxy = FaultProxy(redis_server.port)
    try:
        handled: list[tuple[str, int]] = []
        async with Peer(settings=settings.replace(redis_url=proxy.url)) as pub, \
                Peer(settings=settings) as m1, Peer(settings=settings) as m2:
            for m in (m1, m2):
                await m.cluster_subscribe("work.>", lambda msg, m=m: handled.append((m.id, msg.data)),
                                          queue="workers")
            publish = scripts_for(client).publish.sha.encode()  # publish.lua calls, not heartbeats
            n = 0
            for _round in range(5):
                proxy.cut_after_command(publish)  # the call ran; its reply never comes back
                for _ in range(4):
                    await pub.cluster_publish("work.x", n)
                    n += 1
            assert proxy.cuts == 5
            # the last two went to one member each (in turn), and each member handles its inbox in
            # order: once both are handled, so is anything a repeat could have put before them
            await async_wait_for(lambda: {n - 1, n - 2} <= {v for _, v in handled},
                                 what="every message handled")
            assert sorted(v for _, v in handled) == list(range(n))  # once each, by one member
            assert {who for who, _ in handled} == {m1.id, m2.id}
    finally:
        proxy.close()


async def test_concurrent_answers_and_publishes_share_calls(
        settings: Settings, client: redis.Redis, sidecar: ClusterSidecar) -> None:
    async with Peer(settings=settings) as asker, Peer(settings=settings) as answerer:
        got: list[Message] = []
        await answerer.cluster_subscribe("calc.double", lambda m: m.data * 2)
        await asker.cluster_subscribe("log.>", got.append)
        calls = _script_calls(client)
        answers = await asyncio.gather(*(asker.cluster_request("calc.double", i, timeout=5)
                                         for i in range(40)),
                                       *(answerer.cluster_publish("log.x", i) for i in range(40)))
        assert answers[:40] == [2 * i for i in range(40)]
        await async_wait_for(lambda: len(got) == 40, what="the log messages")
        assert [m.data for m in got] == list(range(40))
        assert _script_calls(client) - calls < 120  # 40 requests, 40 answers, 40 publishes, folded


@pytest.mark.usefixtures("small_sidecar")
async def test_writes_queued_behind_a_refused_publish_still_go_out_in_order(
        settings: Settings) -> None:
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        got: list[Any] = []
        await sub.cluster_subscribe("q.>", lambda m: got.append(m.data))
        results = await asyncio.gather(pub._require_link().write(big(pub.id, "q.x")),
                                       *(pub.cluster_publish("q.x", i) for i in range(10)),
                                       return_exceptions=True)
        assert isinstance(results[0], PayloadTooLarge)
        assert not any(isinstance(r, BaseException) for r in results[1:]), results
        await async_wait_for(lambda: got == list(range(10)), what="the publishes queued behind")


async def test_deep_topics_resolve_without_enumerating_every_pattern(
        settings: Settings, sidecar: ClusterSidecar) -> None:
    deep = ".".join(f"t{i}" for i in range(40))  # 2**41 candidate patterns: read the index instead
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        got: list[str] = []
        await sub.cluster_subscribe("t0.>", lambda m: got.append("rest"))
        await sub.cluster_subscribe("t0.*." + ".".join(f"t{i}" for i in range(2, 40)),
                                    lambda m: got.append("star"))
        await sub.cluster_subscribe("t1.>", lambda m: got.append("other"))
        await pub.cluster_publish(deep, 1)
        await async_wait_for(lambda: sorted(got) == ["rest", "star"], what="the deep topic")


async def test_a_router_that_changes_the_mode_takes_the_next_publish(
        settings: Settings, client: redis.Redis, sidecar: ClusterSidecar) -> None:
    keys = Keys(settings.namespace)
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        got: list[Any] = []
        await sub.cluster_subscribe("mode.>", lambda m: got.append(m.data))
        await pub.cluster_publish("mode.x", "direct")
        assert pub._require_link().data_path == "direct"
        # a router restarted with enforcement (or data_path=routed) writes the data plane again
        publish_dataplane(client, keys, settings.replace(data_path="routed"))
        await pub.cluster_publish("mode.x", "routed")
        await async_wait_for(lambda: got == ["direct", "routed"], what="both publishes")
        assert pub._require_link().data_path == "routed"
        sent = [f.get("d") for _, f in client.xrange(keys.requests(0)) if f.get("k") == "pub"]
        assert sent == ['"routed"']  # the second went through the request stream
        assert client.hget(keys.dataplane, "mode") == "routed"


async def test_a_queue_groups_turn_counter_goes_with_the_group(
        settings: Settings, client: redis.Redis, sidecar: ClusterSidecar) -> None:
    keys = Keys(settings.namespace)
    async with Peer(settings=settings) as pub, Peer(settings=settings) as m1, \
            Peer(settings=settings) as m2:
        got: list[Any] = []
        for m in (m1, m2):
            await m.cluster_subscribe("jobs.*", lambda msg: got.append(msg.data), queue="w")
        for i in range(4):
            await pub.cluster_publish("jobs.a", i)
        await async_wait_for(lambda: len(got) == 4, what="the group's messages")
        assert client.hget(keys.group_turns, "w jobs.*") == "4"
        await m1.cluster_unsubscribe("jobs.*", queue="w")
        assert client.hget(keys.group_turns, "w jobs.*") == "4"  # m2 is still in the group
    # m2 left (gracefully): the group is gone, and so is its counter
    assert client.hlen(keys.group_turns) == 0
    assert client.hlen(keys.routes) == 0
