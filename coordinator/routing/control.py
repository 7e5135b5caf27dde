"""Control requests (subscribe, unsubscribe, register, leave, heartbeat, policy ack): one script each.

:class:`ControlRequests` is the half of the router's RequestHandler that applies them; publishes are
in :mod:`coordinator.routing.publishes`. Every control request is acknowledged by the script (or pipeline)
that applies it, and anything invalid is dead-lettered with the reason by the handler's rejection.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, NoReturn

from coordinator.cluster.membership import elect_call, heartbeat_call, leave_call, register_call
from coordinator.errors import BadRequest, SidecarError, UnknownPeer
from coordinator.keys import REQUEST_GROUP
from coordinator.protocol import KINDS, PEER_ID_RE
from coordinator.topics import check_pattern

if TYPE_CHECKING:
    from coordinator.routing.publishes import Rejection
    from coordinator.routing.router import Entry, Router

__all__ = ["SYSTEM_SENDER", "ControlRequests", "Deposed", "Rerouted", "StopBatch", "VersionChurn"]

SYSTEM_SENDER = "sidecar"
"""Sender id of the sidecar's own events (only scripts write the system stream)."""


class StopBatch(Exception):
    """Stop processing the current batch: its remaining entries are not ours to route now."""


class Rerouted(StopBatch):
    """The rest of the batch was routed by claiming every pending entry."""


class Deposed(StopBatch):
    """A fenced script found the partition's lease gone: its new owner routes the rest."""


class VersionChurn(StopBatch):
    """The routing version changed under every attempt at a run; it is settled again later."""


class ControlRequests:
    """Applies non-publish requests; mixed into coordinator.routing.publishes.RequestHandler."""

    router: Router

    def invalidate(self) -> None:
        raise NotImplementedError

    def _inbox_of(self, peer: str) -> str:
        raise NotImplementedError

    def partition_of(self, stream: str) -> int:
        raise NotImplementedError

    def rejection(self, stream: str, eid: str, f: dict[str, str], exc: SidecarError, *,
                   part: str | None = None) -> Rejection:
        raise NotImplementedError

    def control(self, entry: Entry) -> None:
        """Apply one non-publish request entry."""
        stream, eid, f = entry
        try:
            kind = f.get("k")
            if kind not in KINDS:
                raise BadRequest(f"unknown request kind {kind!r}; expected one of {sorted(KINDS)}")
            if stream == self.router.keys.system:
                raise BadRequest("only publishes belong on the system stream")
            if not f.get("s"):
                raise BadRequest(f"{kind} request without a sender field 's'")
            mark = self.router.guard.authenticate(f, eid)
            if mark is not None:  # stored before the request takes effect (see Guard)
                lease = self.router.keys.router_lease(self.partition_of(stream))
                if not self.router.guard.store_mark(f["s"], mark, lease, self.router.token):
                    self._deposed(stream)
            if kind in ("sub", "unsub"):
                self._subscribe(stream, eid, f, add=kind == "sub")
            elif kind == "reg":
                self._register(stream, eid, f)
            elif kind == "hb":
                self._heartbeat(stream, eid, f)
            elif kind == "pack":
                self._policy_ack(stream, eid, f)
            else:
                self._leave(stream, eid, f)
        except SidecarError as exc:
            self.router.reject([self.rejection(stream, eid, f, exc)])

    def _deposed(self, stream: str) -> NoReturn:
        """A fenced write found our lease on ``stream``'s partition gone: stop routing it."""
        self.router.lost(stream)
        raise Deposed

    def _subscribe(self, stream: str, eid: str, f: dict[str, str], *, add: bool) -> None:
        r = self.router
        sender, pattern = f["s"], check_pattern(f.get("t"))
        if add and r.guard.enforce:
            if str(r.client.get(r.keys.routing_version) or "0") != r.version:
                r.refresh()  # judge the subscribe by the policies in force now, not cached ones
            r.guard.authorize(sender, "subscribe", pattern)
        keys = [r.keys.router_lease(self.partition_of(stream)), r.keys.subs, r.keys.routing_version,
                stream, self._inbox_of(sender), r.keys.member(sender)]
        args = [r.token, REQUEST_GROUP, eid, "add" if add else "remove", f"{sender} {pattern}",
                f.get("r", ""), r.settings.inbox_maxlen]
        result = r.scripts.subscribe(keys=keys, args=args)
        status = str(result[0])
        if status == "lost":
            self._deposed(stream)
        elif status == "unknown_peer":
            raise UnknownPeer(f"peer {sender!r} is not a registered member; register before subscribing")
        else:
            version, changed = int(result[1]), int(result[2])
            if changed and r.version is not None and version == int(r.version) + 1:
                (r.index.add if add else r.index.remove)(sender, pattern)
                r.version = str(version)
                self.invalidate()
            elif changed or str(version) != r.version:
                r.version = None

    def _register(self, stream: str, eid: str, f: dict[str, str]) -> None:
        r = self.router
        sender = f["s"]
        if sender == SYSTEM_SENDER:
            raise BadRequest(f"{SYSTEM_SENDER!r} is the sidecar's own sender id; pick another peer id")
        if not PEER_ID_RE.match(sender):
            raise BadRequest(f"peer id {sender[:80]!r} must be 1-64 letters, digits, '_' or '-'")
        try:
            info = json.loads(f.get("m") or "{}")
            if not isinstance(info, dict):
                raise ValueError("member info must be a JSON object")
            keys, args = register_call(r.keys, sender, info, token=r.token, stream=stream,
                                       entry_id=eid, request_id=f.get("r", ""),
                                       inbox_maxlen=r.settings.inbox_maxlen)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"register request with bad member info: {exc}") from None
        keys[0] = r.keys.router_lease(self.partition_of(stream))
        result = r.scripts.register(keys=keys, args=args)
        if str(result[0]) == "lost":
            self._deposed(stream)
        joined, version = int(result[1]), int(result[4])
        if joined and r.version is not None and version == int(r.version) + 1:
            r.members.add(sender)
            r.version = str(version)
            self.invalidate()
        elif joined or str(version) != r.version:
            r.version = None
        r.guard.learn(sender, info.get("roles") or [info.get("role", "peer")], info.get("labels") or {})
        if r.guard.store.version():  # a joining peer gets the policy set at once
            r.guard.store.distribute([sender], force=True)

    def _heartbeat(self, stream: str, eid: str, f: dict[str, str]) -> None:
        """A heartbeat sent through the stream (authenticated mode: peers cannot run scripts)."""
        r = self.router
        sender = f["s"]
        extra = f.get("x")
        keys, args = heartbeat_call(r.keys, sender, None)
        if extra:
            args[1] = extra if _is_json(extra) else ""
        status, now, leader, term = r.scripts.heartbeat(keys=keys, args=args)
        pipe = r.client.pipeline(transaction=False)
        pipe.xadd(self._inbox_of(sender), {"k": "reply", "r": f.get("r", ""), "ok": "1",
                                           "status": str(status), "leader": str(leader),
                                           "term": str(term), "now": str(now)},
                  maxlen=r.settings.inbox_maxlen, approximate=True)
        pipe.xack(stream, REQUEST_GROUP, eid)
        pipe.execute()

    def _policy_ack(self, stream: str, eid: str, f: dict[str, str]) -> None:
        """A peer applied (ok=1) or refused (ok=0, e=error) a policy set version."""
        r = self.router
        try:
            version = int(f.get("pv", ""))
        except ValueError:
            raise BadRequest("policy ack without a numeric version 'pv'") from None
        r.guard.store.record_ack(f["s"], version, f.get("pn", ""), f.get("ok") == "1",
                                 f.get("e", ""), stream=stream, entry_id=eid)

    def _leave(self, stream: str, eid: str, f: dict[str, str]) -> None:
        r = self.router
        sender = f["s"]
        if not r.leases.get(self.partition_of(stream)):
            return
        keys, args = leave_call(r.keys, sender, "leave", stream=stream, entry_id=eid)
        was_leader = int(r.scripts.leave(keys=keys, args=args)[2])
        if was_leader:  # a graceful leave re-elects now, not a TTL later
            keys, args = elect_call(r.keys, r.settings.member_ttl, "leader left")
            r.scripts.elect(keys=keys, args=args)
        if f.get("r"):
            r.client.xadd(self._inbox_of(sender), {"k": "reply", "r": f["r"], "ok": "1"},
                          maxlen=r.settings.inbox_maxlen, approximate=True)
        r.version = None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
