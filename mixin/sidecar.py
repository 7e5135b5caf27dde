"""``SidecarMixin``: cluster membership, pub/sub and leadership for a peer, through the sidecar.

Mix it into an :class:`~mixin.agent.Agent`::

    class Conductor(Agent, SidecarMixin):
        tempo = StatusField(120)

    async with Conductor(namespace="my-cluster") as c:
        await c.cluster_subscribe("conductor.set_tempo", on_tempo)
        await c.cluster_publish("conductor.heartbeat", {"tempo": c.tempo})

Handlers may be ``async def`` or plain functions; each gets one :class:`Message`. A handler that
raises is logged, counted and retried with backoff, then its message is dead-lettered
(:mod:`mixin.retries`); a handler's return value answers a request (``cluster_request``). Each
handler runs once per message: the inbox may hold a message twice after a router crash or a lost
publish reply, and the mixin drops the repeat by sender and message id. How each inbox entry
reaches its handlers is :mod:`mixin.delivery`'s; this module is the peer's API and its link.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
from typing import Any

from coordinator.errors import NoResponders, NotLeader, RemoteError, RequestTimeout
from coordinator.ids import MessageIds
from coordinator.logs import hide, peer_logger
from coordinator.protocol import MAX_TTL_MS, check_headers, check_size, dumps
from coordinator.settings import Settings
from coordinator.status import StatusField
from coordinator.topics import check_pattern, check_publish_topic, check_queue
from mixin import tracing
from mixin.agent import Lifecycle
from mixin.delivery import INTERNAL, Delivery, Handler
from mixin.link import SidecarLink

__all__ = ["Handler", "SidecarMixin"]


class SidecarMixin(Lifecycle):
    """Lightweight cluster interface: subscribe, publish, heartbeat, leader state."""

    sidecar_connected = StatusField(False, doc="the link to the sidecar's Redis is up")
    cluster_subscriptions = StatusField(0, doc="patterns this peer is subscribed to")
    messages_received = StatusField(0, hidden=True)
    handler_errors = StatusField(0, hidden=True)
    messages_expired = StatusField(0, hidden=True)

    def __init__(self, *args: Any, settings: Settings | None = None, redis_url: str | None = None,
                 role: str = "peer", labels: dict[str, str] | None = None, priority: int = 0,
                 leader_eligible: bool = True, secret: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An explicit namespace= wins; else the settings' own; else SIDECAR_NAMESPACE (the Agent's).
        namespace = getattr(self, "namespace", None)
        if settings is not None and not getattr(self, "namespace_given", True):
            namespace = settings.namespace
        self.sidecar_settings = (settings or Settings.from_env()).replace(
            **{k: v for k, v in (("namespace", namespace), ("redis_url", redis_url)) if v})
        self.namespace = self.sidecar_settings.namespace
        self.role = role
        self.labels = dict(labels or {})
        self.priority = priority
        self.leader_eligible = leader_eligible
        self._secret = secret or self.sidecar_settings.peer_secret
        self._policy_version = 0
        self.policies: dict[str, Any] = {}
        self._link: SidecarLink | None = None
        self._leader: tuple[str, int] = ("", 0)
        self._leader_confirmed = 0.0
        self._hook_tasks: set[asyncio.Future[Any]] = set()
        self._valid_topics: set[str] = set()
        self._ids = MessageIds()
        self._sidecar_log = peer_logger(getattr(self, "logger", None) or logging.getLogger("sidecar.peer"),
                                        peer_id=getattr(self, "id", None), settings=self.sidecar_settings)
        """The peer's logger, its records carrying the peer's id and namespace (coordinator.logs)."""
        hide(self._secret)  # the log formatters mask it should it ever reach a record
        self._delivery = Delivery(self.sidecar_settings, link=lambda: self._link, counts=self,
                                  on_system=self._on_system, on_subscriptions=self._counted,
                                  log=self._sidecar_log)

    # ------------------------------------------------------------------ lifecycle
    async def setup(self, *args: Any, **kwargs: Any) -> None:
        await super().setup(*args, **kwargs)
        await self.setup_sidecar_communication()

    async def teardown(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            await link.close(leave=True)
            self.sidecar_connected = False
        await self._delivery.close()  # after the reader stopped: nothing held is let through now
        await super().teardown()

    async def setup_sidecar_communication(self) -> None:
        """Register with the sidecar and start reading this peer's inbox (idempotent)."""
        if self._link is not None:
            return
        peer_id: str = getattr(self, "id")  # noqa: B009 (provided by Agent)
        self._link = SidecarLink(peer_id, self.sidecar_settings, on_entry=self._delivery.on_entry,
                                 on_rejoin=self._resubscribe, on_heartbeat=self._on_heartbeat,
                                 logger=self._sidecar_log, secret=self._secret)
        self._link.on_connected = self._on_connected
        snapshot = getattr(self, "status_snapshot", None)  # StatusMixin's, when the peer has it
        self._link.status_source = snapshot if callable(snapshot) else None
        # what waited in the inbox while this peer was away waits a little for its handlers
        self._delivery.park_for(max(10.0, 2 * self.sidecar_settings.request_timeout))
        info = {"name": type(self).__name__[:64], "role": self.role, "labels": self.labels,
                "priority": self.priority,
                "eligible": self.leader_eligible, "incarnation": str(time.time_ns()),
                "pid": os.getpid()}
        try:
            reply = await self._link.open(info)
        except BaseException:
            link, self._link = self._link, None
            await link.close(leave=False)
            raise
        self._on_heartbeat(reply.get("leader", ""), int(reply.get("term", "0") or 0))
        for topic in INTERNAL:
            await self._link.request("sub", t=topic)
        self.sidecar_connected = True

    # ------------------------------------------------------------------ pub/sub
    async def cluster_subscribe(self, pattern: str, handler: Handler, *, queue: str | None = None
                                ) -> None:
        """Run ``handler`` for every message matching ``pattern``; returns once the router applied it.

        With ``queue`` the peer joins that queue group of ``pattern``: each message goes to one
        member of the group (the peers that subscribed to ``pattern`` with this name), in turn,
        while plain subscribers of the pattern still get every message. What a member was handed
        and had not handled when it died or left is handed to another member.

        A peer's subscribe and unsubscribe calls take turns with one another and with its
        handlers, each until the router applied it, so two calls for one pattern both return
        only once it is applied; a handler may call it (and :meth:`cluster_request`): the inbox
        reads on while somebody awaits a reply.
        """
        check_pattern(pattern)
        if queue is not None:
            check_queue(queue)
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        link = self._require_link()
        key = (pattern, queue or "")
        async with self._delivery.turn():  # returns once the router applied it, whoever asked first
            if not await self._delivery.add(key, handler) or pattern in INTERNAL:
                return
            try:
                await link.request("sub", t=pattern, q=queue or "")
            except BaseException:
                self._delivery.remove(key, handler)  # (the only one: calls take turns)
                raise

    async def cluster_unsubscribe(self, pattern: str, *, queue: str | None = None) -> None:
        """Stop receiving ``pattern`` (every handler of it, or of its queue group ``queue``);
        returns once the router applied it."""
        check_pattern(pattern)
        link = self._require_link()
        key = (pattern, queue or "")
        async with self._delivery.turn():
            if key not in self._delivery:
                return
            self._delivery.forget(key)
            if pattern not in INTERNAL:
                await link.request("unsub", t=pattern, q=queue or "")

    def _counted(self, subscriptions: int) -> None:
        self.cluster_subscriptions = subscriptions

    async def cluster_publish(self, topic: str, data: Any, *, headers: dict[str, str] | None = None,
                              ttl: float | None = None, fenced: bool = False) -> str:
        """Publish ``data`` (JSON-able) to literal ``topic``; returns its message id once the
        request is in Redis.

        The id is made here and kept on every retry, so subscribers drop the repeats a lost reply
        causes and run each handler once. ``headers`` (names to strings, at most
        ``max_header_bytes`` as JSON) travel with the message untouched; with OpenTelemetry
        installed the current span's ``traceparent`` is added. With ``ttl`` (seconds) a message not
        handled that long after Redis got it is never handed to a handler: it is counted and
        dead-lettered as ``expired``. With ``fenced=True`` the message
        carries this peer's leader term and is delivered only if this peer is still the leader of
        that term. Bad topics, payloads and headers raise here, at the call: a payload over the
        limit (``SIDECAR_MAX_PAYLOAD_BYTES``, or the router's when smaller) raises PayloadTooLarge
        and nothing is sent.
        """
        self._check_topic(topic)
        payload = dumps(data)  # TypeError for anything JSON cannot carry, at the call
        link = self._require_link()
        check_size(payload, link.max_payload_bytes, "payload")
        mid = self._ids.next()
        fields = {"k": "pub", "s": link.peer_id, "t": topic, "d": payload, "i": mid}
        if ttl is not None:
            if not 0 < ttl <= MAX_TTL_MS / 1000:
                raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL_MS // 1000} seconds, "
                                 f"got {ttl!r}")
            fields["x"] = str(max(1, round(ttl * 1000)))
        if headers or tracing.ACTIVE:
            text = check_headers(tracing.inject(headers), self.sidecar_settings.max_header_bytes)
            if text:
                fields["h"] = text
        if fenced:
            if not self.is_leader:
                raise NotLeader(f"peer {link.peer_id} is not the leader (leader: "
                                f"{self._leader[0] or 'nobody'}, term {self._leader[1]})")
            fields["f"] = str(self._leader[1])
        await link.write(fields)
        return mid

    def _check_topic(self, topic: str) -> None:
        """Raise InvalidTopic unless ``topic`` may be published to (topics seen valid are
        remembered, up to 10,000, so a peer publishing to a few topics checks each once)."""
        if topic not in self._valid_topics:
            check_publish_topic(topic)
            if len(self._valid_topics) < 10_000:
                self._valid_topics.add(topic)

    async def cluster_request(self, topic: str, data: Any, *, timeout: float,
                              headers: dict[str, str] | None = None) -> Any:
        """Send ``data`` to the subscribers of ``topic`` and return the first answer's data.

        A subscriber's handler answers by returning a value (or calling ``message.respond``).
        Raises NoResponders at once when nobody is subscribed, RequestTimeout when no answer
        comes within ``timeout`` seconds, and RemoteError with the error text when the handler
        that took the request raised. A payload over the limit raises PayloadTooLarge at the call,
        as in :meth:`cluster_publish`; an answer over it reaches the requester as RemoteError.
        A handler may ask too: the messages after it wait until it returns.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._check_topic(topic)
        payload = dumps(data)
        link = self._require_link()
        check_size(payload, link.max_payload_bytes, "payload")
        mid = self._ids.next()
        fields = {"k": "pub", "s": link.peer_id, "t": topic, "d": payload, "i": mid, "rt": link.peer_id}
        if headers or tracing.ACTIVE:
            text = check_headers(tracing.inject(headers), self.sidecar_settings.max_header_bytes)
            if text:
                fields["h"] = text
        answer = link.expect_answer(mid)
        try:
            await link.write(fields)
            async with asyncio.timeout(timeout):  # (wait_for would start a task per request)
                reply = await answer
        except TimeoutError:
            raise RequestTimeout(f"no answer to the request on {topic!r} within {timeout}s") from None
        finally:
            link.forget_answer(mid)
        if reply.get("k") == "nr":
            raise NoResponders(f"nobody is subscribed to {topic!r}")
        if reply.get("ok") != "1":
            raise RemoteError(reply.get("e") or "the responder's handler failed")
        return json.loads(reply.get("d", "null"))

    async def publish_heartbeat(self, extra: dict[str, Any] | None = None) -> None:
        """Stamp membership now, storing ``extra`` (JSON-able) as this peer's heartbeat payload."""
        await self._require_link().heartbeat(extra)

    # ------------------------------------------------------------------ leadership
    @property
    def leader_id(self) -> str | None:
        """Id of the current leader as last heard, or None."""
        return self._leader[0] or None

    @property
    def leader_term(self) -> int:
        """Term (fencing token) of the current leader as last heard; 0 before any election."""
        return self._leader[1]

    @property
    def is_leader(self) -> bool:
        """True only while this peer is the leader and its membership was confirmed within the TTL."""
        if self._link is None or self._leader[0] != self._link.peer_id:
            return False
        return time.monotonic() - self._leader_confirmed < self.sidecar_settings.member_ttl

    @property
    def policy_version(self) -> int:
        """Version of the policy set this peer applied (0: none yet)."""
        return self._policy_version

    async def on_policy(self, policies: dict[str, Any]) -> None:
        """Hook: apply a new policy set (``{name: document}``); raise to refuse it.

        Refusals are reported to the sidecar with the error (NACK); the default accepts anything.
        """

    async def _apply_policy(self, data: Any) -> None:
        link = self._require_link()
        if not isinstance(data, dict):
            return
        version, nonce = int(data.get("version", 0)), str(data.get("nonce", ""))
        if version < self._policy_version:
            return  # an older set overtaken by the one we run; its distribution raced a newer one
        policies = data.get("policies") or {}
        fields = {"k": "pack", "s": link.peer_id, "pv": str(version), "pn": nonce}
        try:
            result = self.on_policy(policies)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            fields.update(ok="0", e=f"{type(exc).__name__}: {exc}"[:1000])
            self._sidecar_log.warning("refused policy version %d: %s", version, exc)
        else:
            fields["ok"] = "1"
            self._policy_version = version
            self.policies = dict(policies)
        await link.write(fields)

    async def on_leader_change(self, leader_id: str | None, term: int) -> None:
        """Hook: the leader changed. Override it; the default does nothing."""

    async def on_subscription_dropped(self, pattern: str, queue: str | None, reason: str) -> None:
        """Hook: the sidecar dropped a subscription the policies no longer allow (its handlers
        are forgotten already). Override it; the default does nothing (the drop is logged)."""

    async def _subscription_dropped(self, notice: dict[str, Any]) -> None:
        pattern, queue = str(notice.get("pattern") or ""), notice.get("queue") or None
        key = (pattern, str(queue or ""))
        if key not in self._delivery:
            return
        self._delivery.forget(key)
        reason = str(notice.get("reason") or "")
        self._sidecar_log.warning("subscription %r%s dropped by the sidecar: %s",
                                  pattern, f" (queue {queue})" if queue else "", reason)
        hook = self.on_subscription_dropped(pattern, queue and str(queue), reason)
        if inspect.isawaitable(hook):
            await hook

    def _on_connected(self, up: bool) -> None:
        self.sidecar_connected = up

    def _on_heartbeat(self, leader: str, term: int) -> None:
        self._leader_confirmed = time.monotonic()
        self._set_leader(leader, term)

    def _set_leader(self, leader: str, term: int) -> None:
        if not leader:  # nobody leads (a lapsed record says term 0): terms still never go back
            term = max(term, self._leader[1])
        if term < self._leader[1] or (leader, term) == self._leader:
            return
        self._leader = (leader, term)
        hook = self.on_leader_change(leader or None, term)
        if inspect.isawaitable(hook):
            task = asyncio.ensure_future(hook)
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)

    async def _on_system(self, topic: str, data: Any) -> None:
        """A message of the sidecar's own, before any handler of its topic runs (and, like the
        handlers, inside the delivery's one-at-a-time handling: see :mod:`mixin.delivery`)."""
        if topic == "cluster.leader" and isinstance(data, dict):
            self._set_leader(str(data.get("leader_id") or ""), int(data.get("term", 0)))
        elif topic == "cluster.policy":
            await self._apply_policy(data)
        elif topic == "cluster.subscription.dropped" and isinstance(data, dict):
            await self._subscription_dropped(data)

    def _require_link(self) -> SidecarLink:
        return SidecarLink.required(self._link)

    async def _resubscribe(self) -> None:
        link = self._require_link()
        for pattern in INTERNAL:
            await link.request("sub", t=pattern)
        for pattern, queue in self._delivery.subscriptions:
            if pattern not in INTERNAL:
                await link.request("sub", t=pattern, q=queue or "")
