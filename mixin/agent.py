"""``Agent``: the base of a peer application: identity, namespace, lifecycle, status."""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any, Self

from ulid import ULID

from coordinator.protocol import PEER_ID_RE
from coordinator.status import StatusMixin
from mixin.signals import Watch, stop_error

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
    """A peer with a ULID identity in a namespace. Use as ``async with Agent(...) as a:``.

    ``id`` fixes the peer's id (a restarted peer with the same id finds the messages that waited
    in its inbox); by default each instance gets a new ULID. With ``handle_signals`` (the default)
    SIGTERM and SIGINT make a peer inside ``async with`` leave the cluster at once and end the
    process, unless the application handles those signals itself (:mod:`mixin.signals`).
    """

    def __init__(self, namespace: str | None = None, logger: logging.Logger | None = None, *,
                 id: str | None = None, handle_signals: bool = True, **kwargs: Any) -> None:
        self.namespace = namespace or os.environ.get("SIDECAR_NAMESPACE") or "default"
        self.namespace_given = namespace is not None
        self.logger = logger or logging.getLogger(f"sidecar.peer.{type(self).__name__}")
        self._id = str(ULID()) if id is None else str(id)
        if not PEER_ID_RE.match(self._id):
            raise ValueError(f"peer id {self._id[:80]!r} must be 1-64 letters, digits, '_' or '-'")
        self.handle_signals = handle_signals
        self._watch: Watch | None = None
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
        """``setup()``; if it fails, ``teardown()`` releases what it got and the error goes on."""
        self._watch = Watch.enter() if self.handle_signals else None
        try:
            await self.setup()
        except BaseException:
            await self._end_block()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._end_block()

    async def _end_block(self) -> None:
        """Tear down; then, if a stop signal ended the block, raise what it asks for."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.begin_leaving()
        try:
            await self.teardown()
        finally:
            received = watch.exit() if watch is not None else None
        if received is None and watch is not None:
            received = await watch.outlast()
        if received is not None:
            raise stop_error(received) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.short_id!r}, namespace={self.namespace!r})"
