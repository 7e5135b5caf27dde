"""Which request partitions one router holds: leases, the fair share, and the streams they cover.

:class:`Partitions` is the only owner of a router's leases. Routers check in on the ``routers``
sorted set (scored by Redis time); each takes partitions up to ``ceil(partitions / live
routers)`` and hands back what exceeds it, so partitions spread evenly and a standby takes a dead
router's partitions once their leases expire.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from typing import Any

from redis.exceptions import RedisError, ResponseError

from coordinator.clock import redis_ms
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.leases import Lease
from coordinator.settings import Settings

__all__ = ["Partitions"]

log = logging.getLogger("sidecar.router")


class Partitions:
    """The leases of router ``name`` (token ``token``) on ``client``."""

    def __init__(self, client: Any, keys: Keys, settings: Settings, *, name: str, token: str) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.name = name
        self.token = token
        self.leases: dict[int, Lease] = {}
        self._held: tuple[int, ...] | None = None
        """The partitions _held_streams was built for (None: build it again)."""
        self._held_streams: list[str] = []
        self._peers: dict[int, list[str]] = {}
        """Partition -> the peers' own request streams it covers (SIDECAR_AUTH=required)."""

    @property
    def held(self) -> list[int]:
        """Partitions held now, ascending."""
        return sorted(self.leases)

    def streams_of(self, partition: int) -> list[str]:
        """The streams a partition covers: its own, the system stream (partition 0), and the
        own request streams of the peers that map to it (SIDECAR_AUTH=required)."""
        stream = self.keys.requests(partition)
        own = [stream, self.keys.system] if partition == 0 else [stream]
        return own + self._peers.get(partition, [])

    def streams(self) -> list[str]:
        """The streams of the partitions held now (cached until the holding or the peers
        change)."""
        held = tuple(sorted(self.leases))
        if held != self._held:
            self._held = held
            self._held_streams = [s for p in held for s in self.streams_of(p)]
        return self._held_streams

    def holds_stream(self, stream: str) -> bool:
        return self.keys.partition_of_stream(stream, self.settings.partitions) in self.leases

    def learn_peers(self, peers: Iterable[str]) -> None:
        """Cover the own request streams of ``peers`` (the identities, SIDECAR_AUTH=required) from
        now on (the groups of streams new to this router exist once this returns, taking
        whatever was written there before)."""
        known = {s for streams in self._peers.values() for s in streams}
        by_partition: dict[int, list[str]] = {}
        for peer in sorted(peers):
            by_partition.setdefault(self.keys.partition_of(peer, self.settings.partitions),
                                    []).append(self.keys.peer_requests(peer))
        fresh = [s for streams in by_partition.values() for s in streams if s not in known]
        for stream in fresh:
            self._ensure_group(stream)
        if by_partition != self._peers:
            self._peers = by_partition
            self._held = None  # streams() builds its list again

    def renew(self) -> None:
        """Renew every held lease, dropping the ones another router has taken."""
        for p, lease in list(self.leases.items()):
            if not lease.acquire():
                log.warning("router %s lost partition %d", self.name, p)
                del self.leases[p]

    def drop_stream(self, stream: str) -> None:
        """A fenced script said our lease on ``stream``'s partition is gone: stop routing it."""
        p = self.keys.partition_of_stream(stream, self.settings.partitions)
        if self.leases.pop(p, None) is not None:
            log.warning("router %s was fenced off partition %d", self.name, p)

    def rebalance(self) -> list[int]:
        """Check in, hand back partitions beyond the fair share and take free ones up to it.

        Returns the partitions newly taken (the caller routes what their last owner left pending).
        """
        now_ms = redis_ms(self.client)
        stale_ms = now_ms - int(self.settings.router_lease * 2000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.routers, {self.name: now_ms})
        pipe.zremrangebyscore(self.keys.routers, "-inf", stale_ms)
        pipe.zcard(self.keys.routers)
        live = max(1, int(pipe.execute()[2]))
        total = self.settings.partitions
        share = math.ceil(total / live)
        while len(self.leases) > share:
            p = max(self.leases)
            self.leases.pop(p).release()
            log.info("router %s handed partition %d back (fair share %d)", self.name, p, share)
        taken = []
        for p in range(total):
            if len(self.leases) >= share:
                break
            if p in self.leases:
                continue
            lease = Lease(self.client, self.keys.router_lease(p), self.token, self.settings.router_lease)
            if lease.acquire():
                self.leases[p] = lease
                taken.append(p)
        return taken

    def release_all(self) -> None:
        """Give every lease up and check out (a clean stop)."""
        for lease in self.leases.values():
            with contextlib.suppress(RedisError):
                lease.release()
        self.leases.clear()
        with contextlib.suppress(RedisError):
            self.client.zrem(self.keys.routers, self.name)

    def ensure_groups(self, partition: int) -> None:
        """Create the routers' consumer group on the partition's streams if Redis lost it."""
        for stream in self.streams_of(partition):
            self._ensure_group(stream)

    def _ensure_group(self, stream: str) -> None:
        try:
            self.client.xgroup_create(stream, REQUEST_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def trim(self) -> int:
        """Drop routed entries from held request streams (keep anything still pending), then
        cap each peer's own stream at ``peer_backlog`` entries; returns how many unrouted
        requests that cap dropped.

        Not fenced, and safe unfenced: the floor is the group's lowest pending entry (or, with
        none pending, its last delivered id), and everything below it was acknowledged, whoever
        routes the stream now. The cap drops what a peer sent beyond its backlog: its own
        requests only, so a flood costs Redis a bounded amount of memory.
        """
        dropped = 0
        for stream in self.streams():
            try:
                groups = self.client.xinfo_groups(stream)
            except ResponseError:
                continue
            for g in groups:
                if g.get("name") != REQUEST_GROUP:
                    continue
                floor = str(g.get("last-delivered-id") or "0-0")
                if int(g.get("pending") or 0):
                    summary = self.client.xpending(stream, REQUEST_GROUP)
                    floor = str(summary.get("min") or floor)
                # (exactly on a peer's own stream: the cap below counts what is left as unrouted)
                self.client.xtrim(stream, minid=floor,
                                  approximate=self.keys.peer_of_stream(stream) is None)
            if self.keys.peer_of_stream(stream) is not None:
                dropped += int(self.client.xtrim(stream, maxlen=self.settings.peer_backlog,
                                                 approximate=False))
        return dropped
