"""Wire format of request and response stream entries (flat string fields, JSON payloads).

Request entry (``sidecar.requests[.<k>]``), written by the mixin::

    k    kind: pub | pubs (folded publishes) | sub | unsub | reg | leave | hb (heartbeat) | pack (policy ack)
    b    pubs only: JSON list of [topic, payload json text, fence term or null], in publish order
    s    sender peer id
    t    topic (pub) or pattern (sub, unsub)
    d    payload as JSON text (pub)
    r    request id (control requests): the reply carries it back
    f    leader term the sender claims (fenced publishes only)
    m    member info as JSON (reg)
    x    heartbeat payload as JSON (hb)
    pv, pn, ok, e   policy version, distribution nonce, "1" applied / "0" refused, error (pack)
    n, sig       nonce (signer's clock, us) and HMAC tag (when authentication is on)

Response entry (``sidecar.responses.<peer_id>``), written by the router::

    k=msg    i message id, t topic, d payload JSON, s sender, ts publish time (ms)
    k=reply  r request id, ok "1" | "0", e error code, m error message, plus reply fields
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "INTERNAL_SUBSCRIPTIONS",
    "KINDS",
    "PEER_ID_RE",
    "PUBLISH_KINDS",
    "SYSTEM_SENDER",
    "Message",
    "dumps",
]

PEER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What a peer id may look like (a ULID does)."""
KINDS = frozenset({"pub", "pubs", "sub", "unsub", "reg", "leave", "hb", "pack"})
PUBLISH_KINDS = frozenset({"pub", "pubs"})

SYSTEM_SENDER = "sidecar"
"""Sender id of the sidecar's own events (``cluster.*``). No peer may register under it; the
membership scripts (register.lua, leave.lua, elect.lua) write the same literal."""

INTERNAL_SUBSCRIPTIONS = frozenset({"cluster.leader"})
"""Subscriptions every peer makes for its own bookkeeping: never denied by policy, and not counted
among the peer's own subscriptions."""


def dumps(data: Any) -> str:
    """Compact JSON text; TypeError for objects JSON cannot carry, ValueError for NaN/Infinity."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True, slots=True)
class Message:
    """One message delivered to a handler."""

    topic: str
    data: Any
    sender: str
    id: str
    timestamp: float
    """Publish time, seconds since the epoch (Redis server clock)."""
