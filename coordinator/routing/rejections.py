"""Refused requests: the dead-letter stream's only writer, and the error replies that go with it.

A :class:`Rejection` says which request entry was refused and why. :class:`Rejector` writes each
one with ``reply.lua``: a dead-letter entry with the reason, an error reply when the sender can be
identified (it is a member, or it has an inbox), and the entry's acknowledgement, in one atomic
step fenced by the router's lease, so a deposed router never dead-letters or answers a request its
successor handles too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from coordinator.errors import SidecarError
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.protocol import dumps
from coordinator.routing.view import RoutingView
from coordinator.scripts import scripts_for
from coordinator.settings import Settings

__all__ = ["Rejection", "Rejector"]

log = logging.getLogger("sidecar.router")


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
        if sender and stream != self.keys.system and (
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
