"""Handlers that raise: their message is retried with backoff, then dead-lettered.

A message whose handler raised stays unacknowledged in the inbox. :class:`HandlerRetries` runs
the handlers that failed again after ``handler_backoff`` seconds (doubling each time, at most
:data:`MAX_BACKOFF`) until they succeed or the message has been tried ``handler_max_deliveries``
times; then each handler still failing is reported to the sidecar, which dead-letters the message
as ``handler_failed`` with the subscriber, the pattern and the error text. Then the entry is
acknowledged. Handlers that succeeded are not run again.

Order: while a message of a sender is being retried, that sender's later messages to this peer
wait behind it (per-publisher order holds); other senders' messages keep flowing. Requests are
answered at once instead (RemoteError), and the sidecar's own ``cluster.*`` events are not retried
(a failing handler must never hold up leader and policy updates).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from coordinator.logs import Log
from coordinator.protocol import Message
from coordinator.settings import Settings

__all__ = ["MAX_BACKOFF", "Failure", "Handler", "HandlerRetries"]

MAX_BACKOFF = 10.0
"""Longest wait between two tries of one message."""

Handler = Callable[[Message], Any]
"""What handles a message: a plain function or an ``async def``, given one :class:`Message`."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A handler that raised on a message, and what it raised."""

    pattern: str
    handler: Handler
    error: str


class HandlerRetries:
    """Retries of one peer's failed messages (all handler runs happen under ``lock``)."""

    def __init__(self, settings: Settings, *, lock: AbstractAsyncContextManager[Any],
                 run: Callable[[Handler, Message], Awaitable[tuple[bool, Any]]],
                 ack: Callable[[list[str]], Awaitable[None]],
                 dead_letter: Callable[[Message, Failure, int], Awaitable[None]],
                 redispatch: Callable[[str, dict[str, str]], Awaitable[bool]],
                 log: Log) -> None:
        self.max_deliveries = settings.handler_max_deliveries
        self.backoff = settings.handler_backoff
        self._lock = lock
        self._run = run
        self._ack = ack
        self._dead_letter = dead_letter
        self._redispatch = redispatch
        self._log = log
        self._waiting: dict[str, deque[tuple[str, dict[str, str]]]] = {}
        self._owned: set[str] = set()
        """Inbox entries being retried or held here: a re-read of the inbox must leave them alone."""
        self._tasks: set[asyncio.Task[None]] = set()

    def blocked(self, sender: str) -> bool:
        """Whether ``sender`` has a message being retried (its later ones must wait)."""
        return sender in self._waiting

    def owns(self, eid: str) -> bool:
        """Whether inbox entry ``eid`` is being retried or held here (not to be dispatched again,
        nor acknowledged, when the reader reads the inbox's pending entries once more)."""
        return eid in self._owned

    def hold(self, sender: str, eid: str, fields: dict[str, str]) -> None:
        """Keep a message of a blocked sender until the one ahead of it is settled."""
        self._owned.add(eid)
        self._waiting[sender].append((eid, fields))

    @property
    def retrying(self) -> int:
        """Messages being retried now."""
        return len(self._tasks)

    def failed(self, eid: str, message: Message, failures: list[Failure]) -> None:
        """The first try of inbox entry ``eid`` left ``failures``: retry them (call under the lock)."""
        self._waiting.setdefault(message.sender, deque())
        self._owned.add(eid)
        task = asyncio.get_running_loop().create_task(self._retry(eid, message, failures),
                                                      name=f"retry-{message.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def delay(self, tries: int) -> float:
        """Seconds to wait before try ``tries + 1``."""
        return float(min(self.backoff * 2 ** (tries - 1), MAX_BACKOFF))

    async def _retry(self, eid: str, message: Message, failures: list[Failure]) -> None:
        tries = 1
        settled = False
        try:
            while failures and tries < self.max_deliveries:
                await asyncio.sleep(self.delay(tries))
                tries += 1
                async with self._lock:
                    still = []
                    for f in failures:
                        ok, result = await self._run(f.handler, message)
                        if not ok:
                            still.append(Failure(f.pattern, f.handler, str(result)))
                    failures = still
            for f in failures:
                self._log.warning("dead-lettering %s on %s: handler for %r failed %d times (%s)",
                                  message.id, message.topic, f.pattern, tries, f.error)
                await self._dead_letter(message, f, tries)
            settled = True
        except asyncio.CancelledError:
            self._owned.discard(eid)  # stopping: it stays pending for the next start, as does
            raise                     # everything held behind it (close() forgets them)
        except Exception:  # it stays owned, so unacknowledged, until the peer starts again
            self._log.exception("retrying %s failed; it stays in the inbox for the next start",
                                message.id)
        if settled:
            self._owned.discard(eid)
            await self._quietly(self._ack([eid]))
        async with self._lock:  # the sender's messages that waited go through, in order
            queue = self._waiting.pop(message.sender, deque())
            for e, _ in queue:
                self._owned.discard(e)
            done = [e for e, fields in queue if await self._redispatch(e, fields)]
        await self._quietly(self._ack(done))

    async def _quietly(self, ack: Awaitable[None]) -> None:
        """An acknowledgement that may fail: the entry is then read again, and dropped as a repeat."""
        try:
            await ack
        except Exception as exc:
            self._log.warning("could not acknowledge settled inbox entries (%s); they will be "
                              "read again and dropped as repeats", exc)

    async def close(self) -> None:
        """Stop retrying; what was not settled stays in the inbox for the next start."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._waiting.clear()
        self._owned.clear()
