"""The raw one-hop anchors: a publisher process LPUSHes to a list, a consumer process pops it.

Every variant carries the payload the route scenarios carry (compact JSON ``{"i": index, "t": send
time}``), decodes it to text and parses it, as a peer's handler gets it. Three variants of the hop,
so the routed figures meet the strongest plain design, not a convenient one:

``async``
    redis-py's asyncio client on both sides (``decode_responses=True``); the consumer blocks in
    BLPOP for each message. This is the anchor the benchmark always had, kept as it was.
``sync``
    redis-py's synchronous client (with hiredis, so hiredis parses its replies) on both sides.
``lean``
    the project's own lean RESP connections: ``coordinator.resp.AsyncResp`` for the asyncio publisher,
    ``coordinator.resp.RespConnection`` for a synchronous consumer.

The ``sync`` and ``lean`` consumers pop the way a peer reads its inbox (up to 256 entries per read):
one ``BLMPOP 1 1 <key> RIGHT COUNT 256`` per round trip, which blocks for the first message and
returns up to 256 at once. That is the fastest plain design: a single command per round trip, where
BLPOP for the first message and then ``LPOP <key> 255`` costs a second command (or, pipelined
together, a second reply to parse) even when the list holds one message, which is the common case
when the publisher awaits each push. Popping from the right end of an LPUSHed list keeps it FIFO,
as an inbox stream is.

Publishers: ``sequential`` awaits each LPUSH, ``paced`` does the same at a fixed rate (latency runs),
``pipelined`` (``lean`` only) writes ``chunk`` LPUSHes at once and awaits their replies before the
next chunk, the way the pipelined route scenario keeps ``chunk`` publishes in flight.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from bench.children import Channel, Role, pace, run_stages
from coordinator.protocol import dumps
from coordinator.resp import AsyncResp, RespConnection

__all__ = ["BATCH", "VARIANTS", "RawParams", "raw_consumer", "raw_publisher", "run_raw"]

VARIANTS = ("async", "sync", "lean")
"""The raw hop's client designs (see the module docstring)."""
BATCH = 256
"""Messages a batching consumer pops per read, as a peer reads its inbox."""


@dataclass(frozen=True)
class RawParams:
    """One raw run: list ``key`` on ``url`` carries ``count`` messages with clients ``variant``."""

    url: str
    key: str
    count: int
    variant: str = "async"
    rate: float | None = None
    """Messages per second of a paced publisher (None: as fast as each push returns)."""
    chunk: int = 1
    """LPUSHes in flight at once (above 1: the pipelined publisher, ``lean`` only)."""
    keep_latency: bool = False
    timeout: float = 60.0


class _Tally:
    """What a consumer saw: message count, time of the last receipt and (if kept) latencies."""

    def __init__(self, p: RawParams) -> None:
        self.p = p
        self.got = 0
        self.last_ns = 0
        self.latency_ns: list[int] = []
        self.deadline = time.monotonic() + p.timeout

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"raw consumer got {self.got} of {self.p.count} within {self.p.timeout}s")

    def took(self, items: list[Any]) -> None:
        """Messages of one read, received now."""
        now = time.monotonic_ns()
        self.last_ns = now
        for item in items:
            message = json.loads(item)
            if self.p.keep_latency:
                self.latency_ns.append(now - int(message["t"]))
        self.got += len(items)

    def result(self) -> dict[str, Any]:
        return {"received": self.got, "last_ns": self.last_ns, "latency_ns": self.latency_ns}


async def _consume_async(channel: Channel, p: RawParams) -> dict[str, Any]:
    client = aioredis.Redis.from_url(p.url, decode_responses=True)
    await client.ping()
    channel.ready()
    tally = _Tally(p)
    try:
        while tally.got < p.count:
            tally.check()
            item = await client.blpop([p.key], timeout=1)
            if item is not None:
                tally.took([item[1]])
    finally:
        await client.aclose()
    return tally.result()


def _consume_sync(channel: Channel, p: RawParams) -> dict[str, Any]:
    client = redis.Redis.from_url(p.url, decode_responses=True)
    client.ping()
    channel.ready()
    tally = _Tally(p)
    try:
        while tally.got < p.count:
            tally.check()
            reply: Any = client.blmpop(1, 1, p.key, direction="RIGHT", count=BATCH)
            if reply:
                tally.took(reply[1])
    finally:
        client.close()
    return tally.result()


def _consume_lean(channel: Channel, p: RawParams) -> dict[str, Any]:
    conn = RespConnection(p.url)
    conn.pipeline([("PING",)], timeout=10)
    channel.ready()
    tally = _Tally(p)
    pop = [("BLMPOP", 1, 1, p.key, "RIGHT", "COUNT", BATCH)]
    try:
        while tally.got < p.count:
            tally.check()
            (reply,) = conn.pipeline(pop, timeout=5)
            if isinstance(reply, Exception):
                raise reply
            if reply:
                tally.took(reply[1])
    finally:
        conn.close()
    return tally.result()


async def raw_consumer(channel: Channel, p: RawParams) -> dict[str, Any]:
    """Pop ``count`` messages with the consumer of ``variant``; receive time of the last, latencies."""
    if p.variant == "async":
        return await _consume_async(channel, p)
    if p.variant == "sync":
        return _consume_sync(channel, p)
    if p.variant == "lean":
        return _consume_lean(channel, p)
    raise ValueError(f"unknown raw variant {p.variant!r}")


def _message(i: int) -> str:
    return dumps({"i": i, "t": time.monotonic_ns()})


async def _publish_async(channel: Channel, p: RawParams) -> tuple[int, int]:
    client = aioredis.Redis.from_url(p.url, decode_responses=True)
    await client.ping()
    channel.ready()
    await channel.wait_go(p.timeout)
    start_ns = time.monotonic_ns()
    try:
        for i in range(p.count):
            if p.rate:
                await pace(start_ns, i, p.rate)
            await client.lpush(p.key, _message(i))
        return start_ns, time.monotonic_ns()
    finally:
        await client.aclose()


async def _publish_sync(channel: Channel, p: RawParams) -> tuple[int, int]:
    client = redis.Redis.from_url(p.url, decode_responses=True)
    client.ping()
    channel.ready()
    await channel.wait_go(p.timeout)
    start_ns = time.monotonic_ns()
    try:
        for i in range(p.count):
            if p.rate:
                delay = start_ns + int(i * 1e9 / p.rate) - time.monotonic_ns()
                if delay > 0:
                    time.sleep(delay / 1e9)
            client.lpush(p.key, _message(i))
        return start_ns, time.monotonic_ns()
    finally:
        client.close()


async def _publish_lean(channel: Channel, p: RawParams) -> tuple[int, int]:
    conn = AsyncResp(p.url)
    await conn.call("PING")
    channel.ready()
    await channel.wait_go(p.timeout)
    start_ns = time.monotonic_ns()
    try:
        if p.chunk > 1:
            for first in range(0, p.count, p.chunk):
                replies = await conn.pipeline([("LPUSH", p.key, _message(i))
                                               for i in range(first, min(p.count, first + p.chunk))])
                errors = [r for r in replies if isinstance(r, Exception)]
                if errors:
                    raise errors[0]
        else:
            for i in range(p.count):
                if p.rate:
                    await pace(start_ns, i, p.rate)
                await conn.call("LPUSH", p.key, _message(i))
        return start_ns, time.monotonic_ns()
    finally:
        await conn.close()


async def raw_publisher(channel: Channel, p: RawParams) -> dict[str, Any]:
    """LPUSH ``count`` messages with the publisher of ``variant``; times of the first and last send."""
    if p.chunk > 1 and p.variant != "lean":
        raise ValueError("the pipelined raw publisher is the lean one")
    publish = {"async": _publish_async, "sync": _publish_sync, "lean": _publish_lean}.get(p.variant)
    if publish is None:
        raise ValueError(f"unknown raw variant {p.variant!r}")
    start_ns, end_ns = await publish(channel, p)
    return {"start_ns": start_ns, "sent_ns": end_ns}


def run_raw(url: str, key: str, count: int, *, variant: str = "async", rate: float | None = None,
            chunk: int = 1, timeout: float = 60.0) -> dict[str, Any]:
    """One raw run; ``msgs_per_s``, ``send_per_s``, CPU per message of publisher and consumer
    (``subscribers``) and, when paced, the consumer's latencies in ns."""
    params = RawParams(url, key, count, variant, rate, chunk, keep_latency=rate is not None,
                       timeout=timeout)
    res = run_stages(f"raw-{variant}", [[Role("raw-consumer", raw_consumer, params)],
                                        [Role("raw-publisher", raw_publisher, params)]], timeout + 20)
    start = res["raw-publisher"]["start_ns"]
    last = res["raw-consumer"]["last_ns"]
    sent = res["raw-publisher"]["sent_ns"]
    return {"msgs_per_s": count / ((last - start) / 1e9),
            "send_per_s": count / ((sent - start) / 1e9),
            "latency_ns": res["raw-consumer"]["latency_ns"],
            "cpu_us_per_msg": {"publisher": res["raw-publisher"]["cpu_s"] * 1e6 / count,
                               "subscribers": res["raw-consumer"]["cpu_s"] * 1e6 / count}}

