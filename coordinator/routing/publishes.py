"""What the router does with each kind of request entry: validate, then run the fenced script.

Publishes are validated and matched here and delivered in runs by ``route.lua``; control requests
(coordinator.routing.control) run one script each. Anything invalid becomes a
:class:`Rejection`: a dead-letter entry with the reason, an error reply when the sender can be
identified, and an ack, so bad input never stops the router and never blocks good traffic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from coordinator.errors import (
    BadRequest,
    NotLeader,
    PayloadTooLarge,
    SidecarError,
    UnknownPeer,
)
from coordinator.keys import REQUEST_GROUP
from coordinator.protocol import dumps
from coordinator.routing.control import (
    SYSTEM_SENDER,
    ControlRequests,
    Deposed,
    Rerouted,
    StopBatch,
    VersionChurn,
)
from coordinator.routing.guard import Mark
from coordinator.topics import check_publish_topic

if TYPE_CHECKING:
    from coordinator.routing.router import Entry, Router

__all__ = ["SYSTEM_SENDER", "Deposed", "Rejection", "RequestHandler", "Rerouted", "StopBatch"]

log = logging.getLogger("sidecar.router")
_CACHE_LIMIT = 50_000


@dataclass(frozen=True, slots=True)
class DeferredRoute:
    """A computed route.lua call waiting to ride along with the router's next read."""

    run: list[Entry]
    stream: str
    keys: list[str]
    args: list[Any]
    messages: int
    marks: dict[str, Mark]
    """Nonce marks the script stores with the fan-out (authenticated runs)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request entry refused by the router, and why."""

    stream: str
    entry_id: str
    fields: dict[str, str]
    code: str
    message: str
    reply_to: str | None
    ack: bool = True
    """False for one message of a batch entry: the entry itself is acked with the batch."""

    @property
    def sender(self) -> str | None:
        return self.fields.get("s")

    def deadletter_fields(self) -> dict[str, str]:
        raw = dumps(self.fields)
        return {"reason": self.code, "message": self.message, "stream": self.stream,
                "entry": self.entry_id, "sender": self.sender or "", "raw": raw[:4096]}

    def reply_fields(self) -> dict[str, str]:
        return {"k": "reply", "r": self.fields.get("r", ""), "ok": "0", "e": self.code,
                "m": self.message, "ref": self.entry_id, "t": self.fields.get("t", "")[:256]}


class RequestHandler(ControlRequests):
    """Validation and script calls for one :class:`~coordinator.routing.router.Router`."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._targets: dict[str, tuple[str, ...]] = {}
        self._valid_topics: set[str] = set()
        self._inbox: dict[str, str] = {}
        self.deferred: DeferredRoute | None = None
        self._streams: dict[str, tuple[int, str, str, bool]] = {}
        self._version_key = router.keys.routing_version
        self._nonces_key = router.keys.nonces

    def invalidate(self) -> None:
        """Forget matches computed from an older subscription index."""
        self._targets.clear()

    # ------------------------------------------------------------------ publishes
    def publish_run(self, run: list[Entry], *, defer: bool = False,
                    marks: dict[str, Mark] | None = None) -> None:
        """Deliver a run of publish entries from one stream with one fenced script call.

        With ``defer`` the script call is kept in :attr:`deferred` for the router to send in the
        same round trip as its next read (the run's outcome is settled then); a run with
        rejections is never deferred, so dead letters and error replies go out at once.
        ``marks`` are the nonce marks of a run already authenticated (a retry); without them the
        run is authenticated here, and the script stores its marks with the fan-out.
        """
        r = self.router
        stream = run[0][0]
        refused: list[Rejection] = []
        if marks is None:
            marks = {}
            if r.guard.auth and stream != r.keys.system:
                signed = []
                for entry in run:  # once per entry: a retry must not find its own nonce "replayed"
                    try:
                        r.guard.authenticate(entry[2], entry[1], marks)
                        signed.append(entry)
                    except SidecarError as exc:
                        refused.append(self.rejection(stream, entry[1], entry[2], exc))
                run = signed
        for attempt in range(5):
            if r.version is None:
                r.refresh()
            keys, args, rejections, n = self._route_call(run, stream, marks)
            rejections += refused
            if defer and attempt == 0 and not rejections:
                self.deferred = DeferredRoute(run, stream, keys, args, n, marks)
                return
            if self._settle(r.scripts.route(keys=keys, args=args), stream, n, rejections, marks):
                return
        log.warning("router %s: routing version changed under five attempts; settling later", r.name)
        raise VersionChurn

    def _settle(self, result: Any, stream: str, n: int, rejections: list[Rejection],
                marks: dict[str, Mark]) -> bool:
        """Act on a route.lua answer; False when the run must be computed again (stale)."""
        r = self.router
        status = str(result[0])
        if status == "ok":
            r.stats["routed"] += n
            r.stats["delivered"] += int(result[1])
            r.guard.commit(marks)
            r.reject(rejections)
            return True
        if status == "lost":
            r.lost(stream)
            raise Deposed
        if status == "foreign":  # a deposed router's reads are older: route them, then ours
            r.claim_pending(stream)
            raise Rerouted
        r.version = None  # stale: someone changed members or subscriptions; reload and redo
        return False

    def finish_deferred(self, result: Any) -> None:
        """Settle the deferred run with the answer its script call got (or the error it raised)."""
        d, self.deferred = self.deferred, None
        if d is None:
            return
        if isinstance(result, NoScriptError):  # Redis restarted: the synchronous path reloads it
            self.publish_run(d.run, marks=d.marks)
        elif isinstance(result, Exception):
            raise result
        elif not self._settle(result, d.stream, d.messages, [], d.marks):
            self.publish_run(d.run, marks=d.marks)

    def _stream_info(self, stream: str) -> tuple[int, str, str, bool]:
        """(partition, its lease key, message id tag, trusted) of a request stream, cached."""
        info = self._streams.get(stream)
        if info is None:
            keys = self.router.keys
            trusted = stream == keys.system
            partition = self.partition_of(stream)
            tag = "s" if trusted else str(partition)
            info = self._streams[stream] = (partition, keys.router_lease(partition), tag, trusted)
        return info

    def _route_call(self, run: list[Entry], stream: str, marks: dict[str, Mark]
                    ) -> tuple[list[str], list[Any], list[Rejection], int]:
        r = self.router
        _partition, lease_key, tag, trusted = self._stream_info(stream)
        inboxes: dict[str, int] = {}
        acks: list[str] = []
        msgs: list[str] = []
        deliveries: list[int] = []
        rejections: list[Rejection] = []
        for eid, msg_id, f in self._publishes(run, stream, rejections, acks):
            try:
                topic, data, sender = self._check_publish(f, trusted)
            except SidecarError as exc:
                rejections.append(self.rejection(stream, eid, f, exc, part=msg_id))
                continue
            targets = self._targets.get(topic)
            if targets is None:
                targets = self._match(topic)
            if not targets:
                continue
            m = len(msgs) // 5 + 1
            msgs += (f"{tag}:{msg_id}", topic, data, sender, eid.partition("-")[0])
            for inbox in targets:
                i = inboxes.get(inbox)
                if i is None:
                    i = inboxes[inbox] = len(inboxes) + 1
                deliveries += (m, i)
        keys = [lease_key, self._version_key, self._nonces_key, stream, *inboxes]
        args: list[Any] = [r.token, r.version, REQUEST_GROUP, r.settings.inbox_maxlen, 1,
                           len(acks), len(msgs) // 5, r.name, len(marks)]
        for eid in acks:
            args += (1, eid)
        for sender, (nonce, eid) in marks.items():
            args += (sender, f"{nonce} {eid}")
        args += msgs
        args += deliveries
        return keys, args, rejections, len(msgs) // 5

    def _publishes(self, run: list[Entry], stream: str, rejections: list[Rejection],
                   acks: list[str]) -> Iterator[tuple[str, str, dict[str, str]]]:
        """(entry id, message id, publish fields) of every publish in ``run``, batches unfolded.

        A ``pubs`` entry (publishes a peer folded together) carries ``b``: a JSON list of
        ``[topic, payload json, fence or null]``; its messages are ``<entry id>:<n>``.
        """
        for _, eid, f in run:
            if f.get("k") == "pub":
                acks.append(eid)
                yield eid, eid, f
                continue
            try:
                items = json.loads(f.get("b") or "")
                if not isinstance(items, list) or not all(
                        isinstance(i, list) and len(i) == 3 for i in items):
                    raise ValueError
            except ValueError:
                rejections.append(self.rejection(stream, eid, f, BadRequest(
                    "batch field 'b' must be a JSON list of [topic, payload, fence]")))
                continue
            acks.append(eid)
            sender = f.get("s", "")
            for n, (topic, data, fence) in enumerate(items):
                one = {"k": "pub", "s": sender, "t": topic, "d": data}
                if fence is not None:
                    one["f"] = str(fence)
                yield eid, f"{eid}:{n}", one

    def _check_publish(self, f: dict[str, str], trusted: bool) -> tuple[str, str, str]:
        r = self.router
        sender = f.get("s")
        if not sender:
            raise BadRequest("publish without a sender field 's'")
        if not trusted and sender not in r.members:
            raise UnknownPeer(f"peer {sender!r} is not a registered member; register before publishing")
        topic = f.get("t")
        if trusted:  # the sidecar's own events: checked apart, never cached for peers
            check_publish_topic(topic, allow_reserved=True)
        elif topic not in self._valid_topics:
            check_publish_topic(topic)
            if len(self._valid_topics) > _CACHE_LIMIT:
                self._valid_topics.clear()
            self._valid_topics.add(topic)  # type: ignore[arg-type]
        assert topic is not None
        data = f.get("d")
        if not isinstance(data, str):
            raise BadRequest("publish without a payload field 'd' (JSON text)")
        limit = r.settings.max_payload_bytes
        if not trusted and len(data) * 4 > limit and len(data.encode()) > limit:
            raise PayloadTooLarge(f"payload of {len(data.encode())} bytes exceeds the {limit}-byte limit")
        try:
            json.loads(data)
        except ValueError:
            raise BadRequest("payload field 'd' is not valid JSON") from None
        fence = f.get("f")
        if fence is not None and not trusted:
            leader, term = r.leader
            if sender != leader or fence != str(term):
                raise NotLeader(f"fenced publish from {sender!r} with term {fence}, but the leader "
                                f"is {leader or 'nobody'} at term {term}")
        if not trusted:
            r.guard.authorize(sender, "publish", topic)
        return topic, data, sender

    def _match(self, topic: str) -> tuple[str, ...]:
        r = self.router
        targets = tuple(self._inbox_of(p) for p in sorted(r.index.match(topic)) if p in r.members)
        if len(self._targets) > _CACHE_LIMIT:
            self._targets.clear()
        self._targets[topic] = targets
        return targets

    def _inbox_of(self, peer: str) -> str:
        key = self._inbox.get(peer)
        if key is None:
            key = self._inbox[peer] = self.router.keys.responses(peer)
        return key

    def partition_of(self, stream: str) -> int:
        r = self.router
        if stream in (r.keys.requests(0), r.keys.system):
            return 0
        return int(stream.rsplit(".", 1)[-1])

    def rejection(self, stream: str, eid: str, f: dict[str, str], exc: SidecarError, *,
                   part: str | None = None) -> Rejection:
        r = self.router
        sender = f.get("s")
        reply_to = None
        if sender and stream != r.keys.system and (
                sender in r.members or r.client.exists(r.keys.responses(sender))):
            reply_to = sender
        if part is not None and part != eid:  # one message of a batch entry the script acks
            return Rejection(stream, part, dict(f), exc.code, str(exc), reply_to, ack=False)
        return Rejection(stream, eid, dict(f), exc.code, str(exc), reply_to)
