"""Queue group hand-off: what a gone member was handed and had not handled goes to another member.

When a member leaves or is evicted (coordinator.cluster.membership, and the router's leave), the
queue group deliveries still unhandled in its inbox (pending, or never read) are handed to live
members of the same group, in turn, by ``requeue.lua``, which moves each entry exactly once.
Entries of a group with no member left stay where they are (the peer may come back).
"""

from __future__ import annotations

import logging
from typing import Any

from coordinator.keys import PEER_GROUP, Keys
from coordinator.scripts import scripts_for
from coordinator.topics import group_key

__all__ = ["hand_off"]

log = logging.getLogger("sidecar.membership")


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def hand_off(client: Any, keys: Keys, peer: str, *, inbox_maxlen: int) -> int:
    """Hand ``peer``'s unhandled queue group deliveries to other live members; returns how many."""
    inbox = keys.responses(peer)
    try:
        entries = client.xrange(inbox, count=100_000)
    except Exception:  # no inbox, or not a stream: nothing to hand off
        return 0
    queued = [(eid, f) for eid, f in entries if f.get("q") and f.get("qp")]
    if not queued:
        return 0
    members = set(client.zrange(keys.members, 0, -1)) - {peer}
    groups: dict[str, list[str]] = {}
    for _, f in queued:
        key = group_key(f["q"], f["qp"])
        if key not in groups:
            suffix = f" {f['qp']} {f['q']}"  # subscription fields are "<peer> <pattern> <queue>"
            found = {str(field).split(" ", 1)[0] for field, _ in
                     client.hscan_iter(keys.subs, match="* " + _glob_escape(suffix[1:]))}
            groups[key] = sorted(p for p in found if p in members)
    inboxes: dict[str, int] = {}
    args: list[Any] = [PEER_GROUP, inbox_maxlen]
    turn: dict[str, int] = {}
    for eid, f in queued:
        key = group_key(f["q"], f["qp"])
        live = groups[key]
        if not live:
            continue
        to = live[turn.get(key, 0) % len(live)]
        turn[key] = turn.get(key, 0) + 1
        i = inboxes.setdefault(to, len(inboxes) + 1)
        args += (eid, i, to)
    if not inboxes:
        return 0
    moved = int(scripts_for(client).requeue(
        keys=[inbox, keys.members, *(keys.responses(p) for p in inboxes)], args=args))
    if moved:
        log.info("handed %d queue group deliveries of %s to %d other members", moved, peer, len(inboxes))
    return moved
