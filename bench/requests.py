"""Request/reply and queue groups, next to a raw Redis round trip measured the same way.

* ``request-reply``: one requester process awaiting each ``cluster_request``, one responder peer in
  another process whose handler returns the request's data. Each round trip is timed.
* ``raw-rtt`` (the anchor): the requester sends each request with one LPUSH on the project's lean
  asyncio connection and BLPOPs the answer from a reply list; a synchronous responder in another
  process (the lean RESP connection, the fastest plain client here) BLPOPs the request and LPUSHes
  the answer. Same payload, one request in flight, as the requester above.
* ``queue-group``: one publisher awaiting each publish, four members of one queue group in four
  processes; the figure is messages over the time until every message was handled by one member.
  Each member also holds a plain subscription to ``bench.end``, which the publisher sends after its
  last message: order per publisher means a member that has it has handled its share, so no member
  polls anything while the group works.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from bench.children import Channel, Role, run_stages
from bench.route import BenchPeer, _payload
from coordinator.resp import AsyncResp, RespConnection
from mixin import Message

__all__ = ["run_queue_group", "run_raw_rtt", "run_request_reply"]

TOPIC = "bench.rpc"


@dataclass(frozen=True)
class RpcParams:
    url: str
    namespace: str
    count: int
    timeout: float
    key: str = ""
    members: int = 1
    """Queue group: how many members the scenario has (each member process counts its share)."""


async def responder(channel: Channel, p: RpcParams) -> dict[str, Any]:
    """A peer answering every request on ``bench.rpc`` with its data, until told to stop."""
    peer = BenchPeer(namespace=p.namespace, redis_url=p.url)
    await peer.setup()
    stop = asyncio.Event()

    def answer(m: Message) -> Any:
        if m.data == "stop":
            stop.set()
        return m.data

    try:
        await peer.cluster_subscribe(TOPIC, answer)
        channel.ready()
        async with asyncio.timeout(p.timeout):
            await stop.wait()
    finally:
        await peer.teardown()
    return {}


async def requester(channel: Channel, p: RpcParams) -> dict[str, Any]:
    """``count`` requests, one at a time; returns each round trip in ns."""
    peer = BenchPeer(namespace=p.namespace, redis_url=p.url)
    await peer.setup()
    try:
        channel.ready()
        await channel.wait_go(p.timeout)
        rtts: list[int] = []
        start = time.monotonic_ns()
        for i in range(p.count):
            sent = time.monotonic_ns()
            await peer.cluster_request(TOPIC, _payload(i), timeout=p.timeout)
            rtts.append(time.monotonic_ns() - sent)
        end = time.monotonic_ns()
        await peer.cluster_request(TOPIC, "stop", timeout=p.timeout)
    finally:
        await peer.teardown()
    return {"rtt_ns": rtts, "start_ns": start, "end_ns": end}


def raw_responder(channel: Channel, p: RpcParams) -> dict[str, Any]:
    conn = RespConnection(p.url)
    try:
        conn.pipeline([("PING",)], timeout=10)
        channel.ready()
        for _ in range(p.count + 1):
            (reply,) = conn.pipeline([("BLPOP", p.key + ":req", 0)], timeout=p.timeout)
            conn.pipeline([("LPUSH", p.key + ":rep", reply[1])], timeout=p.timeout)
    finally:
        conn.close()
    return {}


async def raw_responder_main(channel: Channel, p: RpcParams) -> dict[str, Any]:
    return await asyncio.to_thread(raw_responder, channel, p)


async def raw_requester(channel: Channel, p: RpcParams) -> dict[str, Any]:
    conn = AsyncResp(p.url)
    try:
        await conn.call("PING")
        channel.ready()
        await channel.wait_go(p.timeout)
        rtts: list[int] = []
        start = time.monotonic_ns()
        for i in range(p.count + 1):
            sent = time.monotonic_ns()
            await conn.call("LPUSH", p.key + ":req", json.dumps(_payload(i)))
            await conn.call("BLPOP", p.key + ":rep", 0)
            if i < p.count:
                rtts.append(time.monotonic_ns() - sent)
        end = time.monotonic_ns()
    finally:
        await conn.close()
    return {"rtt_ns": rtts, "start_ns": start, "end_ns": end}


class _GroupTally:
    def __init__(self) -> None:
        self.got = 0
        self.last_ns = 0
        self.end = asyncio.Event()

    def __call__(self, m: Message) -> None:
        self.got += 1
        self.last_ns = time.monotonic_ns()


async def group_member(channel: Channel, p: RpcParams) -> dict[str, Any]:
    """A queue group member; counts what it handles until the publisher's end marker comes."""
    peer = BenchPeer(namespace=p.namespace, redis_url=p.url)
    tally = _GroupTally()
    await peer.setup()
    try:
        await peer.cluster_subscribe("bench.job", tally, queue="workers")
        await peer.cluster_subscribe("bench.end", lambda m: tally.end.set())
        channel.ready()
        await channel.wait_go(p.timeout)
        async with asyncio.timeout(p.timeout):
            await tally.end.wait()
    finally:
        await peer.teardown()
    return {"got": tally.got, "last_ns": tally.last_ns}


async def group_publisher(channel: Channel, p: RpcParams) -> dict[str, Any]:
    peer = BenchPeer(namespace=p.namespace, redis_url=p.url)
    await peer.setup()
    try:
        channel.ready()
        await channel.wait_go(p.timeout)
        start = time.monotonic_ns()
        for i in range(p.count):
            await peer.cluster_publish("bench.job", _payload(i))
        await peer.cluster_publish("bench.end", p.count)
    finally:
        await peer.teardown()
    return {"start_ns": start}


def _rtt_result(res: dict[str, Any], count: int) -> dict[str, Any]:
    seconds = (res["end_ns"] - res["start_ns"]) / 1e9
    return {"per_s": count / seconds, "latency_ns": res["rtt_ns"]}


def run_request_reply(url: str, namespace: str, count: int, timeout: float) -> dict[str, Any]:
    """Requests per second and each round trip, through the sidecar."""
    p = RpcParams(url, namespace, count, timeout)
    res = run_stages("request-reply", [[Role("responder", responder, p)],
                                       [Role("requester", requester, p)]], timeout + 30)
    return _rtt_result(res["requester"], count)


def run_raw_rtt(url: str, key: str, count: int, timeout: float) -> dict[str, Any]:
    """The raw Redis round trip: LPUSH, a responder's BLPOP and LPUSH, the requester's BLPOP."""
    p = RpcParams(url, "", count, timeout, key=key)
    res = run_stages("raw-rtt", [[Role("responder", raw_responder_main, p)],
                                 [Role("requester", raw_requester, p)]], timeout + 30)
    return _rtt_result(res["requester"], count)


def run_queue_group(url: str, namespace: str, count: int, members: int,
                    timeout: float) -> dict[str, Any]:
    """Messages per second into a queue group of ``members`` member processes."""
    p = RpcParams(url, namespace, count, timeout, members=members)
    roles = [Role(f"member{k}", group_member, p) for k in range(members)]
    res = run_stages("queue-group", [roles, [Role("pub", group_publisher, p)]], timeout + 30)
    handled = sum(res[r.name]["got"] for r in roles)
    if handled != count:
        raise RuntimeError(f"the group handled {handled} of {count} messages")
    last = max(res[r.name]["last_ns"] for r in roles)
    return {"msgs_per_s": count / ((last - res["pub"]["start_ns"]) / 1e9),
            "spread": sorted(res[r.name]["got"] for r in roles)}
