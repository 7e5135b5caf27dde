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
    "template_key",
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


_ID = "\x00id\x00"
_DATA = "\x00data\x00"
"""Stand-ins for the message id and the payload while a template is packed (no peer id, topic
or setting can hold a NUL, so nothing else in a call can be taken for them)."""


@dataclass(frozen=True, slots=True)
class Template:
    """The packed ``publish.lua`` call of one kind of lone entry: only its id and its payload (or
    error text) change from one call to the next, so the rest is packed once per route.

    Which entries share a template is :func:`template_key`'s to say: a plain publish to a topic,
    a request to a topic, an answer of one outcome to one requester.
    """

    pieces: tuple[bytes, ...]
    """The packed command, cut where the id and the payload go."""
    slots: tuple[bool, ...]
    """What goes after each piece but the last: True the payload, False the id (a call with a
    queue group names its batch by the id as well, so the id may go in twice)."""

    @classmethod
    def of(cls, command: Sequence[Any]) -> Template:
        """The template of ``command``, packed with :data:`_ID` and :data:`_DATA` standing in."""
        pieces: list[bytes] = []
        slots: list[bool] = []
        run = [b"*%d\r\n" % len(command)]
        for arg in command:
            text = str(arg)
            if text in (_ID, _DATA):
                pieces.append(b"".join(run))
                slots.append(text == _DATA)
                run = []
            else:
                run.append(bulk(text))
        pieces.append(b"".join(run))
        return cls(tuple(pieces), tuple(slots))

    def pack(self, message_id: str, data: str) -> bytes:
        """The whole command, in the Redis protocol."""
        values = (bulk(message_id), bulk(data))
        out = [self.pieces[0]]
        for slot, piece in zip(self.slots, self.pieces[1:], strict=True):
            out.append(values[slot])
            out.append(piece)
        return b"".join(out)

    def fill(self, fields: Mapping[str, str]) -> bytes:
        """The call for ``fields`` (an entry whose :func:`template_key` this template has)."""
        if fields["k"] == "rep":
            return self.pack(fields["ri"], fields["d"] if fields["ok"] == "1" else fields["e"])
        return self.pack(fields["i"], fields["d"])


def template_key(fields: Mapping[str, str]) -> tuple[str, ...] | None:
    """What a lone entry's template is filed under, or None for one packed whole each time (a
    fence, a time to live or headers make a call of its own): ``("pub", topic)``, ``("req",
    topic)`` or ``("rep", requester, ok)``."""
    kind, size = fields.get("k"), len(fields)
    if kind == "pub":
        if size == 5:  # k s t d i
            return ("pub", fields["t"])
        if size == 6 and "rt" in fields:
            return ("req", fields["t"])
    elif kind == "rep" and size == 6:  # k s to ri ok, and d or e
        return ("rep", fields["to"], fields["ok"])
    return None


class RouteCache:
    """Topics a peer resolved, valid at one routing version (with their packed calls)."""

    def __init__(self) -> None:
        self.version: str | None = None
        self._routes: dict[str, Route] = {}
        self.templates: dict[tuple[str, ...], Template] = {}
        """:func:`template_key` -> the packed call of such entries (see DirectBatch.packed)."""

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
        """The call in the Redis protocol. A lone entry of the common kinds (a plain publish, a
        request or an answer, without fence, expiry or headers), by far the commonest call,
        reuses a template packed once per route: only its id and payload are packed anew."""
        key = template_key(self.entries[0]) if len(self.entries) == 1 else None
        if key is None or (key[0] != "rep" and routes.get(key[1]) is None):
            return pack([self.command(sha, routes)])
        template = routes.templates.get(key)
        if template is None:
            if len(routes.templates) >= _CACHE_LIMIT:
                routes.templates.clear()
            f = self.entries[0]
            stand_in = {**f, "ri": _ID, "d": _DATA, "e": _DATA} if key[0] == "rep" else \
                {**f, "i": _ID, "d": _DATA}
            model = DirectBatch(self.keys, self.plane, self.sender, [stand_in], self.bridge_token)
            template = routes.templates[key] = Template.of(model.command(sha, routes))
        return template.fill(self.entries[0])

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
