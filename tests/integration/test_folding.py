"""Publishes in flight together are folded into one ``pubs`` entry and routed as separate messages."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis

from coordinator.keys import Keys
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from mixin import Message
from tests.support import Peer, async_wait_for


async def test_concurrent_publishes_fold_and_arrive_in_order(settings: Settings, client: redis.Redis,
                                                             sidecar: ClusterSidecar) -> None:
    keys = Keys(settings.namespace)
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        got: list[Message] = []
        await sub.cluster_subscribe("fold.>", got.append)
        await asyncio.gather(*(pub.cluster_publish(f"fold.{i % 3}", {"i": i}) for i in range(500)))
        await async_wait_for(lambda: len(got) == 500, what="500 messages")
        assert [m.data["i"] for m in got] == list(range(500))
        assert len({m.id for m in got}) == 500
        kinds = [f.get("k") for _, f in client.xrange(keys.requests(0)) if f.get("s") == pub.id]
        assert "pubs" in kinds and len(kinds) < 100, kinds[:10]


async def test_bad_batches_and_bad_items_are_dead_lettered(settings: Settings, client: redis.Redis,
                                                            sidecar: ClusterSidecar) -> None:
    keys = Keys(settings.namespace)
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        got: list[Any] = []
        await sub.cluster_subscribe("ok.>", lambda m: got.append(m.data))
        client.xadd(keys.requests(0), {"k": "pubs", "s": pub.id, "b": "not json"})
        items = [["ok.a", "1", None, None, None, None], ["bad.*", "2", None, None, None, None],
                 ["ok.b", "{nope", None, None, None, None], ["ok.c", "3", None, None, None, None]]
        batch_id = client.xadd(keys.requests(0), {"k": "pubs", "s": pub.id, "b": json.dumps(items)})
        await async_wait_for(lambda: len(got) == 2, what="the good items")
        assert got == [1, 3]
        # rejections are written once the fan-out they belong to succeeded: wait for them too
        await async_wait_for(lambda: client.xlen(keys.deadletter) == 3, what="three dead letters")
        dead = {f["entry"]: f["reason"] for _, f in client.xrange(keys.deadletter)}
        assert dead[f"{batch_id}:1"] == "invalid_topic"
        assert dead[f"{batch_id}:2"] == "bad_request"
        assert "bad_request" in [r for e, r in dead.items() if ":" not in e]
        assert client.xpending(keys.requests(0), "routers")["pending"] == 0
