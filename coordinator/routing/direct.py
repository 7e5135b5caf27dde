"""The direct data path: a peer fans its own publishes out, in one script call, with no router hop.

Why: through the router a message costs two hops (publisher to request stream, router to inbox)
and a router wake-up between them; on a machine where every process shares two cores that is more
than twice the CPU of the plain Redis hop a user could write instead. On the direct path a publish
is one ``publish.lua`` call of the publisher's, which writes every subscriber's inbox atomically,
so a message costs what a raw hop costs plus the script's work inside Redis.

When: the router says which path is in force by writing :class:`DataPlane` when it starts
(``dataplane.lua``). It is ``direct`` unless the sidecar signs requests (``SIDECAR_AUTH=required``)
or enforces policies, because those checks are the router's, or ``SIDECAR_DATA_PATH=routed`` asks
for the router: then every publish goes through it, as do control requests (register, subscribe,
leave, ...) always. Peers read it when they register, and again whenever the routing version
moves, which a change of mode makes it do.

How: ``subscribe.lua`` and ``leave.lua`` keep a route index beside the subscription index,
``routes``: pattern -> the subscriptions of that pattern. A topic of ``d`` tokens can only be
matched by the ``2**(d+1) - 1`` patterns :func:`candidates` lists (each token itself or ``*``,
or a prefix of them and ``>``), so a peer resolves a topic of up to :data:`MAX_DEPTH` tokens with
one HMGET that does not grow with the number of subscriptions (deeper topics, rare, read the
whole index once), and caches the :class:`Route` under the routing version it read.
``publish.lua`` delivers only while that version is current; otherwise it writes nothing and
answers ``stale``, and the peer resolves again. Queue groups take turns in ``group.turns``, inside
the script, so every publisher spreads a group's messages over the same rotation; a batch that
hands a group a message is recognised if it is sent again after a lost reply (plain subscribers
drop such repeats themselves, by message id).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import SidecarError, error_from_code
from coordinator.keys import Keys
from coordinator.protocol import MAX_TTL_MS
from coordinator.resp import bulk, pack
from coordinator.scripts import scripts_for
from coordinator.settings import Settings
from coordinator.topics import matches

__all__ = [
    "MAX_DEPTH",
    "DataPlane",
    "DirectBatch",
    "Outcome",
    "Route",
    "RouteCache",
    "Template",
    "candidates",
    "publish_dataplane",
]

_CACHE_LIMIT = 4096
"""Topics a peer keeps resolved; all are forgotten when it fills up (or the version moves)."""


@dataclass(frozen=True, slots=True)
class DataPlane:
    """How peers publish, and the limits the direct path applies (the router's settings)."""

    mode: str
    """``direct`` or ``routed``."""
    inbox_maxlen: int
    overflow: str
    deadletter_maxlen: int
    max_payload_bytes: int
    max_header_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> DataPlane:
        """What a router with ``settings`` puts in force."""
        direct = (settings.data_path == "direct" and settings.auth == "off"
                  and not settings.enforce_policy)
        return cls("direct" if direct else "routed", settings.inbox_maxlen, settings.inbox_overflow,
                   settings.deadletter_maxlen, settings.max_payload_bytes, settings.max_header_bytes)

    @property
    def direct(self) -> bool:
        return self.mode == "direct"

    def fields(self) -> dict[str, str]:
        """As stored in the ``dataplane`` hash."""
        return {"mode": self.mode, "inbox_maxlen": str(self.inbox_maxlen), "overflow": self.overflow,
                "deadletter_maxlen": str(self.deadletter_maxlen),
                "max_payload_bytes": str(self.max_payload_bytes),
                "max_header_bytes": str(self.max_header_bytes)}

    @classmethod
    def parse(cls, fields: Mapping[str, str]) -> DataPlane | None:
        """The data plane a router wrote, or None when there is none (or it is not readable):
        then peers publish through the router."""
        try:
            plane = cls(fields["mode"], int(fields["inbox_maxlen"]), fields["overflow"],
                        int(fields["deadletter_maxlen"]), int(fields["max_payload_bytes"]),
                        int(fields["max_header_bytes"]))
        except (KeyError, ValueError):
            return None
        if plane.mode not in ("direct", "routed") or plane.overflow not in ("drop_oldest", "reject"):
            return None
        return plane


def publish_dataplane(client: Any, keys: Keys, settings: Settings) -> DataPlane:
    """Write the data plane ``settings`` put in force (a router starting); returns it."""
    plane = DataPlane.from_settings(settings)
    args = [x for kv in plane.fields().items() for x in kv]
    scripts_for(client).dataplane(keys=[keys.dataplane, keys.subs, keys.routes, keys.routing_version],
                                  args=args)
    return plane


def candidates(topic: str) -> list[str]:
    """Every pattern that could match literal ``topic``: each token itself or ``*``, and each
    proper prefix of those followed by ``>`` (``2**(d+1) - 1`` patterns for ``d`` tokens)."""
    tokens = topic.split(".")
    out: list[str] = [""]
    found: list[str] = []
    for token in tokens:
        found += [f"{p}>" for p in out]
        out = [f"{p}{t}." for p in out for t in (token, "*")]
    found += [p[:-1] for p in out]
    return found


@dataclass(frozen=True, slots=True)
class Route:
    """Who gets a topic: plain subscribers, and per queue group its members (one gets each)."""

    plain: tuple[str, ...]
    groups: tuple[tuple[str, str, tuple[str, ...]], ...]
    """(queue, pattern, member peers) of every group whose pattern matches."""

    @classmethod
    def from_index(cls, patterns: Sequence[str], values: Sequence[str | None]) -> Route:
        """The route of a topic from the route index entries of its candidate ``patterns``."""
        plain: set[str] = set()
        groups: dict[tuple[str, str], list[str]] = {}
        for pattern, value in zip(patterns, values, strict=True):
            if not value:
                continue
            for entry in str(value).split("\n"):
                peer, _, queue = entry.partition(" ")
                if not peer:
                    continue
                if queue:
                    groups.setdefault((queue, pattern), []).append(peer)
                else:
                    plain.add(peer)
        return cls(tuple(sorted(plain)),
                   tuple((q, p, tuple(sorted(m))) for (q, p), m in sorted(groups.items())))

    @property
    def empty(self) -> bool:
        return not self.plain and not self.groups


@dataclass(frozen=True, slots=True)
class Template:
    """The packed ``publish.lua`` call of one plain publish to one topic: only the message id and
    the payload change from one publish to the next, so the rest is packed once per route."""

    head: bytes
    """The command up to the message id."""
    topic: bytes
    tail: bytes
    """Everything after the payload."""

    def pack(self, message_id: str, data: str) -> bytes:
        """The whole command, in the Redis protocol."""
        return b"".join((self.head, bulk(message_id), self.topic, bulk(data), self.tail))


class RouteCache:
    """Topics a peer resolved, valid at one routing version (with their packed calls)."""

    def __init__(self) -> None:
        self.version: str | None = None
        self._routes: dict[str, Route] = {}
        self.templates: dict[str, Template] = {}
        """Topic -> the packed call of a plain publish to it (see DirectBatch.template)."""

    def get(self, topic: str) -> Route | None:
        return self._routes.get(topic)

    def invalidate(self) -> None:
        """The version moved: forget everything."""
        self.version = None
        self._routes.clear()
        self.templates.clear()

    @staticmethod
    def lookups(keys: Keys, topics: Iterable[str]) -> tuple[list[str], list[tuple[Any, ...]]]:
        """(topics, commands) resolving ``topics``: the routing version first, then the data plane
        in force (a router may have changed it: the version moves with it), then one HMGET of the
        candidate patterns per topic, or for topics deeper than :data:`MAX_DEPTH` tokens the whole
        route index once (matched here: its cost grows with the number of patterns, not 2**depth).
        Reading the version before the routes means a route can only be newer than the version it
        is filed under, which ``publish.lua`` refuses as stale (never older)."""
        wanted = list(dict.fromkeys(topics))
        commands: list[tuple[Any, ...]] = [("GET", keys.routing_version), ("HGETALL", keys.dataplane)]
        commands += [("HMGET", keys.routes, *candidates(t)) for t in wanted if not _deep(t)]
        if any(_deep(t) for t in wanted):
            commands.append(("HGETALL", keys.routes))
        return wanted, commands

    def learn(self, topics: Sequence[str], replies: Sequence[Any]) -> DataPlane | None:
        """Store what the :meth:`lookups` commands answered; returns the data plane they read."""
        version = str(replies[0] or "0")
        if version != self.version or len(self._routes) + len(topics) > _CACHE_LIMIT:
            self._routes.clear()
            self.templates.clear()
            self.version = version
        plane = DataPlane.parse(_text_map(replies[1]))
        shallow = iter(replies[2:])
        index = _text_map(replies[-1]) if any(_deep(t) for t in topics) else {}
        for topic in topics:
            if _deep(topic):
                patterns = [p for p in index if matches(p, topic)]
                self._routes[topic] = Route.from_index(patterns, [index[p] for p in patterns])
            else:
                self._routes[topic] = Route.from_index(candidates(topic), next(shallow))
        return plane


MAX_DEPTH = 8
"""Deepest topic resolved by its candidate patterns (511 of them); deeper ones read the index."""


def _deep(topic: str) -> bool:
    return topic.count(".") >= MAX_DEPTH


def _text_map(reply: Any) -> dict[str, str]:
    """A hash reply (a dict, or RESP2's flat list) as str -> str."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    flat = list(reply or ())
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


@dataclass(slots=True)
class DirectBatch:
    """One ``publish.lua`` call for a run of one sender's publishes and answers, in order.

    Entries are the request fields the mixin builds (``k`` = ``pub`` or ``rep``), or for a site's
    bridge ``fwd`` entries (another site's messages: ``q`` stream sequence, ``i``, ``t``, ``d``,
    ``x`` expiry in Redis ms, ``h``, ``s`` original sender, ``o`` origin site, ``rt`` "1" for a
    request); every topic must be resolved in ``routes`` first (see :meth:`missing`).
    """

    keys: Keys
    plane: DataPlane
    sender: str
    entries: list[dict[str, str]]
    bridge_token: str = ""
    """The bridge lease token a bridge sends ``fwd`` entries under ('' for a peer)."""

    def batch_key(self, routes: RouteCache) -> str:
        """Names this batch for ``publish.lua``'s repeat check (its last message id) when it hands
        a message to a queue group, else '' (no check: plain subscribers drop repeats by id)."""
        for f in self.entries:
            route = routes.get(f["t"]) if f.get("k") == "pub" else None
            if route is not None and route.groups:
                last = self.entries[-1]
                return last["i"] if last.get("k") == "pub" else f"rep:{last.get('ri', '')}"
        return ""

    def missing(self, routes: RouteCache) -> list[str]:
        """Topics of this batch the cache cannot route yet."""
        return [f["t"] for f in self.entries if f.get("k") != "rep" and routes.get(f["t"]) is None]

    def packed(self, sha: str, routes: RouteCache) -> bytes:
        """The call in the Redis protocol. A lone plain publish (no fence, expiry, headers or
        reply-to) to a topic without queue groups, the commonest call by far, reuses a template
        packed once per topic and route: only its message id and payload are packed anew."""
        f = self.entries[0]
        if len(self.entries) == 1 and f.get("k") == "pub" and len(f) == 5:  # k s t d i
            topic = f["t"]
            template = routes.templates.get(topic)
            if template is None:
                route = routes.get(topic)
                if route is None or route.groups:
                    return pack([self.command(sha, routes)])
                template = routes.templates[topic] = self._template(sha, routes)
            return template.pack(f["i"], f["d"])
        return pack([self.command(sha, routes)])

    def _template(self, sha: str, routes: RouteCache) -> Template:
        command = self.command(sha, routes)
        keys = int(command[2])
        inboxes = int(command[3 + keys + 10])  # ARGV[11]
        at = 3 + keys + 11 + inboxes + 1  # the one message: "msg", id, topic, data, ...
        assert command[at] == "msg"
        parts = [bulk(str(x)) for x in command]
        head = b"*%d\r\n" % len(command) + b"".join(parts[:at + 1])
        return Template(head, parts[at + 2], b"".join(parts[at + 4:]))

    def command(self, sha: str, routes: RouteCache) -> tuple[Any, ...]:
        """The EVALSHA command (``routes`` resolves every topic of the batch)."""
        keys, args = self.call(routes)
        return ("EVALSHA", sha, len(keys), *keys, *args)

    def call(self, routes: RouteCache) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the call."""
        inboxes: dict[str, int] = {}

        def at(peer: str) -> int:
            i = inboxes.get(peer)
            if i is None:
                i = inboxes[peer] = len(inboxes) + 1
            return i

        messages: list[Any] = []
        for f in self.entries:
            if f.get("k") == "rep":
                ok = f.get("ok") == "1"
                messages += ("rep", f["ri"], at(f["to"]), "1" if ok else "0",
                             f.get("d", "null") if ok else f.get("e", ""))
                continue
            route = routes.get(f["t"])
            assert route is not None, "resolve every topic before building the call"
            plain = route.plain
            if f.get("k") == "fwd":
                messages += ("fwd", f["q"], f["i"], f["t"], f["d"], f.get("x", ""), f.get("h", ""),
                             f["s"], f["o"], f.get("rt", ""))
                # the bridge's own subscriptions are for this site's messages, never another's
                plain = tuple(p for p in plain if p != self.sender)
            else:
                messages += ("msg", f["i"], f["t"], f["d"], f.get("f", ""), f.get("x", ""),
                             f.get("h", ""), at(self.sender) if "rt" in f else "")
            messages += (len(plain), *(at(p) for p in plain), len(route.groups))
            for queue, pattern, members in route.groups:
                messages += (queue, pattern, len(members), *(at(p) for p in members))
        keys = self.keys
        plane = self.plane
        script_keys = [keys.routing_version, keys.members, keys.leader, keys.stats, keys.inbox_drops,
                       keys.deadletter, keys.group_turns, keys.publish_last, keys.bridge_lease,
                       keys.bridge_applied, *(keys.responses(p) for p in inboxes)]
        args: list[Any] = [routes.version or "", self.sender, plane.inbox_maxlen, plane.overflow,
                           plane.deadletter_maxlen, plane.max_payload_bytes, plane.max_header_bytes,
                           MAX_TTL_MS, self.batch_key(routes), self.bridge_token, len(inboxes),
                           *inboxes, len(self.entries), *messages]
        return script_keys, args

    @staticmethod
    def outcome(reply: Sequence[Any]) -> Outcome:
        """What ``publish.lua`` answered."""
        status = str(reply[0])
        if status != "ok":
            return Outcome(status)
        refused: dict[int, SidecarError] = {}
        rest = reply[3:]
        for n in range(0, len(rest), 3):
            refused[int(rest[n]) - 1] = error_from_code(str(rest[n + 1]), str(rest[n + 2]))
        return Outcome(status, int(reply[1]), int(reply[2]), refused)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A ``publish.lua`` answer: ok | again | stale | unknown | fenced (a bridge without its
    lease), and for ok what it did."""

    status: str
    routed: int = 0
    """Messages delivered to at least one inbox (answers included)."""
    delivered: int = 0
    """Inbox entries written."""
    refused: dict[int, SidecarError] = field(default_factory=dict)
    """The error of each refused entry, by its index in the batch."""
