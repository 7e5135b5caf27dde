"""Redis memory per idle peer: start N peers (registered, one subscription each), then measure.

``redis_used_memory_per_idle_peer`` is the memory figure: the growth of Redis ``INFO memory``
``used_memory`` per idle peer, read before the peers start and once steady with them idle (see
:func:`_settled_memory`), all in: the peers' keys, their share of shared keys and logs, and the
buffers of their connections (up to three per peer). It is split into what Redis holds for those
connections (``mem_clients_normal``) and the dataset, which also holds bounded shared logs
(request, system and event streams) the joins filled. ``redis_bytes_per_idle_peer`` (legacy, no
target) counts keys only, as the issue once did ("a peer's stream, group, member hash and index
entry"): MEMORY USAGE of each sampled peer's inbox stream (with its group) and member hash, plus its
share of the namespace's members, electorate and subscription keys.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

import redis

from bench.children import Channel, Role, run_stages
from bench.route import BenchPeer
from coordinator.keys import Keys

__all__ = ["IdleParams", "idle_peers", "run_idle_memory"]


@dataclass(frozen=True)
class IdleParams:
    """``peers`` idle peers of ``namespace``, numbered from ``first``."""

    url: str
    namespace: str
    peers: int
    first: int
    timeout: float = 60.0


async def idle_peers(channel: Channel, p: IdleParams) -> dict[str, Any]:
    """Set the peers up, report ready, and stay idle until released; then leave."""
    peers = [BenchPeer(namespace=p.namespace, redis_url=p.url) for _ in range(p.peers)]
    try:
        await asyncio.gather(*(peer.setup() for peer in peers))
        await asyncio.gather(*(peer.cluster_subscribe(f"idle.{p.first + k}.>", _ignore)
                               for k, peer in enumerate(peers)))
        channel.ready()
        await channel.wait_go(p.timeout)
    finally:
        await asyncio.gather(*(peer.teardown() for peer in peers), return_exceptions=True)
    return {"peers": len(peers)}


def _ignore(message: Any) -> None:
    """Handler of the idle subscriptions (nothing is published to them)."""


_FIELDS = ("used_memory", "mem_clients_normal", "used_memory_dataset")


def _settled_memory(client: redis.Redis, min_s: float, max_s: float,
                    window: int = 5, interval: float = 0.5) -> tuple[dict[str, float], float]:
    """INFO memory once it is steady: the median of the last ``window`` samples, and the wait.

    Steady means ``used_memory`` moved by at most 0.1% (plus 4 KiB) across the window. Redis frees
    an idle client's query buffer after two idle seconds and resizes reply buffers on a five-second
    cycle, so right after a burst of connections the figure is still falling.
    """
    start = time.monotonic()
    samples: list[dict[str, float]] = []
    while True:
        info = client.info("memory")
        samples.append({f: float(info[f]) for f in _FIELDS})
        recent = samples[-window:]
        used = [x["used_memory"] for x in recent]
        waited = time.monotonic() - start
        steady = len(recent) == window and max(used) - min(used) <= 4096 + used[-1] / 1000
        if (steady and waited >= min_s) or waited >= max_s:
            return {f: statistics.median(x[f] for x in recent) for f in _FIELDS}, waited
        time.sleep(interval)


def _key_sizes(client: redis.Redis, keys: Keys, peers: int, sample: int = 20) -> dict[str, float]:
    """MEMORY USAGE of idle peers' own keys (mean over ``sample`` peers) and of shared keys."""
    def usage(key: str) -> float:
        return float(client.memory_usage(key, samples=0) or 0)

    ids = [str(p) for p in client.zrange(keys.members, 0, sample - 1)]
    inbox = statistics.mean(usage(keys.responses(p)) for p in ids) if ids else 0.0
    member = statistics.mean(usage(keys.member(p)) for p in ids) if ids else 0.0
    shared = {"members": usage(keys.members), "electorate": usage(keys.electorate),
              "subs": usage(keys.subs)}
    return {"redis_bytes_per_idle_peer": inbox + member + sum(shared.values()) / peers,
            "redis_idle_inbox_stream_bytes": inbox, "redis_idle_member_hash_bytes": member,
            "redis_idle_members_zset_bytes_per_peer": shared["members"] / peers,
            "redis_idle_electorate_zset_bytes_per_peer": shared["electorate"] / peers,
            "redis_idle_subs_hash_bytes_per_peer": shared["subs"] / peers}


def run_idle_memory(url: str, namespace: str, peers: int, procs: int, settle_s: float,
                    settle_max_s: float, timeout: float = 60.0) -> dict[str, float]:
    """Bytes of Redis memory per idle peer, total and split, and a few key sizes.

    Keys are the figure names of the results (``redis_bytes_per_idle_peer``, ...).
    """
    client = redis.Redis.from_url(url, decode_responses=True)
    sizes: dict[str, float] = {}
    after: dict[str, float] = {}
    clients: list[int] = []
    waited: list[float] = []
    try:
        before, _ = _settled_memory(client, settle_s, settle_max_s)
        clients.append(int(client.info("clients")["connected_clients"]))
        per = [peers // procs + (1 if k < peers % procs else 0) for k in range(procs)]
        starts = [sum(per[:k]) for k in range(procs)]
        roles = [Role(f"idle{k}", idle_peers, IdleParams(url, namespace, n, first, timeout))
                 for k, (n, first) in enumerate(zip(per, starts, strict=True))]

        def measure() -> None:
            memory, wait = _settled_memory(client, settle_s, settle_max_s)
            after.update(memory)
            waited.append(wait)
            clients.append(int(client.info("clients")["connected_clients"]))
            sizes.update(_key_sizes(client, Keys(namespace), peers))

        run_stages("idle-peers", [roles], timeout + settle_max_s + 30, before_go=measure)
        time.sleep(settle_s)  # every peer left; none should be a member any more
        left = float(client.zcard(Keys(namespace).members))
    finally:
        client.close()
    def per_peer(field: str) -> float:
        return (after[field] - before[field]) / peers

    out = {"redis_used_memory_per_idle_peer": per_peer("used_memory"),
           "redis_client_bytes_per_idle_peer": per_peer("mem_clients_normal"),
           "redis_dataset_bytes_per_idle_peer": per_peer("used_memory_dataset"),
           "redis_connections_per_idle_peer": (clients[1] - clients[0]) / peers,
           "redis_idle_settle_s": waited[0],
           "redis_idle_members_left_after_teardown": left}
    out.update(sizes)
    return out
