"""Topic grammar and the subscription index.

Topics follow NATS subject rules: dot-separated, non-empty tokens without whitespace. Subscription
patterns may use ``*`` (exactly one token) and ``>`` (one or more tokens, last token only); publish
topics are literal. Topics under ``cluster.`` are the sidecar's own events: peers may subscribe to
them but not publish them.

:class:`SubscriptionIndex` is a token trie: matching a topic walks at most one literal branch and one
``*`` branch per level, so its cost grows with topic depth and wildcard branching, not with the number
of subscriptions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from coordinator.errors import InvalidTopic

__all__ = [
    "MAX_TOPIC_LENGTH",
    "QUEUE_RE",
    "RESERVED_PREFIX",
    "SubscriptionIndex",
    "check_pattern",
    "check_publish_topic",
    "check_queue",
    "group_key",
    "matches",
]

MAX_TOPIC_LENGTH = 256
RESERVED_PREFIX = "cluster."
_FORBIDDEN = frozenset(" \t\r\n\x00")


def _tokens(text: object, what: str) -> list[str]:
    if not isinstance(text, str) or not text:
        raise InvalidTopic(f"{what} must be a non-empty string, got {text!r}")
    if len(text) > MAX_TOPIC_LENGTH:
        raise InvalidTopic(f"{what} is longer than {MAX_TOPIC_LENGTH} characters")
    if any(ch in _FORBIDDEN or ch.isspace() for ch in text):
        raise InvalidTopic(f"{what} {text!r} contains whitespace or NUL")
    tokens = text.split(".")
    if "" in tokens:
        raise InvalidTopic(f"{what} {text!r} has an empty token (leading, trailing or double dot)")
    return tokens


def check_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise InvalidTopic."""
    tokens = _tokens(pattern, "subscription pattern")
    for i, tok in enumerate(tokens):
        if tok == ">" and i != len(tokens) - 1:
            raise InvalidTopic(f"'>' may only be the last token, in {pattern!r}")
        if len(tok) > 1 and ("*" in tok or ">" in tok):
            raise InvalidTopic(f"wildcards must be whole tokens, {tok!r} in {pattern!r} is not")
    assert isinstance(pattern, str)
    return pattern


QUEUE_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
"""What a queue group name may look like."""


def check_queue(queue: object) -> str:
    """Return ``queue`` if it is a valid queue group name, else raise InvalidTopic."""
    if not isinstance(queue, str) or not QUEUE_RE.match(queue):
        raise InvalidTopic(f"queue group name {str(queue)[:80]!r} must be 1-64 letters, digits, "
                           "'_', '-' or '.'")
    return queue


def group_key(queue: str, pattern: str) -> str:
    """One queue group: the peers that subscribed to ``pattern`` with the name ``queue``."""
    return f"{queue} {pattern}"


def check_publish_topic(topic: object, *, allow_reserved: bool = False) -> str:
    """Return ``topic`` if a peer may publish to it, else raise InvalidTopic."""
    tokens = _tokens(topic, "topic")
    for tok in tokens:
        if "*" in tok or ">" in tok:
            raise InvalidTopic(f"cannot publish to a wildcard topic {topic!r}; publish topics are literal")
    assert isinstance(topic, str)
    if not allow_reserved and topic.startswith(RESERVED_PREFIX):
        raise InvalidTopic(f"topics under {RESERVED_PREFIX!r} are the sidecar's own events: {topic!r}")
    return topic


def matches(pattern: str, topic: str) -> bool:
    """True if literal ``topic`` matches ``pattern`` (reference matcher, linear in the tokens)."""
    p = pattern.split(".")
    t = topic.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or (tok != "*" and tok != t[i]):
            return False
    return len(p) == len(t)


class _Node:
    __slots__ = ("children", "here", "rest", "star")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.here: set[str] = set()   # subscribers whose pattern ends at this node
        self.rest: set[str] = set()   # subscribers of "<path>.>"

    def empty(self) -> bool:
        return not (self.children or self.star or self.here or self.rest)


class SubscriptionIndex:
    """Maps subscription patterns to subscriber ids; ``match(topic)`` finds every subscriber."""

    def __init__(self, entries: Iterable[tuple[str, str]] = ()) -> None:
        self._root = _Node()
        self._by_peer: dict[str, set[str]] = {}
        for peer, pattern in entries:
            self.add(peer, pattern)

    def __len__(self) -> int:
        return sum(len(p) for p in self._by_peer.values())

    def __contains__(self, item: tuple[str, str]) -> bool:
        peer, pattern = item
        return pattern in self._by_peer.get(peer, ())

    def items(self) -> Iterator[tuple[str, str]]:
        """Every (subscriber, pattern) pair."""
        for peer, patterns in self._by_peer.items():
            for pattern in patterns:
                yield peer, pattern

    def patterns_of(self, peer: str) -> frozenset[str]:
        return frozenset(self._by_peer.get(peer, ()))

    def add(self, peer: str, pattern: str) -> bool:
        """Subscribe ``peer`` to ``pattern``; False if it already was."""
        mine = self._by_peer.setdefault(peer, set())
        if pattern in mine:
            return False
        mine.add(pattern)
        node = self._root
        tokens = pattern.split(".")
        for tok in tokens:
            if tok == ">":
                node.rest.add(peer)
                return True
            if tok == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                nxt = node.children.get(tok)
                if nxt is None:
                    nxt = node.children[tok] = _Node()
                node = nxt
        node.here.add(peer)
        return True

    def remove(self, peer: str, pattern: str) -> bool:
        """Unsubscribe ``peer`` from ``pattern``; False if it was not subscribed."""
        mine = self._by_peer.get(peer)
        if not mine or pattern not in mine:
            return False
        mine.discard(pattern)
        if not mine:
            del self._by_peer[peer]
        self._remove(self._root, pattern.split("."), 0, peer)
        return True

    def remove_peer(self, peer: str) -> int:
        """Drop every subscription of ``peer``; returns how many there were."""
        patterns = list(self._by_peer.get(peer, ()))
        for pattern in patterns:
            self.remove(peer, pattern)
        return len(patterns)

    def _remove(self, node: _Node, tokens: list[str], i: int, peer: str) -> None:
        if i == len(tokens):
            node.here.discard(peer)
            return
        tok = tokens[i]
        if tok == ">":
            node.rest.discard(peer)
            return
        child = node.star if tok == "*" else node.children.get(tok)
        if child is None:
            return
        self._remove(child, tokens, i + 1, peer)
        if child.empty():
            if tok == "*":
                node.star = None
            else:
                del node.children[tok]

    def match(self, topic: str) -> set[str]:
        """Every subscriber with a pattern matching literal ``topic``."""
        out: set[str] = set()
        level = [self._root]  # every node the topic's first i tokens lead to (at most 2**i)
        for token in topic.split("."):
            following = []
            for node in level:
                if node.rest:
                    out |= node.rest
                child = node.children.get(token)
                if child is not None:
                    following.append(child)
                if node.star is not None:
                    following.append(node.star)
            if not following:
                return out
            level = following
        for node in level:
            if node.here:
                out |= node.here
        return out
