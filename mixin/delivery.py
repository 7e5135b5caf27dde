"""What happens to each entry of a peer's inbox: which handlers it is for, and running them.

A :class:`Delivery` belongs to one :class:`~mixin.sidecar.SidecarMixin` and owns the peer's
subscriptions (pattern and queue group to handlers), the messages already handled (a repeat is
dropped by sender, message id and queue group), the messages parked for handlers yet to come
after a restart, and the retries of failed handlers (:class:`~mixin.retries.HandlerRetries`).
Entries are handled one at a time, in inbox order per sender, except that parked entries go when
their handler subscribes and a retried entry holds back only its sender's later ones. An entry is
acknowledged when it is settled: handled, dropped as a repeat, malformed (counted as a handler
error), expired or dead-lettered; an entry parked, held behind its sender's retried message or
being retried itself is acknowledged by whoever settles it later.

The peer's hooks for the sidecar's own messages (leader, policy, dropped subscriptions) run
inside that one-at-a-time handling too. A handler or hook that subscribes goes straight in (it
holds the turn already; see :meth:`Delivery.turn`); the reader reads the sidecar's reply
meanwhile (:mod:`mixin.handing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from coordinator.errors import PayloadTooLarge, SidecarError
from coordinator.logs import Log
from coordinator.protocol import (
    INTERNAL_SUBSCRIPTIONS,
    SYSTEM_SENDER,
    Message,
    check_size,
    dumps,
    parse_headers,
)
from coordinator.settings import Settings
from coordinator.topics import SubscriptionIndex
from mixin import tracing
from mixin.link import SidecarLink
from mixin.retries import Failure, Handler, HandlerRetries

__all__ = ["INTERNAL", "Delivery", "DeliveryCounts", "Handler", "Key"]

INTERNAL = tuple(sorted(INTERNAL_SUBSCRIPTIONS))
"""The subscriptions every peer makes for its own bookkeeping (the leader's announcements;
policies and dropped-subscription notices reach a peer without one)."""
_SEEN_LIMIT = 100_000
"""Messages a peer remembers as handled, to drop their repeats."""
_UNTRACED = contextlib.nullcontext()
"""The context a handler of a message without trace context runs in (one, reused)."""
_MATCHED_LIMIT = 4096
"""Topics whose matching subscriptions a peer remembers (all forgotten when it fills up)."""

Key = tuple[str, str]
"""A subscription: (pattern, queue group or '')."""


class _Turn:
    """The delivery's lock, knowing which task holds it: a handler (run under it) that
    subscribes is let through rather than made to wait for itself."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        self._owner = asyncio.current_task()

    async def __aexit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()

    def mine(self) -> bool:
        """Whether the current task holds it."""
        return self._owner is not None and self._owner is asyncio.current_task()


class DeliveryCounts(Protocol):
    """The peer's status counters a delivery adds to."""

    messages_received: int
    handler_errors: int
    messages_expired: int


def _timestamp_ms(eid: str, fields: dict[str, str]) -> int:
    """When Redis got a message (ms): its ``ts`` field through the router; on the direct path the
    inbox entry id, which Redis stamps with its own clock."""
    ts = fields.get("ts") or eid.partition("-")[0]
    return int(ts) if ts.isdigit() else 0


class Delivery:
    """The handlers of one peer, and every inbox entry's way to them."""

    def __init__(self, settings: Settings, *, link: Callable[[], SidecarLink | None],
                 counts: DeliveryCounts, on_system: Callable[[str, Any], Awaitable[None]],
                 on_subscriptions: Callable[[int], None], log: Log) -> None:
        """``link`` gives the peer's link (None before setup and after teardown); ``counts``
        are the peer's counters; ``on_system`` is told each of the sidecar's own messages before
        the handlers run; ``on_subscriptions`` the peer's own subscription count on each change."""
        self._link = link
        self._counts = counts
        self._on_system = on_system
        self._on_subscriptions = on_subscriptions
        self._log = log
        self._lock = _Turn()
        """Held while an entry is handled, and while a subscription changes (see :meth:`turn`)."""
        self._handlers: dict[Key, list[Handler]] = {}
        self._patterns = SubscriptionIndex()
        self._matched: dict[str, list[Key]] = {}
        """Topic -> the plain subscriptions matching it; cleared whenever those change."""
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._parked: list[tuple[str, dict[str, str]]] = []
        """Entries that came before a handler for them (see :meth:`park_for`)."""
        self._park_until = 0.0
        self._releasing = False
        self._retries = HandlerRetries(settings, lock=self._lock, run=self._call, ack=self._ack,
                                       dead_letter=self._dead_letter,
                                       redispatch=self._redispatch, log=log)

    # ------------------------------------------------------------------ subscriptions
    def __contains__(self, key: Key) -> bool:
        """Whether the peer has subscription ``key``."""
        return key in self._handlers

    @property
    def parked(self) -> int:
        """Entries waiting now for a handler to subscribe."""
        return len(self._parked)

    @property
    def subscriptions(self) -> list[Key]:
        """Every subscription, the internal ones too."""
        return list(self._handlers)

    def count(self) -> int:
        """Subscriptions the peer made itself (the internal ones apart)."""
        return sum(1 for pattern, _ in self._handlers if pattern not in INTERNAL)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """The one-at-a-time turn that handling an entry holds: subscriptions change inside it.
        A handler (which holds it already) goes straight in."""
        if self._lock.mine():
            yield
            return
        async with self._lock:
            yield

    async def add(self, key: Key, handler: Handler) -> bool:
        """Add ``handler`` to subscription ``key`` (inside :meth:`turn`); True when the
        subscription is new. Parked entries it matches are handled now."""
        new = key not in self._handlers
        if new:
            if not key[1]:
                self._patterns.add(key[0], key[0])
                self._matched.clear()
            self._handlers[key] = []
        self._handlers[key].append(handler)
        self._on_subscriptions(self.count())
        await self._release_parked()
        return new

    def remove(self, key: Key, handler: Handler) -> None:
        """Take ``handler`` off subscription ``key`` (the subscription goes with its last one)."""
        handlers = self._handlers.get(key, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers:
            self.forget(key)

    def forget(self, key: Key) -> None:
        """Drop subscription ``key`` and its handlers (inside :meth:`turn`, or while an entry is
        handled: a sidecar notice drops one)."""
        if self._handlers.pop(key, None) is None:
            return
        if not key[1]:
            self._patterns.remove(key[0], key[0])
            self._matched.clear()
        self._on_subscriptions(self.count())

    def park_for(self, seconds: float) -> None:
        """For ``seconds`` from now, entries no handler matches yet wait (unacknowledged) for
        one: messages that waited in the inbox while the peer was away arrive before its handlers
        are back, and are handed to them as they subscribe again, in order."""
        self._park_until = time.monotonic() + seconds

    async def close(self) -> None:
        """Stop the retries (after the inbox reader stopped: nothing held is let through now)."""
        await self._retries.close()

    # ------------------------------------------------------------------ entries
    async def on_entry(self, eid: str, fields: dict[str, str]) -> bool:
        """Handle inbox entry ``eid``; True when it is settled (the reader acknowledges it)."""
        async with self._lock:
            if self._parked and time.monotonic() > self._park_until:
                await self._release_parked(expire=True)
            return await self._dispatch(eid, fields)

    async def _release_parked(self, *, expire: bool = False) -> None:
        """Hand parked messages to the handlers that now match them (or drop them once expired).
        A handler that subscribes meanwhile adds no release of its own: this one goes on, and
        sees the new handler for the entries after it."""
        if self._releasing:
            return
        self._releasing = True
        try:
            await self._release(expire)
        finally:
            self._releasing = False

    async def _release(self, expire: bool) -> None:
        keep, done = [], []
        parked, self._parked = self._parked, []
        for eid, fields in parked:
            if self._keys_for(fields.get("t", ""), fields) or expire:
                if await self._dispatch(eid, fields, park=False):
                    done.append(eid)  # else it is being retried: acknowledged once settled
            else:
                keep.append((eid, fields))
        self._parked = keep + self._parked
        await self._ack(done)

    async def _dispatch(self, eid: str, fields: dict[str, str], *, park: bool = True) -> bool:
        """Run the handlers of one message; False if it is not settled yet (parked for handlers
        yet to come, waiting behind a retried message of its sender, or being retried itself):
        whoever settles it acknowledges it."""
        mid = fields.get("i") or eid
        topic = fields.get("t", "")
        sender = fields.get("s", "")
        # with the sender (a peer cannot suppress another's messages) and the queue group (a
        # message may come once plain and once for a group this peer is in)
        seen = f"{sender} {mid} {fields.get('q', '')}"
        if self._retries.owns(eid):  # read again while it is retried or held: not settled yet
            return False
        if seen in self._seen:
            return True
        keys = self._keys_for(topic, fields)
        if (park and not keys and sender != SYSTEM_SENDER
                and time.monotonic() < self._park_until):
            self._parked.append((eid, fields))
            return False
        if self._retries.blocked(sender):  # an earlier message of this sender is being retried
            self._retries.hold(sender, eid, fields)
            return False
        link = self._link()
        expiry = fields.get("x")
        if expiry and expiry.isdigit() and link is not None and link.redis_now_ms() > int(expiry):
            await self._expired(eid, mid, fields)
            return True
        self._seen[seen] = None
        if len(self._seen) > _SEEN_LIMIT:
            self._seen.popitem(last=False)
        try:
            data = json.loads(fields.get("d", "null"))
        except ValueError:
            self._counts.handler_errors += 1
            return True
        reply_to = fields.get("rt") or None
        respond = self._responder(reply_to, mid) if reply_to is not None else None
        message = Message.delivered(topic, data, sender, mid, _timestamp_ms(eid, fields) / 1000,
                                    parse_headers(fields.get("h")), reply_to,
                                    fields.get("q") or None, respond, fields.get("o"))
        self._counts.messages_received += 1
        if sender == SYSTEM_SENDER:
            await self._on_system(topic, data)
        failures: list[Failure] = []
        for key in keys:
            for handler in list(self._handlers.get(key, ())):
                ok, result = await self._call(handler, message)
                if respond is not None and (not ok or result is not None):
                    try:
                        await respond(result, ok)  # a request is answered, never retried
                    except PayloadTooLarge as exc:  # what the handler returned cannot travel
                        self._log.warning("answer to request %s on %s refused: %s", mid, topic, exc)
                        await respond(f"{type(exc).__name__}: {exc}", False)
                elif not ok and sender != SYSTEM_SENDER:
                    failures.append(Failure(key[0], handler, str(result)))
        if failures:
            self._retries.failed(eid, message, failures)
            return False  # acknowledged once the retries settle it
        return True

    def _responder(self, reply_to: str, mid: str) -> Callable[..., Awaitable[None]]:
        """What answers request ``mid`` of ``reply_to``: once, whichever handler answers first.

        An answer over the payload limit raises PayloadTooLarge at the call and counts as no
        answer: when the handler's return value is too large (or the handler lets that error
        out), the requester gets RemoteError at once; a handler that swallows it leaves the
        requester to its timeout."""
        answered: list[bool] = []

        async def respond(value: Any, ok: bool = True) -> None:
            link = self._link()
            if answered or link is None:
                return  # one answer per request and peer
            answer = {"k": "rep", "s": link.peer_id, "to": reply_to, "ri": mid}
            if ok:
                data = dumps(value)
                check_size(data, link.max_payload_bytes, "answer")
                answer.update(ok="1", d=data)
            else:
                answer.update(ok="0", e=str(value)[:2000])
            answered.append(True)
            try:
                await link.write(answer)
            except SidecarError as exc:  # refused (too large...): the requester was told instead
                self._log.warning("answer to request %s of %s refused: %s", mid, reply_to, exc)

        return respond

    def _keys_for(self, topic: str, fields: dict[str, str]) -> list[Key]:
        """The subscriptions an inbox entry is for: its queue group's, or every plain match."""
        queue = fields.get("q")
        if queue:
            key = (fields.get("qp", ""), queue)
            return [key] if key in self._handlers else []
        keys = self._matched.get(topic)
        if keys is None:
            keys = [(p, "") for p in sorted(self._patterns.match(topic))]
            if len(self._matched) >= _MATCHED_LIMIT:
                self._matched.clear()
            self._matched[topic] = keys
        return keys

    async def _dead_letter(self, message: Message, failure: Failure, tries: int) -> None:
        """Ask the sidecar to dead-letter ``message`` as handler_failed (peers cannot write there)."""
        link = SidecarLink.required(self._link())
        fields = {"k": "dl", "s": link.peer_id, "reason": "handler_failed", "p": failure.pattern,
                  "e": f"failed {tries} times; last: {failure.error}"[:2000], "i": message.id,
                  "t": message.topic, "o": message.sender, "d": dumps(message.data),
                  "ts": str(int(message.timestamp * 1000))}
        if message.headers:
            fields["h"] = dumps(message.headers)
        if message.queue:  # a replay must reach the same queue group subscription
            fields.update(q=message.queue, qp=failure.pattern)
        self._seen.pop(f"{message.sender} {message.id} {message.queue or ''}", None)  # replays welcome
        await link.write(fields)

    async def _expired(self, eid: str, mid: str, fields: dict[str, str]) -> None:
        """A message whose time to live ran out before a handler got it: count and dead-letter it."""
        self._counts.messages_expired += 1
        link = SidecarLink.required(self._link())
        late = link.redis_now_ms() - int(fields.get("x", "0"))
        dead = {"k": "dl", "s": link.peer_id, "reason": "expired", "e": f"expired {late:.0f} ms ago",
                "i": mid, "t": fields.get("t", ""), "o": fields.get("s", ""),
                "d": fields.get("d", "null"), "ts": str(_timestamp_ms(eid, fields))}
        if fields.get("h"):
            dead["h"] = fields["h"]
        if fields.get("q"):
            dead.update(q=fields["q"], qp=fields.get("qp", ""))
        await link.write(dead)

    async def _ack(self, entry_ids: list[str]) -> None:
        """Acknowledge entries settled later than they were read."""
        link = self._link()
        if entry_ids and link is not None:
            await link.ack(entry_ids)

    async def _redispatch(self, eid: str, fields: dict[str, str]) -> bool:
        return await self._dispatch(eid, fields, park=False)

    async def _call(self, handler: Handler, message: Message) -> tuple[bool, Any]:
        """(True, what the handler returned) or (False, its error as text)."""
        try:
            traced = "traceparent" in message.headers
            with tracing.context_of(message.headers) if traced else _UNTRACED:
                result = handler(message)
                if result is not None and inspect.isawaitable(result):
                    result = await result
            return True, result
        except Exception as exc:
            self._counts.handler_errors += 1
            self._log.exception("handler %r failed on %s (%s)", handler, message.topic, message.id)
            return False, f"{type(exc).__name__}: {exc}"
