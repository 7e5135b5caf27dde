"""The router's view of the cluster: the one owner of routing state.

A :class:`RoutingView` holds what routing decisions are made from (the routing version, the
subscription index, the live members and the leader) and the caches derived from them (which
inboxes a topic reaches, inbox keys, topics already checked). Only its own methods change it:
``refresh`` reloads everything, ``invalidate`` marks it stale, and ``subscription_changed`` /
``member_joined`` apply a change the router's own script just made when its version follows ours
(anything else marks the view stale, so it is reloaded before the next decision).

Every fan-out and control script is fenced by the version the view was computed with, so a stale
view never delivers anything: the script answers ``stale`` and the router refreshes and recomputes.
"""

from __future__ import annotations

import logging
from typing import Any

from coordinator.cluster.membership import parse_subscription
from coordinator.keys import Keys
from coordinator.topics import (
    SubscriptionIndex,
    check_pattern,
    check_publish_topic,
    check_queue,
    group_key,
)

__all__ = ["RoutingView"]

log = logging.getLogger("sidecar.router")
_CACHE_LIMIT = 50_000


class RoutingView:
    """Version, subscription index, members and leader of one namespace, with derived caches."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.version: str | None = None
        """Routing version the view was loaded at; None: stale, reload before deciding anything."""
        self.index = SubscriptionIndex()
        self.members: frozenset[str] = frozenset()
        self.leader: tuple[str, int] = ("", 0)
        self.groups = SubscriptionIndex()
        """Queue groups by pattern: (group key ``"<queue> <pattern>"``, pattern) entries."""
        self.group_members: dict[str, list[str]] = {}
        """Group key -> its member peers, sorted (live or not: targets filter)."""
        self.subscriptions: tuple[tuple[str, str, str], ...] = ()
        """Every subscription as loaded: (peer, pattern, queue group or '')."""
        self._turn: dict[str, int] = {}
        self._targets: dict[str, tuple[str, ...]] = {}
        self._topic_groups: dict[str, tuple[str, ...]] = {}
        self._inbox: dict[str, str] = {}
        self._valid_topics: set[str] = set()

    @property
    def stale(self) -> bool:
        return self.version is None

    def invalidate(self) -> None:
        """Anything may have changed: reload before the next decision."""
        self.version = None

    def refresh(self, client: Any) -> None:
        """Reload version, subscriptions, members and leader in one transaction."""
        pipe = client.pipeline(transaction=True)
        pipe.get(self.keys.routing_version)
        pipe.hkeys(self.keys.subs)
        pipe.zrange(self.keys.members, 0, -1)
        pipe.hmget(self.keys.leader, "id", "term")
        version, fields, members, leader = pipe.execute()
        index, groups = SubscriptionIndex(), SubscriptionIndex()
        group_members: dict[str, list[str]] = {}
        subscriptions = []
        for field in fields:
            peer, pattern, queue = parse_subscription(field)
            try:
                check_pattern(pattern)
                if queue:
                    check_queue(queue)
                    key = group_key(queue, pattern)
                    groups.add(key, pattern)
                    group_members.setdefault(key, []).append(peer)
                else:
                    index.add(peer, pattern)
            except ValueError:  # not written by subscribe.lua (it stores checked patterns only)
                log.warning("ignoring malformed subscription %r", field)
                continue
            subscriptions.append((peer, pattern, queue))
        self.subscriptions = tuple(subscriptions)
        self.index = index
        self.groups = groups
        self.group_members = {k: sorted(v) for k, v in group_members.items()}
        self.members = frozenset(str(m) for m in members)
        self.leader = (str(leader[0] or ""), int(leader[1] or 0))
        self.version = str(version or "0")
        self._forget()

    # ------------------------------------------------------------------ changes the router made
    def subscription_changed(self, version: int, changed: bool, add: bool, peer: str,
                             pattern: str, queue: str = "") -> None:
        """subscribe.lua answered ``version``; apply the change if it is the only one since ours."""
        if changed and self.version is not None and version == int(self.version) + 1:
            if not queue:
                (self.index.add if add else self.index.remove)(peer, pattern)
            else:
                key = group_key(queue, pattern)
                peers = set(self.group_members.get(key, ()))
                (peers.add if add else peers.discard)(peer)
                if peers:
                    self.group_members[key] = sorted(peers)
                    self.groups.add(key, pattern)
                else:
                    self.group_members.pop(key, None)
                    self.groups.remove(key, pattern)
            self.version = str(version)
            self._forget()
        elif changed or str(version) != self.version:
            self.version = None

    def member_joined(self, version: int, joined: bool, peer: str) -> None:
        """register.lua answered ``version``; apply the join if it is the only change since ours."""
        if joined and self.version is not None and version == int(self.version) + 1:
            self.members = self.members | {peer}
            self.version = str(version)
            self._forget()
        elif joined or str(version) != self.version:
            self.version = None

    # ------------------------------------------------------------------ derived
    def _forget(self) -> None:
        self._targets.clear()
        self._topic_groups.clear()

    def queue_targets(self, topic: str) -> list[tuple[str, str, str]]:
        """(peer, queue, pattern) for each queue group matching ``topic``: one live member each,
        taken in turn so a group's messages spread evenly over its members."""
        keys = self._topic_groups.get(topic)
        if keys is None:
            keys = tuple(sorted(self.groups.match(topic)))
            if len(self._topic_groups) > _CACHE_LIMIT:
                self._topic_groups.clear()
            self._topic_groups[topic] = keys
        out = []
        for key in keys:
            live = [p for p in self.group_members.get(key, ()) if p in self.members]
            if live:
                turn = self._turn.get(key, 0)
                self._turn[key] = turn + 1
                queue, _, pattern = key.partition(" ")
                out.append((live[turn % len(live)], queue, pattern))
        return out

    def targets(self, topic: str) -> tuple[str, ...]:
        """The live members subscribed to ``topic``, in peer order (cached)."""
        found = self._targets.get(topic)
        if found is None:
            found = self.match(topic)
        return found

    def match(self, topic: str) -> tuple[str, ...]:
        """Compute (and cache) the targets of ``topic``."""
        found = tuple(p for p in sorted(self.index.match(topic)) if p in self.members)
        if len(self._targets) > _CACHE_LIMIT:
            self._targets.clear()
        self._targets[topic] = found
        return found

    def inbox(self, peer: str) -> str:
        """Inbox key of ``peer`` (cached)."""
        key = self._inbox.get(peer)
        if key is None:
            if len(self._inbox) > _CACHE_LIMIT:
                self._inbox.clear()
            key = self._inbox[peer] = self.keys.responses(peer)
        return key

    def check_topic(self, topic: str | None) -> str:
        """``topic`` if a peer may publish to it (InvalidTopic otherwise); checked once per topic."""
        if topic is not None and topic in self._valid_topics:
            return topic
        checked = check_publish_topic(topic)
        if len(self._valid_topics) > _CACHE_LIMIT:
            self._valid_topics.clear()
        self._valid_topics.add(checked)
        return checked
