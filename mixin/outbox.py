"""``Outbox``: how a peer's requests reach its request stream.

One write in flight at a time. A write made while none is in flight goes out at once as one XADD;
writes made meanwhile wait and go out together in the next round trip, where consecutive publishes
are folded into a single ``pubs`` entry (one stream entry, one signature, one fan-out script run),
so a peer with many publishes in flight pays Redis and the router per batch, not per message.
Order is kept: entries go out in the order the writes were made, and a batch keeps its publishes
in order inside the entry.

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
from redis.exceptions import TimeoutError as RedisTimeoutError

from coordinator.errors import SidecarUnavailable
from coordinator.policy.auth import Signer
from coordinator.protocol import dumps
from mixin.resp import AsyncResp

__all__ = ["MAX_FOLD", "TRANSIENT", "Outbox"]

TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
MAX_FOLD = 1000
"""Most publishes folded into one ``pubs`` entry."""
Fields = dict[str, str]


class Outbox:
    """Writes request entries for one peer to ``stream`` on ``redis``."""

    def __init__(self, redis: Any, stream: str, *, limit: int, signer: Signer | None,
                 on_state: Callable[[bool], None], log: logging.Logger | None = None,
                 fast: AsyncResp | None = None) -> None:
        self.redis = redis
        self.stream = stream
        self.limit = limit
        self.signer = signer
        self.on_state = on_state
        self.log = log or logging.getLogger("sidecar.outbox")
        self.fast = fast
        self.up = True
        self.closing = False
        self._queue: list[tuple[Fields, asyncio.Future[str]]] = []
        self._busy = False

    async def write(self, fields: Fields) -> str:
        """Append one entry; returns its stream id (a folded publish: the id of its batch entry)."""
        if self._busy:
            if not self.up and len(self._queue) >= self.limit:
                raise SidecarUnavailable(
                    f"{len(self._queue)} requests already wait for Redis (publish_buffer); retry later")
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._queue.append((fields, fut))
            return await fut
        self._busy = True
        handed_off = False
        try:
            try:
                eid: str = await self._send_one(self._signed(fields))
            except TRANSIENT:  # signed afresh: a retry is a new request (the ids make it a repeat)
                eid = await self._retrying(lambda: self._send_one(self._signed(fields)))
            if self._queue:
                handed_off = True
                asyncio.get_running_loop().create_task(self._drain())
            return eid
        finally:
            if not handed_off:
                self._busy = False

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

    def _fold(self, batch: list[tuple[Fields, asyncio.Future[str]]]
              ) -> list[tuple[Fields, list[asyncio.Future[str]]]]:
        """Entries to send (unsigned): runs of plain publishes of one sender become single ``pubs``
        entries."""
        out: list[tuple[Fields, list[asyncio.Future[str]]]] = []
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
                entries = self._fold(batch)

                async def send(entries: list[tuple[Fields, list[asyncio.Future[str]]]] = entries) -> Any:
                    # signed on every attempt: a retry after a lost reply is a new request, whose
                    # messages keep their ids (subscribers drop the repeats by them)
                    signed = [self._signed(e) for e, _ in entries]
                    if self.fast is not None:
                        replies = await self.fast.pipeline([self._xadd(e) for e in signed])
                        for reply in replies:
                            if isinstance(reply, Exception):
                                raise reply
                        return replies
                    pipe = self.redis.pipeline(transaction=False)
                    for entry in signed:
                        pipe.xadd(self.stream, entry)
                    return await pipe.execute()

                try:
                    ids = await self._retrying(send)
                except Exception as exc:
                    for _, futs in entries:
                        for fut in futs:
                            if not fut.done():
                                fut.set_exception(exc)
                    continue
                for (_, futs), eid in zip(entries, ids, strict=True):
                    for fut in futs:
                        if not fut.done():
                            fut.set_result(eid)
        finally:
            self._busy = False

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
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
