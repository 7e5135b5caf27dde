"""The site's NATS bridge: this site's messages out to JetStream, other sites' messages in.

One bridge is active per site, holding the ``bridge.lease`` the way a router holds its partition;
any other worker's bridge stands by and takes over within the lease. While active it is a member of
the site (``bridge-<site>``, role ``bridge``, never a leader candidate) subscribed to the export
patterns, so every local publish it should send lands in its inbox like any subscriber's, on the
direct path and through the router alike. Then, concurrently:

- **out**: read the inbox, send each message of this site to the namespace's stream
  (:mod:`coordinator.federation.envelope`), await JetStream's acknowledgements in batches, and only
  then acknowledge the inbox entries. A bridge that dies in between leaves them pending; the next
  one sends them again under the same ``Nats-Msg-Id``, which JetStream drops as repeats. Messages
  that came from another site (they carry an origin) are never sent back, so nothing echoes and
  three sites never loop.
- **in**: take what the site's durable (push) consumer delivers, in batches, and deliver each
  batch with one ``publish.lua`` call (``fwd`` messages: original sender, id, headers and origin
  kept), which also records the stream sequence delivered, atomically and fenced by the bridge
  lease. A bridge taking over, or one that sees a delivery go missing (the server numbers
  them), starts the consumer again right after that sequence, so no message is delivered twice
  or skipped; a deposed bridge's late call is refused (``fenced``).
- plain NATS clients' messages on ``<namespace>.<topic>`` are taken by one bridge of the cluster (a
  queue group) and put in the stream (until then at most once, like core NATS itself), so every
  site delivers them like any other; a request is answered on its reply subject;
- answers: a local peer answering a request from elsewhere answers the bridge, which sends the
  answer on core NATS to the requester's site (or reply subject); answers coming back are handed to
  their requesters;
- one cluster: about once a second the bridge puts the site's record in the namespace's key-value
  bucket, takes part in choosing the namespace's one leader there and records it here (both in
  :mod:`coordinator.federation.directory`), and mirrors every site's record into the ``sites``
  hash, which ``sidecar status``, ``sidecar peers`` and the dashboard read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError, WatchError

from coordinator.cluster.membership import (
    elect_call,
    heartbeat_call,
    register_call,
    subscribe_call,
)
from coordinator.errors import BadRequest
from coordinator.federation.connect import connect_options, ensure_stream
from coordinator.federation.directory import (
    ClusterElection,
    Directory,
    LeaderRecord,
    SiteView,
    parse_site,
)
from coordinator.federation.envelope import (
    Outbound,
    ReplyRoute,
    answer_in,
    answer_out,
    inbound,
    ingest,
    origin_of,
    outbound,
)
from coordinator.keys import PEER_GROUP, Keys
from coordinator.leases import LeaseToken
from coordinator.policy.store import policy_ack_call
from coordinator.protocol import BRIDGE_ROLE, SYSTEM_SENDER
from coordinator.resp import AsyncResp, supports
from coordinator.routing.direct import DataPlane, DirectBatch, RouteCache
from coordinator.routing.rejections import deadletter_entry
from coordinator.scripts import scripts_for, source
from coordinator.settings import Settings, default_site
from coordinator.status import StatusField, StatusMixin

__all__ = ["BRIDGE_ROLE", "Bridge", "bridge_id"]

log = logging.getLogger("sidecar.bridge")

_MAX_ORIGINS = 64
"""Fields the site's traffic hash (coordinator.keys.bridge_traffic) holds at most; deliveries from
further origins are counted under :data:`_OTHER_ORIGINS`."""

_OTHER_ORIGINS = "imported *"
"""The traffic field of the origins past the bound (``*``: no site is named so)."""

_CONSUMER = "bridge"
"""Inbox consumer name every bridge of a site shares: one is active at a time, and a successor
reads what its predecessor left pending under the same name."""
_REPLY_LIMIT = 10_000
"""Requests from elsewhere a bridge remembers the way back of."""
_ACK_TIMEOUT = 5.0
"""Seconds a JetStream acknowledgement may take before the message is sent again."""


_PLAIN_QUEUE = "sidecar-bridges"
"""Queue group of every bridge on ``<namespace>.>``: one of them takes each plain client message."""
_PASSED_EVERY = 1000
"""Stream messages a bridge reads past (this site's own) before recording them as done."""
_IN_FLIGHT = 8
"""Batches a bridge has published and not yet seen acknowledged, at most."""


@dataclass(slots=True)
class _Flight:
    """A batch of inbox entries on its way to NATS: the entries, the messages among them, and the
    futures of their JetStream acknowledgements."""

    entry_ids: list[str]
    messages: list[Outbound]
    futures: list[Awaitable[Any]]


def bridge_id(site: str) -> str:
    """Member id of ``site``'s bridge."""
    return f"bridge-{site}"


class _Deposed(Exception):
    """Another bridge holds the lease now."""


def _cancel(futures: list[Any]) -> None:
    """Give up acknowledgements nobody will wait for: a pending nats-py future holds a place
    among the client's unacknowledged publishes until it is done."""
    for future in futures:
        if isinstance(future, asyncio.Future) and not future.done():
            future.cancel()


async def _settled(futures: list[Any], timeout: float) -> list[Any]:
    """Each future's result or exception, in order, waiting at most ``timeout`` for all of them
    together; those still pending then (or when the wait is cancelled) are cancelled, freeing
    their room in the client, and count as TimeoutError. One wait for the whole flight, not a
    task per message."""
    if futures:
        try:
            await asyncio.wait(futures, timeout=timeout)
        finally:
            _cancel(futures)
    out: list[Any] = []
    for future in futures:
        if future.cancelled():
            out.append(TimeoutError(f"no acknowledgement within {timeout}s"))
        else:
            out.append(future.exception() or future.result())
    return out


class _Gap(Exception):
    """A delivery from the consumer went missing (lost with a connection, or the consumer was
    deleted): delivering what follows it would skip it, and acknowledging would give it up."""


class _Cursor:
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
        for one delivered before. Raises :class:`_Gap` when a delivery went missing."""
        if delivery != self.delivery + 1:
            raise _Gap(f"delivery {self.delivery + 1} of the consumer went missing "
                       f"(then came {delivery})")
        self.delivery = delivery
        if stream < self.next_stream:
            return False
        if self.next_stream:
            self.discarded += stream - self.next_stream
        self.next_stream = stream + 1
        return True


class Bridge(StatusMixin):
    """Federates this site (one Redis) with the others through NATS JetStream."""

    site = StatusField("", doc="this site's name")
    active = StatusField(False, doc="this bridge holds the site's bridge lease")
    nats_connected = StatusField(False, doc="connected to NATS")
    consuming = StatusField(False, doc="reading the site's durable consumer of the stream")
    exported = StatusField(0, doc="messages sent to other sites")
    imported = StatusField(0, doc="messages from other sites (and plain NATS clients) delivered here")
    answers = StatusField(0, doc="answers carried between sites")
    dead_lettered = StatusField(0, doc="messages from NATS refused here, with the reason")
    export_failed = StatusField(0, doc="messages given up (dead-lettered): NATS stayed unreachable, "
                                         "or one was larger than NATS takes")
    lost_to_retention = StatusField(0, doc="stream messages discarded before this site read them")

    def __init__(self, settings: Settings, *, name: str = "bridge") -> None:
        if not settings.redis_url or not settings.nats_url:
            raise ValueError("a bridge needs both SIDECAR_REDIS_URL and SIDECAR_NATS_URL")
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.site = settings.site or ""
        """Resolved when the bridge first runs (see _resolve_site)."""
        self.peer_id = bridge_id(self.site)
        self.name = name
        self.token = str(LeaseToken.new(name))
        self.redis: Any = aioredis.Redis.from_url(settings.redis_url, decode_responses=True,
                                                  socket_keepalive=True)
        self.scripts = scripts_for(self.redis)
        self.inbox = self.keys.responses(self.peer_id)
        self._resolved = False
        self._lean = AsyncResp(settings.redis_url) if supports(settings.redis_url) else None
        """Deliveries' connection: hiredis-parsed, without redis-py's per-call work."""
        self._lean_lock = asyncio.Lock()
        self._plane = DataPlane.from_settings(settings)
        self._routes = RouteCache()
        self._replies: OrderedDict[str, tuple[ReplyRoute, float]] = OrderedDict()
        self._nc: Any = None
        self._js: Any = None
        self._work: asyncio.Task[None] | None = None
        self._joined = False
        self._leading: LeaderRecord | None = None
        """The namespace's leader while it is on this site (see _fence_unconfirmed)."""
        self._confirmed_at = 0.0
        self._recorded = 0
        """The stream sequence last recorded here as done (see _deliver_batch)."""
        self._term_seen = 0
        """The highest cluster leader term this bridge has seen."""
        self._tally = [0, 0]
        """Routed and delivered since the last round, added to the site's counters by _tick (as
        peers add theirs with their heartbeats: one command less per delivery)."""
        self._traffic: Counter[str] = Counter()
        """Messages sent to NATS (``exported``) and delivered from each site (``imported <site>``)
        since the last round (keys.bridge_traffic)."""
        self._traffic_fields: set[str] = set()
        """The traffic hash's fields as last read (see _bounded)."""
        self._connection = 0
        """Disconnections from NATS so far: a flight published before the last one may be lost."""
        self._unsettled: deque[tuple[int, bool]] = deque()
        """Each unsettled flight, oldest first: the connection it went out on, and whether all
        of it went out."""
        self._settled = asyncio.Event()
        """Set while no flight is unsettled."""

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        """Take the lease whenever it is free and federate while holding it, until ``stop``."""
        period = self.settings.bridge_lease / 3
        try:
            while not stop.is_set():
                await self._tick()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(period):
                        await stop.wait()
        finally:
            await self._deactivate("stopping")
            with contextlib.suppress(RedisError, OSError):
                await self.scripts.lease_release(keys=[self.keys.bridge_lease], args=[self.token])
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.close()
            await self.redis.aclose()
            if self._lean is not None:
                await self._lean.close()

    async def _resolve_site(self) -> bool:
        """Agree on this site's name with its Redis: the name it holds, or ours if it holds none.
        An explicit ``SIDECAR_SITE`` that differs from it is a configuration error: the bridge
        stays inactive and says so (two names for one Redis would echo every message)."""
        if self._resolved:
            return True
        wanted = self.settings.site or default_site()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.site_name, wanted, nx=True)
        pipe.get(self.keys.site_name)
        _, stored = await pipe.execute()
        stored = str(stored or wanted)
        if self.settings.site and stored != self.settings.site:
            log.error("bridge %s: SIDECAR_SITE=%r, but this Redis is site %r; not federating",
                      self.name, self.settings.site, stored)
            return False
        self.site, self.peer_id = stored, bridge_id(stored)
        self.inbox = self.keys.responses(self.peer_id)
        self._resolved = True
        return True

    async def _tick(self) -> None:
        """Renew (or take) the lease, start or stop federating, and heartbeat the membership."""
        try:
            if not await self._resolve_site():
                return
        except (RedisError, OSError) as exc:
            log.warning("bridge %s cannot reach Redis: %s", self.name, exc)
            return
        try:
            held = bool(await self.scripts.lease_acquire(
                keys=[self.keys.bridge_lease],
                args=[self.token, int(self.settings.bridge_lease * 1000)]))
        except (RedisError, OSError) as exc:
            log.warning("bridge %s cannot reach Redis: %s", self.name, exc)
            held = False
        if not held:
            if self.active:
                await self._deactivate("the lease is held by another bridge")
            return
        try:
            if not self._joined:
                await self._join()
            else:
                keys, args = heartbeat_call(self.keys, self.peer_id, fence=(self.keys.bridge_lease,
                                                                           self.token))
                if str((await self.scripts.heartbeat(keys=keys, args=args))[0]) == "evicted":
                    await self._join()
                await self._flush_tally()
            await self._fence_unconfirmed()
        except (RedisError, OSError) as exc:
            log.warning("bridge %s: Redis failed: %s", self.name, exc)
            return
        except _Deposed:
            await self._deactivate("fenced by another bridge")
            return
        if not self.active or self._work is None or self._work.done():
            self.active = True
            self._work = asyncio.create_task(self._federate(), name=f"bridge {self.site}")
            log.info("bridge %s active for site %r", self.name, self.site)

    async def _bounded(self, traffic: Counter[str]) -> Counter[str]:
        """``traffic`` with the fields the site's traffic hash does not hold yet folded into
        ``imported *`` once the hash names :data:`_MAX_ORIGINS` fields: the origin is a header any
        NATS client may set, and no sender may grow the hash or the metrics without bound, over
        restarts and takeovers too (the bound is read from Redis, not kept here)."""
        new = [field for field in traffic if field not in self._traffic_fields]
        if new:
            self._traffic_fields = set(await self.redis.hkeys(self.keys.bridge_traffic))
        for field in new:
            if field in self._traffic_fields or field in (_OTHER_ORIGINS, "exported"):
                continue
            if len(self._traffic_fields) >= _MAX_ORIGINS:
                traffic[_OTHER_ORIGINS] += traffic.pop(field)
            else:
                self._traffic_fields.add(field)
        return traffic

    async def _flush_tally(self) -> None:
        routed, delivered = self._tally
        traffic, self._traffic = self._traffic, Counter()
        if traffic:
            traffic = await self._bounded(traffic)
        if routed or delivered or traffic:
            self._tally = [0, 0]
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self.keys.stats, "routed", routed)
            pipe.hincrby(self.keys.stats, "delivered", delivered)
            for field, n in traffic.items():
                pipe.hincrby(self.keys.bridge_traffic, field, n)
            await pipe.execute()

    async def _join(self) -> None:
        """Become the site's bridge member, subscribed to the export patterns."""
        fence = (self.keys.bridge_lease, self.token)
        try:
            await self.redis.xgroup_create(self.inbox, PEER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        keys, args = register_call(self.keys, self.peer_id,
                                   {"role": BRIDGE_ROLE, "eligible": False, "labels": {"site": self.site}},
                                   token=self.token, lease_key=self.keys.bridge_lease,
                                   inbox_maxlen=self.settings.inbox_maxlen)
        if str((await self.scripts.register(keys=keys, args=args))[0]) != "ok":
            raise _Deposed  # 'lost': the lease went to another bridge
        for pattern in self.settings.export_patterns:
            keys, args = subscribe_call(self.keys, self.peer_id, pattern, add=True, fence=fence,
                                        inbox_maxlen=self.settings.inbox_maxlen)
            await self.scripts.subscribe(keys=keys, args=args)
        self._joined = True

    async def _deactivate(self, why: str) -> None:
        if self._work is not None:
            self._work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._work
            self._work = None
        if self.active:
            log.info("bridge %s inactive: %s", self.name, why)
        self.active = self.consuming = False
        self._joined = False
        self._leading = None

    async def _federate(self) -> None:
        """Connect to NATS and move messages both ways; start over after a failure."""
        delay = 0.1
        while True:
            try:
                await self._connect()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._out())
                    group.create_task(self._in())
                    group.create_task(self._core())
                    group.create_task(self._govern())
            except BaseExceptionGroup as failures:
                self.consuming = False
                if failures.subgroup(_Deposed) is not None:
                    log.warning("bridge %s was fenced: another bridge took the site over", self.name)
                    self.active = False
                    return
                if failures.subgroup(lambda e: not isinstance(e, Exception)) is not None:
                    raise  # cancelled: the lease is gone or the bridge stops
                log.warning("bridge %s: %s; starting over", self.name,
                            "; ".join(repr(e) for e in failures.exceptions))
            except Exception as exc:  # NATS and Redis errors: start over
                self.consuming = False
                log.warning("bridge %s: %r; starting over", self.name, exc,
                            exc_info=log.isEnabledFor(logging.DEBUG))
            await self._unheard()
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def _connect(self) -> None:
        import nats

        if self._nc is None or self._nc.is_closed:
            async def connected(*_: Any) -> None:
                self.nats_connected = True

            async def disconnected(*_: Any) -> None:
                self.nats_connected = False
                self._connection += 1
                # nats-py writes what it still holds unsent to the next connection, ahead of
                # anything sent after it: messages published before ones lost with this
                # connection would then be stored first. _send publishes them again, in order.
                nc = self._nc
                if nc is not None and isinstance(getattr(nc, "_pending", None), list):
                    nc._pending.clear()
                    nc._pending_data_size = 0

            async def error(exc: Exception) -> None:
                log.debug("bridge %s: NATS: %s", self.name, exc)

            self._nc = await nats.connect(
                **connect_options(self.settings, name=f"sidecar-bridge {self.site} {self.name}"),
                reconnected_cb=connected, disconnected_cb=disconnected, error_cb=error,
                pending_size=0)  # nothing buffered while disconnected: _send publishes again
            self.nats_connected = True
            # room for every batch that can be unacknowledged at once (the queued flights, the
            # one being settled, the one being launched, and a batch of plain clients'
            # messages): a publish waits for room only if acknowledgements go missing
            self._js = self._nc.jetstream(
                publish_async_max_pending=(_IN_FLIGHT + 3) * self.settings.bridge_batch)
        await ensure_stream(self._js, self.keys, self.settings)

    # ------------------------------------------------------------------ out: this site to NATS
    async def _out(self) -> None:
        """Send this site's messages (and answers to requests from elsewhere) to NATS: one task
        reads the inbox and publishes, another awaits JetStream's acknowledgements in order and
        acknowledges the entries, so reading never waits on the acknowledgements."""
        flights: asyncio.Queue[_Flight] = asyncio.Queue(maxsize=_IN_FLIGHT)
        self._unsettled.clear()
        self._settled.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._out_read(flights))
                group.create_task(self._out_settle(flights))
        finally:  # what was in flight is read again from the inbox: nobody waits for these
            while not flights.empty():
                for future in flights.get_nowait().futures:
                    if isinstance(future, asyncio.Future):
                        future.cancel()

    async def _out_read(self, flights: asyncio.Queue[_Flight]) -> None:
        cursor = "0"  # first what a predecessor (or this bridge) left pending, then new entries
        while True:
            reply = await self.redis.xreadgroup(
                PEER_GROUP, _CONSUMER, {self.inbox: cursor}, count=self.settings.bridge_batch,
                block=None if cursor != ">" else 1000)
            entries = reply[0][1] if reply else []
            if cursor != ">":
                if not entries:
                    cursor = ">"
                    continue
                cursor = entries[-1][0]
            if not entries:
                continue
            messages = []
            for _, fields in entries:
                kind = fields.get("k")
                if kind == "rep":
                    await self._answer(fields)
                elif kind != "msg" or fields.get("o"):
                    continue  # control replies, and other sites' messages: never sent back
                elif fields.get("t", "").startswith("cluster."):
                    if fields.get("t") == "cluster.policy" and fields.get("s") == SYSTEM_SENDER:
                        await self._ack_policy(fields)
                else:
                    messages.append(outbound(self.keys, self.site, fields))
            messages = await self._fitting(messages)
            connection = self._connection
            if not all(ok and on == connection for on, ok in self._unsettled):
                # An earlier batch went out on a connection since lost, or could not go out at
                # all: it will be published again. Nothing newer goes out before it is settled,
                # or it could be stored ahead of it (order per publisher).
                await self._settled.wait()
                connection = self._connection
            futures = await self._launch(messages) if messages else []
            self._unsettled.append((connection, len(futures) == len(messages)))
            self._settled.clear()
            try:
                await flights.put(_Flight([eid for eid, _ in entries], messages, futures))
            except BaseException:  # torn down: read again by the next bridge, free their room
                _cancel(futures)
                raise

    async def _out_settle(self, flights: asyncio.Queue[_Flight]) -> None:
        while True:
            flight = await flights.get()
            if flight.messages:
                sent = await self._send(flight.messages, flight.futures)
                self.exported += sent
                self._traffic["exported"] += sent
            await self.redis.xack(self.inbox, PEER_GROUP, *flight.entry_ids)
            self._unsettled.popleft()
            if not self._unsettled:
                self._settled.set()

    async def _fitting(self, messages: list[Outbound]) -> list[Outbound]:
        """``messages`` but those larger than NATS takes (the server's ``max_payload``, headers
        included), which are dead-lettered as ``payload_too_large``: sending one would fail
        every time and hold up everything after it."""
        limit = int(getattr(self._nc, "max_payload", 0) or 0)
        if not limit:
            return messages
        fits: list[Outbound] = []
        too_large: list[Outbound] = []
        for m in messages:
            size = len(m.payload) + sum(len(k) + len(v) + 4 for k, v in m.headers.items()) + 16
            (fits if size <= limit else too_large).append(m)
        if too_large:
            text = f"larger than NATS takes (max_payload {limit} bytes, headers included)"
            await self._dead_letter_out(too_large, "payload_too_large", text)
        return fits

    async def _launch(self, messages: list[Outbound]) -> list[Awaitable[Any]]:
        """Publish ``messages`` in order; their acknowledgements' futures (none while NATS is
        away: nothing goes into the client's buffer that could not be recalled)."""
        futures: list[Awaitable[Any]] = []
        try:
            # The client has room for every flight (see _connect), so a publish waits for room
            # only when acknowledgements went missing; one timeout bounds that wait for the whole
            # batch (nats-py's own wait_stall would start a task per publish to bound it).
            async with asyncio.timeout(_ACK_TIMEOUT):
                for m in (messages if self._nc.is_connected else ()):
                    futures.append(await self._js.publish_async(m.subject, m.payload,
                                                                headers=m.headers))
        except Exception as exc:  # NATS down, or no room in time: sent again by _send
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # nats-py reports a cancellation while it waits for room as TooManyStalledMsgs:
                # swallowing it would leave this task running after its group was torn down
                _cancel(futures)
                raise asyncio.CancelledError from exc
            log.debug("bridge %s: publish failed: %r", self.name, exc)
        except BaseException:
            _cancel(futures)
            raise
        return futures

    async def _send(self, messages: list[Outbound], futures: list[Awaitable[Any]]) -> int:
        """Await the acknowledgements of ``messages`` (published with ``futures``), publishing
        again from the first one not acknowledged, in order, until each is; returns how many
        were. While NATS stays unreachable with more than ``bridge_backlog`` messages waiting
        here, the oldest of them are given up (dead-lettered as ``export_failed``) to keep the
        backlog within the bound; the rest keep waiting."""
        from nats.errors import NoRespondersError
        from nats.js.errors import NoStreamResponseError

        pending = messages
        sent = 0
        delay = 0.05
        while True:
            results = await _settled(futures, _ACK_TIMEOUT)
            failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
            if failed and isinstance(results[failed[0]], NoRespondersError | NoStreamResponseError):
                with contextlib.suppress(Exception):  # the stream is gone: create it again
                    await ensure_stream(self._js, self.keys, self.settings)
            done = len(futures) if not failed else failed[0]
            sent += done
            pending = pending[done:]
            if not pending:
                return sent
            if self._unsettled:  # nothing new goes out before these are sent again (_out_read)
                self._unsettled[0] = (self._unsettled[0][0], False)
            excess = await self._backlog() - self.settings.bridge_backlog
            if excess > 0:
                await self._give_up(pending[:excess], excess + self.settings.bridge_backlog)
                pending = pending[excess:]
                if not pending:
                    return sent
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
            futures = await self._launch(pending)

    async def _backlog(self) -> int:
        """Messages in this bridge's inbox not yet sent (unread, and read but unacknowledged)."""
        for group in await self.redis.xinfo_groups(self.inbox):
            if group.get("name") == PEER_GROUP:
                return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return 0

    async def _give_up(self, messages: list[Outbound], waiting: int) -> None:
        text = (f"NATS stayed unreachable with {waiting} messages waiting to leave site "
                f"{self.site!r} (SIDECAR_BRIDGE_BACKLOG={self.settings.bridge_backlog})")
        await self._dead_letter_out(messages, "export_failed", text)

    async def _dead_letter_out(self, messages: list[Outbound], reason: str, text: str) -> None:
        """Give ``messages`` of this site up: dead letters, counted in ``export_failed``."""
        log.warning("bridge %s: %s; dead-lettering %d", self.name, text, len(messages))
        pipe = self.redis.pipeline(transaction=False)
        for m in messages:
            pipe.xadd(self.keys.deadletter, deadletter_entry(
                reason, text, stream="bridge", entry=m.msg_id,
                sender=m.headers.get("Sidecar-Sender", ""), topic=self.keys.topic_of(m.subject) or "",
                raw=m.payload[:4096].decode(errors="replace")),
                maxlen=self.settings.deadletter_maxlen, approximate=True)
        await pipe.execute()
        self.export_failed += len(messages)

    async def _answer(self, fields: dict[str, str]) -> None:
        """A local peer answered a request from elsewhere: send it the way the request came."""
        found = self._replies.pop(fields.get("i", ""), None)
        if found is None:
            return  # answered already, or asked before this bridge took over: the requester times out
        payload, headers = answer_out(fields, found[0])
        with contextlib.suppress(Exception):  # core NATS: at most once, like any NATS request
            await self._nc.publish(found[0].subject, payload, headers=headers)
            self.answers += 1

    async def _ack_policy(self, fields: dict[str, str]) -> None:
        """A bridge runs no policies: it acknowledges each version so rollouts can complete."""
        try:
            body = json.loads(fields.get("d", "{}"))
            version, nonce = int(body["version"]), str(body["nonce"])
        except (ValueError, KeyError, TypeError):
            return
        keys, args = policy_ack_call(self.keys, self.peer_id, version, nonce, True, "")
        await self.scripts.policy_ack(keys=keys, args=args)

    # ------------------------------------------------------------------ one cluster
    async def _govern(self) -> None:
        """Announce this site, keep the namespace's one leader, mirror the sites; every round."""
        directory = Directory(self._js, self.keys, replicas=self.settings.nats_stream_replicas)
        await directory.open()
        # terms never go back, across this bridge's restarts and takeovers too
        self._term_seen = max(self._term_seen, int(await self.redis.hget(self.keys.leader, "term") or 0))
        election = ClusterElection(directory, self.site, self.settings.member_ttl, term=self._term_seen)
        period = self.settings.bridge_lease / 3
        following = asyncio.create_task(directory.follow(), name="bridge directory")
        try:
            await self._govern_rounds(directory, election, period)
        finally:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await following

    async def _govern_rounds(self, directory: Directory, election: ClusterElection,
                             period: float) -> None:
        while True:
            try:
                await directory.announce(self.site, await self._site_record())
                leader = await election.step(self._candidate)
                self._term_seen = election.term
                self._leading = leader if leader.id and leader.site == self.site else None
                self._confirmed_at = election.confirmed_at
                await self._adopt(leader, election.hold)
                await self._mirror(directory.sites(self.site, silent_after=self.settings.member_ttl))
            except _Deposed:
                raise
            except Exception as exc:  # NATS away: _tick fences this site's leader after the hold
                log.debug("bridge %s: cluster round failed: %r", self.name, exc)
                await self._unheard()
            await asyncio.sleep(period)

    async def _fence_unconfirmed(self) -> None:
        """This site's leader could not be confirmed on NATS for the hold (half a member TTL):
        record no leader here, so its fenced publishes are refused and peers learn it, before
        another site may take over (a member TTL after the last confirmation)."""
        leading = self._leading
        if leading is None or time.monotonic() - self._confirmed_at <= self.settings.member_ttl / 2:
            return
        self._leading = None
        await self._adopt(LeaderRecord("", self.site, leading.term), self.settings.member_ttl / 2)
        log.warning("bridge %s: leader %s could not be confirmed on NATS; fenced here", self.name,
                    leading.id)

    async def _site_record(self) -> dict[str, Any]:
        members = await self.redis.zrange(self.keys.members, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for member in members:
            pipe.hget(self.keys.member(member), "role")
        pipe.hget(self.keys.leader, "id")
        *roles, leader = await pipe.execute()
        return {"site": self.site, "bridge": self.name, "leader": leader or None,
                "members": {m: r or "peer" for m, r in zip(members, roles, strict=True)
                            if r != BRIDGE_ROLE},
                "at": round(time.time(), 3)}

    async def _candidate(self, keep: str) -> str:
        keys, args = elect_call(self.keys, self.settings.member_ttl, "", mode="candidate",
                                extra=(keep,))
        return str((await self.scripts.elect(keys=keys, args=args))[1] or "")

    async def _adopt(self, leader: LeaderRecord, hold: float) -> None:
        """Record ``leader`` here (announced to peers if it changed) for ``hold`` seconds."""
        reason = f"cluster leader on site {leader.site}" if leader.id else "no cluster leader"
        keys, args = elect_call(self.keys, self.settings.member_ttl, reason, mode="adopt",
                                extra=(leader.id, leader.term, max(1, int(hold * 1000)), self.token))
        if str((await self.scripts.elect(keys=keys, args=args))[0]) == "fenced":
            raise _Deposed

    async def _unheard(self) -> None:
        """This bridge hears no other site (NATS is out of reach): the ``sites`` hash says so."""
        with contextlib.suppress(RedisError, OSError):
            views = await self.redis.hgetall(self.keys.sites)
            pipe = self.redis.pipeline(transaction=False)
            for name, text in views.items():
                record = parse_site(text)
                if name != self.site and record["reachable"]:
                    pipe.hset(self.keys.sites, name, json.dumps({**json.loads(text),
                                                                 "reachable": False}))
            await pipe.execute()

    async def _mirror(self, views: list[SiteView]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.sites)
        for view in views:
            pipe.hset(self.keys.sites, view.site, json.dumps({**view.record,
                                                              "reachable": view.reachable}))
        await pipe.execute()

    # ------------------------------------------------------------------ in: NATS to this site
    async def _in(self) -> None:
        """Deliver other sites' messages from the site's durable consumer, in stream order,
        starting over from the last sequence delivered here whenever a delivery went missing."""
        while True:
            try:
                await self._consume()
            except _Gap as gap:
                log.info("bridge %s: %s; resuming after the last message delivered here",
                         self.name, gap)

    async def _consume(self) -> None:
        """One subscription to the consumer, until a delivery goes missing (:class:`_Gap`). The
        server pushes up to four batches ahead (``max_ack_pending``); each delivery takes what
        has arrived, up to a batch, so a lone message goes at once and a burst goes in batches.
        While nothing arrives, the consumer is looked at every lease period: a consumer deleted
        under this bridge would otherwise push nothing, forever."""
        from nats.js.errors import NotFoundError

        arrived: asyncio.Queue[Any] = asyncio.Queue()

        async def take(msg: Any) -> None:
            arrived.put_nowait(msg)

        subscription, cursor = await self._consumer(take)
        self.consuming = True
        try:
            while True:
                try:
                    async with asyncio.timeout(self.settings.bridge_lease):  # (no task, unlike wait_for)
                        msgs = [await arrived.get()]
                except TimeoutError:
                    try:
                        await self._js.consumer_info(self.keys.stream_name,
                                                     self.keys.durable(self.site))
                    except NotFoundError:
                        raise _Gap("the site's consumer was deleted") from None
                    continue
                while not arrived.empty() and len(msgs) < self.settings.bridge_batch:
                    msgs.append(arrived.get_nowait())
                await self._deliver_batch(msgs, cursor)
        finally:
            self.consuming = False
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _deliver_batch(self, msgs: list[Any], cursor: _Cursor) -> None:
        """Deliver the messages of ``msgs`` not delivered before, then acknowledge them all."""
        fresh = [m for m in msgs if cursor.admit(m.metadata.sequence.consumer,
                                                 m.metadata.sequence.stream)]
        if cursor.discarded:
            self.lost_to_retention += cursor.discarded
            log.warning("bridge %s: %d stream messages were discarded before this site read them",
                        self.name, cursor.discarded)
            cursor.discarded = 0
        entries = []
        for m in fresh:
            if origin_of(m.headers) == self.site:
                continue
            found = await self._admit(m.subject, m.data, m.headers, m.metadata.sequence.stream)
            if found is not None:
                entries.append(found)
                self._traffic[f"imported {origin_of(m.headers)}"] += 1
        if entries:
            await self._deliver(entries)
            self.imported += len(entries)
        last = fresh[-1].metadata.sequence.stream if fresh else 0
        if entries and entries[-1].get("q") == str(last):
            self._recorded = last  # (publish.lua recorded it with the delivery)
        elif last >= self._recorded + _PASSED_EVERY:
            # the last of them was this site's own, or refused: recorded now and then, not per
            # batch (every site reads its own messages back), so a restart re-reads a bounded few
            await self._passed(last)
            self._recorded = last
        await msgs[-1].ack()  # acknowledges every message up to it (AckPolicy.ALL)

    async def _consumer(self, callback: Any) -> tuple[Any, _Cursor]:
        """Subscribe ``callback`` to the site's durable consumer, (re)created right after the
        last sequence delivered here; returns the subscription and its cursor."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        stream, durable = self.keys.stream_name, self.keys.durable(self.site)
        applied = await self._applied(await self._js.stream_info(stream))
        try:
            info = await self._js.consumer_info(stream, durable)
        except NotFoundError:
            info = None
        if applied is None and info is not None:  # this Redis lost its record: the consumer's
            applied = int(info.ack_floor.stream_seq if info.ack_floor else 0)
        config = ConsumerConfig(ack_policy=AckPolicy.ALL, ack_wait=10,
                                max_ack_pending=self.settings.bridge_batch * 4,
                                filter_subjects=[self.keys.stream_subject(">"),
                                                 self.keys.plain_subject(">")])
        if applied is None:  # a new site starts with what is published from now on
            config.deliver_policy = DeliverPolicy.NEW
        else:
            # A push consumer is bound to its last holder's inbox, and may have pushed past what
            # was delivered here: start it again right after that, at once.
            if not await self._holding():
                raise _Deposed
            if info is not None:
                await self._js.delete_consumer(stream, durable)
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = applied + 1
        subscription = await self._js.subscribe(self.keys.stream_subject(">"), durable=durable,
                                                stream=stream, cb=callback, manual_ack=True,
                                                config=config, pending_msgs_limit=-1)
        self._recorded = applied or 0
        return subscription, _Cursor(0 if applied is None else applied + 1)

    async def _applied(self, stream: Any) -> int | None:
        """The last stream sequence delivered here (None: this site never read the stream), of
        this incarnation of the stream: a stream deleted and created again numbers from 1
        again, and the record of the old one would have every new message skipped as
        delivered before."""
        created = str(stream.created or "")
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.bridge_applied)
        pipe.get(self.keys.bridge_stream)
        applied, known = await pipe.execute()
        if known == created:
            return None if applied is None else int(applied)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(self.keys.bridge_lease)
            if await pipe.get(self.keys.bridge_lease) != self.token:
                raise _Deposed
            pipe.multi()
            if known is not None:
                pipe.set(self.keys.bridge_applied, 0)
            pipe.set(self.keys.bridge_stream, created)
            await pipe.execute()
        if known is None:
            return None if applied is None else int(applied)
        log.warning("bridge %s: the stream %s was created again; reading it from its start",
                    self.name, self.keys.stream_name)
        return 0

    async def _passed(self, seq: int) -> None:
        """Record stream sequence ``seq`` as done here though nothing of it was delivered (this
        site's own message, or refused), so a restart does not read past it again; fenced by the
        bridge lease, and never moved back."""
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(self.keys.bridge_lease, self.keys.bridge_applied)
            if await pipe.get(self.keys.bridge_lease) != self.token:
                raise _Deposed
            if int(await pipe.get(self.keys.bridge_applied) or 0) >= seq:
                return
            pipe.multi()
            pipe.set(self.keys.bridge_applied, seq)
            with contextlib.suppress(WatchError):  # moved meanwhile: the next batch records it
                await pipe.execute()

    async def _holding(self) -> bool:
        """This bridge still holds the site's bridge lease."""
        return bool(await self.redis.get(self.keys.bridge_lease) == self.token)

    async def _core(self) -> None:
        """Plain NATS clients' messages on ``<namespace>.>`` into the stream (one bridge of the
        cluster takes each: a queue group), and answers coming back to this site."""
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.settings.bridge_batch * 16)

        async def put(msg: Any) -> None:
            await queue.put(msg)

        answers_subject = self.keys.reply_subject(self.site)
        subscriptions = [await self._nc.subscribe(self.keys.subject(">"), queue=_PLAIN_QUEUE, cb=put),
                         await self._nc.subscribe(answers_subject, cb=put)]
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty() and len(batch) < self.settings.bridge_batch:
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
                    self.answers += len(answers)
                if plain:  # core NATS: at most once until the stream has it, like NATS itself
                    results = await _settled(await self._launch(plain), _ACK_TIMEOUT)
                    lost = len(plain) - sum(1 for r in results if not isinstance(r, BaseException))
                    if lost:
                        log.warning("bridge %s: %d plain NATS messages could not be stored", self.name,
                                    lost)
        finally:
            for sub in subscriptions:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _ingest(self, msg: Any) -> Outbound | None:
        """The stream message carrying a plain client's ``msg``, or None when it was
        dead-lettered here as bad input."""
        try:
            return ingest(self.keys, msg.subject, msg.data, msg.headers, msg.reply or "",
                          max_header_bytes=self.settings.max_header_bytes)
        except BadRequest as exc:
            await self._dead_letter(exc, msg.subject, 0, msg.data, msg.headers)
            return None

    def _answer_in(self, msg: Any) -> dict[str, str] | None:
        """The ``rep`` entry of an answer that came back here (None: not an answer)."""
        try:
            return answer_in(msg.headers, msg.data)
        except BadRequest as exc:
            log.info("bridge %s: dropped an answer on %s: %s", self.name, msg.subject, exc)
            return None

    async def _admit(self, subject: str, payload: bytes, headers: Any, seq: int) -> dict[str, str] | None:
        """The ``fwd`` entry of stream message ``seq``, or None when it was dead-lettered here as
        bad input."""
        try:
            found = inbound(self.keys, subject, payload, headers, seq,
                            max_header_bytes=self.settings.max_header_bytes)
        except BadRequest as exc:
            await self._dead_letter(exc, subject, seq, payload, headers)
            return None
        if found.reply is not None:
            self._remember(found.entry["i"], found.reply)
        return found.entry

    async def _dead_letter(self, exc: BadRequest, subject: str, seq: int, payload: bytes,
                           headers: Any) -> None:
        await self.redis.xadd(self.keys.deadletter, deadletter_entry(
            exc.code, str(exc), stream="nats", entry=f"{subject}#{seq}", sender=origin_of(headers),
            topic=self.keys.topic_of(subject) or "", raw=payload[:4096].decode(errors="replace")),
            maxlen=self.settings.deadletter_maxlen, approximate=True)
        self.dead_lettered += 1

    def _remember(self, request: str, route: ReplyRoute) -> None:
        now = time.monotonic()
        self._replies[request] = (route, now)
        while self._replies and (len(self._replies) > _REPLY_LIMIT or
                                 next(iter(self._replies.values()))[1] < now - 300):
            self._replies.popitem(last=False)

    async def _deliver(self, entries: list[dict[str, str]]) -> None:
        """Deliver ``entries`` here with one ``publish.lua`` call (again after a routing change)."""
        while True:
            batch = DirectBatch(self.keys, self._plane, self.peer_id, entries, bridge_token=self.token)
            missing = batch.missing(self._routes)
            if missing or self._routes.version is None:  # answers alone need the version too
                topics, commands = RouteCache.lookups(self.keys, missing)
                pipe = self.redis.pipeline(transaction=False)
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
                await self._join()
            elif outcome.status == "fenced":
                raise _Deposed
            else:
                self._tally[0] += outcome.routed  # added to the site's counters each round
                self._tally[1] += outcome.delivered
                for n, error in outcome.refused.items():
                    log.info("bridge %s: message %s refused here: %s", self.name,
                             entries[n].get("i"), error)
                self.dead_lettered += len(outcome.refused)
                return

    async def _publish(self, keys: list[str], args: list[Any]) -> Any:
        """Run publish.lua, on the lean connection when the URL allows (one caller at a time)."""
        if self._lean is None:
            return await self.scripts.publish(keys=keys, args=args)
        async with self._lean_lock:
            try:
                return await self._lean.call("EVALSHA", self.scripts.publish.sha, len(keys), *keys,
                                             *args)
            except NoScriptError:  # Redis restarted: load it and call again
                await self._lean.call("SCRIPT", "LOAD", source("publish"))
                return await self._lean.call("EVALSHA", self.scripts.publish.sha, len(keys), *keys,
                                             *args)

    def __repr__(self) -> str:
        return f"Bridge(site={self.site!r}, name={self.name!r}, active={self.active})"


class BridgeThread:
    """Runs a :class:`Bridge` on its own event loop thread (a Celery worker, a ClusterSidecar)."""

    def __init__(self, settings: Settings, *, name: str) -> None:
        self.bridge = Bridge(settings, name=name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: Any = None

    def start(self) -> None:
        import threading

        ready = threading.Event()

        def main() -> None:
            async def body() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                ready.set()
                await self.bridge.run(self._stop)

            asyncio.run(body())

        self._thread = threading.Thread(target=main, name=f"bridge-{self.bridge.site}", daemon=True)
        self._thread.start()
        ready.wait(5)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop federating and release the lease (a successor takes over at once)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

