"""Queue groups: each message to exactly one member, spread evenly; plain subscribers get all."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import redis

from coordinator import ClusterSidecar, Keys, Settings
from coordinator.cluster.membership import Membership
from mixin import InvalidTopic, Message
from tests.support import Peer, async_wait_for


async def test_each_message_reaches_one_member_evenly_and_every_plain_subscriber(
        settings: Settings, sidecar: ClusterSidecar) -> None:
    handled: list[tuple[str, int]] = []
    plain: list[int] = []
    other_group: list[int] = []
    async with Peer(settings=settings) as pub, Peer(settings=settings) as m1, \
            Peer(settings=settings) as m2, Peer(settings=settings) as m3, \
            Peer(settings=settings) as watcher:
        for m in (m1, m2, m3):
            await m.cluster_subscribe("jobs.>", lambda msg, m=m: handled.append((m.id, msg.data)),
                                      queue="workers")
        await m1.cluster_subscribe("jobs.>", lambda msg: plain.append(msg.data))  # also plain
        await watcher.cluster_subscribe("jobs.*", lambda msg: other_group.append(msg.data),
                                        queue="audit")
        for i in range(30):
            await pub.cluster_publish("jobs.run", i)
        await asyncio.gather(*(pub.cluster_publish("jobs.run", i) for i in range(30, 60)))
        await async_wait_for(lambda: len(handled) == 60 and len(plain) == 60 and len(other_group) == 60,
                             what="every delivery")
        # a request to the group is answered by one member
        await m2.cluster_subscribe("svc.echo", lambda msg: f"m2:{msg.data}", queue="svc")
        await m3.cluster_subscribe("svc.echo", lambda msg: f"m3:{msg.data}", queue="svc")
        answers = [await pub.cluster_request("svc.echo", i, timeout=5) for i in range(4)]
    assert sorted(n for _, n in handled) == list(range(60))  # each exactly once in the group
    assert Counter(peer for peer, _ in handled) == {m1.id: 20, m2.id: 20, m3.id: 20}  # evenly
    assert sorted(plain) == list(range(60)) and sorted(other_group) == list(range(60))
    assert sorted(a[:2] for a in answers) == ["m2", "m2", "m3", "m3"]


async def test_what_a_leaving_member_had_not_handled_goes_to_another_once(
        settings: Settings, sidecar: ClusterSidecar, client: redis.Redis, keys: Keys) -> None:
    release = asyncio.Event()
    handled: list[tuple[str, int]] = []

    async def stuck(msg: Message) -> None:
        await release.wait()

    async with Peer(settings=settings) as pub, Peer(settings=settings) as good:
        await good.cluster_subscribe("q.>", lambda msg: handled.append((good.id, msg.data)), queue="g")
        slow = Peer(settings=settings)
        await slow.setup()
        await slow.cluster_subscribe("q.>", stuck, queue="g")
        for i in range(10):
            await pub.cluster_publish("q.x", i)
        await async_wait_for(lambda: len(handled) == 5, what="the good member's half")
        # the stuck member holds five: the one its handler is stuck on (pending) and four unread
        assert client.xlen(keys.responses(slow.id)) >= 5
        assert Membership(client, keys).leave(slow.id, "evicted")  # as the sweep or `sidecar evict`
        await async_wait_for(lambda: len(handled) == 10, what="the handed-off five")
        assert not Membership(client, keys).leave(slow.id, "evicted")  # a second run moves nothing
        release.set()
        await slow.teardown()
    assert sorted(n for _, n in handled) == list(range(10))  # each once


async def test_a_bad_queue_name_is_refused(settings: Settings, sidecar: ClusterSidecar) -> None:
    async with Peer(settings=settings) as p:
        with pytest.raises(InvalidTopic, match="queue group name"):
            await p.cluster_subscribe("a.b", lambda m: None, queue="no spaces")
