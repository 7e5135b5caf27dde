"""Federation when NATS state is lost or changed under the bridges: a consumer or the whole
stream deleted, a leader record deleted from the bucket, a message larger than NATS takes, a site
whose bridge stops while its peer leads, a bridge member silent for long."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import nats
import pytest
import redis

from coordinator import Keys
from coordinator.cluster.membership import Membership
from coordinator.federation.directory import ClusterElection, Directory, LeaderRecord
from coordinator.federation.intake import Cursor, Gap
from mixin import Message
from ops.embedded import NatsServer, RedisServer
from tests.integration.test_federation import LEADER_TIMING, peers, running_sites, site, sites_ab
from tests.support import Peer, async_wait_for


def test_a_cursor_skips_repeats_counts_discards_and_refuses_gaps() -> None:
    cursor = Cursor(next_stream=10)
    assert cursor.admit(1, 10) and cursor.admit(2, 11)
    assert not cursor.admit(3, 11)  # redelivered: a repeat of what came before
    assert cursor.admit(4, 15) and cursor.discarded == 3  # 12-14 went with the stream's limits
    with pytest.raises(Gap):
        cursor.admit(6, 16)  # delivery 5 never came


async def test_deleted_consumer_and_stream_are_made_again_and_nothing_is_lost_or_repeated(
        redis_server: RedisServer, second_redis: RedisServer, nats_server: NatsServer,
        namespace: str) -> None:
    a, b = sites_ab(redis_server, second_redis, nats_server, namespace, router_lease=1.5)
    keys = Keys(namespace)
    got: list[Message] = []
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        async with running_sites(a, b), AsyncExitStack() as stack:
            pa, pb = await peers(stack, a, b)
            await pb.cluster_subscribe("n.>", got.append)
            sent = [await pa.cluster_publish("n.x", i) for i in range(20)]
            await async_wait_for(lambda: len(got) == 20, what="the first twenty")
            await js.delete_consumer(keys.stream_name, keys.durable("b"))
            sent += [await pa.cluster_publish("n.x", i) for i in range(20, 40)]
            await async_wait_for(lambda: len(got) == 40, timeout=20,
                                 what="the next twenty through a consumer made again")
            await js.delete_stream(keys.stream_name)
            sent += [await pa.cluster_publish("n.x", i) for i in range(40, 60)]
            await async_wait_for(lambda: len(got) == 60, timeout=30,
                                 what="the last twenty through a stream made again")
            await asyncio.sleep(0.5)  # a repeat would have come by now
    finally:
        await nc.close()
    assert [m.id for m in got[:40]] == sent[:40]  # once each, in order
    # Once each; their order is not promised: while the stream was missing, publishes that
    # were in flight when it came back may have been stored ahead of one sent again.
    assert sorted(m.id for m in got[40:]) == sorted(sent[40:])


class SmallNats(NatsServer):
    """A NATS server that takes messages of at most 64 KiB."""

    def command(self) -> list[str]:
        conf = self.dir / "small.conf"
        conf.write_text("max_payload: 65536\n")
        return [*super().command(), "-c", str(conf)]


@pytest.fixture
def small_nats() -> Iterator[NatsServer]:
    with SmallNats() as server:
        yield server


async def test_a_message_larger_than_nats_takes_is_dead_lettered_and_the_rest_flow(
        redis_server: RedisServer, second_redis: RedisServer, small_nats: NatsServer,
        namespace: str) -> None:
    a = site(redis_server.url, small_nats.url, namespace, "a")
    b = site(second_redis.url, small_nats.url, namespace, "b")
    keys = Keys(namespace)
    got: list[Any] = []
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with running_sites(a, b) as sidecars, AsyncExitStack() as stack:
            pa, pb = await peers(stack, a, b)
            await pb.cluster_subscribe("big.>", lambda m: got.append(m.data))
            await pa.cluster_publish("big.x", "before")
            await pa.cluster_publish("big.x", "x" * 100_000)  # the sidecar takes up to 1 MiB
            await pa.cluster_publish("big.x", "after")
            await async_wait_for(lambda: len(got) == 2, what="the two that fit")
            letters = [f for _, f in client.xrange(keys.deadletter)]
            assert sidecars[0].bridge is not None
            assert sidecars[0].bridge.bridge.export_failed == 1
    finally:
        client.close()
    assert got == ["before", "after"]
    assert [(f["reason"], f["topic"]) for f in letters] == [("payload_too_large", "big.x")]


async def test_a_deleted_leader_record_never_sends_the_term_back(
        nats_server: NatsServer, namespace: str) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        directory = Directory(nc.jetstream(), Keys(namespace))
        await directory.open()
        election = ClusterElection(directory, "a", member_ttl=1.0)

        async def me(keep: str) -> str:
            return "p1"

        first = await election.step(me)
        assert (first.id, first.term) == ("p1", 1)
        await directory.kv.delete("leader")  # an operator (or a mistake) deletes the record
        again = await election.step(me)
        record, _ = await directory.leader()
    finally:
        await nc.close()
    assert again == LeaderRecord("p1", "a", 2) == record


async def test_a_site_whose_bridge_stops_fences_its_leader_and_the_other_site_takes_over(
        redis_server: RedisServer, second_redis: RedisServer, nats_server: NatsServer,
        namespace: str) -> None:
    a, b = sites_ab(redis_server, second_redis, nats_server, namespace, **LEADER_TIMING)
    async with running_sites(a, b) as sidecars, AsyncExitStack() as stack:
        pa = await stack.enter_async_context(Peer(settings=a))
        await async_wait_for(lambda: pa.is_leader, timeout=20, what="a leader on site a")
        pb = await stack.enter_async_context(Peer(settings=b))
        await async_wait_for(lambda: pb.leader_id == pa.id, timeout=20, what="b following a")
        term = pa.leader_term
        bridge = sidecars[0].bridge
        assert bridge is not None
        bridge.stop()  # site a federates no more: nobody renews its leader's record there
        await async_wait_for(lambda: not pa.is_leader, timeout=10, what="site a's leader fenced")
        assert pa.leader_term >= term  # nobody leads there now, and the term did not go back
        await async_wait_for(lambda: pb.is_leader, timeout=20, what="site b taking over")
        assert pb.leader_term > term


def test_the_sweep_leaves_a_silent_bridge_member_and_its_subscriptions(
        client: redis.Redis, keys: Keys) -> None:
    membership = Membership(client, keys)
    membership.register("bridge-x", role="bridge", eligible=False)
    membership.register("p1")
    client.hset(keys.subs, "bridge-x orders.>", "1")
    long_ago = 1_000
    client.zadd(keys.members, {"bridge-x": long_ago, "p1": long_ago})
    assert membership.sweep(member_ttl=1.0) == ["p1"]
    assert "bridge-x" in membership.members()
    assert client.hget(keys.subs, "bridge-x orders.>") == "1"
    assert membership.leave("bridge-x", "evicted")  # an operator can still remove it


async def test_a_new_site_never_replays_what_came_before_it_even_after_a_restart(
        redis_server: RedisServer, second_redis: RedisServer, nats_server: NatsServer,
        namespace: str) -> None:
    a, b = sites_ab(redis_server, second_redis, nats_server, namespace, router_lease=1.5)
    keys = Keys(namespace)
    async with running_sites(a), AsyncExitStack() as stack:
        (pa,) = await peers(stack, a)
        for n in range(5):
            await pa.cluster_publish("h.x", f"before {n}")
    got: list[Any] = []
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        async with running_sites(a, b), AsyncExitStack() as stack:
            pa, pb = await peers(stack, a, b)
            await pb.cluster_subscribe("h.>", lambda m: got.append(m.data))
            await js.delete_consumer(keys.stream_name, keys.durable("b"))  # b's bridge starts over
            await async_wait_for(lambda: _exists(js, keys.stream_name, keys.durable("b")), timeout=20,
                                 what="b's consumer made again")
            await pa.cluster_publish("h.x", "after")
            await async_wait_for(lambda: got, what="the publish after b joined")
            await asyncio.sleep(0.5)  # a replay of the history would have come by now
    finally:
        await nc.close()
    assert got == ["after"]


async def _exists(js: Any, stream: str, durable: str) -> bool:
    from nats.js.errors import NotFoundError

    try:
        await js.consumer_info(stream, durable)
    except NotFoundError:
        return False
    return True


async def test_a_tightened_policy_leaves_the_bridge_exporting(
        redis_server: RedisServer, second_redis: RedisServer, nats_server: NatsServer,
        namespace: str) -> None:
    from coordinator.policy.store import PolicyStore

    a = site(redis_server.url, nats_server.url, namespace, "a", enforce_policy=True)
    b = site(second_redis.url, nats_server.url, namespace, "b")
    keys = Keys(namespace)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = PolicyStore(client, keys)
    store.set("all", {"statements": [{"id": "all", "effect": "allow", "role_ids": "*", "action": "*",
                                      "resource": ">"}]})
    got: list[Any] = []
    try:
        async with running_sites(a, b), AsyncExitStack() as stack:
            pa, pb = await peers(stack, a, b)
            player = await stack.enter_async_context(Peer(settings=a, role="player"))
            await player.cluster_subscribe("z.>", lambda m: None)
            await pb.cluster_subscribe("x.>", lambda m: got.append(m.data))
            store.set("all", {"statements": [{"id": "peers", "effect": "allow", "role_ids": "peer",
                                              "action": "*", "resource": ">"}]})  # not role bridge
            await async_wait_for(lambda: not client.hexists(keys.subs, f"{player.id} z.>"),
                                 timeout=15, what="the router checking every subscription")
            await pa.cluster_publish("x.y", "after the change")
            await async_wait_for(lambda: got, timeout=15, what="the export after the change")
            assert client.hexists(keys.subs, "bridge-a >")
    finally:
        client.close()
    assert got == ["after the change"]
