"""Inbox entries handed from a peer's reader to its handlers, which run in a task of their own.

After handing a read's entries over, the reader waits until they are handled, so what was
settled is acknowledged with its next read (one round trip for both), as when it ran the
handlers itself. But while somebody awaits an answer or a sidecar reply, it reads on: a handler
may then await what only the reader can bring (the answer to its own ``cluster_request``, the
reply to its ``cluster_subscribe``), and what the reader reads meanwhile waits its turn. Entries
are handled one at a time, in the order read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["Handing"]

Fields = dict[str, str]


class Handing:
    """The entries read and not yet handled, and the settled ones not yet acknowledged."""

    def __init__(self, handle: Callable[[str, Fields], Awaitable[bool]]) -> None:
        """``handle(eid, fields)`` is True once the entry is settled (acknowledged next)."""
        self._handle = handle
        self._queue: deque[tuple[str, Fields]] = deque()
        self._ids: set[str] = set()
        """Entries queued or being handled (a read from ``0`` returns them again)."""
        self._settled: list[str] = []
        self._arrived = asyncio.Event()
        self._progress = asyncio.Event()
        """Set when the queue empties, handling fails, or somebody starts awaiting an answer."""
        self.failed: Exception | None = None
        """Why handling stopped short, until the reader has taken note (it reads from ``0``)."""

    def put(self, eid: str, fields: Fields) -> None:
        """Queue an entry read from the inbox (one queued or being handled already is skipped, and
        so is every entry while a failure waits for the reader: it reads them all again, in
        order)."""
        if eid in self._ids or self.failed is not None:
            return
        self._ids.add(eid)
        self._queue.append((eid, fields))
        self._arrived.set()

    def settled(self) -> list[str]:
        """The entries settled since the last call (to acknowledge with the next read)."""
        done, self._settled = self._settled, []
        return done

    async def handled(self, awaited: Callable[[], bool]) -> None:
        """Until every queued entry is handled, or ``awaited()`` (an answer or a reply is
        awaited: the reader must read on)."""
        while self._queue and self.failed is None and not awaited():
            self._progress.clear()
            await self._progress.wait()

    def wake(self) -> None:
        """Somebody starts awaiting an answer or a reply: a reader waiting in :meth:`handled`
        reads on."""
        self._progress.set()

    async def run(self) -> None:
        """Handle queued entries, in order, until cancelled. An entry whose handling fails (Redis
        away while it is dead-lettered, say) stays pending, and so does everything queued after
        it: they are dropped here and :attr:`failed` makes the reader read them again, in order."""
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            eid, fields = self._queue[0]
            try:
                settled = await self._handle(eid, fields)
            except Exception as exc:
                self._queue.clear()
                self._ids.clear()
                self.failed = exc
                self._progress.set()
                continue
            self._queue.popleft()
            self._ids.discard(eid)
            if settled:
                self._settled.append(eid)
            if not self._queue:
                self._progress.set()
