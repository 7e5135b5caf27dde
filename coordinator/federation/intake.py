"""The bridge's way in: other sites' messages, plain NATS clients' messages, and answers.

- **The stream.** The site's durable (push) consumer delivers the namespace's stream in batches;
  each batch goes to local subscribers with one ``publish.lua`` call (``fwd`` messages: original
  sender, id, headers and origin kept), which also records the stream sequence delivered,
  atomically and fenced by the bridge lease. A bridge taking over, or one that sees a delivery go
  missing (the server numbers them), starts the consumer again right after that sequence, so no
  message is delivered twice or skipped; a deposed bridge's late call is refused (``fenced``).
- **Plain NATS clients'** messages on ``<namespace>.<topic>`` are taken by one bridge of the
  cluster (a queue group) and put in the stream (until then at most once, like core NATS itself),
  so every site delivers them like any other; a request is answered on its reply subject.
- **Answers** coming back to this site's requesters are handed to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.exceptions import NoScriptError, WatchError

from coordinator.errors import BadRequest
from coordinator.federation.active import ActiveSite, Deposed
from coordinator.federation.envelope import Outbound, answer_in, inbound, ingest, origin_of
from coordinator.federation.flights import ACK_TIMEOUT, launch, settled
from coordinator.resp import AsyncResp, supports
from coordinator.routing.direct import DataPlane, DirectBatch, RouteCache
from coordinator.routing.rejections import deadletter_entry
from coordinator.scripts import source

__all__ = ["Cursor", "Gap", "Intake"]

log = logging.getLogger("sidecar.bridge")

_PLAIN_QUEUE = "sidecar-bridges"
"""Queue group of every bridge on ``<namespace>.>``: one of them takes each plain client message."""
_PASSED_EVERY = 1000
"""Stream messages a bridge reads past (this site's own) before recording them as done."""


class Gap(Exception):
    """A delivery from the consumer went missing (lost with a connection, or the consumer was
    deleted): delivering what follows it would skip it, and acknowledging would give it up."""


class Cursor:
    """Where a subscription to the site's consumer stands: the delivery it expects next (the
    server numbers every delivery, so one that went missing shows as a gap), and the stream
    sequence (a gap there is what the stream discarded, or a repeat of what came before)."""

    def __init__(self, next_stream: int) -> None:
        self.delivery = 0
        """The consumer sequence of the last delivery seen."""
        self.next_stream = next_stream
        """The stream sequence expected next (0: whatever comes first)."""
        self.discarded = 0
        """Stream messages skipped over by the stream itself since last read."""

    def admit(self, delivery: int, stream: int) -> bool:
        """True when stream message ``stream`` (delivered as ``delivery``) is new here; False
        for one delivered before. Raises :class:`Gap` when a delivery went missing."""
        if delivery != self.delivery + 1:
            raise Gap(f"delivery {self.delivery + 1} of the consumer went missing "
                      f"(then came {delivery})")
        self.delivery = delivery
        if stream < self.next_stream:
            return False
        if self.next_stream:
            self.discarded += stream - self.next_stream
        self.next_stream = stream + 1
        return True


class Intake:
    """Delivers what comes from NATS to one active bridge's site."""

    def __init__(self, active: ActiveSite) -> None:
        self.active = active
        self._lean = AsyncResp(active.settings.redis_url or "") \
            if supports(active.settings.redis_url or "") else None
        """Deliveries' connection: hiredis-parsed, without redis-py's per-call work."""
        self._lean_lock = asyncio.Lock()
        self._plane = DataPlane.from_settings(active.settings)
        self._routes = RouteCache()
        self._recorded = 0
        """The stream sequence last recorded here as done (see _deliver_batch)."""

    async def close(self) -> None:
        """Close the deliveries' connection (at the end of the round)."""
        if self._lean is not None:
            await self._lean.close()

    # ------------------------------------------------------------------ the stream
    async def stream(self) -> None:
        """Deliver other sites' messages from the site's durable consumer, in stream order,
        starting over from the last sequence delivered here whenever a delivery went missing."""
        while True:
            try:
                await self._consume()
            except Gap as gap:
                log.info("bridge %s: %s; resuming after the last message delivered here",
                         self.active.name, gap)

    async def _consume(self) -> None:
        """One subscription to the consumer, until a delivery goes missing (:class:`Gap`). The
        server pushes up to four batches ahead (``max_ack_pending``); each delivery takes what
        has arrived, up to a batch, so a lone message goes at once and a burst goes in batches.
        While nothing arrives, the consumer is looked at every lease period: a consumer deleted
        under this bridge would otherwise push nothing, forever."""
        from nats.js.errors import NotFoundError

        a = self.active
        arrived: asyncio.Queue[Any] = asyncio.Queue()

        async def take(msg: Any) -> None:
            arrived.put_nowait(msg)

        subscription, cursor = await self._consumer(take)
        a.counters.consuming = True
        try:
            while True:
                try:
                    async with asyncio.timeout(a.settings.bridge_lease):  # (no task, unlike wait_for)
                        msgs = [await arrived.get()]
                except TimeoutError:
                    try:
                        await a.js.consumer_info(a.keys.stream_name, a.keys.durable(a.site))
                    except NotFoundError:
                        raise Gap("the site's consumer was deleted") from None
                    continue
                while not arrived.empty() and len(msgs) < a.settings.bridge_batch:
                    msgs.append(arrived.get_nowait())
                await self._deliver_batch(msgs, cursor)
        finally:
            a.counters.consuming = False
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _deliver_batch(self, msgs: list[Any], cursor: Cursor) -> None:
        """Deliver the messages of ``msgs`` not delivered before, then acknowledge them all."""
        a = self.active
        fresh = [m for m in msgs if cursor.admit(m.metadata.sequence.consumer,
                                                 m.metadata.sequence.stream)]
        if cursor.discarded:
            a.counters.lost_to_retention += cursor.discarded
            log.warning("bridge %s: %d stream messages were discarded before this site read them",
                        a.name, cursor.discarded)
            cursor.discarded = 0
        entries = []
        for m in fresh:
            if origin_of(m.headers) == a.site:
                continue
            found = await self._admit(m.subject, m.data, m.headers, m.metadata.sequence.stream)
            if found is not None:
                entries.append(found)
                a.tally.traffic[f"imported {origin_of(m.headers)}"] += 1
        if entries:
            await self._deliver(entries)
            a.counters.imported += len(entries)
        last = fresh[-1].metadata.sequence.stream if fresh else 0
        if entries and entries[-1].get("q") == str(last):
            self._recorded = last  # (publish.lua recorded it with the delivery)
        elif last >= self._recorded + _PASSED_EVERY:
            # the last of them was this site's own, or refused: recorded now and then, not per
            # batch (every site reads its own messages back), so a restart re-reads a bounded few
            await self._passed(last)
            self._recorded = last
        await msgs[-1].ack()  # acknowledges every message up to it (AckPolicy.ALL)

    async def _consumer(self, callback: Any) -> tuple[Any, Cursor]:
        """Subscribe ``callback`` to the site's durable consumer, (re)created right after the
        last sequence delivered here; returns the subscription and its cursor."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        a = self.active
        stream, durable = a.keys.stream_name, a.keys.durable(a.site)
        applied = await self._applied(await a.js.stream_info(stream))
        try:
            info = await a.js.consumer_info(stream, durable)
        except NotFoundError:
            info = None
        if applied is None and info is not None:  # this Redis lost its record: the consumer's
            applied = int(info.ack_floor.stream_seq if info.ack_floor else 0)
        config = ConsumerConfig(ack_policy=AckPolicy.ALL, ack_wait=10,
                                max_ack_pending=a.settings.bridge_batch * 4,
                                filter_subjects=[a.keys.stream_subject(">"),
                                                 a.keys.plain_subject(">")])
        if applied is None:  # a new site starts with what is published from now on
            config.deliver_policy = DeliverPolicy.NEW
        else:
            # A push consumer is bound to its last holder's inbox, and may have pushed past what
            # was delivered here: start it again right after that, at once.
            if not await self._holding():
                raise Deposed
            if info is not None:
                await a.js.delete_consumer(stream, durable)
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = applied + 1
        subscription = await a.js.subscribe(a.keys.stream_subject(">"), durable=durable,
                                            stream=stream, cb=callback, manual_ack=True,
                                            config=config, pending_msgs_limit=-1)
        self._recorded = applied or 0
        return subscription, Cursor(0 if applied is None else applied + 1)

    async def _applied(self, stream: Any) -> int | None:
        """The last stream sequence delivered here (None: this site never read the stream), of
        this incarnation of the stream: a stream deleted and created again numbers from 1
        again, and the record of the old one would have every new message skipped as
        delivered before."""
        a = self.active
        created = str(stream.created or "")
        pipe = a.redis.pipeline(transaction=False)
        pipe.get(a.keys.bridge_applied)
        pipe.get(a.keys.bridge_stream)
        applied, known = await pipe.execute()
        if known == created:
            return None if applied is None else int(applied)
        async with a.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(a.keys.bridge_lease)
            if await pipe.get(a.keys.bridge_lease) != a.token:
                raise Deposed
            pipe.multi()
            if known is not None:
                pipe.set(a.keys.bridge_applied, 0)
            pipe.set(a.keys.bridge_stream, created)
            await pipe.execute()
        if known is None:
            return None if applied is None else int(applied)
        log.warning("bridge %s: the stream %s was created again; reading it from its start",
                    a.name, a.keys.stream_name)
        return 0

    async def _passed(self, seq: int) -> None:
        """Record stream sequence ``seq`` as done here though nothing of it was delivered (this
        site's own message, or refused), so a restart does not read past it again; fenced by the
        bridge lease, and never moved back."""
        a = self.active
        async with a.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(a.keys.bridge_lease, a.keys.bridge_applied)
            if await pipe.get(a.keys.bridge_lease) != a.token:
                raise Deposed
            if int(await pipe.get(a.keys.bridge_applied) or 0) >= seq:
                return
            pipe.multi()
            pipe.set(a.keys.bridge_applied, seq)
            with contextlib.suppress(WatchError):  # moved meanwhile: the next batch records it
                await pipe.execute()

    async def _holding(self) -> bool:
        """This bridge still holds the site's bridge lease."""
        return bool(await self.active.redis.get(self.active.keys.bridge_lease) == self.active.token)

    # ------------------------------------------------------------------ core NATS
    async def plain(self) -> None:
        """Plain NATS clients' messages on ``<namespace>.>`` into the stream (one bridge of the
        cluster takes each: a queue group), and answers coming back to this site."""
        a = self.active
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=a.settings.bridge_batch * 16)

        async def put(msg: Any) -> None:
            await queue.put(msg)

        answers_subject = a.keys.reply_subject(a.site)
        subscriptions = [await a.nc.subscribe(a.keys.subject(">"), queue=_PLAIN_QUEUE, cb=put),
                         await a.nc.subscribe(answers_subject, cb=put)]
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty() and len(batch) < a.settings.bridge_batch:
                    batch.append(queue.get_nowait())
                answers, plain = [], []
                for msg in batch:
                    headers = msg.headers or {}
                    if msg.subject == answers_subject:
                        entry = self._answer_in(msg)
                        if entry is not None:
                            answers.append(entry)
                    elif "Nats-Stream" not in headers and "Sidecar-Site" not in headers:
                        # (those are sites' messages the stream republished: they came in already)
                        found = await self._ingest(msg)
                        if found is not None:
                            plain.append(found)
                if answers:
                    await self._deliver(answers)
                    a.counters.answers += len(answers)
                if plain:  # core NATS: at most once until the stream has it, like NATS itself
                    results = await settled(await launch(a, plain), ACK_TIMEOUT)
                    lost = len(plain) - sum(1 for r in results if not isinstance(r, BaseException))
                    if lost:
                        log.warning("bridge %s: %d plain NATS messages could not be stored", a.name,
                                    lost)
        finally:
            for sub in subscriptions:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _ingest(self, msg: Any) -> Outbound | None:
        """The stream message carrying a plain client's ``msg``, or None when it was
        dead-lettered here as bad input."""
        try:
            return ingest(self.active.keys, msg.subject, msg.data, msg.headers, msg.reply or "",
                          max_header_bytes=self.active.settings.max_header_bytes)
        except BadRequest as exc:
            await self._dead_letter(exc, msg.subject, 0, msg.data, msg.headers)
            return None

    def _answer_in(self, msg: Any) -> dict[str, str] | None:
        """The ``rep`` entry of an answer that came back here (None: not an answer)."""
        try:
            return answer_in(msg.headers, msg.data)
        except BadRequest as exc:
            log.info("bridge %s: dropped an answer on %s: %s", self.active.name, msg.subject, exc)
            return None

    # ------------------------------------------------------------------ into this site's Redis
    async def _admit(self, subject: str, payload: bytes, headers: Any, seq: int) -> dict[str, str] | None:
        """The ``fwd`` entry of stream message ``seq``, or None when it was dead-lettered here as
        bad input."""
        try:
            found = inbound(self.active.keys, subject, payload, headers, seq,
                            max_header_bytes=self.active.settings.max_header_bytes)
        except BadRequest as exc:
            await self._dead_letter(exc, subject, seq, payload, headers)
            return None
        if found.reply is not None:
            self.active.replies.remember(found.entry["i"], found.reply)
        return found.entry

    async def _dead_letter(self, exc: BadRequest, subject: str, seq: int, payload: bytes,
                           headers: Any) -> None:
        a = self.active
        await a.redis.xadd(a.keys.deadletter, deadletter_entry(
            exc.code, str(exc), stream="nats", entry=f"{subject}#{seq}", sender=origin_of(headers),
            topic=a.keys.topic_of(subject) or "", raw=payload[:4096].decode(errors="replace")),
            maxlen=a.settings.deadletter_maxlen, approximate=True)
        a.counters.dead_lettered += 1

    async def _deliver(self, entries: list[dict[str, str]]) -> None:
        """Deliver ``entries`` here with one ``publish.lua`` call (again after a routing change)."""
        a = self.active
        while True:
            batch = DirectBatch(a.keys, self._plane, a.peer_id, entries, bridge_token=a.token)
            missing = batch.missing(self._routes)
            if missing or self._routes.version is None:  # answers alone need the version too
                topics, commands = RouteCache.lookups(a.keys, missing)
                pipe = a.redis.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command)
                plane = self._routes.learn(topics, await pipe.execute())
                if plane is not None:
                    self._plane = plane
                continue
            keys, args = batch.call(self._routes)
            outcome = DirectBatch.outcome(await self._publish(keys, args))
            if outcome.status == "stale":
                self._routes.invalidate()
            elif outcome.status == "unknown":
                await a.rejoin()
            elif outcome.status == "fenced":
                raise Deposed
            else:
                a.tally.routed += outcome.routed  # added to the site's counters by the bridge
                a.tally.delivered += outcome.delivered
                for n, error in outcome.refused.items():
                    log.info("bridge %s: message %s refused here: %s", a.name,
                             entries[n].get("i"), error)
                a.counters.dead_lettered += len(outcome.refused)
                return

    async def _publish(self, keys: list[str], args: list[Any]) -> Any:
        """Run publish.lua, on the lean connection when the URL allows (one caller at a time)."""
        scripts = self.active.scripts
        if self._lean is None:
            return await scripts.publish(keys=keys, args=args)
        async with self._lean_lock:
            try:
                return await self._lean.call("EVALSHA", scripts.publish.sha, len(keys), *keys, *args)
            except NoScriptError:  # Redis restarted: load it and call again
                await self._lean.call("SCRIPT", "LOAD", source("publish"))
                return await self._lean.call("EVALSHA", scripts.publish.sha, len(keys), *keys, *args)
