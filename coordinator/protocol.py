"""Wire format of request and response stream entries (flat string fields, JSON payloads).

Request entry (``sidecar.requests[.<k>]``), written by the mixin::

    k    kind: pub | pubs (folded publishes) | rep (answer) | sub | unsub | reg | leave | hb (heartbeat)
         | pack (policy ack) | dl (dead-letter a delivered message)
    b    pubs only: JSON list of [topic, payload json text, fence term or null, message id,
         headers json text or null], in publish order
    s    sender peer id
    t    topic (pub) or pattern (sub, unsub)
    d    payload as JSON text (pub)
    i    message id (pub): made by the publisher, the same on every retry (coordinator.ids)
    h    headers as JSON text (pub, optional): a mapping of header names to strings
    x    time to live in ms (pub, optional): the message expires that long after Redis got it
    rt   reply-to (pub of a request): the requester, which must be the sender
    to, ri, ok, e   rep (a responder's answer): the requester, the request's message id, "1" with
         the answer in d, or "0" with the handler's error text in e
    reason, p, e, i, t, o, d, h, ts   dl (a subscriber gives a message up): handler_failed or
         expired, the pattern, the error, and the message (id, topic, original sender, data,
         headers, publish time)
    r    request id (control requests): the reply carries it back
    f    leader term the sender claims (fenced publishes only)
    m    member info as JSON (reg)
    x    heartbeat payload as JSON (hb)
    pv, pn, ok, e   policy version, distribution nonce, "1" applied / "0" refused, error (pack)
    n, sig       nonce (signer's clock, us) and HMAC tag (when authentication is on)

Response entry (``sidecar.responses.<peer_id>``), written by the router::

    k=msg    i message id, t topic, d payload JSON, s sender, ts publish time (ms), and when set:
             h headers JSON, x expiry (Redis ms), rt the requester of a request, o the site it
             came from (a message another site's bridge forwarded), q and qp the queue group
    k=reply  r request id, ok "1" | "0", e error code, m error message, plus reply fields
    k=rep    i the request's message id, d answer JSON, s responder, ok "1" | "0", e error text
    k=nr     i the request's message id, t topic: nobody is subscribed to it (no responders)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from coordinator.errors import InvalidHeaders, PayloadTooLarge

__all__ = [
    "BRIDGE_ROLE",
    "DELIVERY_DEAD_LETTERS",
    "HEADER_NAME_RE",
    "INTERNAL_SUBSCRIPTIONS",
    "KINDS",
    "MAX_BATCH",
    "MAX_STATUS_BYTES",
    "MAX_TTL_MS",
    "PEER_ID_RE",
    "PUBLISH_KINDS",
    "SYSTEM_SENDER",
    "Message",
    "check_headers",
    "check_size",
    "dumps",
    "parse_headers",
    "parse_status",
    "status_json",
]

PEER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What a peer id may look like (a ULID does)."""
KINDS = frozenset({"pub", "pubs", "rep", "sub", "unsub", "reg", "leave", "hb", "pack", "dl"})
PUBLISH_KINDS = frozenset({"pub", "pubs", "rep"})
"""Kinds routed in runs through route.lua (in order with the sender's other publishes)."""

MAX_TTL_MS = 7 * 24 * 3600 * 1000
"""Longest time to live a message may ask for (a week)."""

BRIDGE_ROLE = "bridge"
"""Member role of a site's NATS bridge: never swept, trimmed or re-checked against policies like
a peer (leave.lua, the trim duty and the router know it by this role)."""

MAX_BATCH = 1000
"""Most publishes one ``pubs`` entry (or one direct call) may carry; a router refuses a larger
entry whole, before looking at any of it."""

DELIVERY_DEAD_LETTERS = frozenset({"handler_failed", "expired"})
"""Reasons a subscriber may give for dead-lettering a message delivered to it (``dl``)."""

SYSTEM_SENDER = "sidecar"
"""Sender id of the sidecar's own events (``cluster.*``). No peer may register under it; the
membership scripts (register.lua, leave.lua, elect.lua) write the same literal."""

MAX_STATUS_BYTES = 8192
"""Most JSON a peer's status fields, or its heartbeat payload, may take; the router (signed mode)
and the reports ignore more, so no peer can make every dashboard poll carry megabytes."""

INTERNAL_SUBSCRIPTIONS = frozenset({"cluster.leader"})
"""Subscriptions every peer makes for its own bookkeeping: never denied by policy, and not counted
among the peer's own subscriptions."""


HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""What a header name may look like (``traceparent``, ``Nats-Msg-Id``, ``x-request-id``...)."""


def check_headers(headers: Any, limit: int) -> str:
    """``headers`` as compact JSON text ('' for none); InvalidHeaders unless it is a mapping of
    header names to strings (no control characters) of at most ``limit`` bytes as JSON."""
    if not headers:
        return ""
    if not isinstance(headers, Mapping):
        raise InvalidHeaders(f"headers must be a mapping of names to strings, got {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not HEADER_NAME_RE.match(name):
            raise InvalidHeaders(f"header name {str(name)[:80]!r} must be 1-128 letters, digits, "
                                 "'_', '.' or '-', starting with a letter or digit")
        if not isinstance(value, str):
            raise InvalidHeaders(f"header {name!r} must be a string, got {type(value).__name__}")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise InvalidHeaders(f"header {name!r} holds a control character")
    text = dumps(dict(headers))
    if len(text.encode()) > limit:
        raise InvalidHeaders(f"headers take {len(text.encode())} bytes as JSON; the limit is {limit}")
    return text


def parse_headers(text: str | None) -> dict[str, str]:
    """Headers as a peer receives them: the JSON text the router checked ({} for none or garbage)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
"""One encoder for every call: ``json.dumps`` with options builds a new one each time."""


def dumps(data: Any) -> str:
    """Compact JSON text; TypeError for objects JSON cannot carry, ValueError for NaN/Infinity."""
    return _ENCODE(data)


def check_size(text: str, limit: int, what: str) -> None:
    """PayloadTooLarge when ``text`` (JSON) is more than ``limit`` bytes as UTF-8: the peer checks
    at the call, the router again on arrival. The text is encoded only when it could be over (at
    most 4 bytes a character)."""
    if len(text) * 4 > limit and (size := len(text.encode())) > limit:
        raise PayloadTooLarge(
            f"{what} of {size} bytes exceeds the {limit}-byte limit (SIDECAR_MAX_PAYLOAD_BYTES); "
            "send large data by reference (a key, a URL) instead")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities (which JSON cannot carry) as None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def status_json(values: Mapping[str, Any]) -> str:
    """A peer's status fields as JSON for operators, whatever they hold: values JSON cannot carry
    become their text (a datetime, a Decimal), NaN and infinities null; '' (the last status sent
    stays) when the text would be over :data:`MAX_STATUS_BYTES` or the values cannot be written
    at all (a structure that contains itself, an object whose text raises)."""
    try:
        text = json.dumps(_finite(dict(values)), default=str, allow_nan=False,
                          separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, ArithmeticError, RecursionError):
        return ""
    return text if len(text.encode()) <= MAX_STATUS_BYTES else ""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_status(text: str | None) -> dict[str, Any] | None:
    """A status or heartbeat payload as a peer sent it: a JSON object of at most
    :data:`MAX_STATUS_BYTES` without NaN or infinities, or None (absent, too big or not that)."""
    if not text or len(text.encode()) > MAX_STATUS_BYTES:
        return None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class Message:
    """One message delivered to a handler."""

    topic: str
    data: Any
    sender: str
    id: str
    timestamp: float
    """Publish time, seconds since the epoch (Redis server clock)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Headers the publisher set (``traceparent`` and the like), passed through untouched."""
    site: str | None = None
    """Site the message was published on; None for this site."""
    reply_to: str | None = None
    """For a request (``cluster_request``): the requester; a handler's return value answers it."""
    queue: str | None = None
    """The queue group this message was handed to this peer for (None: a plain subscription)."""
    _respond: Callable[[Any], Awaitable[None]] | None = field(default=None, repr=False, compare=False)

    @property
    def is_request(self) -> bool:
        return self.reply_to is not None

    @classmethod
    def delivered(cls, topic: str, data: Any, sender: str, id: str, timestamp: float,
                  headers: dict[str, str], reply_to: str | None, queue: str | None,
                  respond: Callable[[Any], Awaitable[None]] | None,
                  site: str | None = None) -> Message:
        """The message an inbox reader hands to handlers: equal to ``Message(...)`` with the same
        fields, built at less than half the cost (a frozen dataclass's ``__init__`` goes through
        ``object.__setattr__`` once per field, a sizeable share of a peer's work per message)."""
        m = object.__new__(cls)
        (s_topic, s_data, s_sender, s_id, s_timestamp, s_headers, s_site, s_reply_to, s_queue,
         s_respond) = _MESSAGE_SLOTS
        s_topic(m, topic)
        s_data(m, data)
        s_sender(m, sender)
        s_id(m, id)
        s_timestamp(m, timestamp)
        s_headers(m, headers)
        s_site(m, site)
        s_reply_to(m, reply_to)
        s_queue(m, queue)
        s_respond(m, respond)
        return m

    async def respond(self, data: Any) -> None:
        """Answer this request with ``data`` (JSON-able) now; the handler's return value is then
        not sent. RuntimeError for a message that is not a request."""
        if self._respond is None:
            raise RuntimeError(f"message {self.id} on {self.topic!r} is not a request")
        await self._respond(data)


_MESSAGE_SLOTS = tuple(vars(Message)[f.name].__set__ for f in fields(Message))
"""The slot setters of every Message field, in declaration order (see Message.delivered)."""
