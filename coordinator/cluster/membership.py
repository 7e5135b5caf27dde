"""Membership records: register, heartbeat, leave and evict, as script calls.

Each ``*_call`` function returns the ``(keys, args)`` of one script invocation, so the router
(sync client), the mixin and ClusterSidecar (async clients) and the beat duties share one
definition of what each call touches. :class:`Membership` runs them on a sync client.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from typing import Any

from coordinator.clock import redis_ms
from coordinator.cluster.handoff import hand_off
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.protocol import dumps
from coordinator.scripts import scripts_for

__all__ = ["Membership", "elect_call", "heartbeat_call", "leave_call", "member_fields",
           "parse_subscription", "register_call", "subscribe_call", "subscription_field"]

Call = tuple[list[str], list[Any]]


_NAME_RE = re.compile(r"[\w.-]{0,64}")
"""A member's name (its class name): shown to operators, so nothing that could forge a line."""


def member_fields(peer_id: str, info: Mapping[str, Any]) -> tuple[str, list[str]]:
    """Validate a member's self-description; return (json for the join event, hash field pairs)."""
    role = str(info.get("role", "peer"))
    labels = info.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise ValueError("labels must be a mapping of strings")
    priority = int(info.get("priority", 0))
    eligible = bool(info.get("eligible", True))
    incarnation = str(info.get("incarnation", "0"))
    roles = info.get("roles") or [role]
    name = str(info.get("name", ""))
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"name {name[:80]!r} must be at most 64 letters, digits, '_', '.' or '-'")
    event = dumps({"peer_id": peer_id, "role": role, "labels": dict(labels), "priority": priority})
    pairs = ["role", role, "labels", dumps(dict(labels)), "priority", str(priority),
             "eligible", "1" if eligible else "0", "incarnation", incarnation,
             "roles", dumps(list(roles)), "name", name]
    return event, pairs


def register_call(keys: Keys, peer_id: str, info: Mapping[str, Any], *, token: str = "",
                  stream: str | None = None, entry_id: str = "", request_id: str = "",
                  inbox_maxlen: int = 10_000, lease_key: str | None = None) -> Call:
    """Arguments of register.lua for ``peer_id`` (from a router, fenced by ``lease_key`` holding
    ``token``, when ``token`` is given)."""
    event, pairs = member_fields(peer_id, info)
    ks = [lease_key or keys.router_lease(0), keys.members, keys.member(peer_id), stream or keys.requests(0),
          keys.responses(peer_id), keys.leader, keys.system, keys.events, keys.routing_version,
          keys.electorate]
    eligible = "1" if bool(info.get("eligible", True)) else "0"
    priority = int(info.get("priority", 0))
    args: list[Any] = [token, REQUEST_GROUP, entry_id, peer_id, request_id, inbox_maxlen, event,
                       eligible, priority, *pairs]
    return ks, args


def subscription_field(peer_id: str, pattern: str, queue: str = "") -> str:
    """The subscriptions hash's field for one subscription: ``<peer> <pattern>[ <queue>]``."""
    return f"{peer_id} {pattern} {queue}" if queue else f"{peer_id} {pattern}"


def parse_subscription(field: str) -> tuple[str, str, str]:
    """``(peer, pattern, queue)`` of a subscriptions hash field (queue '' for a plain one)."""
    peer, _, rest = str(field).partition(" ")
    pattern, _, queue = rest.partition(" ")
    return peer, pattern, queue


def subscribe_call(keys: Keys, peer_id: str, pattern: str, queue: str = "", *, add: bool,
                   fence: tuple[str, str], stream: str | None = None, entry_id: str = "",
                   request_id: str = "", inbox_maxlen: int = 10_000) -> Call:
    """Arguments of subscribe.lua: ``peer_id`` subscribes to (``add``) or leaves ``pattern``,
    in queue group ``queue`` if given, fenced by ``fence`` (lease key, token); a router passes
    the request entry to ack and the request id to reply to."""
    ks = [fence[0], keys.subs, keys.routing_version, stream or keys.requests(0),
          keys.responses(peer_id), keys.member(peer_id), keys.routes, keys.group_turns]
    field = subscription_field(peer_id, pattern, queue)
    args: list[Any] = [fence[1], REQUEST_GROUP, entry_id, "add" if add else "remove", field,
                       request_id, inbox_maxlen, pattern,
                       f"{peer_id} {queue}" if queue else peer_id]
    return ks, args


def leave_call(keys: Keys, peer_id: str, reason: str, *, stream: str | None = None,
               entry_id: str = "", silent_ms: int | None = None,
               fence: tuple[str, str] | None = None) -> Call:
    """Arguments of leave.lua: ``peer_id`` leaves (``reason``: leave, evicted, expired).

    With ``silent_ms`` the member is removed only if it has been silent that long (sweep). With
    ``fence`` (lease key, token) the script runs only while that router lease is the caller's.
    """
    lease_key, token = fence or (keys.router_lease(0), "")
    ks = [keys.members, keys.member(peer_id), keys.subs, keys.routing_version, keys.system,
          keys.events, stream or keys.requests(0), keys.leader, keys.electorate, lease_key,
          keys.routes, keys.publish_last, keys.group_turns]
    return ks, [peer_id, REQUEST_GROUP, entry_id, reason, "" if silent_ms is None else silent_ms,
                token]


def elect_call(keys: Keys, member_ttl: float, reason: str, *, mode: str = "local",
               extra: tuple[Any, ...] = ()) -> Call:
    """Arguments of elect.lua (``reason`` is recorded if the leader changes). ``mode`` and
    ``extra`` are the federated modes' (``candidate``: who to keep; ``adopt``: leader id, term,
    hold ms, bridge lease token), see coordinator.federation.directory."""
    ks = [keys.members, keys.electorate, keys.leader, keys.system, keys.events, keys.routing_version]
    if mode == "adopt":
        ks.append(keys.bridge_lease)
    return ks, [int(member_ttl * 1000), reason, mode, *extra]


def heartbeat_call(keys: Keys, peer_id: str, extra: Any = None, *, payload: str | None = None,
                   status: str = "", fence: tuple[str, str] | None = None) -> Call:
    """Arguments of heartbeat.lua; ``extra`` (JSON-able) replaces the last heartbeat payload.

    ``payload`` passes JSON text as it is instead (a router relaying a peer's heartbeat);
    ``status`` (JSON text, '' to keep the last) replaces the peer's status fields. With ``fence``
    (lease key, token) the script runs only while that router lease is the caller's.
    """
    text = payload if payload is not None else "" if extra is None else dumps(extra)
    ks = [keys.members, keys.member(peer_id), keys.leader]
    if fence is None:
        return ks, [peer_id, text, "", status]
    return [*ks, fence[0]], [peer_id, text, fence[1], status]


class Membership:
    """Reads and changes membership on a sync Redis client."""

    def __init__(self, client: Any, keys: Keys, *, inbox_maxlen: int = 100_000) -> None:
        self.client = client
        self.keys = keys
        self.inbox_maxlen = inbox_maxlen
        self.scripts = scripts_for(client)

    def register(self, peer_id: str, **info: Any) -> bool:
        """Make ``peer_id`` a member; True if it was not one before."""
        ks, args = register_call(self.keys, peer_id, info)
        return bool(int(self.scripts.register(keys=ks, args=args)[1]))

    def leave(self, peer_id: str, reason: str = "leave") -> bool:
        """Remove ``peer_id`` and its subscriptions, handing its unhandled queue group deliveries
        to other members; True if it was a member.

        The caller runs the election next if the peer was the leader (Duties does).
        """
        ks, args = leave_call(self.keys, peer_id, reason)
        left = bool(int(self.scripts.leave(keys=ks, args=args)[0]))
        if left:
            hand_off(self.client, self.keys, peer_id, inbox_maxlen=self.inbox_maxlen)
        return left

    def sweep(self, member_ttl: float) -> list[str]:
        """Evict every member silent for longer than ``member_ttl`` (a site's bridge member
        stays: leave.lua); returns the evicted ids."""
        now_ms = redis_ms(self.client)
        ttl_ms = int(member_ttl * 1000)
        evicted = []
        for peer in self.client.zrangebyscore(self.keys.members, "-inf", now_ms - ttl_ms - 1):
            ks, args = leave_call(self.keys, str(peer), "expired", silent_ms=ttl_ms)
            if int(self.scripts.leave(keys=ks, args=args)[0]):
                evicted.append(str(peer))
                hand_off(self.client, self.keys, str(peer), inbox_maxlen=self.inbox_maxlen)
        return evicted

    def heartbeat(self, peer_id: str, extra: Any = None) -> bool:
        """Stamp ``peer_id`` as alive; False if it is not a member (it must register again)."""
        ks, args = heartbeat_call(self.keys, peer_id, extra)
        return bool(self.scripts.heartbeat(keys=ks, args=args)[0] == "ok")

    def members(self) -> dict[str, float]:
        """Live member ids mapped to their last heartbeat (Redis server ms)."""
        return {str(k): float(v) for k, v in self.client.zrange(self.keys.members, 0, -1,
                                                                 withscores=True)}

    def info(self, peer_id: str) -> dict[str, Any]:
        """The member record of ``peer_id`` with JSON fields decoded ({} if not a member)."""
        raw = self.client.hgetall(self.keys.member(peer_id))
        out: dict[str, Any] = dict(raw)
        for name in ("labels", "roles", "extra"):
            if name in out:
                with contextlib.suppress(ValueError):
                    out[name] = json.loads(out[name])
        return out
