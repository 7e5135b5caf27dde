"""Publishes: validate a run of publish entries and plan the one ``route.lua`` call that delivers it.

:class:`PublishPlanner` reads the :class:`~coordinator.routing.view.RoutingView` and the guard, and
returns a :class:`FanOut`: the script call, how many messages it carries, the nonce marks it stores
and the rejections found on the way. It changes no state: the router sends the call and acts on
the answer (:func:`outcome`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import (
    BadRequest,
    InvalidHeaders,
    NotLeader,
    SidecarError,
    UnknownPeer,
)
from coordinator.ids import MESSAGE_ID_RE
from coordinator.keys import REQUEST_GROUP
from coordinator.protocol import MAX_BATCH, MAX_TTL_MS, SYSTEM_SENDER, check_headers, check_size
from coordinator.resp import Entry
from coordinator.routing.context import RouterContext
from coordinator.routing.guard import Mark
from coordinator.routing.rejections import Rejection
from coordinator.topics import check_publish_topic

__all__ = ["FanOut", "PublishPlanner", "outcome"]


@dataclass(slots=True)
class FanOut:
    """A planned route.lua call for one run of publish entries of one stream."""

    run: list[Entry]
    stream: str
    keys: list[str]
    args: list[Any]
    messages: int
    marks: dict[str, Mark]
    """Nonce marks the script stores with the fan-out (authenticated runs)."""
    rejections: list[Rejection] = field(default_factory=list)

    def command(self, sha: str) -> tuple[Any, ...]:
        """The call as one EVALSHA command (for the lean connection)."""
        return ("EVALSHA", sha, len(self.keys), *self.keys, *self.args)


def outcome(result: Any) -> tuple[str, int]:
    """(ok | lost | foreign | stale, deliveries) of a route.lua answer."""
    status = str(result[0])
    return status, int(result[1]) if status == "ok" else 0


class PublishPlanner:
    """Validation, matching and the route.lua arguments for one router."""

    def __init__(self, ctx: RouterContext) -> None:
        self.keys = ctx.keys
        self.settings = ctx.settings
        self.view = ctx.view
        self.guard = ctx.guard
        self.rejector = ctx.rejector
        self.token = ctx.token
        self.consumer = ctx.name
        self._streams: dict[str, tuple[str, str, bool]] = {}

    def authenticate(self, run: list[Entry]) -> tuple[list[Entry], list[Rejection], dict[str, Mark]]:
        """The entries of ``run`` whose signatures check out, the refused ones, and their marks.

        Once per entry and per run: a retry of the same run must not find its own nonces
        "replayed", so the marks are kept with the run until its fan-out stored them.
        """
        marks: dict[str, Mark] = {}
        stream = run[0][0]
        if not self.guard.auth or stream == self.keys.system:
            return run, [], marks
        signed, refused = [], []
        for entry in run:
            try:
                self.guard.authenticate(entry[2], entry[1], marks)
                signed.append(entry)
            except SidecarError as exc:
                refused.append(self.rejector.rejection(stream, entry[1], entry[2], exc))
        return signed, refused, marks

    def stream_info(self, stream: str) -> tuple[str, str, bool]:
        """(its partition's lease key, message id tag, trusted) of a request stream, cached."""
        info = self._streams.get(stream)
        if info is None:
            trusted = stream == self.keys.system
            partition = self.keys.partition_of_stream(stream, self.settings.partitions)
            peer = self.keys.peer_of_stream(stream)  # entry ids of two streams may be equal
            tag = "s" if trusted else str(partition) if peer is None else peer
            info = self._streams[stream] = (self.keys.router_lease(partition), tag, trusted)
        return info

    def plan(self, stream: str, run: list[Entry], marks: dict[str, Mark]) -> FanOut:
        """The fan-out of ``run`` (entries of ``stream``, perhaps none left after authentication)
        under the view as it is now (the view must not be stale)."""
        lease_key, tag, trusted = self.stream_info(stream)
        inboxes: dict[str, int] = {}  # peer id -> inbox index (1-based)
        acks: list[str] = []
        records: list[Any] = []
        deliveries: list[int] = []  # (record offset within records, inbox index) pairs
        rejections: list[Rejection] = []
        messages = 0
        for eid, msg_id, f in self._publishes(run, stream, rejections, acks):
            ts = eid.partition("-")[0]
            try:
                if f.get("k") == "rep":
                    to, record = self._reply(f, ts)
                    targets: tuple[str, ...] = (to,) if to in self.view.members else ()
                else:
                    topic, data, sender = self._check(f, trusted)
                    targets = self.view.targets(topic)
                    queued = self.view.queue_targets(topic) if self.view.group_members else []
                    record = self._message(f, msg_id, tag, topic, data, sender, ts,
                                           bool(targets or queued))
                    if not (targets or queued) and "rt" in f:  # nobody can answer: say so at once
                        targets = (sender,)
                    for peer, queue, pattern in queued:  # one member of each group, its own record
                        messages += 1
                        at = len(records)
                        records += self._queued(record, queue, pattern)
                        deliveries += (at, self._inbox_index(inboxes, peer))
            except SidecarError as exc:
                rejections.append(self.rejector.rejection(stream, eid, f, exc, part=msg_id))
                continue
            if not targets:
                continue
            messages += 1
            at = len(records)
            records += record
            for peer in targets:
                deliveries += (at, self._inbox_index(inboxes, peer))
        view = self.view
        keys = [lease_key, self.keys.routing_version, self.keys.nonces, stream, self.keys.inbox_drops,
                self.keys.deadletter, *(view.inbox(p) for p in inboxes)]
        args: list[Any] = [self.token, view.version, REQUEST_GROUP, self.settings.inbox_maxlen,
                           len(acks), 0, self.consumer, len(marks), self.settings.inbox_overflow,
                           self.settings.deadletter_maxlen, len(inboxes), *inboxes, *acks]
        for sender, (nonce, eid) in marks.items():
            args += (sender, f"{nonce} {eid}")
        base = len(args) + 1  # ARGV is 1-based: a record at records[k] is ARGV[base + k]
        args += records
        args[5] = len(args) + 1
        args += [x + base if n % 2 == 0 else x for n, x in enumerate(deliveries)]
        return FanOut(run, stream, keys, args, messages, marks, rejections)

    @staticmethod
    def _inbox_index(inboxes: dict[str, int], peer: str) -> int:
        i = inboxes.get(peer)
        if i is None:
            i = inboxes[peer] = len(inboxes) + 1
        return i

    @staticmethod
    def _queued(record: tuple[Any, ...], queue: str, pattern: str) -> tuple[Any, ...]:
        """``record`` as a queue group delivery (marked with its group, so the member runs that
        subscription's handlers and a requeue finds it)."""
        extras = int(record[6])
        return (*record[:6], extras + 2, *record[7:], "q", queue, "qp", pattern)

    @staticmethod
    def _message(f: dict[str, str], msg_id: str, tag: str, topic: str, data: str, sender: str,
                 ts: str, answered: bool) -> tuple[Any, ...]:
        """The route.lua record of a checked publish (for a request nobody answers: ``nr``)."""
        mid = f.get("i") or f"{tag}:{msg_id}"
        if not answered and "rt" in f:
            return ("nr", mid, topic, "null", SYSTEM_SENDER, ts, 0)
        extras: list[str] = []
        if f.get("h"):
            extras += ("h", f["h"])
        if f.get("x"):  # time to live: the deadline on Redis's clock, from when Redis got it
            extras += ("x", str(int(ts) + int(f["x"])))
        if "rt" in f:
            extras += ("rt", f["rt"])
        return ("msg", mid, topic, data, sender, ts, len(extras) // 2, *extras)

    def _reply(self, f: dict[str, str], ts: str) -> tuple[str, tuple[Any, ...]]:
        """(requester, route.lua record) of a responder's answer (``rep``)."""
        sender, to, request = f.get("s"), f.get("to"), f.get("ri")
        if not sender or sender not in self.view.members:
            raise UnknownPeer(f"peer {sender!r} is not a registered member; register before answering")
        if not to or not isinstance(request, str) or not MESSAGE_ID_RE.match(request):
            raise BadRequest("an answer needs the requester 'to' and the request's message id 'ri'")
        if f.get("ok") == "1":
            data = f.get("d")
            if not isinstance(data, str):
                raise BadRequest("an answer without a payload field 'd' (JSON text)")
            check_size(data, self.settings.max_payload_bytes, "answer")
            try:
                json.loads(data)
            except ValueError:
                raise BadRequest("answer field 'd' is not valid JSON") from None
            return to, ("rep", request, "", data, sender, ts, 1, "ok", "1")
        return to, ("rep", request, "", "null", sender, ts, 2, "ok", "0", "e", str(f.get("e", ""))[:2000])

    def _publishes(self, run: list[Entry], stream: str, rejections: list[Rejection],
                   acks: list[str]) -> Iterator[tuple[str, str, dict[str, str]]]:
        """(entry id, message id, publish fields) of every publish in ``run``, batches unfolded.

        A ``pubs`` entry (publishes a peer folded together) carries ``b``: a JSON list of
        ``[topic, payload json, fence or null, message id or null, headers json or null, ttl ms or
        null]``; a
        message without an id of its own is known as ``<partition>:<entry id>:<n>``.
        """
        for _, eid, f in run:
            if f.get("k") in ("pub", "rep"):
                acks.append(eid)
                yield eid, eid, f
                continue
            try:
                items = json.loads(f.get("b") or "")
                if not isinstance(items, list) or not all(
                        isinstance(i, list) and len(i) == 6 for i in items[:MAX_BATCH]):
                    raise ValueError
            except ValueError:
                rejections.append(self.rejector.rejection(stream, eid, f, BadRequest(
                    "batch field 'b' must be a JSON list of [topic, payload, fence, id, headers, ttl]")))
                continue
            if len(items) > MAX_BATCH:
                rejections.append(self.rejector.rejection(stream, eid, f, BadRequest(
                    f"a batch carries at most {MAX_BATCH} publishes, this one {len(items)}")))
                continue
            acks.append(eid)
            sender = f.get("s", "")
            for n, (topic, data, fence, mid, headers, ttl) in enumerate(items):
                one = {"k": "pub", "s": sender, "t": topic, "d": data}
                if fence is not None:
                    one["f"] = str(fence)
                if mid is not None:
                    one["i"] = mid
                if headers is not None:
                    one["h"] = headers
                if ttl is not None:
                    one["x"] = str(ttl)
                yield eid, f"{eid}:{n}", one

    def _check(self, f: dict[str, str], trusted: bool) -> tuple[str, str, str]:
        sender = f.get("s")
        if not sender:
            raise BadRequest("publish without a sender field 's'")
        view = self.view
        if not trusted and sender not in view.members:
            raise UnknownPeer(f"peer {sender!r} is not a registered member; register before publishing")
        if trusted:  # the sidecar's own events: checked apart, never cached for peers
            topic = check_publish_topic(f.get("t"), allow_reserved=True)
        else:
            topic = view.check_topic(f.get("t"))
        data = f.get("d")
        if not isinstance(data, str):
            raise BadRequest("publish without a payload field 'd' (JSON text)")
        if not trusted:
            check_size(data, self.settings.max_payload_bytes, "payload")
        try:
            json.loads(data)
        except ValueError:
            raise BadRequest("payload field 'd' is not valid JSON") from None
        ttl = f.get("x")
        if ttl is not None and not (isinstance(ttl, str) and ttl.isdigit() and 0 < int(ttl) <= MAX_TTL_MS):
            raise BadRequest(f"time to live 'x' must be 1 to {MAX_TTL_MS} milliseconds, got {ttl!r}")
        reply_to = f.get("rt")
        if reply_to is not None and reply_to != sender:
            raise BadRequest(f"a request's reply-to must be its sender {sender!r}, not {reply_to!r}")
        mid = f.get("i")
        if mid is not None and (not isinstance(mid, str) or not MESSAGE_ID_RE.match(mid)):
            raise BadRequest(f"message id {str(mid)[:80]!r} must be 1-64 letters, digits or "
                             "'_', '.', ':', '-'")
        headers = f.get("h")
        if headers is not None:
            if not isinstance(headers, str):
                raise InvalidHeaders("headers field 'h' must be JSON text")
            try:
                parsed = json.loads(headers)
            except ValueError:
                raise InvalidHeaders("headers field 'h' is not valid JSON") from None
            check_headers(parsed, self.settings.max_header_bytes)
        fence = f.get("f")
        if fence is not None and not trusted:
            leader, term = view.leader
            if sender != leader or fence != str(term):
                raise NotLeader(f"fenced publish from {sender!r} with term {fence}, but the leader "
                                f"is {leader or 'nobody'} at term {term}")
        if not trusted:
            self.guard.authorize(sender, "publish", topic)
        return topic, data, sender
