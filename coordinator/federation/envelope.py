"""How a message looks on NATS: subject, headers and payload, both ways.

A message leaves its site as one JetStream message on subject ``_SIDECAR.<namespace>.msg.<topic>``
(the stream stores it and republishes it on ``<namespace>.<topic>`` for plain NATS subscribers):

- the payload is the message's JSON text, as the publisher wrote it;
- ``Nats-Msg-Id`` is the message id (JetStream drops a repeat within its duplicate window);
- ``Sidecar-Site`` and ``Sidecar-Sender`` say where it was published and by whom;
- ``Sidecar-Expires`` is its expiry (Redis ms on the origin site) when it has a time to live;
- every header the publisher set travels as a NATS header of the same name;
- a request also carries ``Sidecar-Reply-To`` (its site's answer subject) and ``Sidecar-Requester``.

An answer travels on core NATS (not the stream: a request is only worth answering while its
requester waits) to the requester's site with ``Sidecar-Requester``, ``Sidecar-Request-Id`` and
``Sidecar-Ok``; its payload is the answer's JSON, or the handler's error text. A plain NATS
requester gets the same payload on its reply subject.

Header names starting with ``Sidecar-`` or ``Nats-`` are the bridge's: a publisher's own headers of
those names are not sent (they could forge an origin), and on the way in they are not handed to
handlers. A message from a plain NATS client on ``<namespace>.<topic>`` is taken by one bridge of the
cluster (a queue group) and put in the stream on ``_SIDECAR.<namespace>.plain.<topic>`` (:func:`ingest`),
so every site gets it once, in order, like any other; it comes from site and sender ``nats``, and
its id is its ``Nats-Msg-Id`` when that is a valid id, else one the bridge made.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from coordinator.errors import BadRequest
from coordinator.ids import MESSAGE_ID_RE, MessageIds
from coordinator.keys import Keys
from coordinator.protocol import PEER_ID_RE, check_headers
from coordinator.settings import RESERVED_SITE

__all__ = ["ORIGIN_NATS", "RESERVED_PREFIXES", "Inbound", "Outbound", "ReplyRoute", "answer_in",
           "answer_out", "inbound", "ingest", "origin_of", "outbound"]

ORIGIN_NATS = RESERVED_SITE
"""Site and sender of a message a plain NATS client published."""

RESERVED_PREFIXES = ("sidecar-", "nats-")
"""Header names (lowercased) that belong to the bridge and to NATS, never to a publisher."""

H_ID = "Nats-Msg-Id"
H_SITE = "Sidecar-Site"
H_SENDER = "Sidecar-Sender"
H_EXPIRES = "Sidecar-Expires"
H_REPLY_TO = "Sidecar-Reply-To"
H_REQUESTER = "Sidecar-Requester"
H_REQUEST_ID = "Sidecar-Request-Id"
H_OK = "Sidecar-Ok"


_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
"""What a site name may look like (coordinator.settings checks the same)."""

new_id = MessageIds().next
"""Ids for plain clients' core NATS messages that bring none (one generator per process)."""


def _reserved(name: str) -> bool:
    return name.lower().startswith(RESERVED_PREFIXES)


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message on its way to NATS."""

    subject: str
    payload: bytes
    headers: dict[str, str]
    msg_id: str


@dataclass(frozen=True, slots=True)
class ReplyRoute:
    """Where the answer to a request from elsewhere goes: a NATS subject, and for a sidecar
    requester on another site its peer id (None: a plain NATS requester's reply subject)."""

    subject: str
    requester: str | None


@dataclass(frozen=True, slots=True)
class Inbound:
    """A NATS message to deliver here: its ``fwd`` entry, and for a request where to answer."""

    entry: dict[str, str]
    reply: ReplyRoute | None


def outbound(keys: Keys, site: str, fields: Mapping[str, str]) -> Outbound:
    """The NATS message carrying inbox entry ``fields`` (``k=msg``) of this site."""
    headers: dict[str, str] = {}
    text = fields.get("h")
    if text:
        try:
            user = json.loads(text)
        except ValueError:
            user = {}
        if isinstance(user, dict):
            headers.update((str(k), str(v)) for k, v in user.items() if not _reserved(str(k)))
    mid = fields.get("i", "")
    headers[H_ID] = mid
    headers[H_SITE] = site
    headers[H_SENDER] = fields.get("s", "")
    if fields.get("x"):
        headers[H_EXPIRES] = fields["x"]
    if fields.get("rt"):
        headers[H_REPLY_TO] = keys.reply_subject(site)
        headers[H_REQUESTER] = fields["rt"]
    return Outbound(keys.stream_subject(fields.get("t", "")), fields.get("d", "null").encode(), headers,
                    mid)


def ingest(keys: Keys, subject: str, payload: bytes, headers: Mapping[str, str] | None, reply: str,
           *, max_header_bytes: int) -> Outbound:
    """The stream message that carries a plain NATS client's message on ``<namespace>.<topic>``
    to every site: its own headers, an id (its ``Nats-Msg-Id`` if valid, else a new one) and,
    for a request, its reply subject (``Sidecar-Reply-To``). BadRequest (and its kinds) for a
    message no peer may be handed, as :func:`inbound` says."""
    checked = inbound(keys, subject, payload, headers, 0, max_header_bytes=max_header_bytes)
    entry = checked.entry
    out = {k: v for k, v in (headers or {}).items() if not _reserved(k)}
    out[H_ID] = entry["i"]
    if reply:
        out[H_REPLY_TO] = reply
    return Outbound(keys.plain_subject(entry["t"]), payload, out, entry["i"])


def inbound(keys: Keys, subject: str, payload: bytes, headers: Mapping[str, str] | None, seq: int, *,
            max_header_bytes: int) -> Inbound:
    """What delivers NATS message ``seq`` of the stream here. BadRequest (and its kinds) for a
    message no peer may be handed: a subject outside the namespace, a payload that is not JSON
    text, headers or names that are not valid."""
    topic = keys.topic_of(subject)
    if not topic:
        raise BadRequest(f"subject {subject[:80]!r} is outside namespace {keys.namespace!r}")
    try:
        data = payload.decode()
        json.loads(data)
    except ValueError:  # UnicodeDecodeError is one
        raise BadRequest(f"payload on {subject[:80]!r} is not JSON text") from None
    given = dict(headers or {})
    user = {k: v for k, v in given.items() if not _reserved(k)}
    entry = {"k": "fwd", "q": str(seq), "t": topic, "d": data}
    user_text = check_headers(user, max_header_bytes)
    if user_text:
        entry["h"] = user_text
    site = given.get(H_SITE)
    sender = given.get(H_SENDER) or ORIGIN_NATS if site else ORIGIN_NATS
    if not _NAME_RE.match(site or ORIGIN_NATS) or not PEER_ID_RE.match(sender):
        raise BadRequest(f"{H_SITE} and {H_SENDER} must be site and peer names")
    entry["o"], entry["s"] = site or ORIGIN_NATS, sender
    mid = given.get(H_ID, "")
    entry["i"] = mid if MESSAGE_ID_RE.match(mid) else f"nats-{seq}" if seq else new_id()
    expires = given.get(H_EXPIRES, "")
    if expires.isdigit():
        entry["x"] = expires
    route = None
    if site and given.get(H_REPLY_TO) and given.get(H_REQUESTER):
        if not PEER_ID_RE.match(given[H_REQUESTER]):
            raise BadRequest(f"{H_REQUESTER} must be a peer id")
        route = ReplyRoute(given[H_REPLY_TO], given[H_REQUESTER])
    elif not site and given.get(H_REPLY_TO):  # a plain NATS client's request: its reply subject
        route = ReplyRoute(given[H_REPLY_TO], None)
    if route is not None:
        entry["rt"] = "1"
    return Inbound(entry, route)


def answer_out(fields: Mapping[str, str], route: ReplyRoute) -> tuple[bytes, dict[str, str]]:
    """Payload and headers of the answer in ``rep`` entry ``fields`` for ``route``."""
    ok = fields.get("ok") == "1"
    payload = (fields.get("d") or "null") if ok else (fields.get("e") or "handler failed")
    headers = {H_OK: "1" if ok else "0", H_SENDER: fields.get("s", "")}
    if route.requester is not None:
        headers[H_REQUESTER] = route.requester
        headers[H_REQUEST_ID] = fields.get("i", "")
    return payload.encode(), headers


def answer_in(headers: Mapping[str, str] | None, payload: bytes) -> dict[str, str]:
    """The ``rep`` entry handing an answer from another site to its requester here; BadRequest
    for an answer that does not say whose request it answers."""
    given = dict(headers or {})
    requester, request = given.get(H_REQUESTER, ""), given.get(H_REQUEST_ID, "")
    if not PEER_ID_RE.match(requester) or not MESSAGE_ID_RE.match(request):
        raise BadRequest("an answer needs a requester and a request id")
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        raise BadRequest("an answer must be UTF-8 text") from None
    entry = {"k": "rep", "to": requester, "ri": request}
    if given.get(H_OK) == "1":
        try:
            json.loads(text)
        except ValueError:
            raise BadRequest("an answer must be JSON text") from None
        entry.update(ok="1", d=text)
    else:
        entry.update(ok="0", e=text[:2000])
    return entry


def origin_of(headers: Mapping[str, str] | None) -> str:
    """The site a NATS message was published on (``nats`` for a plain client)."""
    return (headers or {}).get(H_SITE) or ORIGIN_NATS
