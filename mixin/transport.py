"""``NatsMixin``: the seed's peer transport, a plain NATS connection of the peer's own.

``setup_transport(urls=None)`` connects to NATS (``SIDECAR_NATS_URL`` unless ``urls`` are given)
with a few retries and backoff, then carries on offline with a warning instead of raising; without
any URL it does nothing and ``connected`` stays False, so a peer written for NATS still runs on a
Redis-only sidecar. ``publish(topic, data)`` sends a dict as JSON, a str as UTF-8 and bytes as they
are on subject ``<namespace>.<topic>`` (the subjects the sidecar's bridge uses); ``subscribe`` and
``unsubscribe`` take the same topics. nats-py is imported only when a URL is given.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from coordinator.errors import SidecarUnavailable
from coordinator.keys import Keys
from coordinator.settings import Settings
from mixin.agent import Lifecycle

__all__ = ["NatsMixin"]

CONNECT_ATTEMPTS = 3
"""Tries ``setup_transport`` makes before carrying on offline."""
CONNECT_TIMEOUT = 3.0
"""Seconds one try may take."""


def encode(data: Any) -> bytes:
    """A dict as JSON, a str as UTF-8, bytes as they are; TypeError for anything else."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, dict):
        return json.dumps(data, separators=(",", ":")).encode()
    raise TypeError(f"publish takes a dict, a str or bytes, not {type(data).__name__}")


class NatsMixin(Lifecycle):
    """A peer's own NATS connection: publish, subscribe, unsubscribe (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nats: Any = None
        self._nats_subs: dict[str, Any] = {}

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up."""
        nc = self._nats
        return bool(nc is not None and nc.is_connected)

    def _transport_settings(self) -> Settings:
        found = getattr(self, "sidecar_settings", None)
        return found if isinstance(found, Settings) else Settings.from_env()

    def _subject(self, topic: str) -> str:
        return Keys(str(getattr(self, "namespace", None) or self._transport_settings().namespace)
                    ).subject(topic)

    async def setup_transport(self, urls: Sequence[str] | str | None = None) -> None:
        """Connect to NATS, or carry on offline (a warning) when it cannot be reached."""
        if self._nats is not None:
            return
        servers = [urls] if isinstance(urls, str) else list(urls or ())
        if not servers and self._transport_settings().nats_url:
            servers = [str(self._transport_settings().nats_url)]
        if not servers:
            return  # no NATS configured: the peer runs on the sidecar alone
        import nats  # only when NATS is used

        log: logging.Logger = getattr(self, "logger", None) or logging.getLogger("sidecar.nats")
        delay = 0.2
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                # once connected it reconnects forever; the first connection is bounded here
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    self._nats = await nats.connect(servers=servers, connect_timeout=2,
                                                    max_reconnect_attempts=-1, allow_reconnect=True)
                return
            except Exception as exc:  # nats-py raises several types for an unreachable server
                if attempt == CONNECT_ATTEMPTS:
                    log.warning("NATS unreachable after %d attempts (%s); carrying on offline",
                                attempt, exc)
                    return
                await asyncio.sleep(delay)
                delay *= 2

    async def update_transport(self) -> None:
        """Flush what was published (nothing to do while offline)."""
        if self.connected:
            await self._nats.flush(timeout=2)

    async def publish(self, topic: str, data: Any) -> None:
        """Send ``data`` (dict, str or bytes) on ``<namespace>.<topic>``."""
        payload = encode(data)
        if not self.connected:
            raise SidecarUnavailable("not connected to NATS (setup_transport found no server)")
        await self._nats.publish(self._subject(topic), payload)

    async def subscribe(self, topic: str, callback: Callable[[Any], Any]) -> None:
        """Call ``callback(msg)`` (nats-py's message) for every message on ``<namespace>.<topic>``;
        the subscription is in force when this returns."""
        if not self.connected:
            raise SidecarUnavailable("not connected to NATS (setup_transport found no server)")

        async def handler(msg: Any) -> None:
            result = callback(msg)
            if inspect.isawaitable(result):
                await result

        await self.unsubscribe(topic)
        self._nats_subs[topic] = await self._nats.subscribe(self._subject(topic), cb=handler)
        await self._nats.flush(timeout=2)  # the server has it when this returns

    async def unsubscribe(self, topic: str) -> None:
        """Stop the subscription to ``topic``, if any."""
        sub = self._nats_subs.pop(topic, None)
        if sub is not None and self.connected:
            await sub.unsubscribe()

    async def teardown_transport(self) -> None:
        """Drain and close the connection."""
        nc, self._nats = self._nats, None
        self._nats_subs.clear()
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except Exception:
                await nc.close()

    async def teardown(self) -> None:
        await self.teardown_transport()
        await super().teardown()
