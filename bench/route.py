"""Routing through the sidecar: publisher and subscriber peers in their own processes.

A peer is the plainest thing a user writes, ``class BenchPeer(Agent, SidecarMixin)``. The publisher
publishes ``{"i": index, "t": send time}`` to ``bench.x``; subscribers hold ``bench.>`` and count
what their handler sees. A run ends when every subscriber peer has every message: throughput is
messages (or deliveries) over the time from the first publish to the last handler call anywhere.

Publisher modes: ``sequential`` awaits each ``cluster_publish``; ``paced`` does the same at a fixed
rate (latency runs); ``pipelined`` keeps ``chunk`` publishes in flight with ``asyncio.gather``,
which the mixin coalesces into pipelines.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import redis

from bench.children import Channel, Role, pace, run_stages
from bench.services import BENCH_PEER_KEY
from coordinator.keys import Keys
from coordinator.policy.auth import Identities
from coordinator.policy.store import PolicyStore
from coordinator.protocol import Message
from mixin import Agent, SidecarMixin

__all__ = ["BenchPeer", "PeerParams", "route_publisher", "route_subscriber", "run_route"]

TOPIC = "bench.x"
PATTERN = "bench.>"


class BenchPeer(Agent, SidecarMixin):
    """A peer with nothing but the mixin."""


def _payload(index: int) -> dict[str, int]:
    """What every benchmark message carries: its index and its send time (CLOCK_MONOTONIC ns)."""
    return {"i": index, "t": time.monotonic_ns()}


@dataclass(frozen=True)
class PeerParams:
    """One side of a route run in namespace ``namespace`` on ``url``."""

    url: str
    namespace: str
    count: int
    mode: str = "sequential"
    """Publisher: ``sequential``, ``paced`` or ``pipelined``."""
    rate: float | None = None
    chunk: int = 1
    peers: int = 1
    """Subscriber: peers in this process, each subscribed to ``bench.>``."""
    keep_latency: bool = False
    timeout: float = 60.0
    credentials: tuple[tuple[str, str], ...] = ()
    """(peer id, secret) for each peer of this process, when the sidecar requires signing."""


def _peer(p: PeerParams, k: int = 0) -> BenchPeer:
    if p.credentials:
        peer_id, secret = p.credentials[k]
        return BenchPeer(namespace=p.namespace, redis_url=p.url, id=peer_id, secret=secret)
    return BenchPeer(namespace=p.namespace, redis_url=p.url)


class _Tally:
    """Counts one subscriber peer's deliveries and signals when all ``count`` arrived."""

    def __init__(self, count: int, keep_latency: bool, done: asyncio.Event,
                 remaining: list[int]) -> None:
        self.count = count
        self.keep_latency = keep_latency
        self.got = 0
        self.last_ns = 0
        self.latency_ns: list[int] = []
        self._done = done
        self._remaining = remaining

    def __call__(self, message: Message) -> None:
        now = time.monotonic_ns()
        if self.keep_latency:
            self.latency_ns.append(now - int(message.data["t"]))
        self.got += 1
        if self.got == self.count:
            self.last_ns = now
            self._remaining[0] -= 1
            if self._remaining[0] == 0:
                self._done.set()


async def route_subscriber(channel: Channel, p: PeerParams) -> dict[str, Any]:
    """Set up ``peers`` subscriber peers, then wait until each has ``count`` messages."""
    peers = [_peer(p, k) for k in range(p.peers)]
    done = asyncio.Event()
    remaining = [p.peers]
    tallies = [_Tally(p.count, p.keep_latency, done, remaining) for _ in peers]
    try:
        await asyncio.gather(*(peer.setup() for peer in peers))
        await asyncio.gather(*(peer.cluster_subscribe(PATTERN, tally)
                               for peer, tally in zip(peers, tallies, strict=True)))
        channel.ready()
        try:
            async with asyncio.timeout(p.timeout):
                await done.wait()
        except TimeoutError:
            got = [t.got for t in tallies]
            raise TimeoutError(f"subscribers got {min(got)}..{max(got)} of {p.count} messages "
                               f"within {p.timeout}s") from None
    finally:
        await asyncio.gather(*(peer.teardown() for peer in peers), return_exceptions=True)
    return {"last_ns": max(t.last_ns for t in tallies),
            "received": sum(t.got for t in tallies),
            "latency_ns": [x for t in tallies for x in t.latency_ns]}


async def route_publisher(channel: Channel, p: PeerParams) -> dict[str, Any]:
    """Publish ``count`` messages in ``mode``; returns the time of the first publish."""
    peer = _peer(p)
    await peer.setup()
    try:
        channel.ready()
        await channel.wait_go(p.timeout)
        start_ns = time.monotonic_ns()
        if p.mode == "pipelined":
            for first in range(0, p.count, p.chunk):
                chunk = range(first, min(p.count, first + p.chunk))
                await asyncio.gather(*(peer.cluster_publish(TOPIC, _payload(i)) for i in chunk))
        else:
            for i in range(p.count):
                if p.rate:
                    await pace(start_ns, i, p.rate)
                await peer.cluster_publish(TOPIC, _payload(i))
        sent_ns = time.monotonic_ns()
    finally:
        await peer.teardown()
    return {"start_ns": start_ns, "sent_ns": sent_ns}


BENCH_POLICY = {"statements": [{"id": "bench", "effect": "allow", "role_ids": ["bench"],
                                "action": ["publish", "subscribe"], "resource": ["bench.>"]}]}


def secure_identities(url: str, namespace: str, count: int) -> list[tuple[str, str]]:
    """``count`` signing identities with role ``bench``, and a policy letting them use bench.>."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        keys = Keys(namespace)
        store = PolicyStore(client, keys)
        if store.get("bench") is None:
            store.set("bench", BENCH_POLICY, by="bench")
        made = [Identities(client, keys, BENCH_PEER_KEY).add(f"bench{k}", ["bench"])
                for k in range(count)]
    finally:
        client.close()
    return [(m["SIDECAR_PEER_ID"], m["SIDECAR_PEER_SECRET"]) for m in made]


def run_route(url: str, namespace: str, count: int, *, mode: str = "sequential",
              rate: float | None = None, chunk: int = 1, procs: int = 1, peers_per_proc: int = 1,
              timeout: float = 60.0, secure: bool = False) -> dict[str, Any]:
    """One route run with ``procs`` x ``peers_per_proc`` subscribers and one publisher.

    Returns ``msgs_per_s`` (messages published over time to the last delivery), ``deliveries_per_s``
    (the same times the subscriber count), ``send_per_s`` and, for paced runs, latencies in ns.
    """
    keep = mode == "paced"
    creds = secure_identities(url, namespace, procs * peers_per_proc + 1) if secure else []
    subscribers = [Role(f"sub{k}", route_subscriber, PeerParams(
        url, namespace, count, peers=peers_per_proc, keep_latency=keep, timeout=timeout,
        credentials=tuple(creds[k * peers_per_proc:(k + 1) * peers_per_proc])))
        for k in range(procs)]
    pub = PeerParams(url, namespace, count, mode=mode, rate=rate, chunk=chunk, timeout=timeout,
                     credentials=tuple(creds[-1:]))
    res = run_stages(f"route-{mode}", [subscribers, [Role("pub", route_publisher, pub)]],
                     timeout + 30)
    start = res["pub"]["start_ns"]
    last = max(res[r.name]["last_ns"] for r in subscribers)
    seconds = (last - start) / 1e9
    total = procs * peers_per_proc
    return {"msgs_per_s": count / seconds, "deliveries_per_s": count * total / seconds,
            "send_per_s": count / ((res["pub"]["sent_ns"] - start) / 1e9),
            "latency_ns": [x for r in subscribers for x in res[r.name]["latency_ns"]],
            "cpu_us_per_msg": {"publisher": res["pub"]["cpu_s"] * 1e6 / count,
                               "subscribers": sum(res[r.name]["cpu_s"] for r in subscribers)
                               * 1e6 / count}}
