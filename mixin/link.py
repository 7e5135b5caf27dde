"""``SidecarLink``: one peer's connection to the sidecar over Redis (no Celery here).

It writes requests to the peer's request partition, coalescing concurrent writes into one pipeline
round trip; reads the peer's inbox through its own consumer group (pending entries first, so nothing
is lost across a restart), acknowledging entries only after they were handled; matches replies to
control requests; and heartbeats on a timer with a Lua script stamped by the Redis server clock.

When Redis drops, writes wait in a bounded buffer while the link reconnects with backoff, and raise
:class:`~coordinator.errors.SidecarUnavailable` past that bound. After a Redis restart or an eviction
the link registers again and the owner restores its subscriptions (``on_rejoin``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from coordinator.clock import offset_ms
from coordinator.cluster.membership import heartbeat_call
from coordinator.errors import SidecarError, SidecarTimeout, SidecarUnavailable, error_from_code
from coordinator.keys import PEER_GROUP, Keys
from coordinator.logs import Log
from coordinator.policy.auth import Signer
from coordinator.protocol import dumps, status_json
from coordinator.resp import AsyncResp, stream_entries, stream_entries_py, supports
from coordinator.routing.coalesce import ReadCoalescer
from coordinator.routing.direct import DataPlane
from coordinator.scripts import scripts_for
from coordinator.settings import Settings, redact_url
from mixin.handing import Handing
from mixin.outbox import TRANSIENT, Outbox

__all__ = ["SidecarLink"]

_CONSUMER = "c"
_READ_COUNT = 256
"""Inbox entries one read takes at most."""
_REJOIN_WARN_EVERY = 30.0
"""Seconds between warnings while a peer keeps failing to register again."""
_TRANSIENT = TRANSIENT
EntryHandler = Callable[[str, dict[str, str]], Awaitable[bool]]
"""Handles one inbox entry; returns False to leave it unacknowledged (the owner acks it later)."""
Fields = dict[Any, Any]  # str -> str; typed loosely because redis-py wants its EncodableT union


_TURNS = frozenset(("reply", "rep", "nr"))
"""Entry kinds that answer something this peer sent (see the read loop's linger)."""


class SidecarLink:
    """Request writer, inbox reader and heartbeat of peer ``peer_id``."""

    def __init__(self, peer_id: str, settings: Settings, *, on_entry: EntryHandler,
                 on_rejoin: Callable[[], Awaitable[None]] | None = None,
                 on_heartbeat: Callable[[str, int], None] | None = None,
                 logger: Log | None = None, secret: str | None = None) -> None:
        if not settings.redis_url:
            raise SidecarUnavailable("no Redis URL: set SIDECAR_REDIS_URL or pass redis_url")
        self.peer_id = peer_id
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.stream = (self.keys.peer_requests(peer_id) if settings.auth == "required"
                       else self.keys.requests(Keys.partition_of(peer_id, settings.partitions)))
        self.inbox = self.keys.responses(peer_id)
        self.log = logger or logging.getLogger("sidecar.link")
        self.redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True,
                                             health_check_interval=0, socket_keepalive=True)
        self.scripts = scripts_for(self.redis)
        self.signer = Signer(secret) if secret else None
        fast = supports(settings.redis_url)
        self.fast_read = AsyncResp(settings.redis_url) if fast else None
        self.outbox = Outbox(self.redis, self.stream, limit=settings.publish_buffer,
                             signer=self.signer, on_state=self._on_outbox, log=self.log,
                             fast=AsyncResp(settings.redis_url) if fast else None,
                             keys=self.keys, sender=peer_id, on_unknown=self._schedule_rejoin,
                             unknown_wait=settings.request_timeout)
        self.on_entry = on_entry
        self.on_rejoin = on_rejoin
        self.on_heartbeat = on_heartbeat
        self.on_connected: Callable[[bool], None] | None = None
        self.status_source: Callable[[], Mapping[str, Any]] | None = None
        """The peer's status fields, sent with each heartbeat so operators see them."""
        self._connected = False
        self.member_info: dict[str, Any] = {}
        self.extra: Any = None
        self._replies: dict[str, asyncio.Future[dict[str, str]]] = {}
        self._answers: dict[str, asyncio.Future[dict[str, str]]] = {}
        """Requests to peers (cluster_request) waiting for an answer, by message id."""
        self._tasks: list[asyncio.Task[None]] = []
        self._handing = Handing(on_entry)
        """The entries read, on their way to the handlers (mixin.handing)."""
        self._closing = False
        self._leaving = False
        self._rejoining = False

    @property
    def connected(self) -> bool:
        """Whether the last Redis call succeeded."""
        return self._connected

    @connected.setter
    def connected(self, up: bool) -> None:
        if up != self._connected:
            self._connected = up
            if self.on_connected is not None:
                self.on_connected(up)

    def _on_outbox(self, up: bool) -> None:
        if not self._closing and self.member_info:
            self.connected = up

    # ------------------------------------------------------------------ lifecycle
    async def open(self, member_info: dict[str, Any]) -> dict[str, str]:
        """Create the inbox group, start reading, register; returns the register reply."""
        self.member_info = member_info
        try:
            await self._ensure_group()
        except _TRANSIENT as exc:
            raise self.unreachable(exc) from exc
        self._tasks.append(asyncio.create_task(self._handing.run(), name=f"handlers-{self.peer_id}"))
        self._tasks.append(asyncio.create_task(self._read_loop(), name=f"inbox-{self.peer_id}"))
        reply = await self.request("reg", m=dumps(member_info))
        try:
            await self._load_plane()
        except _TRANSIENT as exc:
            raise self.unreachable(exc) from exc
        self.connected = True
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name=f"hb-{self.peer_id}"))
        self.log.debug("peer %s registered", self.peer_id)
        return reply

    async def close(self, *, leave: bool = True) -> None:
        """Leave the cluster (when ``leave``), stop the tasks and close the connection."""
        self._leaving = True  # a heartbeat answered after our leave must not rejoin us
        for task in self._tasks:
            if task.get_name().startswith(("hb-", "rejoin-")):
                task.cancel()
        if leave and self.connected:
            try:
                await self.request("leave", timeout=min(2.0, self.settings.request_timeout))
            except (SidecarTimeout, SidecarUnavailable, RedisError, OSError) as exc:
                self.log.warning("peer %s: leave not confirmed (%s)", self.peer_id, exc)
            else:
                self.log.debug("peer %s left the cluster", self.peer_id)
        with contextlib.suppress(RedisError, OSError):
            await self.outbox.flush_counts()
        self._closing = True
        self.outbox.closing = True
        self.connected = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for fut in self._replies.values():
            if not fut.done():
                fut.cancel()
        if self.fast_read is not None:
            await self.fast_read.close()
        await self.outbox.close()
        await self.redis.aclose()

    @staticmethod
    def required(link: SidecarLink | None) -> SidecarLink:
        """``link``, or RuntimeError when there is none (before setup, after teardown)."""
        if link is None:
            raise RuntimeError("no link to the sidecar: call setup() (or "
                               "setup_sidecar_communication()) first, and not after teardown()")
        return link

    def unreachable(self, exc: BaseException) -> SidecarUnavailable:
        """The error for a Redis that does not answer, naming it (password hidden) and the fix."""
        return SidecarUnavailable(
            f"cannot reach the sidecar's Redis at {redact_url(self.settings.redis_url)} ({exc}); "
            "start it, or point SIDECAR_REDIS_URL (or redis_url=) at the Redis the sidecar uses")

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload (bytes of JSON) this peer may send: its own setting, or the
        router's when that is smaller (read from the data plane the router wrote; a signed peer
        cannot read it and goes by its own setting)."""
        own = self.settings.max_payload_bytes
        plane = self.outbox.plane
        return own if plane is None else min(own, plane.max_payload_bytes)

    async def _load_plane(self) -> None:
        """Learn how to publish (coordinator.routing.direct) from what the router wrote; a peer
        whose router wrote nothing publishes through the router."""
        if self.signer is not None:  # signed requests must pass the router's checks
            return
        found = await self.redis.hgetall(self.keys.dataplane)
        plane = DataPlane.parse({str(k): str(v) for k, v in found.items()})
        self.outbox.routes.invalidate()
        self.outbox.plane = plane

    @property
    def data_path(self) -> str:
        """How this peer's publishes travel now: ``direct`` (publish.lua) or ``routed``."""
        plane = self.outbox.plane
        return "direct" if plane is not None and plane.direct else "routed"

    # ------------------------------------------------------------------ writing
    async def write(self, fields: Fields) -> str:
        """Append one request entry; returns its stream id once Redis has it (see Outbox)."""
        return await self.outbox.write(fields)

    # ------------------------------------------------------------------ control requests
    async def request(self, kind: str, *, timeout: float | None = None, urgent: bool = False,
                      **fields: str) -> dict[str, str]:
        """Send a control request and wait for the router's reply (raises the reported error).

        ``urgent`` sends it ahead of the writes waiting in the outbox (registering again)."""
        rid = uuid.uuid4().hex[:16]
        fut: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        self._handing.wake()  # a handler may be the one asking: the reader reads on
        wait = self.settings.request_timeout if timeout is None else timeout
        try:
            entry = {"k": kind, "s": self.peer_id, "r": rid, **fields}
            await (self.outbox.send_now(entry) if urgent else self.write(entry))
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel (a SIGTERM's)
            # that comes in the same turn as the reply
            async with asyncio.timeout(wait):
                reply = await fut
        except TimeoutError:
            hint = ("is a router running (`celery -A workers worker` or ClusterSidecar.setup())?")
            if self.settings.auth == "required":
                hint += (" With SIDECAR_AUTH=required a request that fails authentication gets no "
                         "answer: check SIDECAR_PEER_ID and SIDECAR_PEER_SECRET (`sidecar deadletter "
                         "list` says why a request was refused)")
            raise SidecarTimeout(f"no reply to {kind!r} from the sidecar within {wait}s; {hint}") \
                from None
        finally:
            self._replies.pop(rid, None)
        if reply.get("ok") != "1":
            raise error_from_code(reply.get("e", ""), reply.get("m", "request refused"))
        return reply

    # ------------------------------------------------------------------ reading
    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.inbox, PEER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_loop(self) -> None:
        """Read the inbox until closed. Nothing but cancellation ends it: errors back off and retry."""
        cursor = "0"  # pending entries first: whatever we read but did not ack before a restart
        delay = 0.05
        done: list[str] = []
        handled: list[str] = []
        idle = False
        regroup = False
        coalescer = ReadCoalescer(self.settings.inbox_linger, _READ_COUNT)
        while not self._closing:
            try:
                if self._handing.failed is not None:  # a handler's entry could not be settled:
                    failure, self._handing.failed = self._handing.failed, None
                    cursor = "0"  # it and all after it are read again, in order
                    self.log.warning("peer %s: handling an entry failed (%r); reading the inbox "
                                     "again from the oldest unsettled entry", self.peer_id, failure)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                done += self._handing.settled()
                # while messages arrive one by one faster than the linger, wait for a few more:
                # one wake-up and one round trip then serve several (sparse traffic never waits).
                # Never in a conversation (see ReadCoalescer.converse): while this peer waits for
                # an answer or a reply, or has just read a request, an answer or a reply.
                awaited = bool(self._answers) or bool(self._replies)
                wait = 0.0 if awaited else coalescer.delay(time.monotonic())
                if wait > 0:
                    self.lingered += 1
                    await asyncio.sleep(wait)
                if regroup:  # Redis lost our group (a restart without persistence): make it again
                    await self._ensure_group()
                    regroup, cursor = False, "0"
                    self._schedule_rejoin()
                block = None if cursor == "0" else 1000
                # Entries handled in the last round are acknowledged in the same round trip as the
                # next read; they are deleted (an idle inbox keeps nothing) once the inbox goes
                # quiet or a thousand have gathered, so a busy peer pays no extra command for it.
                commands: list[tuple[Any, ...]] = []
                if done:
                    commands.append(("XACK", self.inbox, PEER_GROUP, *done))
                    handled += done
                if handled and (idle or len(handled) >= 1000):
                    commands.append(("XDEL", self.inbox, *handled))
                    handled = []
                entries = await self._read(commands, cursor, block)
                coalescer.observe(time.monotonic(), len(entries))
                done = []
                delay = 0.05
                idle = not entries
                if cursor != ">" and not entries:
                    cursor = ">"
                    continue
                for eid, fields in entries:
                    kind = fields.get("k")
                    if kind == "reply":
                        self._resolve(fields)
                        done.append(eid)
                    elif kind in ("rep", "nr"):
                        self._answered(fields)
                        done.append(eid)
                    else:
                        self._handing.put(eid, fields)
                # the next read acknowledges what was handled, unless somebody awaits an answer
                # or a reply (a handler may): then it reads on at once
                await self._handing.handled(lambda: bool(self._answers) or bool(self._replies))
                if any("rt" in f or f.get("k") in _TURNS for _, f in entries):
                    coalescer.converse(time.monotonic())  # from now: the next read may be its sequel
                if entries and cursor != ">":
                    cursor = entries[-1][0]
            except asyncio.CancelledError:
                raise
            except _TRANSIENT:
                self.connected = False
                cursor = "0"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except ResponseError as exc:
                # the group or the whole inbox is gone (a Redis restart without persistence, or
                # the trim duty deleted the inbox of a peer it took for long gone): make it again
                if "NOGROUP" in str(exc) or "UNBLOCKED the stream key" in str(exc):
                    regroup = True
                    continue
                self.log.warning("peer %s: inbox read refused: %s", self.peer_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except Exception:
                self.log.exception("peer %s: inbox reader error; carrying on", self.peer_id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def ack(self, entry_ids: list[str]) -> None:
        """Acknowledge (and delete) inbox entries the owner finished with later."""
        if entry_ids:
            await self._read([("XACK", self.inbox, PEER_GROUP, *entry_ids),
                              ("XDEL", self.inbox, *entry_ids)], cursor=None, block=None)

    async def _read(self, commands: list[tuple[Any, ...]], cursor: str | None,
                    block: int | None) -> list[tuple[str, dict[str, str]]]:
        """Send ``commands`` and (unless ``cursor`` is None) the inbox read in one round trip.

        Returns the entries read. Only the reader task reads; ``ack`` (the owner's late acks) uses
        redis-py so it never shares the reader's connection.
        """
        if cursor is None:
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()
            return []
        read = ("XREADGROUP", "GROUP", PEER_GROUP, _CONSUMER, "COUNT", _READ_COUNT,
                *(("BLOCK", block) if block is not None else ()), "STREAMS", self.inbox, cursor)
        if self.fast_read is not None:
            replies = await self.fast_read.pipeline([*commands, read])
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return [(eid, f) for _, eid, f in stream_entries(replies[-1])]
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        pipe.xreadgroup(PEER_GROUP, _CONSUMER, {self.inbox: cursor}, count=_READ_COUNT, block=block)
        return [(eid, f) for _, eid, f in stream_entries_py((await pipe.execute())[-1])]

    # ------------------------------------------------------------------ requests to peers
    def expect_answer(self, message_id: str) -> asyncio.Future[dict[str, str]]:
        """A future for the answer (``rep``) or refusal (``nr``) to request ``message_id``."""
        fut: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._answers[message_id] = fut
        self._handing.wake()
        return fut

    def forget_answer(self, message_id: str) -> None:
        self._answers.pop(message_id, None)

    def _answered(self, fields: dict[str, str]) -> None:
        """An answer came; answers nobody waits for any more (a timeout, a second responder) go."""
        fut = self._answers.pop(fields.get("i", ""), None)
        if fut is not None and not fut.done():
            fut.set_result(fields)

    def _resolve(self, fields: dict[str, str]) -> None:
        fut = self._replies.get(fields.get("r", ""))
        if fut is not None and not fut.done():
            fut.set_result(fields)
        elif fields.get("ok") == "0":
            self.log.warning("peer %s: request %s rejected: %s (%s)", self.peer_id,
                             fields.get("ref", "?"), fields.get("e"), fields.get("m"))
            self.rejected += 1

    rejected = 0
    """Requests the router rejected without anybody waiting for the reply (publishes)."""

    lingered = 0
    """Times the inbox reader waited to gather several entries (see the read loop)."""

    clock_offset_ms = 0.0
    """Redis server time minus this process's clock, as of the last heartbeat (0 before one)."""

    def redis_now_ms(self) -> float:
        """Redis server time now, estimated from the last heartbeat (message expiry uses it)."""
        return time.time() * 1000 + self.clock_offset_ms

    # ------------------------------------------------------------------ membership
    async def heartbeat(self, extra: Any = None) -> tuple[str, int]:
        """Stamp our membership now; returns (leader id, term). Re-registers if we were evicted."""
        if extra is not None:
            self.extra = extra
        fields: dict[str, str] = {} if extra is None else {"x": dumps(extra)}
        if self.status_source is not None:  # the peer's status fields, for operators
            fields["st"] = status_json(self.status_source())
        if self.signer is not None:  # authenticated mode: only the router may run scripts
            wait = self.settings.member_ttl
            sent = time.time()
            reply = await self.request("hb", timeout=wait, x=fields.get("x", ""),
                                       st=fields.get("st", ""))
            status, leader, term = reply.get("status"), reply.get("leader", ""), reply.get("term", "0")
            now = reply.get("now", "")
        else:
            keys, args = heartbeat_call(self.keys, self.peer_id, extra,
                                        status=fields.get("st", ""))
            try:
                sent = time.time()
                status, now, leader, term = await self.scripts.heartbeat(keys=keys, args=args)
            except _TRANSIENT as exc:
                self.connected = False
                raise self.unreachable(exc) from exc
        self.connected = True
        if str(now).isdigit():  # Redis time, halfway through the round trip
            self.clock_offset_ms = offset_ms(int(now), sent, time.time())
        if status == "evicted":
            self._schedule_rejoin()
        if self.on_heartbeat is not None:
            self.on_heartbeat(str(leader), int(term))
        return str(leader), int(term)

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval
        while not self._closing:
            started = time.monotonic()
            try:
                await self.heartbeat()
                await self.outbox.flush_counts()
            except asyncio.CancelledError:
                raise
            except (*_TRANSIENT, SidecarUnavailable):
                self.connected = False
            except (RedisError, SidecarError) as exc:
                self.log.warning("peer %s: heartbeat failed: %s", self.peer_id, exc)
            except Exception:  # a bug must not stop the heartbeats: the peer would be evicted
                self.log.exception("peer %s: heartbeat failed", self.peer_id)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _pause(self, seconds: float) -> None:
        """Wait between rejoin attempts (a method so tests can observe the backoff)."""
        await asyncio.sleep(seconds)

    def _schedule_rejoin(self) -> None:
        if self._rejoining or self._closing or self._leaving:
            return
        self._rejoining = True
        self._tasks.append(asyncio.create_task(self._rejoin(), name=f"rejoin-{self.peer_id}"))

    async def _rejoin(self) -> None:
        """Register again until it works, backing off from 0.5 s to 2 s between attempts.

        The first failure is a warning; later ones are logged at most every 30 s (and at debug
        level in between), so a long outage does not flood the log.
        """
        delay, failures, warned = 0.5, 0, -_REJOIN_WARN_EVERY
        try:
            while not self._closing:
                try:
                    await self._ensure_group()
                    # ahead of the direct publishes waiting until we are a member again (signed
                    # requests keep their order: their nonces must grow, and they never wait so)
                    await self.request("reg", urgent=self.signer is None, m=dumps(self.member_info))
                    await self._load_plane()
                    self.connected = True
                    if self.on_rejoin is not None:
                        await self.on_rejoin()
                    self.log.info("peer %s registered again%s", self.peer_id,
                                  f" after {failures} failed attempts" if failures else "")
                    return
                except (SidecarTimeout, RedisError, OSError) as exc:
                    failures += 1
                    now = time.monotonic()
                    level = logging.WARNING if now - warned >= _REJOIN_WARN_EVERY else logging.DEBUG
                    if level == logging.WARNING:
                        warned = now
                    self.log.log(level, "peer %s: rejoin failed %d time(s) (%s); retrying in %.1fs",
                                 self.peer_id, failures, exc, delay)
                    await self._pause(delay)
                    delay = min(delay * 2, 2.0)
        finally:
            self._rejoining = False

