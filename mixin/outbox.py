"""``Outbox``: how a peer's requests reach its request stream.

One write in flight at a time. A write made while none is in flight goes out at once as one XADD;
writes made meanwhile wait and go out together in the next round trip, where consecutive publishes
are folded into a single ``pubs`` entry (one stream entry, one signature, one fan-out script run),
so a peer with many publishes in flight pays Redis and the router per batch, not per message.
Order is kept: entries go out in the order the writes were made, and a batch keeps its publishes
in order inside the entry.

On the direct data path (coordinator.routing.direct), publishes and answers skip the request
stream: a run of them goes out as one ``publish.lua`` call that writes every subscriber's inbox
(the topics it routes are resolved first, and again whenever the routing version moved). Control
requests always go through the stream. Runs keep their order: each goes out after the one before
it was answered.

When Redis is unreachable the pending writes wait while the outbox retries with backoff; at most
``publish_buffer`` may wait, beyond that a write raises SidecarUnavailable at once. A write whose
reply was lost may have reached Redis: it is sent again, signed afresh (so the router does not take
it for a replay), and its messages keep their ids, so subscribers drop the second copy and each
handler runs once per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coordinator.errors import SidecarError, SidecarUnavailable, UnknownPeer
from coordinator.keys import Keys
from coordinator.logs import Log
from coordinator.policy.auth import Signer
from coordinator.protocol import MAX_BATCH, dumps
from coordinator.resp import AsyncResp, pack
from coordinator.routing.direct import DataPlane, DirectBatch, RouteCache, template_key
from coordinator.scripts import scripts_for, source

__all__ = ["MAX_FOLD", "TRANSIENT", "Outbox"]

TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
MAX_FOLD = MAX_BATCH
"""Most publishes folded into one ``pubs`` entry (or one direct call): what a router takes."""
_STALE_TRIES = 20
"""Direct calls refused as stale in a row before a publish gives up (the routes keep changing)."""
_DIRECT_KINDS = ("pub", "rep")
Fields = dict[str, str]
Pending = list[tuple[Fields, list[asyncio.Future[str]]]]


class _Routed(Exception):
    """Internal: the data plane is no longer direct; send these writes through the router."""


class Outbox:
    """Writes request entries for one peer to ``stream`` on ``redis``."""

    def __init__(self, redis: Any, stream: str, *, limit: int, signer: Signer | None,
                 on_state: Callable[[bool], None], log: Log | None = None,
                 fast: AsyncResp | None = None, keys: Keys | None = None, sender: str = "",
                 on_unknown: Callable[[], None] | None = None, unknown_wait: float = 5.0) -> None:
        self.redis = redis
        self.stream = stream
        self.keys = keys
        self.sender = sender
        self.routes = RouteCache()
        self._plane: DataPlane | None = None
        self.on_unknown = on_unknown
        """Called when Redis does not know us as a member (the link registers again)."""
        self.unknown_wait = unknown_wait
        """How long a direct write waits for us to be a member again before UnknownPeer."""
        self._counted = [0, 0]
        """Messages routed and inbox entries delivered on the direct path, not yet added to the
        sidecar's counters (they ride along with a direct call about once a second)."""
        self._count_due = 0.0
        self.limit = limit
        self.signer = signer
        self.on_state = on_state
        self.log = log or logging.getLogger("sidecar.outbox")
        self.fast = fast
        self.up = True
        self.closing = False
        self._queue: list[tuple[Fields, asyncio.Future[str]]] = []
        self._busy = False

    @property
    def plane(self) -> DataPlane | None:
        """The data plane in force (set by the link once registered); None: everything routed."""
        return self._plane

    @plane.setter
    def plane(self, plane: DataPlane | None) -> None:
        if plane != self._plane:  # packed calls carry the plane's limits: pack them afresh
            self.routes.templates.clear()
        self._plane = plane

    async def write(self, fields: Fields) -> str:
        """Send one request; returns its stream id (a folded publish: the id of its batch entry;
        on the direct path: its message id). A direct publish the script refused raises why."""
        if self._busy:
            if not self.up and len(self._queue) >= self.limit:
                raise SidecarUnavailable(
                    f"{len(self._queue)} requests already wait for Redis (publish_buffer); retry later")
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._queue.append((fields, fut))
            return await fut
        self._busy = True
        try:
            if self._direct_ok(fields):
                try:
                    quick = await self._quick_direct(fields)
                    if quick is not None:
                        return quick
                    return str(await self._retrying(lambda: self._send_direct([fields])))
                except _Routed:
                    pass
            try:
                return await self._send_one(self._signed(fields))
            except TRANSIENT:  # signed afresh: a retry is a new request (the ids make it a repeat)
                return str(await self._retrying(lambda: self._send_one(self._signed(fields))))
        finally:
            # whatever came of this write (an error too), the writes queued meanwhile go next
            if self._queue:
                asyncio.get_running_loop().create_task(self._drain())
            else:
                self._busy = False

    async def send_now(self, fields: Fields) -> str:
        """Append one request entry at once, ahead of whatever waits: a peer registering again
        while its direct publishes wait until it is a member (they would hold it up otherwise).
        Uses the shared client's own connection, never the one a write in flight holds."""
        return str(await self.redis.xadd(self.stream, self._signed(fields)))

    def _direct_ok(self, fields: Fields) -> bool:
        """Whether ``fields`` goes out on the direct path."""
        plane = self.plane
        return plane is not None and plane.direct and fields.get("k") in _DIRECT_KINDS

    async def _quick_direct(self, fields: Fields) -> str | None:
        """One lone publish, request or answer whose packed call is ready (see
        DirectBatch.packed), in one round trip; its message id ('' for an answer), or None when
        nothing was delivered and the general path must do it (no template yet, a stale route,
        a lost connection, counters due)."""
        fast = self.fast
        key = template_key(fields)
        template = self.routes.templates.get(key) if key is not None else None
        if fast is None or template is None or asyncio.get_running_loop().time() >= self._count_due:
            return None
        try:
            (reply,) = await fast.send_packed(template.fill(fields), 1)
        except TRANSIENT:
            return None  # sent again by the general path: the message id makes it a repeat
        if not isinstance(reply, list) or reply[0] != "ok":
            return None  # stale, unknown, again, NOSCRIPT: nothing was written
        if len(reply) == 3:  # delivered, nothing refused
            self._counted[0] += reply[1]
            self._counted[1] += reply[2]
            return fields.get("i", "")
        outcome = DirectBatch.outcome(reply)
        self._counted[0] += outcome.routed
        self._counted[1] += outcome.delivered
        if outcome.refused:
            raise outcome.refused[0]
        return fields.get("i", "")

    async def _send_direct(self, entries: list[Fields]) -> str:
        """Deliver a run of publishes and answers with ``publish.lua``; returns the last message
        id. A refused message raises its error (for a run of several: see :meth:`_drain`)."""
        refused = await self._direct_run(entries)
        if refused:
            raise next(iter(refused.values()))
        return entries[-1].get("i", "")

    async def _direct_run(self, entries: list[Fields]) -> dict[int, SidecarError]:
        """One direct call for ``entries`` (resolving topics first, again when stale); returns
        the refused entries' errors by index."""
        assert self.plane is not None and self.keys is not None
        batch = DirectBatch(self.keys, self.plane, self.sender, entries)
        loop = asyncio.get_running_loop()
        unknown_until = None
        stale = 0
        while True:
            missing = batch.missing(self.routes)
            if missing or self.routes.version is None:  # answers alone still need the version
                topics, lookups = RouteCache.lookups(self.keys, missing)
                plane = self.routes.learn(topics, await self._commands(lookups))
                if plane != self.plane:
                    self.plane = plane
                    if plane is None or not plane.direct:
                        raise _Routed  # a router changed the mode: these go through it now
                    batch = DirectBatch(self.keys, plane, self.sender, entries)
                stale += 1  # a lookup at a newer version forgets other routes: look again
                if stale >= _STALE_TRIES:
                    raise SidecarError(f"the routes changed {stale} times in a row while "
                                       "publishing (subscriptions churning); retry later")
                if batch.missing(self.routes):
                    continue
            outcome = DirectBatch.outcome(await self._evalsha(batch))
            status = outcome.status
            if status in ("ok", "again"):
                self._counted[0] += outcome.routed
                self._counted[1] += outcome.delivered
                return outcome.refused
            if status == "stale":
                self.routes.invalidate()
                continue
            # 'unknown': Redis does not know us (evicted, or restarted): register, then deliver
            if unknown_until is None:
                unknown_until = loop.time() + self.unknown_wait
                if self.on_unknown is not None:
                    self.on_unknown()
            if loop.time() > unknown_until:
                raise UnknownPeer(f"peer {self.sender!r} is not a registered member (it was evicted "
                                  "and could not register again in time)")
            await asyncio.sleep(0.05)

    async def _commands(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if self.fast is not None:
            replies = await self.fast.pipeline(commands)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute())

    async def flush_counts(self) -> None:
        """Add what the direct path routed and delivered to the sidecar's counters now (the link
        calls it with every heartbeat and on close, so a publisher that went quiet is counted)."""
        if any(self._counted) and self.keys is not None:
            (routed, delivered), self._counted = self._counted, [0, 0]
            self._count_due = asyncio.get_running_loop().time() + 1.0
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self.keys.stats, "routed", routed)
            pipe.hincrby(self.keys.stats, "delivered", delivered)
            await pipe.execute()

    def _counts(self) -> list[tuple[Any, ...]]:
        """The counter increments due now (about once a second), taken from the tally."""
        assert self.keys is not None
        now = asyncio.get_running_loop().time()
        if now < self._count_due or not any(self._counted):
            return []
        self._count_due = now + 1.0
        (routed, delivered), self._counted = self._counted, [0, 0]
        return [("HINCRBY", self.keys.stats, "routed", routed),
                ("HINCRBY", self.keys.stats, "delivered", delivered)]

    async def _evalsha(self, batch: DirectBatch) -> Any:
        counts = self._counts()
        script = scripts_for(self.redis).publish
        if self.fast is None:
            if counts:
                await self._commands(counts)
            keys, args = batch.call(self.routes)
            return await script(keys=keys, args=args)
        call = batch.packed(script.sha, self.routes)
        replies = await self.fast.send_packed(pack(counts) + call if counts else call, len(counts) + 1)
        if isinstance(replies[-1], NoScriptError):  # Redis restarted: load it and call again
            await self.fast.call("SCRIPT", "LOAD", source("publish"))
            return await self.fast.call(*batch.command(script.sha, self.routes))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies[-1]

    def _xadd(self, entry: Fields) -> tuple[str, ...]:
        return ("XADD", self.stream, "*", *(x for kv in entry.items() for x in kv))

    async def _send_one(self, entry: Fields) -> str:
        if self.fast is not None:
            return str(await self.fast.call(*self._xadd(entry)))
        return str(await self.redis.xadd(self.stream, entry))

    async def close(self) -> None:
        """Close the outbox's own connection (the shared client is its owner's to close)."""
        self.closing = True
        if self.fast is not None:
            await self.fast.close()

    def _signed(self, fields: Fields) -> Fields:
        return self.signer.sign(dict(fields)) if self.signer is not None else fields

    def _segments(self, batch: list[tuple[Fields, asyncio.Future[str]]]
                  ) -> list[tuple[bool, list[tuple[Fields, asyncio.Future[str]]]]]:
        """``batch`` cut into runs, in order: (direct, writes) with direct runs of at most
        MAX_FOLD publishes and answers, and stream runs of everything else."""
        out: list[tuple[bool, list[tuple[Fields, asyncio.Future[str]]]]] = []
        for fields, fut in batch:
            if fut.done():
                continue
            direct = self._direct_ok(fields)
            if out and out[-1][0] == direct and not (direct and len(out[-1][1]) >= MAX_FOLD):
                out[-1][1].append((fields, fut))
            else:
                out.append((direct, [(fields, fut)]))
        return out

    def _fold(self, batch: list[tuple[Fields, asyncio.Future[str]]]) -> Pending:
        """Entries to send (unsigned): runs of plain publishes of one sender become single ``pubs``
        entries."""
        out: Pending = []
        run: list[tuple[Fields, asyncio.Future[str]]] = []

        def flush() -> None:
            if len(run) == 1:
                out.append((run[0][0], [run[0][1]]))
            elif run:
                items = [[f["t"], f["d"], f.get("f"), f.get("i"), f.get("h"), f.get("x")] for f, _ in run]
                entry = {"k": "pubs", "s": run[0][0]["s"], "b": dumps(items)}
                out.append((entry, [fut for _, fut in run]))
            run.clear()

        for fields, fut in batch:
            if fut.done():
                continue
            if fields.get("k") == "pub" and "rt" not in fields:  # requests travel alone
                run.append((fields, fut))
                if len(run) >= MAX_FOLD:
                    flush()
            else:
                flush()
                out.append((fields, [fut]))
        flush()
        return out

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                for direct, run in self._segments(batch):
                    if direct:
                        await self._drain_direct(run)
                    else:
                        await self._drain_stream(self._fold(run))
        finally:
            self._busy = False

    async def _drain_direct(self, run: list[tuple[Fields, asyncio.Future[str]]]) -> None:
        entries = [fields for fields, _ in run]
        try:
            refused = await self._retrying(lambda: self._direct_run(entries))
        except _Routed:  # the mode changed under us: through the router, in the same order
            await self._drain_stream(self._fold(run))
            return
        except Exception as exc:
            for _, fut in run:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for n, (fields, fut) in enumerate(run):
            if fut.done():
                continue
            error = refused.get(n)
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(fields.get("i", ""))

    async def _drain_stream(self, entries: Pending) -> None:
        async def send() -> Any:
            # signed on every attempt: a retry after a lost reply is a new request, whose
            # messages keep their ids (subscribers drop the repeats by them)
            signed = [self._signed(e) for e, _ in entries]
            return await self._commands([self._xadd(e) for e in signed])

        if not entries:
            return
        try:
            ids = await self._retrying(send)
        except Exception as exc:
            for _, futs in entries:
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(exc)
            return
        for (_, futs), eid in zip(entries, ids, strict=True):
            for fut in futs:
                if not fut.done():
                    fut.set_result(str(eid))

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()`` until it gets through Redis, backing off while Redis is unreachable."""
        delay = 0.05
        while True:
            try:
                result = await call()
                if not self.up:
                    self.up = True
                    self.on_state(True)
                return result
            except TRANSIENT as exc:
                if self.closing:
                    raise SidecarUnavailable("the link is closing") from exc
                if self.up:
                    self.log.warning("Redis unreachable (%s); retrying", exc)
                    self.up = False
                    self.on_state(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
