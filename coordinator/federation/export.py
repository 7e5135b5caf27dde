"""The bridge's way out: this site's messages, read from the bridge's inbox, to JetStream.

The bridge is a member of its site subscribed to the export patterns, so every local publish it
should send lands in its inbox, on the direct path and through the router alike. One task reads
the inbox and publishes each batch (a *flight*); another awaits the flights' acknowledgements in
order and only then acknowledges their inbox entries, so reading never waits on acknowledgements.
A bridge that dies in between leaves the entries pending; the next one sends them again under the
same ``Nats-Msg-Id``, which JetStream drops as repeats. Messages that came from another site
(they carry an origin) are never sent back, so nothing echoes and three sites never loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable
from typing import Any

from coordinator.federation.active import ActiveSite
from coordinator.federation.connect import ensure_stream
from coordinator.federation.envelope import Outbound, answer_out, outbound
from coordinator.federation.flights import ACK_TIMEOUT, IN_FLIGHT, Flight, cancel, launch, settled
from coordinator.keys import PEER_GROUP
from coordinator.policy.store import policy_ack_call
from coordinator.protocol import SYSTEM_SENDER
from coordinator.resp import AsyncResp, stream_entries, stream_entries_py, supports
from coordinator.routing.rejections import deadletter_entry

__all__ = ["Export"]

log = logging.getLogger("sidecar.bridge")

_READ_DEADLINE = 5.0
"""Seconds an inbox read (which blocks for at most one) may take before its connection is taken
for dead: a half-open connection must not stall the export while the lease is renewed."""
_CONSUMER = "bridge"
"""Inbox consumer name every bridge of a site shares: one is active at a time, and a successor
reads what its predecessor left pending under the same name."""


class Export:
    """Sends one active bridge's site's messages (and answers to requests from elsewhere) out."""

    def __init__(self, active: ActiveSite) -> None:
        self.active = active
        self._unsettled: deque[tuple[int, bool]] = deque()
        """Each unsettled flight, oldest first: the NATS connection it went out on (counted in
        disconnections), and whether all of it went out."""
        self._settled = asyncio.Event()
        """Set while no flight is unsettled."""
        self._settled.set()

    async def run(self) -> None:
        """Read and send until cancelled or a failure (the bridge starts a new round)."""
        flights: asyncio.Queue[Flight] = asyncio.Queue(maxsize=IN_FLIGHT)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(flights))
                group.create_task(self._settle(flights))
        finally:  # what was in flight is read again from the inbox: nobody waits for these
            while not flights.empty():
                cancel(flights.get_nowait().futures)

    async def _read(self, flights: asyncio.Queue[Flight]) -> None:
        a = self.active
        url = a.settings.redis_url or ""
        # the inbox is read on a connection of its own, lean where the URL allows: a message
        # waits for this read on its way out, and redis-py's per-call work is on that path
        lean = AsyncResp(url) if supports(url) else None
        try:
            await self._read_from(flights, lean)
        finally:
            if lean is not None:
                await lean.close()

    async def _inbox(self, lean: AsyncResp | None, cursor: str) -> list[tuple[str, dict[str, str]]]:
        """The next inbox entries after ``cursor`` (``>``: new ones, waiting up to a second).

        A lost connection (or a read past its deadline) ends the round: the next one reads from
        ``0``, so entries whose reply was lost come first, in order, rather than being skipped
        until some later round by a read sent again on a new connection."""
        a = self.active
        block = ("BLOCK", 1000) if cursor == ">" else ()
        if lean is not None:
            async with asyncio.timeout(_READ_DEADLINE):  # (a cancelled read closes its connection)
                reply = await lean.call("XREADGROUP", "GROUP", PEER_GROUP, _CONSUMER,
                                        "COUNT", a.settings.bridge_batch, *block,
                                        "STREAMS", a.inbox, cursor)
            return [(eid, fields) for _, eid, fields in stream_entries(reply)]
        reply = await a.redis.xreadgroup(PEER_GROUP, _CONSUMER, {a.inbox: cursor},
                                         count=a.settings.bridge_batch,
                                         block=1000 if cursor == ">" else None)
        return [(eid, fields) for _, eid, fields in stream_entries_py(reply)]

    async def _read_from(self, flights: asyncio.Queue[Flight], lean: AsyncResp | None) -> None:
        a = self.active
        cursor = "0"  # first what a predecessor (or this bridge) left pending, then new entries
        while True:
            entries = await self._inbox(lean, cursor)
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
                    messages.append(outbound(a.keys, a.site, fields))
            messages = await self._fitting(messages)
            connection = a.disconnections()
            if not all(ok and on == connection for on, ok in self._unsettled):
                # An earlier batch went out on a connection since lost, or could not go out at
                # all: it will be published again. Nothing newer goes out before it is settled,
                # or it could be stored ahead of it (order per publisher).
                await self._settled.wait()
                connection = a.disconnections()
            futures = await launch(a, messages) if messages else []
            self._unsettled.append((connection, len(futures) == len(messages)))
            self._settled.clear()
            try:
                await flights.put(Flight([eid for eid, _ in entries], messages, futures))
            except BaseException:  # torn down: read again by the next bridge, free their room
                cancel(futures)
                raise

    async def _settle(self, flights: asyncio.Queue[Flight]) -> None:
        a = self.active
        while True:
            flight = await flights.get()
            if flight.messages:
                sent = await self._send(flight.messages, flight.futures)
                a.counters.exported += sent
                a.tally.traffic["exported"] += sent
            await a.redis.xack(a.inbox, PEER_GROUP, *flight.entry_ids)
            self._unsettled.popleft()
            if not self._unsettled:
                self._settled.set()

    async def _fitting(self, messages: list[Outbound]) -> list[Outbound]:
        """``messages`` but those larger than NATS takes (the server's ``max_payload``, headers
        included), which are dead-lettered as ``payload_too_large``: sending one would fail
        every time and hold up everything after it."""
        limit = int(getattr(self.active.nc, "max_payload", 0) or 0)
        if not limit:
            return messages
        fits: list[Outbound] = []
        too_large: list[Outbound] = []
        for m in messages:
            size = len(m.payload) + sum(len(k) + len(v) + 4 for k, v in m.headers.items()) + 16
            (fits if size <= limit else too_large).append(m)
        if too_large:
            text = f"larger than NATS takes (max_payload {limit} bytes, headers included)"
            await self._dead_letter(too_large, "payload_too_large", text)
        return fits

    async def _send(self, messages: list[Outbound], futures: list[Awaitable[Any]]) -> int:
        """Await the acknowledgements of ``messages`` (published with ``futures``), publishing
        again from the first one not acknowledged, in order, until each is; returns how many
        were. While NATS stays unreachable with more than ``bridge_backlog`` messages waiting
        here, the oldest of them are given up (dead-lettered as ``export_failed``) to keep the
        backlog within the bound; the rest keep waiting."""
        from nats.errors import NoRespondersError
        from nats.js.errors import NoStreamResponseError

        a = self.active
        pending = messages
        sent = 0
        delay = 0.05
        while True:
            results = await settled(futures, ACK_TIMEOUT)
            failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
            if failed and isinstance(results[failed[0]], NoRespondersError | NoStreamResponseError):
                with contextlib.suppress(Exception):  # the stream is gone: create it again
                    await ensure_stream(a.js, a.keys, a.settings)
            done = len(futures) if not failed else failed[0]
            sent += done
            pending = pending[done:]
            if not pending:
                return sent
            if self._unsettled:  # nothing new goes out before these are sent again (_read_from)
                self._unsettled[0] = (self._unsettled[0][0], False)
            excess = await self._backlog() - a.settings.bridge_backlog
            if excess > 0:
                text = (f"NATS stayed unreachable with {excess + a.settings.bridge_backlog} "
                        f"messages waiting to leave site {a.site!r} "
                        f"(SIDECAR_BRIDGE_BACKLOG={a.settings.bridge_backlog})")
                await self._dead_letter(pending[:excess], "export_failed", text)
                pending = pending[excess:]
                if not pending:
                    return sent
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
            futures = await launch(a, pending)

    async def _backlog(self) -> int:
        """Messages in this bridge's inbox not yet sent (unread, and read but unacknowledged)."""
        for group in await self.active.redis.xinfo_groups(self.active.inbox):
            if group.get("name") == PEER_GROUP:
                return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return 0

    async def _dead_letter(self, messages: list[Outbound], reason: str, text: str) -> None:
        """Give ``messages`` of this site up: dead letters, counted in ``export_failed``."""
        a = self.active
        log.warning("bridge %s: %s; dead-lettering %d", a.name, text, len(messages))
        pipe = a.redis.pipeline(transaction=False)
        for m in messages:
            pipe.xadd(a.keys.deadletter, deadletter_entry(
                reason, text, stream="bridge", entry=m.msg_id,
                sender=m.headers.get("Sidecar-Sender", ""), topic=a.keys.topic_of(m.subject) or "",
                raw=m.payload[:4096].decode(errors="replace")),
                maxlen=a.settings.deadletter_maxlen, approximate=True)
        await pipe.execute()
        a.counters.export_failed += len(messages)

    async def _answer(self, fields: dict[str, str]) -> None:
        """A local peer answered a request from elsewhere: send it the way the request came."""
        route = self.active.replies.take(fields.get("i", ""))
        if route is None:
            return  # answered already, or asked before this bridge took over: the requester times out
        payload, headers = answer_out(fields, route)
        with contextlib.suppress(Exception):  # core NATS: at most once, like any NATS request
            await self.active.nc.publish(route.subject, payload, headers=headers)
            self.active.counters.answers += 1

    async def _ack_policy(self, fields: dict[str, str]) -> None:
        """A bridge runs no policies: it acknowledges each version so rollouts can complete."""
        try:
            body = json.loads(fields.get("d", "{}"))
            version, nonce = int(body["version"]), str(body["nonce"])
        except (ValueError, KeyError, TypeError):
            return
        a = self.active
        keys, args = policy_ack_call(a.keys, a.peer_id, version, nonce, True, "")
        await a.scripts.policy_ack(keys=keys, args=args)
