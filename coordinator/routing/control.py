"""Control requests (subscribe, unsubscribe, register, leave, heartbeat, policy ack): one script each.

:class:`ControlHandler` applies one entry and returns what happened: :data:`APPLIED`, or
:data:`DEPOSED` when a fenced script found the partition's lease gone (nothing was written; the new
owner applies the entry), or the :class:`Rejection` of an invalid request for the router to
write. Every control request is acknowledged by the script that applies it. Changes to
members and subscriptions go to the :class:`RoutingView`, which is their only owner.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from enum import Enum

from coordinator.cluster.handoff import hand_off
from coordinator.cluster.membership import (
    elect_call,
    heartbeat_call,
    leave_call,
    register_call,
    subscribe_call,
)
from coordinator.errors import BadRequest, PolicyRejected, SidecarError, UnknownPeer
from coordinator.keys import REQUEST_GROUP
from coordinator.protocol import (
    BRIDGE_ROLE,
    DELIVERY_DEAD_LETTERS,
    KINDS,
    PEER_ID_RE,
    SYSTEM_SENDER,
    dumps,
    parse_status,
)
from coordinator.resp import Entry
from coordinator.routing.context import RouterContext
from coordinator.routing.rejections import Rejection
from coordinator.scripts import scripts_for
from coordinator.topics import check_pattern, check_queue

__all__ = ["APPLIED", "DEPOSED", "ControlHandler", "Done"]

log = logging.getLogger("sidecar.router")


class Done(Enum):
    """What became of one control request."""

    APPLIED = "applied"
    """Applied (or refused and dead-lettered) and acknowledged."""
    DEPOSED = "deposed"
    """Our lease on the entry's partition is gone: nothing was written."""


APPLIED = Done.APPLIED
DEPOSED = Done.DEPOSED


class _Deposed(Exception):
    """Internal: a fenced script answered that the lease is gone."""


class ControlHandler:
    """Applies non-publish requests for one router (identified by its lease ``token``)."""

    def __init__(self, ctx: RouterContext, *, refresh: Callable[[], None]) -> None:
        self.client = ctx.client
        self.keys = ctx.keys
        self.settings = ctx.settings
        self.view = ctx.view
        self.guard = ctx.guard
        self.rejector = ctx.rejector
        self.token = ctx.token
        self.refresh = refresh
        """Reloads the view and what the guard derives from it (the router's)."""
        self.scripts = scripts_for(ctx.client)

    def apply(self, entry: Entry) -> Done | Rejection:
        """Apply one non-publish request entry; a refused one comes back as a Rejection for the
        router to write (nothing of it is written here)."""
        stream, eid, f = entry
        lease = self.keys.router_lease(self.keys.partition_of_stream(stream, self.settings.partitions))
        try:
            self._apply(stream, eid, f, lease)
        except SidecarError as exc:
            return self.rejector.rejection(stream, eid, f, exc)
        except _Deposed:
            return DEPOSED
        return APPLIED

    def _apply(self, stream: str, eid: str, f: dict[str, str], lease: str) -> None:
        kind = f.get("k")
        if kind not in KINDS:
            raise BadRequest(f"unknown request kind {kind!r}; expected one of {sorted(KINDS)}")
        if stream == self.keys.system:
            raise BadRequest("only publishes belong on the system stream")
        if not f.get("s"):
            raise BadRequest(f"{kind} request without a sender field 's'")
        mark = self.guard.authenticate(f, eid)
        if mark is not None and not self.guard.store_mark(f["s"], mark, lease, self.token):
            raise _Deposed  # marks are stored before the request takes effect (see Guard)
        if kind in ("sub", "unsub"):
            self._subscribe(stream, eid, f, lease, add=kind == "sub")
        elif kind == "reg":
            self._register(stream, eid, f, lease)
        elif kind == "hb":
            self._heartbeat(stream, eid, f, lease)
        elif kind == "pack":
            self._policy_ack(stream, eid, f)
        elif kind == "dl":
            self._dead_letter(stream, eid, f, lease)
        else:
            self._leave(stream, eid, f, lease)

    def drop_disallowed(self, subscriptions: Iterable[tuple[str, str, str]]) -> int:
        """Remove the ``(peer, pattern, queue)`` subscriptions the policies in force no longer
        allow, telling each peer (``cluster.subscription.dropped`` in its inbox), fenced by
        partition 0's lease; returns how many went."""
        lease = (self.keys.router_lease(0), self.token)
        dropped = 0
        for peer, pattern, queue in subscriptions:
            try:
                self.guard.authorize(peer, "subscribe", pattern)
                continue
            except PolicyRejected as exc:
                reason = str(exc)
            if self.client.hget(self.keys.member(peer), "role") == BRIDGE_ROLE:
                continue  # a site's bridge subscribes for other sites, under its own lease
            keys, args = subscribe_call(self.keys, peer, pattern, queue, add=False, fence=lease,
                                        inbox_maxlen=self.settings.inbox_maxlen)
            status = str(self.scripts.subscribe(keys=keys, args=args)[0])
            if status == "lost":
                break  # partition 0 went to another router: it checks them
            if status != "ok":
                continue
            dropped += 1
            notice = {"pattern": pattern, "queue": queue or None, "reason": reason}
            self.client.xadd(self.keys.responses(peer), {
                "k": "msg", "i": _notice_id(self.guard.policy_version, peer, pattern, queue),
                "t": "cluster.subscription.dropped", "d": dumps(notice), "s": SYSTEM_SENDER},
                maxlen=self.settings.inbox_maxlen, approximate=True)
            log.warning("subscription %r%s of %s dropped: %s", pattern,
                        f" (queue {queue})" if queue else "", peer, reason)
        return dropped

    def _reply(self, stream: str, eid: str, sender: str, fields: dict[str, str], lease: str) -> None:
        """Answer ``sender`` and ack the entry, fenced (reply.lua)."""
        done = self.scripts.reply(
            keys=[lease, stream, self.view.inbox(sender), self.keys.deadletter],
            args=[self.token, REQUEST_GROUP, eid, self.settings.inbox_maxlen,
                  self.settings.deadletter_maxlen, len(fields), 0,
                  *(x for kv in fields.items() for x in kv)])
        if not int(done):
            raise _Deposed

    def _subscribe(self, stream: str, eid: str, f: dict[str, str], lease: str, *, add: bool) -> None:
        sender, pattern = f["s"], check_pattern(f.get("t"))
        queue = check_queue(f["q"]) if f.get("q") else ""
        if add and self.guard.enforce:
            if str(self.client.get(self.keys.routing_version) or "0") != self.view.version:
                self.refresh()  # judge the subscribe by the policies in force now, not cached ones
            self.guard.authorize(sender, "subscribe", pattern)
        keys, args = subscribe_call(self.keys, sender, pattern, queue, add=add,
                                    fence=(lease, self.token), stream=stream, entry_id=eid,
                                    request_id=f.get("r", ""),
                                    inbox_maxlen=self.settings.inbox_maxlen)
        result = self.scripts.subscribe(keys=keys, args=args)
        status = str(result[0])
        if status == "lost":
            raise _Deposed
        if status == "unknown_peer":
            raise UnknownPeer(f"peer {sender!r} is not a registered member; register before subscribing")
        self.view.subscription_changed(int(result[1]), bool(int(result[2])), add, sender, pattern,
                                       queue)

    def _register(self, stream: str, eid: str, f: dict[str, str], lease: str) -> None:
        sender = f["s"]
        if sender == SYSTEM_SENDER:
            raise BadRequest(f"{SYSTEM_SENDER!r} is the sidecar's own sender id; pick another peer id")
        if not PEER_ID_RE.match(sender):
            raise BadRequest(f"peer id {sender[:80]!r} must be 1-64 letters, digits, '_' or '-'")
        try:
            info = json.loads(f.get("m") or "{}")
            if not isinstance(info, dict):
                raise ValueError("member info must be a JSON object")
            info = self.guard.member_info(sender, info)
            keys, args = register_call(self.keys, sender, info, token=self.token, stream=stream,
                                       entry_id=eid, request_id=f.get("r", ""),
                                       inbox_maxlen=self.settings.inbox_maxlen, lease_key=lease)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"register request with bad member info: {exc}") from None
        result = self.scripts.register(keys=keys, args=args)
        if str(result[0]) == "lost":
            raise _Deposed
        joined = bool(int(result[1]))
        self.view.member_joined(int(result[4]), joined, sender)
        if joined:
            log.info("%s joined (role %s)", sender, info.get("role", "peer"))
        self.guard.learn(sender, info.get("roles") or [info.get("role", "peer")], info.get("labels") or {})
        if self.guard.store.version():  # a joining peer gets the policy set at once
            self.guard.store.distribute([sender], force=True)

    def _heartbeat(self, stream: str, eid: str, f: dict[str, str], lease: str) -> None:
        """A heartbeat sent through the stream (authenticated mode: peers cannot run scripts)."""
        sender = f["s"]
        # kept only when a JSON object of bounded size: the dashboards poll what is stored here
        extra, status = (text if text and parse_status(text) is not None else ""
                         for text in (f.get("x", ""), f.get("st", "")))
        keys, args = heartbeat_call(self.keys, sender, payload=extra, status=status,
                                    fence=(lease, self.token))
        result = self.scripts.heartbeat(keys=keys, args=args)
        if str(result[0]) == "lost":
            raise _Deposed
        status, now, leader, term = result
        self._reply(stream, eid, sender, {"k": "reply", "r": f.get("r", ""), "ok": "1",
                                          "status": str(status), "leader": str(leader),
                                          "term": str(term), "now": str(now)}, lease)

    def _dead_letter(self, stream: str, eid: str, f: dict[str, str], lease: str) -> None:
        """A subscriber gives up a message delivered to it (its handler kept failing, or the
        message expired before it was handled): dead-letter it for that subscriber."""
        reason = f.get("reason")
        if reason not in DELIVERY_DEAD_LETTERS:
            raise BadRequest(f"dead-letter reason {reason!r} must be one of {sorted(DELIVERY_DEAD_LETTERS)}")
        if f["s"] not in self.view.members:
            raise UnknownPeer(f"peer {f['s']!r} is not a registered member")
        dead = {"reason": reason, "message": f.get("e", "")[:2000], "stream": stream,
                "entry": f.get("i", "")[:64], "sender": f.get("o", "")[:64], "peer": f["s"],
                "pattern": f.get("p", "")[:256], "topic": f.get("t", "")[:256],
                "raw": f.get("d", "")[:65536], "headers": f.get("h", "")[:8192],
                "ts": f.get("ts", "")[:20], "queue": f.get("q", "")[:64]}
        done = self.scripts.reply(
            keys=[lease, stream, self.keys.deadletter, self.keys.deadletter],
            args=[self.token, REQUEST_GROUP, eid, self.settings.inbox_maxlen,
                  self.settings.deadletter_maxlen, 0, len(dead), *(x for kv in dead.items() for x in kv)])
        if not int(done):
            raise _Deposed

    def _policy_ack(self, stream: str, eid: str, f: dict[str, str]) -> None:
        """A peer applied (ok=1) or refused (ok=0, e=error) a policy set version.

        Not fenced: policy_ack.lua keeps the newest answer per peer, so the same entry applied
        again by a deposed router changes nothing.
        """
        try:
            version = int(f.get("pv", ""))
        except ValueError:
            raise BadRequest("policy ack without a numeric version 'pv'") from None
        self.guard.store.record_ack(f["s"], version, f.get("pn", ""), f.get("ok") == "1",
                                    f.get("e", ""), stream=stream, entry_id=eid)

    def _leave(self, stream: str, eid: str, f: dict[str, str], lease: str) -> None:
        sender = f["s"]
        keys, args = leave_call(self.keys, sender, "leave", stream=stream, entry_id=eid,
                                fence=(lease, self.token))
        left, _removed, was_leader = (int(x) for x in self.scripts.leave(keys=keys, args=args))
        if left < 0:
            raise _Deposed
        self.view.invalidate()
        if left:
            hand_off(self.client, self.keys, sender, inbox_maxlen=self.settings.inbox_maxlen)
            log.info("%s left%s", sender, " (it was the leader)" if was_leader else "")
        if was_leader:  # a graceful leave re-elects now, not a TTL later (a compare-and-set)
            keys, args = elect_call(self.keys, self.settings.member_ttl, "leader left")
            status, leader, term = self.scripts.elect(keys=keys, args=args)
            if str(status) == "elected":
                log.info("leader is now %s (term %s, leader left)", leader, term)
            elif str(status) == "vacated":
                log.info("no leader: %s is gone and no eligible member is live (term %s)", sender, term)
        if f.get("r"):
            self._reply(stream, "", sender, {"k": "reply", "r": f["r"], "ok": "1"}, lease)


def _notice_id(version: int, peer: str, pattern: str, queue: str) -> str:
    """The message id of a dropped-subscription notice: the same for the same drop, so a
    router that repeats it (deposed midway) repeats the id too, and the peer drops the copy."""
    digest = hashlib.sha256(f"{version}\0{peer}\0{pattern}\0{queue}".encode()).hexdigest()
    return f"dropped-{version}-{digest[:24]}"
