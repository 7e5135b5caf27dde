"""The dead-letter stream: refused requests and given-up deliveries, written, listed and replayed.

A :class:`Rejection` says which request entry was refused and why. :class:`Rejector` writes each
one with ``reply.lua``: a dead-letter entry with the reason, an error reply when the sender can be
identified (it is a member, or it has an inbox; with ``SIDECAR_AUTH=required``, only once its
signature checked out), and the entry's acknowledgement, in one atomic
step fenced by the router's lease, so a deposed router never dead-letters or answers a request its
successor handles too. (Subscribers give up deliveries through the router too: ``dl`` requests,
see coordinator.routing.control.) :class:`DeadLetters` lists them and sends them again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from coordinator.errors import AuthenticationFailed, SidecarError
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.protocol import dumps
from coordinator.routing.view import RoutingView
from coordinator.scripts import scripts_for
from coordinator.settings import Settings

__all__ = ["DeadLetters", "Rejection", "Rejector", "deadletter_entry"]

log = logging.getLogger("sidecar.router")


def deadletter_entry(reason: str, message: str, *, stream: str, entry: str, sender: str = "",
                     raw: str = "", **more: str) -> dict[str, str]:
    """The fields of a dead-letter entry: why (``reason`` code and ``message``), where the refused
    thing came from (``stream`` and ``entry``), who sent it, up to 4 KiB of it, and ``more``
    (``topic``, ``peer``...)."""
    return {"reason": reason, "message": message, "stream": stream, "entry": entry,
            "sender": sender, "raw": raw[:4096], **more}


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
        return deadletter_entry(self.code, self.message, stream=self.stream, entry=self.entry_id,
                                sender=self.sender or "", raw=dumps(self.fields))

    def reply_fields(self) -> dict[str, str]:
        return {"k": "reply", "r": self.fields.get("r", ""), "ok": "0", "e": self.code,
                "m": self.message, "ref": self.entry_id, "t": self.fields.get("t", "")[:256]}


class Rejector:
    """Builds and writes the rejections of one router."""

    def __init__(self, client: Any, keys: Keys, settings: Settings, view: RoutingView) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.view = view
        self.scripts = scripts_for(client)

    def rejection(self, stream: str, eid: str, f: dict[str, str], exc: SidecarError, *,
                  part: str | None = None) -> Rejection:
        """The rejection of entry ``eid`` (or of message ``part`` of a batch entry)."""
        sender = f.get("s")
        reply_to = None
        if isinstance(exc, AuthenticationFailed) and self.settings.auth == "required":
            pass  # anyone can claim a sender: answering would let them flood its inbox
        elif sender and stream != self.keys.system and (
                sender in self.view.members or self.client.exists(self.keys.responses(sender))):
            reply_to = sender
        if part is not None and part != eid:  # one message of a batch entry the script acks
            return Rejection(stream, part, dict(f), exc.code, str(exc), reply_to, ack=False)
        return Rejection(stream, eid, dict(f), exc.code, str(exc), reply_to)

    def write(self, rejections: list[Rejection], lease_key: str, token: str) -> int:
        """Dead-letter, answer and ack each rejection under the lease; returns how many were
        written (fewer when the lease went meanwhile: the rest is the new owner's)."""
        if not rejections:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for r in rejections:
            reply = r.reply_fields() if r.reply_to else {}
            dead = r.deadletter_fields()
            self.scripts.reply(
                keys=[lease_key, r.stream, self.keys.responses(r.reply_to or "-"), self.keys.deadletter],
                args=[token, REQUEST_GROUP, r.entry_id if r.ack else "", self.settings.inbox_maxlen,
                      self.settings.deadletter_maxlen, len(reply), len(dead),
                      *(x for kv in reply.items() for x in kv), *(x for kv in dead.items() for x in kv)],
                client=pipe)
        written = sum(int(x) for x in pipe.execute())
        if written:
            self.client.hincrby(self.keys.stats, "rejected", written)
        for r in rejections[:written]:
            log.info("rejected %s from %s: %s (%s)", r.entry_id, r.sender or "?", r.code, r.message)
        return written


DELIVERY_REASONS = frozenset({"handler_failed", "expired", "inbox_full"})
"""Dead letters of a message delivered (or due) to one peer: replayed into that peer's inbox."""


class DeadLetters:
    """Reads the dead-letter stream and replays entries of it (operator tooling calls this)."""

    def __init__(self, client: Any, keys: Keys, settings: Settings) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings

    def list(self, count: int = 50, reason: str | None = None) -> list[dict[str, str]]:
        """The newest ``count`` dead letters (of ``reason`` only, if given), oldest first."""
        out: list[dict[str, str]] = []
        last = "+"
        while len(out) < count:
            batch = self.client.xrevrange(self.keys.deadletter, max=last, count=max(count, 100))
            if last != "+":
                batch = batch[1:]  # the boundary entry was seen already
            if not batch:
                break
            for eid, fields in batch:
                if reason is None or fields.get("reason") == reason:
                    out.append({"id": eid, **fields})
            last = batch[-1][0]
        return list(reversed(out[:count]))

    def replay(self, entry_id: str) -> str:
        """Send dead letter ``entry_id`` again and delete it; returns where it went.

        A given-up delivery goes back into its peer's inbox with its message id, topic, data and
        headers; a refused request is appended to its request stream again (and checked again).
        Raises KeyError for an unknown entry and ValueError for one that cannot be replayed.
        """
        found = self.client.xrange(self.keys.deadletter, entry_id, entry_id)
        if not found:
            raise KeyError(f"no dead letter {entry_id} (list them with `sidecar deadletter list`)")
        fields = found[0][1]
        reason = fields.get("reason", "")
        if reason in DELIVERY_REASONS:
            peer = fields.get("peer", "")
            if not self.client.zscore(self.keys.members, peer):
                raise ValueError(f"dead letter {entry_id} was for peer {peer!r}, which is not a "
                                 "member any more")
            target = self.keys.responses(peer)
            entry = {"k": "msg", "i": fields.get("entry", ""), "t": fields.get("topic", ""),
                     "d": fields.get("raw", "null"), "s": fields.get("sender", ""),
                     "ts": fields.get("ts", "") or entry_id.partition("-")[0]}
            if fields.get("headers"):
                entry["h"] = fields["headers"]
            if fields.get("queue"):  # to the queue group subscription it was handed to
                entry.update(q=fields["queue"], qp=fields.get("pattern", ""))
        else:
            try:
                entry = json.loads(fields.get("raw", ""))
                if not isinstance(entry, dict) or not entry:
                    raise ValueError
            except ValueError:
                raise ValueError(f"dead letter {entry_id} keeps no request to replay") from None
            target = fields.get("stream", "")
            if not self.keys.is_request_stream(target, self.settings.partitions):
                raise ValueError(f"dead letter {entry_id} came from {target!r}, not a request stream")
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(target, {str(k): str(v) for k, v in entry.items()},
                  maxlen=self.settings.inbox_maxlen, approximate=True)
        pipe.xdel(self.keys.deadletter, entry_id)
        pipe.execute()
        return target
