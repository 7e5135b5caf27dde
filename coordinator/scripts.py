"""Lua scripts, kept as files under ``coordinator/lua`` and loaded once per Redis client.

Each ``.lua`` file documents its KEYS, ARGV and return value in its header. ``scripts_for(client)``
returns the script objects registered on that client (sync, async or a pipeline's parent); calling
one runs EVALSHA and falls back to loading the script after a Redis restart (NOSCRIPT).
"""

from __future__ import annotations

import weakref
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["SCRIPT_NAMES", "Scripts", "scripts_for", "source"]

SCRIPT_NAMES = (
    "route",
    "subscribe",
    "register",
    "leave",
    "heartbeat",
    "lease_acquire",
    "lease_release",
    "elect",
    "policy_set",
    "policy_ack",
    "mark",
    "drop_inbox",
    "reply",
    "requeue",
    "publish",
    "dataplane",
)


@cache
def source(name: str) -> str:
    """Text of ``coordinator/lua/<name>.lua``."""
    return resources.files("coordinator").joinpath("lua", f"{name}.lua").read_text()


class Scripts:
    """The scripts registered on one client, as attributes named like their files."""

    route: Any
    subscribe: Any
    register: Any
    leave: Any
    heartbeat: Any
    lease_acquire: Any
    lease_release: Any
    elect: Any
    policy_set: Any
    policy_ack: Any
    mark: Any
    drop_inbox: Any
    reply: Any
    requeue: Any
    publish: Any
    dataplane: Any

    def __init__(self, client: Any) -> None:
        for name in SCRIPT_NAMES:
            setattr(self, name, client.register_script(source(name)))


_CACHE: weakref.WeakKeyDictionary[Any, Scripts] = weakref.WeakKeyDictionary()


def scripts_for(client: Any) -> Scripts:
    """The :class:`Scripts` of ``client``, registered on first use."""
    found = _CACHE.get(client)
    if found is None:
        found = _CACHE[client] = Scripts(client)
    return found
