"""What the parts of an active bridge share (:mod:`.export`, :mod:`.intake`, :mod:`.governor`).

The :class:`~coordinator.federation.bridge.Bridge` owns the lease, the NATS connection and these
objects; the export and the intake are given an :class:`ActiveSite` for one round of federating
(from a connection to NATS until it fails or the lease goes) and keep their own state; the
governor outlives rounds and is given what it needs. What two parts touch is here: the
:class:`Tally` the parts add to and the bridge takes at each lease renewal, the
:class:`ReplyRoutes` the intake fills and the export empties, and the bridge's :class:`Counters`,
each added to by the parts named beside it.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from coordinator.federation.envelope import ReplyRoute
from coordinator.keys import Keys
from coordinator.scripts import Scripts
from coordinator.settings import Settings

__all__ = ["ActiveSite", "Counters", "Deposed", "ReplyRoutes", "Tally"]

_REPLY_LIMIT = 10_000
"""Requests from elsewhere a bridge remembers the way back of."""
_REPLY_AGE = 300.0
"""Seconds a request from elsewhere is remembered (far past any request timeout)."""


class Deposed(Exception):
    """Another bridge holds the site's bridge lease now."""


class Counters(Protocol):
    """The bridge's status counters; the part that adds to each is named beside it."""

    exported: int  # export
    export_failed: int  # export
    answers: int  # export (answers out) and intake (answers in)
    imported: int  # intake
    dead_lettered: int  # intake
    lost_to_retention: int  # intake
    consuming: bool  # intake (and the bridge clears it when a round ends)


@dataclass(slots=True)
class Tally:
    """What the parts moved since the bridge last added it to the site's counters (at each lease
    renewal, as peers add theirs with their heartbeats: one command less per delivery)."""

    routed: int = 0
    delivered: int = 0
    traffic: Counter[str] = field(default_factory=Counter)
    """``exported`` and ``imported <site>`` (:attr:`coordinator.keys.Keys.bridge_traffic`)."""

    def take(self) -> tuple[int, int, Counter[str]]:
        """Routed, delivered and traffic so far, starting the next tally from zero."""
        taken = self.routed, self.delivered, Counter(self.traffic)
        self.routed = self.delivered = 0
        self.traffic.clear()
        return taken

    def restore(self, routed: int, delivered: int, traffic: Counter[str]) -> None:
        """Add back what :meth:`take` gave and could not be recorded (Redis failed)."""
        self.routed += routed
        self.delivered += delivered
        self.traffic.update(traffic)


class ReplyRoutes:
    """Requests from other sites (and plain NATS requesters) that a local peer may answer: the way
    back of each, for a bounded number of them and a bounded time."""

    def __init__(self) -> None:
        self._routes: OrderedDict[str, tuple[ReplyRoute, float]] = OrderedDict()

    def remember(self, request: str, route: ReplyRoute) -> None:
        """Keep the way back of ``request``, forgetting the oldest past the bounds."""
        now = time.monotonic()
        self._routes[request] = (route, now)
        while self._routes and (len(self._routes) > _REPLY_LIMIT or
                                next(iter(self._routes.values()))[1] < now - _REPLY_AGE):
            self._routes.popitem(last=False)

    def take(self, request: str) -> ReplyRoute | None:
        """The way back of ``request``, forgotten now (a request is answered once)."""
        found = self._routes.pop(request, None)
        return None if found is None else found[0]


@dataclass(frozen=True, slots=True)
class ActiveSite:
    """One round of federating: the site, its Redis, NATS, and what the parts add to."""

    settings: Settings
    keys: Keys
    site: str
    peer_id: str
    """The bridge's member id on this site (:func:`~coordinator.federation.bridge.bridge_id`)."""
    inbox: str
    token: str
    """The bridge lease's token: every write that a successor's could conflict with is fenced."""
    name: str
    redis: Any
    scripts: Scripts
    nc: Any
    js: Any
    disconnections: Callable[[], int]
    """How often NATS was lost so far: what was published before the last loss may be lost."""
    rejoin: Callable[[], Awaitable[None]]
    """Register the bridge's member again (after an eviction)."""
    counters: Counters
    tally: Tally
    replies: ReplyRoutes
