"""The router: reads request partitions in batches and fans publishes out to subscriber inboxes.

A :class:`Router` runs in its own thread with a sync Redis client (the worker's bootstep and
``ClusterSidecar.setup()`` both host one). It holds request partitions under leases
(:class:`~coordinator.routing.partitions.Partitions`). A router that takes a partition over first
routes the entries its predecessor left pending (XAUTOCLAIM), then new ones, so order per
publisher survives the crash.

The router is the one owner of its routing state: the :class:`RoutingView` (version, index,
members, leader), its leases, the fan-out riding along with the next read (:class:`InFlight`) and
whether its partitions need settling after an error. The publish planner and the control handler
read the view and return what happened; the router acts on it.

What is fenced, and why the rest is safe. A router deposed while paused (GC, SIGSTOP, a network
stall) may wake up and carry on with a batch its successor is routing too. Every write it could
make that conflicts with the successor's checks the partition lease token inside the script that
makes it, so a deposed router writes nothing:

* the fan-out and its acknowledgements (route.lua, also fenced by the routing version);
* subscribe, register, leave and a relayed heartbeat (subscribe/register/leave/heartbeat.lua);
* nonce marks of control requests (mark.lua);
* rejections, error replies, heartbeat and leave replies with their acks (reply.lua).

Not fenced, and safe without: the election after a graceful leave (elect.lua is a compare-and-set
on live members, so running it late or twice elects the same leader); policy acks (policy_ack.lua
keeps the newest answer per peer, so applying the same entry again changes nothing); reading and
claiming entries (XREADGROUP, XAUTOCLAIM move pending entries to the deposed router, but route.lua
refuses to fan out while another consumer holds pending entries, and the successor claims them
back and routes them first, in order); consumer-group creation (idempotent); trimming (only below
the lowest pending entry); check-ins on the ``routers`` set, the routed/delivered/rejected
counters (each router counts only work its fenced scripts did) and the batch-size and fan-out
latency histograms (coordinator.histogram).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from coordinator import resp
from coordinator.clock import offset_ms, redis_ms
from coordinator.errors import InternalError, SidecarError
from coordinator.histogram import BATCH_SIZE, FANOUT_SECONDS, Histogram
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.leases import LeaseToken
from coordinator.protocol import PUBLISH_KINDS
from coordinator.resp import Entry, RespConnection, stream_entries, stream_entries_py
from coordinator.routing.coalesce import ReadCoalescer
from coordinator.routing.context import RouterContext
from coordinator.routing.control import DEPOSED, ControlHandler
from coordinator.routing.direct import publish_dataplane
from coordinator.routing.guard import Guard, Mark
from coordinator.routing.partitions import Partitions
from coordinator.routing.publishes import FanOut, PublishPlanner, outcome
from coordinator.routing.rejections import Rejection, Rejector
from coordinator.routing.throttle import Throttle
from coordinator.routing.view import RoutingView
from coordinator.scripts import scripts_for
from coordinator.settings import Settings

__all__ = ["Entry", "InFlight", "Router"]

log = logging.getLogger("sidecar.router")


class StopBatch(Exception):
    """Stop processing the current batch: its remaining entries are not ours to route now."""


class Rerouted(StopBatch):
    """The rest of the batch was routed by claiming every pending entry."""


class Deposed(StopBatch):
    """A fenced script found the partition's lease gone: its new owner routes the rest."""


class VersionChurn(StopBatch):
    """The routing version changed under every attempt at a run; it is settled again later."""


class InFlight:
    """The fan-out of the last read's final run, riding along with the next read's round trip.

    ``written`` says it was already sent on the lean connection (before the router lingered), so
    only its answer is still owed.
    """

    def __init__(self) -> None:
        self.fanout: FanOut | None = None
        self.written = False

    def hold(self, fanout: FanOut) -> None:
        self.fanout, self.written = fanout, False

    def drop(self) -> None:
        self.fanout, self.written = None, False


def _awaited(fields: dict[str, str]) -> bool:
    """Whether somebody waits on this entry's outcome: a request, an answer, a control call
    (heartbeats apart: signed peers send one a second, and nobody waits on its speed)."""
    return "rt" in fields or fields.get("k") == "rep" or ("r" in fields and fields.get("k") != "hb")


class Router:
    """Routes the request partitions it holds leases on. ``start()``/``stop()`` run it in a thread."""

    def __init__(self, client: Any, settings: Settings, *, name: str | None = None) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.token = str(LeaseToken.new(self.name))
        self.scripts = scripts_for(client)
        self.parts = Partitions(client, self.keys, settings, name=self.name, token=self.token)
        self.view = RoutingView(self.keys)
        self.guard = Guard(client, self.keys, settings)
        self.rejector = Rejector(client, self.keys, settings, self.view)
        ctx = RouterContext(client, self.keys, settings, self.view, self.guard, self.rejector,
                            self.token, self.name)
        self.planner = PublishPlanner(ctx)
        self.control = ControlHandler(ctx, refresh=self.refresh)
        self.inflight = InFlight()
        self.coalescer = ReadCoalescer(settings.router_linger, settings.batch_size)
        self.lingered = 0
        """Times this router waited to gather a batch (see coordinator.routing.coalesce)."""
        self.throttle = Throttle(settings.peer_rate if settings.auth == "required" else 0.0,
                                 settings.peer_burst)
        self.stats = {"routed": 0, "delivered": 0, "rejected": 0, "batches": 0, "takeovers": 0}
        self.batch_sizes = Histogram(BATCH_SIZE)
        self.fanout_seconds = Histogram(FANOUT_SECONDS)
        self._clock_offset_ms = 0.0
        """Redis time minus this process's clock (ms), as of the last maintenance: fan-out latency
        is measured on Redis's clock, from the entry id a publish got."""
        url = settings.redis_url
        self.fast = RespConnection(url) if url and resp.supports(url) else None
        self.unsettled = False
        """An error or a stopped batch may have left read entries unrouted: settle before reading."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_maintenance = 0.0
        self._next_renewal = 0.0
        self._flushed: dict[str, int] = {}
        self._block_ms = settings.router_block_ms
        self._last_trim = 0.0
        self._shown_throttled: set[str] = set()
        self._subscriptions_checked = -1
        """The policy version every subscription was last checked against (see refresh)."""
        self._followed: str | None = None
        """The routing version identities and policies were last followed at (_follow_version)."""

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
        return self.parts.held

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
                if self.unsettled:
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
            self.unsettled = True
            self.inflight.drop()  # its entries are still pending: settling routes them
            if self.fast is not None:
                self.fast.close()  # a reply may still be owed on it: start afresh
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)
        try:
            self.flush()
        except (RedisError, StopBatch):
            pass
        self.parts.release_all()
        if self.fast is not None:
            self.fast.close()

    def step(self) -> int:
        """Maintain leases when due, then route one batch. Returns the entries handled."""
        now = time.monotonic()
        if now >= self._next_maintenance:
            self._maintain()
            self._next_maintenance = now + self.settings.lease_renew_interval
        if not self.parts.leases:
            self._stop.wait(max(0.0, self._next_maintenance - time.monotonic()))
            return 0
        block = max(1, min(self._block_ms,
                           int((self._next_maintenance - time.monotonic()) * 1000)))
        wait = self.coalescer.delay(time.monotonic())
        if wait > 0:
            if self.inflight.fanout is not None and not self.inflight.written:
                # the linger must only delay entries not read yet: the fan-out goes out now, and
                # its answer is read with the next read's
                if not self._guarded(self._write_ahead):
                    return 0
                wait = self.coalescer.delay(time.monotonic())
            if wait > 0:
                self.lingered += 1
                if self._stop.wait(wait):
                    return 0
        fanout = self.inflight.fanout
        streams, rest = self._readable(time.monotonic())
        if rest:  # wake up when the first peer held back may be read again
            block = max(1, min(block, int(rest * 1000) + 1))
        answer, reply = self._read({s: ">" for s in streams}, block)
        if fanout is not None:
            self.inflight.drop()
            if not self._guarded(lambda: self._finish(fanout, answer)):
                return 0  # this read's entries stay pending: settling routes them
        if isinstance(reply, Exception):
            raise reply
        self.coalescer.observe(time.monotonic(), len(reply))
        if self.throttle.on:
            self._spend(reply)
        if reply:
            self.process(reply, defer_last=True)
        if any(_awaited(f) for _, _, f in reply):  # from now: the next read may be its sequel
            self.coalescer.converse(time.monotonic())
        return len(reply)

    def _readable(self, now: float) -> tuple[list[str], float]:
        """The held streams to read now (peers over their rate wait), and the seconds until the
        first one waiting may be read again (0: none waits)."""
        streams = self.parts.streams()
        if not self.throttle.on:
            return streams, 0.0
        ready, waits = [], []
        for stream in streams:
            wait = self.throttle.resting(stream, now)
            if wait:
                waits.append(wait)
            else:
                ready.append(stream)
        return ready, min(waits, default=0.0)

    def _spend(self, entries: list[Entry]) -> None:
        """Count what was read from each peer's own stream against its rate (a folded entry
        by an upper bound of its publishes, so nobody gets more by folding)."""
        now = time.monotonic()
        for stream, _, fields in entries:
            if self.keys.peer_of_stream(stream) is not None:
                folded = fields.get("b")
                self.throttle.spend(stream, max(1, folded.count("[") - 1) if folded else 1, now)

    def _guarded(self, action: Callable[[], None]) -> bool:
        """Run ``action``; False (and settle later) if it stopped the batch."""
        try:
            action()
        except StopBatch:
            self.unsettled = True
            return False
        return True

    def _write_ahead(self) -> None:
        """Send the in-flight fan-out now, before the router lingers.

        On the lean connection it is only written (Redis runs it at once) and its answer is read
        with the next read's; through redis-py it is a round trip of its own, settled here.
        """
        fanout = self.inflight.fanout
        assert fanout is not None
        command = fanout.command(self.scripts.route.sha)
        if self.fast is not None:
            self.fast.send([command])
            self.inflight.written = True
            return
        self.inflight.drop()
        result = self.client.pipeline(transaction=False).execute_command(*command).execute(
            raise_on_error=False)[0]
        self._finish(fanout, result)

    def _read(self, streams: dict[str, str], block: int) -> tuple[Any, list[Entry] | Exception]:
        """One round trip: the in-flight fan-out (unless written already), then a blocking read.

        Returns (the fan-out's answer or error, the entries read or the read's error).
        """
        count = self.settings.batch_size
        fanout = self.inflight.fanout
        if self.fast is not None:
            commands: list[tuple[Any, ...]] = []
            if fanout is not None and not self.inflight.written:
                commands.append(fanout.command(self.scripts.route.sha))
            commands.append(("XREADGROUP", "GROUP", REQUEST_GROUP, self.name, "COUNT", count,
                             "BLOCK", block, "STREAMS", *streams, *streams.values()))
            replies = self.fast.pipeline(commands, timeout=self._block_ms / 1000 + 10)
            read = replies[-1]
            return (replies[0] if fanout is not None else None,
                    read if isinstance(read, Exception) else stream_entries(read))
        pipe = self.client.pipeline(transaction=False)
        if fanout is not None:
            pipe.execute_command(*fanout.command(self.scripts.route.sha))
        pipe.xreadgroup(REQUEST_GROUP, self.name, streams, count=count, block=block)
        replies = pipe.execute(raise_on_error=False)
        read = replies[-1]
        return (replies[0] if fanout is not None else None,
                read if isinstance(read, Exception) else stream_entries_py(read))

    # ------------------------------------------------------------------ partitions
    def _maintain(self) -> None:
        """Renew held leases, take or give partitions toward a fair share, and tidy up."""
        if self.guard.active:
            self._follow_version()
        self.parts.renew()
        self._next_renewal = time.monotonic() + self.settings.lease_renew_interval
        for p in self.parts.rebalance():
            self._take_over(p)
        for stream in self.parts.streams():  # entries a deposed router read while no new ones arrive
            if _foreign(self.client.xpending(stream, REQUEST_GROUP), self.name):
                self.claim_pending(stream)
        sent = time.time()
        self._clock_offset_ms = offset_ms(redis_ms(self.client), sent, time.time())
        self._flush_stats()
        if time.monotonic() - self._last_trim > 5.0:
            self._last_trim = time.monotonic()
            dropped = self.parts.trim()
            if dropped:
                self.client.hincrby(self.keys.stats, "dropped_requests", dropped)
                log.warning("router %s dropped %d requests past SIDECAR_PEER_BACKLOG", self.name, dropped)

    def _follow_version(self) -> None:
        """Check requests against the identities and policies as they are now, even while only
        control requests flow: a peer added, rotated or revoked, or a policy changed (each moves
        the routing version), counts from the next lease renewal on; read each identity's own
        request stream; drop the subscriptions a tightened policy no longer allows."""
        version = self.client.get(self.keys.routing_version)
        if version == self._followed:
            return
        self._followed = version
        if self.settings.auth == "required":
            self.parts.learn_peers(self.client.hkeys(self.keys.identities))
        self.refresh()

    def _take_over(self, partition: int) -> None:
        """Start owning ``partition``: route what the last owner left pending, then new entries."""
        self.stats["takeovers"] += 1
        self._settle_partition(partition)
        log.info("router %s owns partition %d", self.name, partition)

    def _settle_held(self) -> None:
        """Renew every lease (dropping lost ones), then settle the partitions still held."""
        self.unsettled = False
        self.parts.renew()
        for p in self.parts.held:
            self._settle_partition(p)

    def _settle_partition(self, partition: int) -> None:
        """Make sure the partition's groups exist (partition 0: and that peers know the data
        plane), then route every entry pending on it."""
        self.view.invalidate()  # anything may have changed while we did not route it
        self.guard.forget_marks()
        self.parts.ensure_groups(partition)
        if partition == 0:  # after a takeover or an error (a Redis restart loses it)
            publish_dataplane(self.client, self.keys, self.settings)
        for stream in self.parts.streams_of(partition):
            self.claim_pending(stream)

    def claim_pending(self, stream: str) -> None:
        """Route every entry pending on ``stream`` (ours or a predecessor's), oldest first.

        Used when taking a partition over, and when the route script finds entries pending under
        another consumer: a router deposed while paused may read one more batch before its fenced
        writes are refused, and those entries are older than anything read since.
        """
        fanout = self.inflight.fanout
        if fanout is not None and fanout.stream == stream:
            self.inflight.drop()  # its entries are pending too: routed below, in order
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
        for i in range(0, len(claimed_all), size):
            if not self.parts.holds_stream(stream):
                break  # deposed meanwhile: the new owner claims the rest
            self.process(claimed_all[i:i + size])

    def flush(self) -> None:
        """Settle the in-flight fan-out now and write the counters (before stopping, and in tests)."""
        fanout = self.inflight.fanout
        if fanout is not None and self.inflight.written and self.fast is not None:
            self.inflight.drop()  # written already: only its answer is still to be read
            answer = self.fast.pipeline([], timeout=10.0)
            if answer:
                self._finish(fanout, answer[0])
            # else the connection went, and the answer with it: its entries stay pending for
            # settling or the partition's next owner
        elif fanout is not None:
            self.inflight.drop()
            self._route(fanout.run, marks=fanout.marks)
        self._flush_stats()

    def _flush_stats(self) -> None:
        counts = {k: self.stats[k] - self._flushed.get(k, 0) for k in ("routed", "delivered")}
        histograms = (self.batch_sizes, self.fanout_seconds)
        buckets = [h.pending() for h in histograms]
        if any(counts.values()) or any(fields for fields, _ in buckets):
            pipe = self.client.pipeline(transaction=False)
            for key, delta in counts.items():
                pipe.hincrby(self.keys.stats, key, delta)
            for (fields, total), name in zip(buckets, (BATCH_SIZE, FANOUT_SECONDS), strict=True):
                for field, n in fields.items():
                    pipe.hincrby(self.keys.histograms, field, n)
                if fields:
                    pipe.hincrbyfloat(self.keys.histograms, f"{name}:sum", total)
            pipe.execute()
            self._flushed.update({k: self.stats[k] for k in counts})
            for h in histograms:
                h.clear()
        if self.throttle.on:
            self._show_throttled()

    def _show_throttled(self) -> None:
        """Record which peers of this router's partitions are held back now, and for how long
        (``sidecar status`` shows them)."""
        now = time.monotonic()
        held = {peer: round(wait, 3) for stream in self.parts.streams()
                if (peer := self.keys.peer_of_stream(stream)) is not None
                and (wait := self.throttle.resting(stream, now))}
        gone = self._shown_throttled - set(held)
        if held or gone:
            pipe = self.client.pipeline(transaction=False)
            if gone:
                pipe.hdel(self.keys.throttled, *gone)
            if held:
                pipe.hset(self.keys.throttled, mapping=held)
            pipe.execute()
        self._shown_throttled = set(held)

    # ------------------------------------------------------------------ routing
    def refresh(self) -> None:
        """Reload the routing view, and what the guard derives from it."""
        self.view.refresh(self.client)
        self.guard.refresh(set(self.view.members))
        if (self.guard.enforce and self.guard.policy_version != self._subscriptions_checked
                and 0 in self.parts.leases):  # partition 0's router checks for everyone
            version = self.guard.policy_version
            if self.control.drop_disallowed(self.view.subscriptions):
                self.view.invalidate()
            self._subscriptions_checked = version  # (only once every one was checked)

    def process(self, entries: list[Entry], *, defer_last: bool = False) -> None:
        """Route ``entries`` in order: runs of publishes in one script call, control one by one.

        With ``defer_last`` a final run of publishes may leave its script call for the next read's
        round trip (see :class:`InFlight`).
        """
        if self.view.stale:
            self.refresh()
        self.stats["batches"] += 1
        self.batch_sizes.observe(len(entries))
        run: list[Entry] = []
        try:
            for entry in entries:
                if run and entry[0] != run[0][0]:  # a run never mixes streams (trust, partition, ack)
                    self._publish(run)
                    run = []
                    self._keep_leases()
                if entry[2].get("k") in PUBLISH_KINDS:
                    run.append(entry)
                    continue
                if run:
                    self._publish(run)
                    run = []
                self._isolated(self._control, entry)
            if run:
                self._publish(run, defer=defer_last)
        except StopBatch:  # entries of other streams in this batch may be left pending
            self.unsettled = True

    def _keep_leases(self) -> None:
        """Between runs of a long batch (one read takes a batch from every stream held): renew
        the leases when due, so no amount of work read at once outlasts them."""
        now = time.monotonic()
        if now >= self._next_renewal:
            self.parts.renew()
            self._next_renewal = now + self.settings.lease_renew_interval

    def _control(self, entry: Entry) -> None:
        done = self.control.apply(entry)
        if isinstance(done, Rejection):
            self._reject([done])
        elif done is DEPOSED:
            self.parts.drop_stream(entry[0])
            raise Deposed

    def _publish(self, run: list[Entry], *, defer: bool = False) -> None:
        """Route a run of publishes; if it breaks the router, route its entries one by one."""
        try:
            self._route(run, defer=defer)
        except (RedisError, StopBatch):
            raise
        except Exception as exc:
            if len(run) == 1:
                self._refuse(run[0], exc)
                return
            pending = self._pending(run[0][0], [eid for _, eid, _ in run])
            for entry in run:  # find the entry at fault; the others are routed as usual
                if entry[1] in pending:
                    self._isolated(lambda e: self._route([e]), entry)

    def _route(self, run: list[Entry], *, defer: bool = False,
               marks: dict[str, Mark] | None = None) -> None:
        """Deliver a run of publishes of one stream with one fenced script call.

        With ``defer`` the call is held in :attr:`inflight` to ride along with the next read (a run
        with rejections is never deferred: dead letters and error replies go out at once).
        ``marks`` are the nonce marks of a run authenticated already (a retry).
        """
        stream = run[0][0]
        refused: list[Rejection] = []
        if marks is None:
            run, refused, marks = self.planner.authenticate(run)
        for attempt in range(5):
            if self.view.stale:
                self.refresh()
            fanout = self.planner.plan(stream, run, marks)
            fanout.rejections += refused
            if defer and attempt == 0 and not fanout.rejections:
                self.inflight.hold(fanout)
                return
            if self._settle(fanout, self.scripts.route(keys=fanout.keys, args=fanout.args)):
                return
        log.warning("router %s: routing version changed under five attempts; settling later", self.name)
        raise VersionChurn

    def _settle(self, fanout: FanOut, result: Any) -> bool:
        """Act on a route.lua answer; False when the run must be planned again (stale view)."""
        status, delivered = outcome(result)
        if status == "ok":
            self.stats["routed"] += fanout.messages
            self.stats["delivered"] += delivered
            now_ms = time.time() * 1000 + self._clock_offset_ms
            for _, eid, _ in fanout.run:  # one observation per request entry (a folded one: once)
                self.fanout_seconds.observe(max(0.0, now_ms - int(eid.partition("-")[0])) / 1000)
            self.guard.commit(fanout.marks)
            self._reject(fanout.rejections)
            return True
        if status == "lost":
            self.parts.drop_stream(fanout.stream)
            raise Deposed
        if status == "foreign":  # a deposed router's reads are older: route them, then ours
            self.claim_pending(fanout.stream)
            raise Rerouted
        self.view.invalidate()  # stale: someone changed members or subscriptions
        return False

    def _finish(self, fanout: FanOut, answer: Any) -> None:
        """Settle an in-flight fan-out with the answer its call got (or the error it raised)."""
        if isinstance(answer, NoScriptError):  # Redis restarted: the synchronous path reloads it
            self._route(fanout.run, marks=fanout.marks)
        elif isinstance(answer, Exception):
            raise answer
        elif not self._settle(fanout, answer):
            self._route(fanout.run, marks=fanout.marks)

    def _isolated(self, apply: Callable[[Entry], None], entry: Entry) -> None:
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
        self._reject([self.rejector.rejection(entry[0], entry[1], entry[2], error)])

    def _reject(self, rejections: list[Rejection]) -> None:
        """Write rejections under the lease of their stream's partition."""
        if not rejections:
            return
        stream = rejections[0].stream
        lease_key = self.planner.stream_info(stream)[0]
        written = self.rejector.write(rejections, lease_key, self.token)
        self.stats["rejected"] += written
        if written < len(rejections):
            self.parts.drop_stream(stream)
            raise Deposed

    def _pending(self, stream: str, ids: list[str]) -> set[str]:
        """Which of ``ids`` (ascending entry ids of ``stream``) are still pending."""
        rows = self.client.xpending_range(stream, REQUEST_GROUP, min=ids[0], max=ids[-1],
                                          count=len(ids))
        return {str(r["message_id"]) for r in rows}


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
