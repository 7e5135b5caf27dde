"""Per-message time to live: a message not handled in time never reaches a handler."""

from __future__ import annotations

import asyncio

import pytest
import redis

from coordinator import ClusterSidecar, Keys, Settings
from coordinator.clock import redis_ms
from mixin import Message
from tests.support import Peer, async_wait_for


async def test_messages_past_their_time_to_live_are_dead_lettered_not_handled(
        settings: Settings, sidecar: ClusterSidecar, client: redis.Redis, keys: Keys) -> None:
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(m: Message) -> None:
        if m.data == "blocker":
            await release.wait()  # the inbox waits behind this one
        handled.append(m.data)

    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        await sub.publish_heartbeat()  # learns Redis's clock
        await sub.cluster_subscribe("ttl.>", handler)
        await pub.cluster_publish("ttl.x", "blocker")
        await async_wait_for(lambda: sub.messages_received >= 1, what="the blocker taken")
        short = await pub.cluster_publish("ttl.x", "short", ttl=0.05)
        folded = await asyncio.gather(*(pub.cluster_publish("ttl.x", f"f{i}", ttl=0.05) for i in range(3)))
        await pub.cluster_publish("ttl.x", "long", ttl=60)
        await pub.cluster_publish("ttl.x", "forever")
        await async_wait_for(lambda: int(client.xlen(keys.responses(sub.id))) >= 7,
                             what="the messages queued behind the blocker")
        deadlines = [int(f["x"]) for _, f in client.xrange(keys.responses(sub.id))
                     if f.get("x") and f["d"] != '"long"']
        assert len(deadlines) == 4
        await async_wait_for(lambda: redis_ms(client) > max(deadlines), what="the short ones to expire")
        release.set()
        await async_wait_for(lambda: "forever" in handled, what="the last message")
        await async_wait_for(lambda: client.xlen(keys.deadletter) == 4, what="four dead letters")
        assert sub.status_snapshot(include_hidden=True)["messages_expired"] == 4
    assert handled == ["blocker", "long", "forever"]
    dead = [f for _, f in client.xrange(keys.deadletter)]
    assert [(f["reason"], f["entry"], f["peer"]) for f in dead] == \
        [("expired", mid, sub.id) for mid in (short, *folded)]
    assert all(f["message"].startswith("expired ") for f in dead)


async def test_a_bad_time_to_live_is_refused(settings: Settings, sidecar: ClusterSidecar) -> None:
    async with Peer(settings=settings) as pub:
        for ttl in (0, -1, 8 * 24 * 3600):
            with pytest.raises(ValueError, match="ttl must be"):
                await pub.cluster_publish("ttl.x", 1, ttl=ttl)
