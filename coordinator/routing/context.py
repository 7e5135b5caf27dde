"""What the router's helpers share: one router's connection, identity and routing state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.keys import Keys
from coordinator.routing.guard import Guard
from coordinator.routing.rejections import Rejector
from coordinator.routing.view import RoutingView
from coordinator.settings import Settings

__all__ = ["RouterContext"]


@dataclass(frozen=True, slots=True)
class RouterContext:
    """The parts of one router that its publish planner and control handler read.

    They read the view and the guard, and never change anything else of the router's: what they
    find out goes back to the router as return values.
    """

    client: Any
    keys: Keys
    settings: Settings
    view: RoutingView
    guard: Guard
    rejector: Rejector
    token: str
    """The router's lease token: every fenced script checks it."""
    name: str
    """The router's consumer name in the request group."""
