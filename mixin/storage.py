"""``RedisMixin``: the seed's peer storage, a small key-value space of the peer's own in Redis.

``setup_storage(urls=None)`` connects a client (``SIDECAR_REDIS_URL`` unless ``urls`` are given).
``get`` / ``set(key, value, nx=False, ttl=None)`` / ``delete`` / ``keys`` / ``exists`` work under the
root ``sidecar:{<namespace>}:peer.<id>.`` (built by coordinator.keys), so peers never see each
other's keys and the sidecar's own keys are out of reach. Values are JSON. Every call raises
SidecarUnavailable while the storage is not set up or Redis cannot be reached.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coordinator.errors import SidecarUnavailable
from coordinator.keys import Keys
from coordinator.settings import Settings
from mixin.agent import Lifecycle

__all__ = ["RedisMixin"]

_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisMixin(Lifecycle):
    """Peer-private key-value storage in Redis (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._storage: aioredis.Redis | None = None
        self._root = ""

    async def setup_storage(self, urls: Sequence[str] | str | None = None) -> None:
        """Connect the storage client (it connects lazily: the first call finds out if Redis is up)."""
        if self._storage is not None:
            return
        found = getattr(self, "sidecar_settings", None)
        settings = found if isinstance(found, Settings) else Settings.from_env()
        url = urls if isinstance(urls, str) else next(iter(urls or ()), None)
        url = url or settings.redis_url
        if not url:
            raise SidecarUnavailable("no Redis URL for storage: set SIDECAR_REDIS_URL or pass urls")
        namespace = str(getattr(self, "namespace", None) or settings.namespace)
        peer = str(getattr(self, "id", "") or "anonymous")
        self._root = Keys(namespace).peer_storage(peer)
        self._storage = aioredis.Redis.from_url(url, decode_responses=True)

    async def update_storage(self) -> None:
        """Check the storage is reachable (raises SidecarUnavailable if not)."""
        await self._call(lambda r: r.ping())

    def _client(self) -> aioredis.Redis:
        if self._storage is None:
            raise SidecarUnavailable("storage is not set up: call setup_storage() first")
        return self._storage

    async def _call(self, op: Any) -> Any:
        try:
            return await op(self._client())
        except _DOWN as exc:
            raise SidecarUnavailable(f"the peer's storage (Redis) is unreachable: {exc}") from exc

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        raw = await self._call(lambda r: r.get(self._root + key))
        return default if raw is None else json.loads(raw)

    async def set(self, key: str, value: Any, nx: bool = False, ttl: float | None = None) -> bool:
        """Store ``value`` (JSON-able) under ``key``; with ``nx`` only if absent, with ``ttl`` for
        that many seconds. Returns whether it was stored."""
        text = json.dumps(value, separators=(",", ":"))
        px = None if ttl is None else max(1, int(ttl * 1000))
        return bool(await self._call(lambda r: r.set(self._root + key, text, nx=nx, px=px)))

    async def delete(self, key: str) -> bool:
        """Remove ``key``; whether it existed."""
        return bool(await self._call(lambda r: r.delete(self._root + key)))

    async def exists(self, key: str) -> bool:
        return bool(await self._call(lambda r: r.exists(self._root + key)))

    async def keys(self, pattern: str = "*") -> list[str]:
        """This peer's keys matching the glob ``pattern``, without the root."""
        async def scan(r: aioredis.Redis) -> list[str]:
            return [k async for k in r.scan_iter(match=self._root + pattern, count=500)]
        return sorted(k[len(self._root):] for k in await self._call(scan))

    async def teardown_storage(self) -> None:
        client, self._storage = self._storage, None
        if client is not None:
            await client.aclose()

    async def teardown(self) -> None:
        await self.teardown_storage()
        await super().teardown()
