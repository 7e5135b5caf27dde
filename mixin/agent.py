"""``Agent``: the base of a peer application: identity, namespace, lifecycle, status."""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any, Self

from ulid import ULID

from coordinator.protocol import PEER_ID_RE
from coordinator.status import StatusMixin

__all__ = ["Agent", "Lifecycle"]


class Lifecycle:
    """Cooperative async lifecycle: every class in the MRO chains ``super()`` in these."""

    async def setup(self, *args: Any, **kwargs: Any) -> None:
        """Prepare the peer to run."""

    async def update(self) -> bool:
        """One unit of the peer's work; True if it did something."""
        return True

    async def teardown(self) -> None:
        """Release everything ``setup`` acquired."""


class Agent(Lifecycle, StatusMixin):
    """A peer with a ULID identity in a namespace. Use as ``async with Agent(...) as a:``."""

    def __init__(self, namespace: str | None = None, logger: logging.Logger | None = None, *,
                 id: str | None = None, **kwargs: Any) -> None:
        self.namespace = namespace or os.environ.get("SIDECAR_NAMESPACE") or "default"
        self.namespace_given = namespace is not None
        self.logger = logger or logging.getLogger(f"sidecar.peer.{type(self).__name__}")
        self._id = str(ULID()) if id is None else str(id)
        if not PEER_ID_RE.match(self._id):
            raise ValueError(f"peer id {self._id[:80]!r} must be 1-64 letters, digits, '_' or '-'")
        super().__init__(**kwargs)

    @property
    def id(self) -> str:
        """26-character ULID string, unique and time-ordered."""
        return self._id

    @property
    def short_id(self) -> str:
        """Last six characters of :attr:`id`, for logs."""
        return self._id[-6:]

    async def __aenter__(self) -> Self:
        await self.setup()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.teardown()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.short_id!r}, namespace={self.namespace!r})"
