"""The router: reads request partitions in batches and fans publishes out to subscriber inboxes.

A :class:`Router` runs in its own thread with a sync Redis client (the worker's bootstep and
``ClusterSidecar.setup()`` both host one). It owns request partitions under leases
(:mod:`coordinator.leases`); routers spread the partitions evenly over the live routers, and a
standby takes a dead router's partitions when their leases expire. A router that takes a partition
over first routes the entries its predecessor left pending (XAUTOCLAIM), then new ones, so order per
publisher survives the crash.

Every write is a script fenced by the lease token and the routing version: a router deposed while
paused writes nothing, and one whose cached subscription index is stale reloads and recomputes
before anything is delivered. Fan-out and acknowledgement are one atomic script, so a crash never
leaves a request half routed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

from redis.exceptions import RedisError, ResponseError

from coordinator import resp
from coordinator.clock import redis_ms
from coordinator.errors import InternalError, SidecarError
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.leases import Lease
from coordinator.protocol import PUBLISH_KINDS
from coordinator.resp import RespConnection, stream_entries, stream_entries_py
from coordinator.routing.coalesce import ReadCoalescer
from coordinator.routing.guard import Guard
from coordinator.routing.publishes import DeferredRoute, Rejection, RequestHandler, StopBatch
from coordinator.scripts import scripts_for
from coordinator.settings import Settings
from coordinator.topics import SubscriptionIndex, check_pattern

__all__ = ["Router"]

log = logging.getLogger("sidecar.router")

Entry = tuple[str, str, dict[str, str]]  # (stream key, entry id, fields)


class Router:
    """Routes the request partitions it holds leases on. ``start()``/``stop()`` run it in a thread."""

    def __init__(self, client: Any, settings: Settings, *, name: str | None = None) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.token = f"{self.name}:{uuid.uuid4().hex}"
        self.scripts = scripts_for(client)
        self.leases: dict[int, Lease] = {}
        self.index = SubscriptionIndex()
        self.members: set[str] = set()
        self.leader: tuple[str, int] = ("", 0)
        self.version: str | None = None
        self.stats = {"routed": 0, "delivered": 0, "rejected": 0, "batches": 0, "takeovers": 0}
        self.guard = Guard(client, self.keys, settings)
        self.handler = RequestHandler(self)
        url = settings.redis_url
        self.fast = RespConnection(url) if resp.supports(url) and url else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_maintenance = 0.0
        self._flushed: dict[str, int] = {}
        self._held: tuple[int, ...] = ()
        self._held_streams: list[str] = []
        self._block_ms = settings.router_block_ms
        self.coalescer = ReadCoalescer(settings.router_linger, settings.batch_size)
        self._unsettled = False
        self._deferred_sent = False
        """The deferred fan-out was written on the lean connection; its answer is still owed."""
        self._last_trim = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Route in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"sidecar-router-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the current batch, release every lease and stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # stuck on Redis: it closes its own connection when done
                log.warning("router %s still finishing a batch after %.1fs", self.name, timeout)
                return
            self._thread = None
        if self.fast is not None:
            self.fast.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def partitions(self) -> list[int]:
        """Partitions this router holds now."""
        return sorted(self.leases)

    def run(self) -> None:
        """The routing loop (blocking). Survives Redis outages: it backs off and carries on.

        After any error mid-batch the router settles its partitions before reading anything new:
        entries it read but did not route stay pending under it (a read of new entries never returns
        them), and a lost reply may hide whether a fan-out ran; claiming every pending entry routes
        exactly those not acknowledged, in order.
        """
        backoff = 0.05
        while not self._stop.is_set():
            try:
                if self._unsettled:
                    self._settle_held()
                self.step()
                backoff = 0.05
                continue
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost our streams (a restart without persistence)
                    log.warning("router %s: consumer group gone; creating it again", self.name)
                else:
                    log.warning("router %s: Redis refused a command (%s)", self.name, exc)
            except RedisError as exc:
                log.warning("router %s: Redis error (%s); retrying in %.2fs", self.name, exc, backoff)
            except Exception:  # never let one bad batch kill routing
                log.exception("router %s: unexpected error; carrying on", self.name)
            self._unsettled = True
            self.handler.deferred = None  # its entries are still pending: settling routes them
            self._deferred_sent = False
            if self.fast is not None:
                self.fast.close()  # a reply may still be owed on it: start afresh
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)
        try:
            self.flush()
        except (RedisError, StopBatch):
            pass
        self._release_all()
        if self.fast is not None:
            self.fast.close()

    def step(self) -> int:
        """Maintain leases when due, then route one batch. Returns the entries handled."""
        now = time.monotonic()
        if now >= self._next_maintenance:
            self._maintain()
            self._next_maintenance = now + self.settings.lease_renew_interval
        if not self.leases:
            self._stop.wait(max(0.0, self._next_maintenance - time.monotonic()))
            return 0
        block = max(1, min(self._block_ms,
                           int((self._next_maintenance - time.monotonic()) * 1000)))
        wait = self.coalescer.delay(time.monotonic())
        if wait > 0:
            if self.handler.deferred is not None and not self._deferred_sent:
                # the linger must only delay entries not read yet: the fan-out goes out now, and
                # its answer is read with the next read's
                try:
                    self._send_deferred()
                except StopBatch:
                    self._unsettled = True
                    return 0
                wait = self.coalescer.delay(time.monotonic())
            if wait > 0 and self._stop.wait(wait):
                return 0
        deferred = self.handler.deferred
        routed, reply = self._read({s: ">" for s in self._streams()}, block, deferred)
        self._deferred_sent = False
        if deferred is not None:
            try:
                self.handler.finish_deferred(routed)
            except StopBatch:  # this read's entries stay pending: settling routes them
                self._unsettled = True
                return 0
        if isinstance(reply, Exception):
            raise reply
        entries = reply
        self.coalescer.observe(time.monotonic(), len(entries))
        if entries:
            self.process(entries, defer_last=True)
        return len(entries)

    def _send_deferred(self) -> None:
        """Send the deferred fan-out now, before the router lingers.

        On the lean connection it is only written (Redis runs it at once) and its answer is read
        with the next read's; through redis-py it is a round trip of its own, settled here.
        """
        d = self.handler.deferred
        assert d is not None
        command = self._fan_out(d)
        if self.fast is not None:
            self.fast.send([command])
            self._deferred_sent = True
            return
        result = self.client.pipeline(transaction=False).execute_command(*command).execute(
            raise_on_error=False)[0]
        self.handler.finish_deferred(result)

    def _fan_out(self, d: DeferredRoute) -> tuple[Any, ...]:
        """The route.lua call of a deferred run, as one command."""
        return ("EVALSHA", self.scripts.route.sha, len(d.keys), *d.keys, *d.args)

    def _read(self, streams: dict[str, str], block: int,
              deferred: DeferredRoute | None) -> tuple[Any, list[Entry] | Exception]:
        """One round trip: the last batch's fan-out (if deferred), then a blocking read.

        Returns (the fan-out's answer or error, the entries read or the read's error).
        """
        count = self.settings.batch_size
        if self.fast is not None:
            commands: list[tuple[Any, ...]] = []
            if deferred is not None and not self._deferred_sent:
                commands.append(self._fan_out(deferred))
            commands.append(("XREADGROUP", "GROUP", REQUEST_GROUP, self.name, "COUNT", count,
                             "BLOCK", block, "STREAMS", *streams, *streams.values()))
            replies = self.fast.pipeline(commands, timeout=self._block_ms / 1000 + 10)
            read = replies[-1]
            return (replies[0] if deferred is not None else None,
                    read if isinstance(read, Exception) else stream_entries(read))
        pipe = self.client.pipeline(transaction=False)
        if deferred is not None:
            pipe.execute_command(*self._fan_out(deferred))
        pipe.xreadgroup(REQUEST_GROUP, self.name, streams, count=count, block=block)
        replies = pipe.execute(raise_on_error=False)
        read = replies[-1]
        return (replies[0] if deferred is not None else None,
                read if isinstance(read, Exception) else stream_entries_py(read))

    # ------------------------------------------------------------------ leases
    def _streams(self) -> list[str]:
        """The streams of the partitions held now (partition 0 includes the system stream)."""
        held = tuple(sorted(self.leases))
        if held != self._held:
            self._held = held
            self._held_streams = [s for p in held for s in (
                (self.keys.requests(p), self.keys.system) if p == 0 else (self.keys.requests(p),))]
        return self._held_streams

    def _maintain(self) -> None:
        """Renew held leases, drop lost ones, and take or give partitions toward a fair share."""
        for p, lease in list(self.leases.items()):
            if not lease.acquire():
                log.warning("router %s lost partition %d", self.name, p)
                del self.leases[p]
        now_ms = redis_ms(self.client)
        stale_ms = now_ms - int(self.settings.router_lease * 2000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.routers, {self.name: now_ms})
        pipe.zremrangebyscore(self.keys.routers, "-inf", stale_ms)
        pipe.zcard(self.keys.routers)
        live = max(1, int(pipe.execute()[2]))
        total = self.settings.partitions
        share = math.ceil(total / live)
        while len(self.leases) > share:
            p = max(self.leases)
            self.leases.pop(p).release()
            log.info("router %s handed partition %d back (fair share %d)", self.name, p, share)
        for p in range(total):
            if len(self.leases) >= share:
                break
            if p in self.leases:
                continue
            lease = Lease(self.client, self.keys.router_lease(p), self.token,
                          self.settings.router_lease)
            if lease.acquire():
                self.leases[p] = lease
                self._take_over(p)
        for stream in self._streams():  # entries a deposed router read while no new ones arrive
            if _foreign(self.client.xpending(stream, REQUEST_GROUP), self.name):
                self.claim_pending(stream)
        self._flush_stats()
        if time.monotonic() - self._last_trim > 5.0:
            self._last_trim = time.monotonic()
            self._trim_requests()

    def flush(self) -> None:
        """Settle a deferred fan-out now and write the counters (before stopping, and in tests)."""
        deferred = self.handler.deferred
        if deferred is not None and self._deferred_sent and self.fast is not None:
            self._deferred_sent = False  # written already: only its answer is still to be read
            answer = self.fast.pipeline([], timeout=10.0)
            if answer:
                self.handler.finish_deferred(answer[0])
            else:  # the connection went, and the answer with it: its entries stay pending for
                self.handler.deferred = None  # settling or the partition's next owner
        elif deferred is not None:
            self.handler.deferred = None
            self.handler.publish_run(deferred.run, marks=deferred.marks)
        self._flush_stats()

    def _flush_stats(self) -> None:
        counts = {k: self.stats[k] - self._flushed.get(k, 0) for k in ("routed", "delivered")}
        if any(counts.values()):
            pipe = self.client.pipeline(transaction=False)
            for key, delta in counts.items():
                pipe.hincrby(self.keys.stats, key, delta)
            pipe.execute()
            self._flushed.update({k: self.stats[k] for k in counts})

    def _release_all(self) -> None:
        for lease in self.leases.values():
            with contextlib.suppress(RedisError):
                lease.release()
        self.leases.clear()
        with contextlib.suppress(RedisError):
            self.client.zrem(self.keys.routers, self.name)

    def _take_over(self, partition: int) -> None:
        """Start owning ``partition``: route what the last owner left pending, then new entries."""
        self.stats["takeovers"] += 1
        self._settle_partition(partition)
        log.info("router %s owns partition %d", self.name, partition)

    def _settle_held(self) -> None:
        """Renew every lease (dropping lost ones), then settle the partitions still held."""
        self._unsettled = False
        for p, lease in list(self.leases.items()):
            if not lease.acquire():
                log.warning("router %s lost partition %d", self.name, p)
                del self.leases[p]
        for p in list(self.leases):
            self._settle_partition(p)

    def _settle_partition(self, partition: int) -> None:
        """Make sure the partition's groups exist, then route every entry pending on it."""
        self.version = None  # anything may have changed while we did not route it
        self.guard.forget_marks()
        streams = [self.keys.requests(partition)] + ([self.keys.system] if partition == 0 else [])
        for stream in streams:
            try:
                self.client.xgroup_create(stream, REQUEST_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        for stream in streams:
            self.claim_pending(stream)

    def claim_pending(self, stream: str) -> None:
        """Route every entry pending on ``stream`` (ours or a predecessor's), oldest first.

        Used when taking a partition over, and when the route script finds entries pending under
        another consumer: a router deposed while paused may read one more batch before its fenced
        writes are refused, and those entries are older than anything read since.
        """
        deferred = self.handler.deferred
        if deferred is not None and deferred.stream == stream:
            self.handler.deferred = None  # its entries are pending too: routed below, in order
        start = "0-0"
        claimed_all: list[Entry] = []
        while True:  # claim everything first, so routing them never finds a foreign entry again
            nxt, claimed, deleted = _autoclaim(self.client.xautoclaim(
                stream, REQUEST_GROUP, self.name, min_idle_time=0, start_id=start,
                count=self.settings.batch_size * 4))
            if deleted:
                self.client.xack(stream, REQUEST_GROUP, *deleted)
            claimed_all += [(stream, eid, fields) for eid, fields in claimed]
            if nxt == "0-0":
                break
            start = nxt
        if claimed_all:
            log.info("router %s re-routes %d pending entries of %s", self.name, len(claimed_all), stream)
        size = self.settings.batch_size
        partition = self.handler.partition_of(stream)
        for i in range(0, len(claimed_all), size):
            if partition not in self.leases:
                break  # deposed meanwhile: the new owner claims the rest
            self.process(claimed_all[i:i + size])

    def _trim_requests(self) -> None:
        """Drop routed entries from owned request streams (keep anything still pending)."""
        for stream in self._streams():
            try:
                groups = self.client.xinfo_groups(stream)
            except ResponseError:
                continue
            for g in groups:
                if g.get("name") != REQUEST_GROUP:
                    continue
                floor = str(g.get("last-delivered-id") or "0-0")
                if int(g.get("pending") or 0):
                    summary = self.client.xpending(stream, REQUEST_GROUP)
                    floor = str(summary.get("min") or floor)
                self.client.xtrim(stream, minid=floor, approximate=True)

    def lost(self, stream: str) -> None:
        """A fenced script said our lease on ``stream``'s partition is gone: stop routing it."""
        for p in list(self.leases):
            if stream in (self.keys.requests(p), self.keys.system if p == 0 else None):
                log.warning("router %s was fenced off partition %d", self.name, p)
                del self.leases[p]

    # ------------------------------------------------------------------ routing state
    def refresh(self) -> None:
        """Reload subscriptions, members and leader in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.routing_version)
        pipe.hkeys(self.keys.subs)
        pipe.zrange(self.keys.members, 0, -1)
        pipe.hmget(self.keys.leader, "id", "term")
        version, fields, members, leader = pipe.execute()
        index = SubscriptionIndex()
        for field in fields:
            peer, _, pattern = str(field).partition(" ")
            try:
                index.add(peer, check_pattern(pattern))
            except ValueError:  # not written by subscribe.lua (it stores checked patterns only)
                log.warning("router %s: ignoring malformed subscription %r", self.name, field)
        self.index = index
        self.members = {str(m) for m in members}
        self.leader = (str(leader[0] or ""), int(leader[1] or 0))
        self.version = str(version or "0")
        self.guard.refresh(self.members)
        self.handler.invalidate()

    def process(self, entries: list[Entry], *, defer_last: bool = False) -> None:
        """Route ``entries`` in order: runs of publishes in one script call, control one by one.

        With ``defer_last`` a final run of publishes may leave its script call for the next read's
        round trip (see RequestHandler.publish_run).
        """
        if self.version is None:
            self.refresh()
        self.stats["batches"] += 1
        run: list[Entry] = []
        try:
            for entry in entries:
                if run and entry[0] != run[0][0]:  # a run never mixes streams (trust, partition, ack)
                    self._publish(run)
                    run = []
                if entry[2].get("k") in PUBLISH_KINDS:
                    run.append(entry)
                    continue
                if run:
                    self._publish(run)
                    run = []
                self._isolated(self.handler.control, entry)
            if run:
                self._publish(run, defer=defer_last)
        except StopBatch:  # entries of other streams in this batch may be left pending
            self._unsettled = True

    def _publish(self, run: list[Entry], *, defer: bool = False) -> None:
        """Route a run of publishes; if it breaks the router, route its entries one by one."""
        try:
            self.handler.publish_run(run, defer=defer)
        except (RedisError, StopBatch):
            raise
        except Exception as exc:
            if len(run) == 1:
                self._refuse(run[0], exc)
                return
            pending = self._pending(run[0][0], [eid for _, eid, _ in run])
            for entry in run:  # find the entry at fault; the others are routed as usual
                if entry[1] in pending:
                    self._isolated(lambda e: self.handler.publish_run([e]), entry)

    def _isolated(self, apply: Any, entry: Entry) -> None:
        """``apply(entry)``; a failure that is not Redis's is the entry's: dead-letter it."""
        try:
            apply(entry)
        except (RedisError, StopBatch):
            raise
        except Exception as exc:
            self._refuse(entry, exc)

    def _refuse(self, entry: Entry, exc: Exception) -> None:
        """Dead-letter an entry that tripped an unforeseen error (unless it was settled anyway).

        Bad input must never wedge a partition: without this, such an entry would stay pending and
        fail again after every settle and takeover.
        """
        log.error("router %s: request %s broke the router", self.name, entry[1],
                  exc_info=(type(exc), exc, exc.__traceback__))
        if entry[1] not in self._pending(entry[0], [entry[1]]):
            return  # its script ran and acknowledged it before the failure: nothing to refuse
        error: SidecarError = InternalError(
            f"the router failed on this request ({type(exc).__name__}); see the router's log")
        self.reject([self.handler.rejection(entry[0], entry[1], entry[2], error)])

    def _pending(self, stream: str, ids: list[str]) -> set[str]:
        """Which of ``ids`` (ascending entry ids of ``stream``) are still pending."""
        rows = self.client.xpending_range(stream, REQUEST_GROUP, min=ids[0], max=ids[-1],
                                          count=len(ids))
        return {str(r["message_id"]) for r in rows}

    def reject(self, rejections: list[Rejection]) -> None:
        """Dead-letter rejected entries, tell identifiable senders why, and ack them."""
        if not rejections:
            return
        pipe = self.client.pipeline(transaction=False)
        for r in rejections:
            pipe.xadd(self.keys.deadletter, r.deadletter_fields(),
                      maxlen=self.settings.deadletter_maxlen, approximate=True)
            if r.reply_to:
                pipe.xadd(self.keys.responses(r.reply_to), r.reply_fields(),
                          maxlen=self.settings.inbox_maxlen, approximate=True)
            if r.ack:
                pipe.xack(r.stream, REQUEST_GROUP, r.entry_id)
        pipe.hincrby(self.keys.stats, "rejected", len(rejections))
        pipe.execute()
        self.stats["rejected"] += len(rejections)
        for r in rejections:
            log.info("rejected %s from %s: %s (%s)", r.entry_id, r.sender or "?", r.code, r.message)


def _foreign(summary: Any, me: str) -> bool:
    """Whether an XPENDING summary shows entries pending under a consumer other than ``me``."""
    if not summary or not summary.get("pending"):
        return False
    return any(c.get("name") != me and int(c.get("pending") or 0) for c in summary.get("consumers") or ())


def _autoclaim(reply: Any) -> tuple[str, list[tuple[str, dict[str, str]]], list[str]]:
    nxt = str(reply[0])
    claimed = [(str(eid), fields or {}) for eid, fields in reply[1]]
    deleted = [str(d) for d in reply[2]] if len(reply) > 2 else []
    return nxt, claimed, deleted
