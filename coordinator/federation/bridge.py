"""The site's NATS bridge: this site's messages out to JetStream, other sites' messages in.

One bridge is active per site, holding the ``bridge.lease`` the way a router holds its partition;
any other worker's bridge stands by and takes over within the lease. While active it is a member of
the site (``bridge-<site>``, role ``bridge``, never a leader candidate) subscribed to the export
patterns, and each round of federating (from a connection to NATS until it fails or the lease
goes) runs its parts concurrently, each with state of its own (:mod:`.active` says what they
share):

- :mod:`.export`: the bridge's inbox out to the namespace's stream, acknowledged only once
  JetStream acknowledged it;
- :mod:`.intake`: the site's durable consumer of the stream, plain NATS clients' messages and
  answers in, delivered with ``publish.lua`` and fenced by the lease;
- :mod:`.governor`: the site's record, the namespace's one leader and the ``sites`` hash.

This module owns the lease, the membership, the NATS connection and the site's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from coordinator.aio import reap
from coordinator.cluster.membership import heartbeat_call, register_call, subscribe_call
from coordinator.federation.active import ActiveSite, Deposed, ReplyRoutes, Tally
from coordinator.federation.connect import connect_options, ensure_stream
from coordinator.federation.export import Export
from coordinator.federation.flights import IN_FLIGHT
from coordinator.federation.governor import Governor
from coordinator.federation.intake import Intake
from coordinator.keys import PEER_GROUP, Keys
from coordinator.leases import LeaseToken
from coordinator.protocol import BRIDGE_ROLE
from coordinator.scripts import scripts_for
from coordinator.settings import Settings, default_site
from coordinator.status import StatusField, StatusMixin

__all__ = ["BRIDGE_ROLE", "Bridge", "BridgeThread", "bridge_id"]

log = logging.getLogger("sidecar.bridge")

_MAX_ORIGINS = 64
"""Fields the site's traffic hash (coordinator.keys.bridge_traffic) holds at most; deliveries from
further origins are counted under :data:`_OTHER_ORIGINS`."""

_OTHER_ORIGINS = "imported *"
"""The traffic field of the origins past the bound (``*``: no site is named so)."""


def _unless_cancelled() -> None:
    """Raise CancelledError if the current task is being cancelled: in Python 3.11 a task group
    whose child failed with an ordinary error while it was being cancelled raises that error
    alone, and starting over on it would outlive the cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def bridge_id(site: str) -> str:
    """Member id of ``site``'s bridge."""
    return f"bridge-{site}"


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
        self._governor: Governor | None = None
        """Made once the site's name is known (see _resolve_site)."""
        self._nc: Any = None
        self._js: Any = None
        self._work: asyncio.Task[None] | None = None
        self._joined = False
        self._tally = Tally()
        self._traffic_fields: set[str] = set()
        """The traffic hash's fields as last read (see _bounded)."""
        self._replies = ReplyRoutes()
        self._disconnections = 0
        """Disconnections from NATS so far: a flight published before the last one may be lost."""

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

    async def _resolve_site(self) -> Governor | None:
        """Agree on this site's name with its Redis: the name it holds, or ours if it holds none;
        returns the site's governor. An explicit ``SIDECAR_SITE`` that differs from it is a
        configuration error: None, the bridge stays inactive and says so (two names for one
        Redis would echo every message)."""
        if self._governor is not None:
            return self._governor
        wanted = self.settings.site or default_site()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.site_name, wanted, nx=True)
        pipe.get(self.keys.site_name)
        _, stored = await pipe.execute()
        stored = str(stored or wanted)
        if self.settings.site and stored != self.settings.site:
            log.error("bridge %s: SIDECAR_SITE=%r, but this Redis is site %r; not federating",
                      self.name, self.settings.site, stored)
            return None
        self.site, self.peer_id = stored, bridge_id(stored)
        self.inbox = self.keys.responses(self.peer_id)
        self._governor = Governor(self.settings, site=stored, name=self.name, token=self.token,
                                  redis=self.redis, scripts=self.scripts)
        return self._governor

    async def _tick(self) -> None:
        """Renew (or take) the lease, start or stop federating, and heartbeat the membership."""
        try:
            governor = await self._resolve_site()
            if governor is None:
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
            await governor.fence_unconfirmed()
        except (RedisError, OSError) as exc:
            log.warning("bridge %s: Redis failed: %s", self.name, exc)
            return
        except Deposed:
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
        """Add what the parts moved since the last renewal to the site's counters. What a failed
        write may have recorded is not sent again (a count is never added twice)."""
        routed, delivered, traffic = self._tally.take()
        if traffic:
            try:
                traffic = await self._bounded(traffic)
            except BaseException:  # nothing was written: count it with the next renewal
                self._tally.restore(routed, delivered, traffic)
                raise
        if routed or delivered or traffic:
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
            raise Deposed  # 'lost': the lease went to another bridge
        for pattern in self.settings.export_patterns:
            keys, args = subscribe_call(self.keys, self.peer_id, pattern, add=True, fence=fence,
                                        inbox_maxlen=self.settings.inbox_maxlen)
            await self.scripts.subscribe(keys=keys, args=args)
        self._joined = True

    async def _deactivate(self, why: str) -> None:
        if self._work is not None:
            await reap(self._work)
            self._work = None
        if self.active:
            log.info("bridge %s inactive: %s", self.name, why)
        self.active = self.consuming = False
        self._joined = False
        if self._governor is not None:
            self._governor.reset()

    async def _federate(self) -> None:
        """Connect to NATS and move messages both ways; start over after a failure."""
        governor = self._governor
        assert governor is not None  # the site is resolved before the bridge becomes active
        delay = 0.1
        while True:
            try:
                await self._connect()
                await self._round()
            except BaseExceptionGroup as failures:
                self.consuming = False
                _unless_cancelled()
                if failures.subgroup(Deposed) is not None:
                    log.warning("bridge %s was fenced: another bridge took the site over", self.name)
                    self.active = False
                    return
                if failures.subgroup(lambda e: not isinstance(e, Exception)) is not None:
                    raise  # cancelled: the lease is gone or the bridge stops
                log.warning("bridge %s: %s; starting over", self.name,
                            "; ".join(repr(e) for e in failures.exceptions))
            except Exception as exc:  # NATS and Redis errors: start over
                self.consuming = False
                _unless_cancelled()
                log.warning("bridge %s: %r; starting over", self.name, exc,
                            exc_info=log.isEnabledFor(logging.DEBUG))
            if self._nc is None or not self._nc.is_connected:
                await governor.unheard()  # (a Redis failure leaves the other sites reachable)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def _round(self) -> None:
        """Run the parts on the connection just made, until one fails or the lease goes."""
        assert self._governor is not None
        active = ActiveSite(self.settings, self.keys, self.site, self.peer_id, self.inbox,
                            self.token, self.name, self.redis, self.scripts, self._nc, self._js,
                            disconnections=lambda: self._disconnections, rejoin=self._join,
                            counters=self, tally=self._tally, replies=self._replies)
        intake = Intake(active)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(Export(active).run())
                group.create_task(intake.stream())
                group.create_task(intake.plain())
                group.create_task(self._governor.run(self._js))
        finally:
            await intake.close()

    async def _connect(self) -> None:
        import nats

        if self._nc is None or self._nc.is_closed:
            async def connected(*_: Any) -> None:
                self.nats_connected = True

            async def disconnected(*_: Any) -> None:
                self.nats_connected = False
                self._disconnections += 1
                # nats-py writes what it still holds unsent to the next connection, ahead of
                # anything sent after it: messages published before ones lost with this
                # connection would then be stored first. The export publishes them again, in order.
                nc = self._nc
                if nc is not None and isinstance(getattr(nc, "_pending", None), list):
                    nc._pending.clear()
                    nc._pending_data_size = 0

            async def error(exc: Exception) -> None:
                log.debug("bridge %s: NATS: %s", self.name, exc)

            self._nc = await nats.connect(
                **connect_options(self.settings, name=f"sidecar-bridge {self.site} {self.name}"),
                reconnected_cb=connected, disconnected_cb=disconnected, error_cb=error,
                pending_size=0)  # nothing buffered while disconnected: the export publishes again
            self.nats_connected = True
            # room for every batch that can be unacknowledged at once (the queued flights, the
            # one being settled, the one being launched, and a batch of plain clients'
            # messages): a publish waits for room only if acknowledgements go missing
            self._js = self._nc.jetstream(
                publish_async_max_pending=(IN_FLIGHT + 3) * self.settings.bridge_batch)
        await ensure_stream(self._js, self.keys, self.settings)

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
        """Start the bridge's thread (and its event loop); returns once the loop runs."""
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

