"""The raw one-hop anchor: an asyncio publisher LPUSHes, a consumer process BLPOPs.

Both sides use redis-py's asyncio client with ``decode_responses=True`` and the payloads the route
scenarios carry (compact JSON ``{"i": index, "t": send time}``), so the anchor costs what a single
Redis hop costs the same client library. The publisher awaits each LPUSH; the consumer blocks in
BLPOP for each message.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from bench.children import Channel, Role, pace, run_stages
from coordinator.protocol import dumps

__all__ = ["RawParams", "raw_consumer", "raw_publisher", "run_raw"]


@dataclass(frozen=True)
class RawParams:
    """One raw run: list ``key`` on ``url`` carries ``count`` messages (paced when ``rate``)."""

    url: str
    key: str
    count: int
    rate: float | None = None
    keep_latency: bool = False
    timeout: float = 60.0


async def raw_consumer(channel: Channel, p: RawParams) -> dict[str, Any]:
    """BLPOP ``count`` messages; returns the receive time of the last and, if asked, latencies."""
    client = aioredis.Redis.from_url(p.url, decode_responses=True)
    await client.ping()
    channel.ready()
    latencies: list[int] = []
    got = 0
    last_ns = 0
    deadline = time.monotonic() + p.timeout
    try:
        while got < p.count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw consumer got {got} of {p.count} within {p.timeout}s")
            item = await client.blpop([p.key], timeout=1)
            if item is None:
                continue
            last_ns = time.monotonic_ns()
            message = json.loads(item[1])
            if p.keep_latency:
                latencies.append(last_ns - int(message["t"]))
            got += 1
    finally:
        await client.aclose()
    return {"received": got, "last_ns": last_ns, "latency_ns": latencies}


async def raw_publisher(channel: Channel, p: RawParams) -> dict[str, Any]:
    """LPUSH ``count`` messages, awaiting each; returns the time of the first send."""
    client = aioredis.Redis.from_url(p.url, decode_responses=True)
    await client.ping()
    channel.ready()
    await channel.wait_go(p.timeout)
    start_ns = time.monotonic_ns()
    try:
        for i in range(p.count):
            if p.rate:
                await pace(start_ns, i, p.rate)
            await client.lpush(p.key, dumps({"i": i, "t": time.monotonic_ns()}))
        end_ns = time.monotonic_ns()
    finally:
        await client.aclose()
    return {"start_ns": start_ns, "sent_ns": end_ns}


def run_raw(url: str, key: str, count: int, *, rate: float | None = None,
            timeout: float = 60.0) -> dict[str, Any]:
    """One raw run; returns ``msgs_per_s`` and (when paced) the consumer's latencies in ns."""
    params = RawParams(url, key, count, rate, keep_latency=rate is not None, timeout=timeout)
    res = run_stages("raw", [[Role("raw-consumer", raw_consumer, params)],
                             [Role("raw-publisher", raw_publisher, params)]], timeout + 20)
    start = res["raw-publisher"]["start_ns"]
    last = res["raw-consumer"]["last_ns"]
    sent = res["raw-publisher"]["sent_ns"]
    return {"msgs_per_s": count / ((last - start) / 1e9),
            "send_per_s": count / ((sent - start) / 1e9),
            "latency_ns": res["raw-consumer"]["latency_ns"],
            "cpu_us_per_msg": {"publisher": res["raw-publisher"]["cpu_s"] * 1e6 / count,
                               "subscribers": res["raw-consumer"]["cpu_s"] * 1e6 / count}}
