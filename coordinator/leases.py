"""Token leases in Redis: at most one holder at a time, renewals checked by token.

A holder that stalls past its lease (GC pause, SIGSTOP, partition) finds the lease gone or taken
and must stop acting; the scripts that do the holder's writes check the same token, so a stale
holder is fenced even if it has not noticed yet.
"""

from __future__ import annotations

from typing import Any

from coordinator.scripts import scripts_for

__all__ = ["Lease"]


class Lease:
    """A lease on ``key`` held under ``token`` for ``ttl`` seconds per renewal (sync client)."""

    def __init__(self, client: Any, key: str, token: str, ttl: float) -> None:
        self.client = client
        self.key = key
        self.token = token
        self.ttl_ms = max(1, int(ttl * 1000))
        self._scripts = scripts_for(client)

    def acquire(self) -> bool:
        """Take the lease if free, renew it if ours; False if another holder has it."""
        return bool(self._scripts.lease_acquire(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> bool:
        """Give the lease up if we still hold it."""
        return bool(self._scripts.lease_release(keys=[self.key], args=[self.token]))

    def holder(self) -> str | None:
        """Token of the current holder, if any."""
        value = self.client.get(self.key)
        return None if value is None else str(value)

    def __repr__(self) -> str:
        return f"Lease(key={self.key!r}, ttl_ms={self.ttl_ms})"
