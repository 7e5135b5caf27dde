"""The bridge's traffic counters name a bounded number of origins, read from Redis, so no NATS
client setting made-up origin headers can grow them, over restarts and takeovers too."""

from __future__ import annotations

import types
from collections import Counter

import redis
import redis.asyncio as aioredis

from coordinator.federation.bridge import _MAX_ORIGINS, _OTHER_ORIGINS, Bridge
from coordinator.keys import Keys


async def test_origins_past_the_bound_are_counted_together(redis_url: str, client: redis.Redis,
                                                           keys: Keys) -> None:
    client.hset(keys.bridge_traffic, mapping={f"imported s{n}": 1 for n in range(_MAX_ORIGINS - 1)})
    connection = aioredis.from_url(redis_url, decode_responses=True)
    try:
        for _ in range(2):  # a bridge, then its successor with nothing in memory
            bridge = types.SimpleNamespace(redis=connection, keys=keys, _traffic_fields=set())
            traffic = Counter({"imported s0": 2, "imported new1": 1, "imported new2": 3, "exported": 5})
            bounded = await Bridge._bounded(bridge, traffic)  # type: ignore[arg-type]
            for field, n in bounded.items():
                client.hincrby(keys.bridge_traffic, field, n)
    finally:
        await connection.aclose()
    held = client.hgetall(keys.bridge_traffic)
    assert held["imported new1"] == "2" and held["imported s0"] == "5"
    assert held[_OTHER_ORIGINS] == "6" and held["exported"] == "10"  # new2, both times
    assert "imported new2" not in held
    assert len(held) == _MAX_ORIGINS + 2  # the bound, the '*' field and 'exported'
