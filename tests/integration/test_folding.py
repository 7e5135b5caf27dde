"""Publishes in flight together are folded: through the router into one ``pubs`` entry, on the direct
path into one ``publish.lua`` call; either way they arrive as separate messages, in order."""

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


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


async def test_concurrent_publishes_fold_and_arrive_in_order(client: redis.Redis,
                                                             sidecar: ClusterSidecar) -> None:
    settings = sidecar.settings
    keys = Keys(settings.namespace)
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        assert pub._require_link().data_path == "direct"
        got: list[Message] = []
        await sub.cluster_subscribe("fold.>", got.append)
        calls = _script_calls(client)
        await asyncio.gather(*(pub.cluster_publish(f"fold.{i % 3}", {"i": i}) for i in range(500)))
        calls = _script_calls(client) - calls  # heartbeats and the router's scripts count too
        await async_wait_for(lambda: len(got) == 500, what="500 messages")
        assert [m.data["i"] for m in got] == list(range(500))
        assert len({m.id for m in got}) == 500
        assert calls < 100, calls
        assert not [f for _, f in client.xrange(keys.requests(0)) if f.get("k") in ("pub", "pubs")]


async def test_routed_publishes_fold_into_batch_entries(settings: Settings, client: redis.Redis) -> None:
    routed = settings.replace(data_path="routed")
    keys = Keys(settings.namespace)
    sidecar = ClusterSidecar(settings=routed, run_duties=False)
    await sidecar.setup()
    try:
        async with Peer(settings=routed) as pub, Peer(settings=routed) as sub:
            assert pub._require_link().data_path == "routed"
            got: list[Message] = []
            await sub.cluster_subscribe("fold.>", got.append)
            await asyncio.gather(*(pub.cluster_publish(f"fold.{i % 3}", {"i": i}) for i in range(500)))
            await async_wait_for(lambda: len(got) == 500, what="500 messages")
            assert [m.data["i"] for m in got] == list(range(500))
            assert len({m.id for m in got}) == 500
            kinds = [f.get("k") for _, f in client.xrange(keys.requests(0)) if f.get("s") == pub.id]
            assert "pubs" in kinds and len(kinds) < 100, kinds[:10]
    finally:
        await sidecar.teardown()


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
