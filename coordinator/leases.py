"""Token leases in Redis: at most one holder at a time, renewals checked by token.

A holder that stalls past its lease (GC pause, SIGSTOP, partition) finds the lease gone or taken
and must stop acting; the scripts that do the holder's writes check the same token, so a stale
holder is fenced even if it has not noticed yet.

A lease's value is a :class:`LeaseToken`: who holds it (a worker or beat name), its process id and
a random nonce, so tools can tell which process holds a lease and no two holders share a token.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from coordinator.scripts import scripts_for

__all__ = ["Lease", "LeaseToken"]

_SEP = "|"


@dataclass(frozen=True, slots=True)
class LeaseToken:
    """The value a lease holder writes: ``<name>|<pid>|<nonce>`` (the name may hold anything but '|')."""

    name: str
    pid: int
    nonce: str

    @classmethod
    def new(cls, name: str) -> LeaseToken:
        """A fresh token for ``name`` in this process."""
        return cls(name.replace(_SEP, "_"), os.getpid(), uuid.uuid4().hex[:12])

    @classmethod
    def parse(cls, text: str | bytes | None) -> LeaseToken | None:
        """The token a lease holds, or None for no lease or a value not written as a token."""
        if text is None:
            return None
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        name, sep, rest = text.partition(_SEP)
        pid, sep2, nonce = rest.partition(_SEP)
        if not (sep and sep2 and pid.isdigit() and nonce):
            return None
        return cls(name, int(pid), nonce)

    def __str__(self) -> str:
        return f"{self.name}{_SEP}{self.pid}{_SEP}{self.nonce}"


class Lease:
    """A lease on ``key`` held under ``token`` for ``ttl`` seconds per renewal (sync client)."""

    def __init__(self, client: Any, key: str, token: LeaseToken | str, ttl: float) -> None:
        self.key = key
        self.token = str(token)
        self.ttl_ms = max(1, int(ttl * 1000))
        self._scripts = scripts_for(client)

    def acquire(self) -> bool:
        """Take the lease if free, renew it if ours; False if another holder has it."""
        return bool(self._scripts.lease_acquire(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> bool:
        """Give the lease up if we still hold it."""
        return bool(self._scripts.lease_release(keys=[self.key], args=[self.token]))

    def __repr__(self) -> str:
        return f"Lease(key={self.key!r}, ttl_ms={self.ttl_ms})"
